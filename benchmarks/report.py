"""Turn pytest-benchmark JSON into a Markdown table (median time and ratio to a baseline).

python benchmarks/report.py bench.json [--baseline dense] [--out docs/bench.md]
"""

from __future__ import annotations

import argparse
import json
import platform
from collections import defaultdict
from pathlib import Path


def load(path: Path) -> tuple[dict, list[dict]]:
    data = json.loads(path.read_text())
    return data.get("machine_info", {}), data["benchmarks"]


def table(benchmarks: list[dict], baseline: str) -> str:
    groups: dict[str, list[dict]] = defaultdict(list)
    for b in benchmarks:
        groups[b["group"] or b["name"]].append(b)
    lines = []
    for group, rows in groups.items():
        base = next((r for r in rows if r["extra_info"].get("provider") == baseline), None)
        base_median = base["stats"]["median"] if base else None
        lines += [
            f"**{group}**",
            "",
            f"| provider | median (ms) | IQR (ms) | rounds | {baseline} / provider |",
            "|---|---:|---:|---:|---:|",
        ]
        for r in sorted(rows, key=lambda r: r["stats"]["median"]):
            s = r["stats"]
            ratio = f"{base_median / s['median']:.1f}x" if base_median else "-"
            lines.append(
                f"| {r['extra_info'].get('provider', r['name'])} | "
                f"{s['median'] * 1e3:.3f} | {s['iqr'] * 1e3:.3f} | {s['rounds']} | "
                f"{ratio} |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", type=Path)
    parser.add_argument("--baseline", default="dense")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    machine, benchmarks = load(args.json)
    cpu = machine.get("cpu", {}).get("brand_raw", platform.processor())
    text = table(benchmarks, args.baseline)
    text += (
        f"\nMachine: {cpu}, {machine.get('python_implementation', '')} "
        f"{machine.get('python_version', '')}, threads per benchmark: "
        f"{benchmarks[0]['extra_info'].get('threads', '?') if benchmarks else '?'}\n"
    )
    if args.out:
        args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
