"""The trainer end to end on the `small` preset: learning, exact resume, DDP, configs, CLI."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import hsoftmax
from hsoftmax.data import MobilityDataset, load_preset, run_baselines
from hsoftmax.models import ParameterBudgetError, build_model
from hsoftmax.training import (
    PACKAGED_CONFIGS,
    ConfigError,
    epoch_batches,
    evaluate_model,
    evaluate_run,
    load_config,
    packaged_config_path,
    train,
)

from conftest import QUIET, small_config

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_one_epoch_learns_and_beats_most_frequent(cache_dir, tmp_path):
    cfg = small_config(
        cache_dir, tmp_path, "train.epochs=1", "train.batch_size=32", "train.lr=0.005",
        "train.label_smoothing=0.0", "model.dropout=0.1",
    )  # fmt: skip
    data = load_preset("small", seed=0, cache_dir=cache_dir, progress=False)
    torch.manual_seed(cfg["train"]["seed"])
    untrained = build_model(cfg["model"], data)
    before = evaluate_model(untrained, MobilityDataset(data.validation), 512, "cpu")
    result = train(cfg, data=data, **QUIET)
    after = result.history[-1]["val_nll"]
    assert after < before["nll"] - 0.2, (before["nll"], after)
    baseline = run_baselines(data.train, data.test, data.n_locations, ("most_frequent",))
    assert result.test["acc@1"] > baseline["most_frequent"]["acc@1"], (result.test, baseline)
    run = result.run_dir
    expected = "config.yaml metrics.csv metrics.json test_metrics.json test_table.md per_user.csv"
    for name in expected.split() + ["curves.png", "ckpt.pt", "params.json"]:
        assert (run / name).is_file(), name
    assert not list(run.glob("*.tmp"))
    # `hsoftmax evaluate` reproduces the final test table from the checkpoint
    again = evaluate_run(run, **QUIET)
    for key in ("acc@1", "acc@5", "mrr", "ndcg@10", "f1"):
        assert again[key] == pytest.approx(result.test[key]), key


@pytest.mark.slow
def test_resume_after_interruption_is_exact(cache_dir, tmp_path):
    extra = ("train.max_steps_per_epoch=4", "train.batch_size=32", "model.dropout=0.3",
             "train.label_smoothing=0.05", "train.val_metrics=false")  # fmt: skip
    straight = train(small_config(cache_dir, tmp_path / "a", "train.epochs=2", *extra), **QUIET)
    first = train(small_config(cache_dir, tmp_path / "b", "train.epochs=1", *extra), **QUIET)
    resumed = train(resume=first.run_dir, overrides=["train.epochs=2"], **QUIET)
    assert resumed.run_dir == first.run_dir
    assert len(resumed.history) == 2
    for a, b in zip(straight.history, resumed.history, strict=True):
        for key in ("train_loss", "val_loss", "val_nll", "lr"):
            assert a[key] == b[key], (key, a[key], b[key])
    assert straight.test == resumed.test


@pytest.mark.slow
def test_ddp_two_processes_match_single_process(cache_dir, tmp_path):
    extra = ["train.epochs=1", "train.max_steps_per_epoch=3", "train.batch_size=64",
             "model.dropout=0.0", "train.val_metrics=false"]  # fmt: skip
    cfg = small_config(cache_dir, tmp_path / "single", *extra)
    single = train(cfg, **QUIET)
    run_dir = tmp_path / "ddp"
    config = tmp_path / "config.yaml"  # the same resolved config for the torchrun job
    config.write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # the child imports the same hsoftmax as this test (installed package or source tree)
    root = str(Path(hsoftmax.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", "-m", "hsoftmax", "train"]  # fmt: skip
    cmd += ["--config", str(config), "--set", f"output.run_dir={run_dir}"]
    proc = subprocess.Popen(
        cmd,
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group, so a hang can be killed whole
    )
    try:
        out, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and its workers: their own session
        out, _ = proc.communicate()
        pytest.fail("torchrun timed out:\n" + out[-3000:])
    assert proc.returncode == 0, out[-3000:]
    ddp = json.loads((run_dir / "metrics.json").read_text())
    for key in ("train_loss", "val_nll"):
        assert ddp[0][key] == pytest.approx(single.history[0][key], rel=1e-4, abs=1e-5), key


def test_budget_refusal(cache_dir, tmp_path):
    cfg = small_config(cache_dir, tmp_path, "train.param_budget=1000")
    with pytest.raises(ParameterBudgetError, match="over the budget of 1,000"):
        train(cfg, **QUIET)
    assert not list(tmp_path.iterdir())  # refused before any run directory was made


def test_config_overrides_and_unknown_keys():
    cfg = load_config("diy", ["model.d_model=64", "train.lr=3e-4", "model.tree_branching=[8, 4]"])
    assert cfg["model"]["d_model"] == 64
    assert cfg["train"]["lr"] == pytest.approx(3e-4)
    assert cfg["model"]["tree_branching"] == [8, 4]
    with pytest.raises(ConfigError, match="model.d_modle"):
        load_config("diy", ["model.d_modle=64"])
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(None, ["train.lr"])
    with pytest.raises(ConfigError, match="logit_add"):
        load_config(None, ["model.history=logit_add"])
    with pytest.raises(ConfigError, match="user_memory extends the pointer"):
        load_config(None, ["model.user_memory=8", "model.history=none"])
    with pytest.raises(ConfigError, match="user_memory_context counts the memory's visits"):
        load_config(None, ["model.user_memory_context=true"])


@pytest.mark.parametrize("name", PACKAGED_CONFIGS)
def test_packaged_configs_are_valid(name):
    assert packaged_config_path(name).is_file()
    assert load_config(name)["name"] == name


def test_cli_reports_bad_key(capsys):
    from hsoftmax.cli import main

    assert main(["train", "--set", "model.bogus=1"]) == 1
    assert "model.bogus" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["mhsa", "staypoints"])
def test_train_from_a_data_directory(cache_dir, tmp_path, kind):
    """``--data DIR``: MHSA pickles (as `hsoftmax data samples` writes them) or staypoints.csv."""
    from hsoftmax.data.synthetic import synthesize_to_dir

    data_dir = tmp_path / "data"
    if kind == "mhsa":
        load_preset("small", seed=0, cache_dir=cache_dir, progress=False).write_mhsa(data_dir)
    else:
        synthesize_to_dir("small", 0, data_dir, progress=False)
    cfg = small_config(
        cache_dir, tmp_path / "runs", f"data.path={data_dir}", "train.epochs=1",
        "train.max_steps_per_epoch=2", "train.val_metrics=false",
    )  # fmt: skip
    result = train(cfg, **QUIET)
    assert result.test["n"] == len(load_preset("small", seed=0, cache_dir=cache_dir).test)


@pytest.mark.parametrize(
    "override,message",
    [
        ("train.lr=abc", r"'abc' of type 'str' could not be converted to Float \(key 'train.lr'\)"),
        ("train.lr=0", "train.lr must be a positive number"),
        ("train.batch_size=true", r"could not be converted to Integer \(key 'train.batch_size'\)"),
        ("data.max_len=0", "data.max_len must be a positive int or null"),
        ("model.dropout=1.5", r"model.dropout must be in \[0, 1\)"),
        ("model.tree_branching=[8, 1]", "model.tree_branching must be an int >= 2"),
        ("train.lr_factor=2", r"train.lr_factor must be in \(0, 1\)"),
        ("train.progress=maybe", r"'maybe' is not a valid bool .*\(key 'train.progress'\)"),
        ("train.num_threads=-1", "train.num_threads must be a positive int or null"),
        ("model.user_memory=-1", r"model.user_memory must be an int >= 0"),
        ("model.position_loss=-0.5", r"model.position_loss must be a finite number >= 0"),
        ("model.position_loss=inf", r"model.position_loss must be a finite number >= 0"),
    ],
)
def test_config_values_are_type_and_range_checked(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("demo", [override])


def test_text_keys_keep_the_override_text():
    cfg = load_config(None, ["name=off", "output.dir=2024", "train.device=cpu", "data.path=1e5"])
    assert cfg["name"] == "off" and cfg["output"]["dir"] == "2024"
    assert cfg["data"]["path"] == "1e5"
    assert load_config(None, ["data.path=null"])["data"]["path"] is None


def test_resume_keeps_the_config_and_a_finished_run_dir_is_not_reused(cache_dir, tmp_path):
    extra = ("train.epochs=1", "train.max_steps_per_epoch=2", "train.val_metrics=false",
             f"output.run_dir={tmp_path / 'run'}")  # fmt: skip
    cfg = small_config(cache_dir, tmp_path, *extra)
    run = train(cfg, **QUIET)
    with pytest.raises(ConfigError, match=r"cannot change model.d_model \(32 -> 16\), train.lr"):
        train(resume=run.run_dir, overrides=["model.d_model=16", "train.lr=0.5"], **QUIET)
    with pytest.raises(ValueError, match="already holds a run .*test_metrics.json"):
        train(small_config(cache_dir, tmp_path, *extra, "train.seed=3"), **QUIET)
    from hsoftmax.cli import main

    assert main(["train", "--resume", str(run.run_dir), "--config", "demo"]) == 1
    assert main(["train", "--resume", str(tmp_path / "nothing-here")]) == 1
    # resuming a finished run with more epochs is allowed (and repeats of recorded values)
    again = train(resume=run.run_dir, overrides=["train.epochs=2", "name=test"], **QUIET)
    assert len(again.history) == 2


def test_mhsa_directory_format_errors(cache_dir, tmp_path):
    import pandas as pd

    from hsoftmax.data import DataFormatError
    from hsoftmax.training import load_data

    data = load_preset("small", seed=0, cache_dir=cache_dir, progress=False)
    d = tmp_path / "mhsa"
    data.write_mhsa(d)
    cfg = load_config(None, [f"data.path={d}"])["data"]
    assert load_data(cfg, progress=False).n_locations == data.n_locations
    meta = json.loads((d / "meta.json").read_text())
    (d / "meta.json").write_text(json.dumps({"n_users": 3}))
    with pytest.raises(DataFormatError, match="needs an integer n_locations"):
        load_data(cfg, progress=False)
    (d / "meta.json").write_text(json.dumps(meta))
    vocab = pd.read_csv(d / "vocab_locations.csv")
    vocab.drop(columns=["loc"]).to_csv(d / "vocab_locations.csv", index=False)
    with pytest.raises(DataFormatError, match=r"missing column\(s\) \['loc'\]"):
        load_data(cfg, progress=False)
    vocab.assign(loc=vocab["loc"] + data.n_locations).to_csv(d / "vocab_locations.csv", index=False)
    with pytest.raises(DataFormatError, match="is not a location id in"):
        load_data(cfg, progress=False)


def test_data_cli_reports_bad_arguments(tmp_path, capsys):
    from hsoftmax.cli import main
    from hsoftmax.data.synthetic import synthesize_to_dir

    synthesize_to_dir("small", 0, tmp_path / "sp", progress=False)
    sp = str(tmp_path / "sp" / "staypoints.csv")
    out = str(tmp_path / "o")
    assert (
        main(["data", "samples", "--staypoints", sp, "--out", out, "--split", "0.5", "0.3", "0.3"])
        == 1
    )
    assert "error:" in capsys.readouterr().err
    assert main(["data", "samples", "--staypoints", sp, "--out", out, "--tz", "Mars/Olympus"]) == 1
    assert "Mars/Olympus" in capsys.readouterr().err


def test_atomic_writes_keep_the_old_file_on_failure(tmp_path):
    from hsoftmax.training.checkpoint import atomic_save, atomic_write_text, load_checkpoint

    path = tmp_path / "ckpt.pt"
    atomic_save({"epoch": 1, "model": {}}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("cannot pickle this")

    with pytest.raises(RuntimeError, match="cannot pickle"):
        atomic_save({"epoch": 2, "bad": Unpicklable()}, path)
    assert load_checkpoint(path) == {"epoch": 1, "model": {}}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]  # no .tmp left behind
    atomic_write_text(tmp_path / "a.json", "{}\n")
    assert (tmp_path / "a.json").read_text() == "{}\n"


def test_node_smoothing_config():
    with pytest.raises(ConfigError, match="set model.user_memory=0 for history 'none'"):
        load_config("diy", ["model.history=none"])  # diy has the user memory
    no_memory = ["model.user_memory=0", "model.user_memory_context=false"]
    cfg = load_config("diy", [*no_memory, "model.history=none", "model.smoothing=nodes"])
    assert cfg["model"]["smoothing"] == "nodes"
    assert load_config("diy", ["model.smoothing=nodes"])["model"]["history"] == "mixture"
    with pytest.raises(ConfigError, match="model.smoothing 'nodes' .* needs model.history 'none'"):
        load_config(
            "diy",
            [*no_memory, "model.head=dense", "model.history=logit_add", "model.smoothing=nodes"],
        )
    with pytest.raises(ConfigError, match="model.smoothing must be 'leaves' or 'nodes'"):
        load_config("diy", [*no_memory, "model.history=none", "model.smoothing=edges"])


def test_epoch_batches_without_bucketing_are_slices_of_one_permutation():
    batches = epoch_batches(10, 4, seed=3, epoch=2)
    g = torch.Generator().manual_seed(3 * 1_000_003 + 2)
    perm = torch.randperm(10, generator=g).tolist()
    assert batches == [perm[0:4], perm[4:8], perm[8:10]]


def test_length_bucketing_partitions_the_epoch_and_cuts_padding():
    g = torch.Generator().manual_seed(0)
    n, batch = 1000, 32
    lengths = torch.randint(1, 40, (n,), generator=g).numpy()

    def padded(batches):  # positions the encoder computes: each batch padded to its longest
        return sum(int(lengths[b].max()) * len(b) for b in batches)

    plain = epoch_batches(n, batch, 5, 1)
    bucketed = epoch_batches(n, batch, 5, 1, lengths=lengths, bucket=8)
    # every sample once, in batches of the same sizes
    assert sorted(sum(bucketed, [])) == list(range(n))
    assert sorted(map(len, bucketed)) == sorted(map(len, plain))
    assert bucketed == epoch_batches(n, batch, 5, 1, lengths=lengths, bucket=8)
    assert bucketed != epoch_batches(n, batch, 5, 2, lengths=lengths, bucket=8)
    # a batch holds histories of about one length: far less padding than random batches
    assert padded(bucketed) < 0.6 * padded(plain)
    assert padded(bucketed) < 1.2 * int(lengths.sum())
    # with 2 ranks, their batches together are the single-process batches
    ranks = [epoch_batches(n, batch, 5, 1, r, 2, lengths=lengths, bucket=8) for r in (0, 1)]
    assert [sorted(a + b) for a, b in zip(*ranks, strict=True)] == [sorted(b) for b in bucketed]


def test_length_bucketing_needs_one_length_per_sample():
    with pytest.raises(ValueError, match="needs the samples' lengths"):
        epoch_batches(10, 4, 0, 0, bucket=2)
    with pytest.raises(ValueError, match=r"lengths must have shape \(10,\)"):
        epoch_batches(10, 4, 0, 0, lengths=[3] * 9, bucket=2)


def test_training_with_length_bucketing(cache_dir, tmp_path):
    cfg = small_config(
        cache_dir, tmp_path, "train.epochs=1", "train.max_steps_per_epoch=3",
        "train.batch_size=32", "train.bucket_batches=4", "train.val_metrics=false",
    )  # fmt: skip
    result = train(cfg, **QUIET)
    assert math.isfinite(result.history[0]["train_loss"])
    with pytest.raises(ConfigError, match="train.bucket_batches must be an int >= 0"):
        load_config("demo", ["train.bucket_batches=-1"])


def test_a_run_recorded_before_length_bucketing_resumes_without_it(cache_dir, tmp_path):
    from hsoftmax.training.loop import _start

    cfg = small_config(cache_dir, tmp_path, "train.epochs=1", "train.max_steps_per_epoch=1",
                       "train.val_metrics=false")  # fmt: skip
    run = train(cfg, **QUIET).run_dir
    assert _start(None, run, ["train.epochs=2"])[0]["train"]["bucket_batches"] == 32
    recorded = yaml.safe_load((run / "config.yaml").read_text())
    del recorded["train"]["bucket_batches"]  # as the runs written before the key existed
    (run / "config.yaml").write_text(yaml.safe_dump(recorded))
    assert _start(None, run, ["train.epochs=2"])[0]["train"]["bucket_batches"] == 0


def test_tree_frequent_lifts_the_most_frequent_targets_to_the_root(cache_dir, tmp_path):
    data = load_preset("small", seed=0, cache_dir=cache_dir)
    cfg = small_config(cache_dir, tmp_path, "model.tree_frequent=5")
    tree = build_model(cfg["model"], data).head.tree
    counts = np.bincount(np.asarray(data.train.y), minlength=data.n_locations)
    top = np.argsort(-counts, kind="stable")[:5]
    parents = np.asarray(tree.parents)
    assert (parents[top] == np.flatnonzero(parents == -1)[0]).all()
    plain = build_model({**cfg["model"], "tree_frequent": 0}, data).head.tree
    assert (np.asarray(plain.parents)[top] != np.flatnonzero(parents == -1)[0]).any()
    with pytest.raises(ConfigError, match="model.tree_frequent must be an int >= 0"):
        load_config("demo", ["model.tree_frequent=-1"])
