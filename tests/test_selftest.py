"""The GPU kit's self-test runs its CPU checks anywhere and says plainly when no GPU exists."""

from __future__ import annotations

import pytest
import torch

from hsoftmax import selftest


def test_cpu_selftest_passes(capsys):
    assert selftest.main(["--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "self-test: PASSED" in out and "FAIL" not in out.replace("FAILED", "")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_cuda_selftest_without_gpu_says_so(capsys):
    assert selftest.main(["--device", "cuda"]) == 1
    assert "no GPU found" in capsys.readouterr().out


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_selftest_parity(capsys):
    assert selftest.main(["--device", "cuda"]) == 0
