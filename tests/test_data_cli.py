"""The `hsoftmax data` command group."""

from __future__ import annotations

import pytest

from hsoftmax.cli import main


def test_synth_samples_baselines(tmp_path, capsys):
    out = tmp_path / "small"
    assert (
        main(
            [
                "data",
                "synth",
                "--preset",
                "small",
                "--seed",
                "0",
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    assert (out / "staypoints.csv").is_file() and (out / "locations.csv").is_file()
    assert "small seed 0" in capsys.readouterr().out
    s = tmp_path / "samples"
    sp, locs = str(out / "staypoints.csv"), str(out / "locations.csv")
    rc = main(["data", "samples", "--staypoints", sp, "--locations", locs, "--out", str(s)])
    assert rc == 0
    text = capsys.readouterr()
    assert "samples train/validation/test" in text.out
    assert (s / "train.pk").is_file() and (s / "meta.json").is_file()
    assert main(["data", "baselines", "--samples", str(s), "--only", "markov"]) == 0
    text = capsys.readouterr().out
    assert "markov" in text and "most_frequent" not in text


def test_baselines_on_preset(tmp_path, capsys):
    rc = main(
        ["data", "baselines", "--preset", "small", "--cache-dir", str(tmp_path), "--no-progress"]
    )
    assert rc == 0
    out = capsys.readouterr().out
    for name in ("most_frequent", "markov"):
        assert name in out


def test_bad_input_exit_code_and_message(tmp_path, capsys):
    p = tmp_path / "sp.csv"
    p.write_text("user_id,location_id,started_at\n1,2,2021-10-01 08:00\n")
    rc = main(["data", "samples", "--staypoints", str(p), "--out", str(tmp_path / "o")])
    assert rc == 1
    err = capsys.readouterr().err
    assert "error:" in err and "sp.csv" in err and "finished_at" in err


def test_help_without_subcommand(capsys):
    assert main(["data"]) == 2
    assert "synth" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["data", "synth"])  # --out is required
