"""Turn pytest-benchmark JSON into Markdown tables and a log-log plot.

    python benchmarks/report.py bench.json [--baseline dense] [--out docs/benchmarks.md]
                                           [--plot docs/benchmarks.png]

Output-layer results (test_bench_suite.py) become one table per (device, mode, D, B): median
milliseconds per provider and vocabulary size, the ratio to the baseline, and peak memory. Other
benchmark groups (head inference, trees) are listed per group with their medians.
"""

from __future__ import annotations

import argparse
import json
import platform
from collections import defaultdict
from pathlib import Path


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f}" if seconds < 1 else f"{seconds * 1e3:,.0f}"


def suite_tables(rows: list[dict], baseline: str) -> list[str]:
    """Rows carrying extra_info V/D/B/provider/mode/device: provider x V tables."""
    by_setting: dict[tuple, dict[tuple, dict]] = defaultdict(dict)
    for r in rows:
        e = r["extra_info"]
        by_setting[(e["device"], e["mode"], e["D"], e["B"])][(e["provider"], e["V"])] = r
    out = []
    for (device, mode, d, b), cells in sorted(by_setting.items()):
        vocab = sorted({v for _, v in cells})
        providers = sorted({p for p, _ in cells}, key=lambda p: (p != baseline, p))
        out += [f"**{device}, {mode}, D={d}, B={b}**: median ms ({baseline} / provider)", ""]
        out.append("| provider | " + " | ".join(f"V={v:,}" for v in vocab) + " |")
        out.append("|---|" + "---:|" * len(vocab))
        for p in providers:
            line = [p]
            for v in vocab:
                r = cells.get((p, v))
                if r is None:
                    line.append("skipped")
                    continue
                med = r["stats"]["median"]
                base = cells.get((baseline, v))
                ratio = f" ({base['stats']['median'] / med:.1f}x)" if base and p != baseline else ""
                line.append(_ms(med) + ratio)
            out.append("| " + " | ".join(line) + " |")
        if mode == "fwd+bwd":
            out.append(
                "| peak memory (MB) | "
                + " | ".join(
                    ", ".join(
                        f"{p}: {cells[(p, v)]['extra_info'].get('peak_mem_mb') or 0:.0f}"
                        for p in providers
                        if (p, v) in cells
                    )
                    for v in vocab
                )
                + " |"
            )
        out.append("")
    return out


def other_tables(rows: list[dict], baseline: str) -> list[str]:
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        groups[r["group"] or r["name"]].append(r)
    out = []
    for group, members in groups.items():
        base = next((r for r in members if r["extra_info"].get("provider") == baseline), None)
        out += [
            f"**{group}**",
            "",
            f"| benchmark | median (ms) | rounds | {baseline} / it |",
            "|---|---:|---:|---:|",
        ]
        for r in sorted(members, key=lambda r: r["stats"]["median"]):
            s = r["stats"]
            ratio = f"{base['stats']['median'] / s['median']:.1f}x" if base else "-"
            name = r["extra_info"].get("provider", r["name"])
            out.append(f"| {name} | {_ms(s['median'])} | {s['rounds']} | {ratio} |")
        out.append("")
    return out


def plot(rows: list[dict], path: Path, mode="fwd+bwd", d=112, b=1024) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines: dict[tuple, list[tuple[int, float]]] = defaultdict(list)
    for r in rows:
        e = r["extra_info"]
        if e.get("mode") == mode and e.get("D") == d and e.get("B") == b:
            lines[(e["provider"], e["device"])].append((e["V"], r["stats"]["median"] * 1e3))
    if not lines:
        return False
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for (provider, device), pts in sorted(lines.items()):
        pts.sort()
        ax.plot(
            [p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{provider} ({device})"
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("vocabulary size V")
    ax.set_ylabel("median time per step (ms)")
    ax.set_title(f"output layer {mode}, D={d}, B={b}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", type=Path, nargs="+")
    parser.add_argument("--baseline", default="dense")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args(argv)
    rows, machine = [], {}
    for path in args.json:
        data = json.loads(path.read_text())
        machine = data.get("machine_info", machine)
        rows += data["benchmarks"]
    suite = [r for r in rows if {"V", "D", "B", "mode", "device"} <= r["extra_info"].keys()]
    rest = [r for r in rows if r not in suite]
    text = suite_tables(suite, args.baseline) + other_tables(rest, args.baseline)
    cpu = machine.get("cpu", {}).get("brand_raw", platform.processor())
    threads = sorted({r["extra_info"].get("threads") for r in rows} - {None})
    text.append(
        f"Machine: {cpu}, {machine.get('cpu', {}).get('count', '?')} CPUs, "
        f"CPython {machine.get('python_version', '?')}, torch threads {threads}."
    )
    if args.plot and plot(suite, args.plot):
        text.append(f"\n![time vs V]({args.plot.name})")
    report = "\n".join(text) + "\n"
    if args.out:
        args.out.write_text(report)
    print(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
