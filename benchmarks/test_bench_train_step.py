"""One training step of the next-location model, for every head configuration of the comparison.

Run: ``PYTHONPATH=. pytest benchmarks/test_bench_train_step.py --benchmark-only`` (about 2 min).

Setting: the ``diy`` preset (15,602 classes) and the seed's model (``configs/diy.yaml``: d_model
112, 4 layers, batch 256, label smoothing 0.05), with each configuration of
``experiments/compare_heads.py`` (dense / tree heads, with and without history). A step is
exactly the trainer's (:func:`hsoftmax.training.train_step`: collate, forward, backward, gradient
clipping, AdamW), on the first training batches of epoch 1, cycled. ``extra_info`` holds the
steps per epoch, so ``median x steps`` is the training time of one epoch on a quiet machine -
the ``s/epoch`` column of the comparison comes from runs that shared the cores.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from compare_heads import CONFIGS

from hsoftmax.data import MobilityDataset
from hsoftmax.models import build_model, parameter_report
from hsoftmax.training import epoch_batches, load_config, load_data, make_optimizer, train_step

PRESET = "diy"
BATCHES = 6
QUICK = ("dense", "hs-binary")  # the --quick subset


@pytest.fixture(scope="module")
def preset_data():
    cfg = load_config(PRESET)
    return load_data(cfg["data"], progress=False)


@pytest.mark.benchmark(group="train-step")
@pytest.mark.parametrize(
    "config",
    [pytest.param(c, marks=[pytest.mark.quick] if c in QUICK else []) for c in CONFIGS],
)
def test_train_step(benchmark, preset_data, config):
    cfg = load_config(PRESET, CONFIGS[config])
    tcfg = cfg["train"]
    torch.manual_seed(0)
    model = build_model(cfg["model"], preset_data)
    model.train()
    optimizer = make_optimizer(model, tcfg)
    dataset = MobilityDataset(preset_data.train, max_len=cfg["data"]["max_len"])
    batches = epoch_batches(len(dataset), tcfg["batch_size"], tcfg["seed"], 0)[:BATCHES]
    order = itertools.cycle(batches)
    device = torch.device("cpu")

    def step():
        return train_step(model, model, optimizer, dataset, next(order), device, tcfg)

    loss = benchmark.pedantic(step, rounds=2 * BATCHES, iterations=1, warmup_rounds=2)
    steps = math.ceil(len(dataset) / tcfg["batch_size"])
    benchmark.extra_info.update(
        steps_per_epoch=steps,
        parameters=parameter_report(model)["total"],
        label_smoothing=tcfg["label_smoothing"],
    )
    assert torch.isfinite(loss)
