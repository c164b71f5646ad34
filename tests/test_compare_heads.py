"""benchmarks/compare_heads.py refuses to reuse or resume a run made with other settings."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import yaml

from hsoftmax.training import load_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
compare_heads = pytest.importorskip("compare_heads")


def _recorded(tmp_path, name, args, *extra):
    run_dir = tmp_path / "runs" / f"{name}-seed0"
    run_dir.mkdir(parents=True)
    cfg = load_config(args.preset, [*compare_heads._fresh_sets(name, 0, args, run_dir), *extra])
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return run_dir, load_config(args.preset, compare_heads._fresh_sets(name, 0, args, run_dir))


def test_reuse_accepts_the_same_settings_and_refuses_others(tmp_path):
    args = types.SimpleNamespace(preset="diy", epochs=100, set=["train.lr=1e-3"])
    run_dir, expected = _recorded(tmp_path, "hs-binary", args, "train.num_threads=1")
    compare_heads._check_reused(run_dir, expected)  # "1e-3" and 0.001 are the same number
    other, expected = _recorded(tmp_path / "b", "dense", args, "model.d_model=64")
    with pytest.raises(SystemExit, match=r"model.d_model=64 \(wanted 112\)"):
        compare_heads._check_reused(other, expected)
    (other / "config.yaml").write_text("model: {bogus: 1}\n")
    with pytest.raises(SystemExit, match="no longer loads"):
        compare_heads._check_reused(other, expected)
