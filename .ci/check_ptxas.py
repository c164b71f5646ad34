"""Check a CUDA build log: every csrc/cuda/*.cu compiled for each requested arch, no spills.

    python .ci/check_ptxas.py build-cuda.log --arch sm_80 --arch sm_90
Prints the register / spill figures of every kernel and exits 1 on a missing arch or a spill.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ENTRY = re.compile(r"Compiling entry function '(\S+)' for '(sm_\d+)'")
SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
REGS = re.compile(r"Used (\d+) registers")


def parse(log: str):
    """(kernel, arch, registers, spill_stores, spill_loads) per compiled entry function."""
    rows, current = [], None
    for line in log.splitlines():
        if m := ENTRY.search(line):
            current = [m.group(1), m.group(2), None, None, None]
        elif current and (m := SPILL.search(line)):
            current[3], current[4] = int(m.group(1)), int(m.group(2))
        elif current and (m := REGS.search(line)):
            current[2] = int(m.group(1))
            rows.append(tuple(current))
            current = None
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("log", type=Path)
    parser.add_argument("--arch", action="append", required=True)
    parser.add_argument("--sources", default="csrc/cuda")
    args = parser.parse_args(argv)
    rows = parse(args.log.read_text(errors="replace"))
    ok = True
    for src in sorted(Path(args.sources).glob("*.cu")):
        tag = src.name.replace(".", "_")  # nvcc puts e.g. path_log_prob_cuda_cu in the names
        for arch in args.arch:
            mine = [r for r in rows if tag in r[0] and r[1] == arch]
            print(f"{src.name} {arch}: {len(mine)} kernels")
            if not mine:
                print(f"  MISSING: no kernel of {src.name} compiled for {arch}")
                ok = False
    for name, arch, regs, stores, loads in rows:
        short = re.sub(r"_GLOBAL__N__\w+?_\d+", "", name)[:90]
        flag = "" if (stores, loads) == (0, 0) else "   <-- SPILLS"
        print(f"  {arch} regs={regs:3d} spill_st={stores} spill_ld={loads} {short}{flag}")
        ok &= (stores, loads) == (0, 0)
    if not rows:
        print("no ptxas output found: was the build verbose (PTXAS_VERBOSE=1, pip -v)?")
        ok = False
    print("ptxas check:", "OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
