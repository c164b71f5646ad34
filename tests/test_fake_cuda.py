"""The model on a CUDA device, traced without one: every tensor on a fake ``cuda`` device.

``FakeTensorMode`` runs each op's fake (meta) kernel, so a tensor created on the wrong device
fails the op that mixes it with a ``cuda`` one, and every host synchronisation (``.item()``,
``int(t)``, ``bool(t)``, ``.tolist()``, data-dependent shapes such as ``nonzero``) shows up as the
op it needs: ``aten._local_scalar_dense`` or an op with a data-dependent output shape. A dispatch
mode below records those with the line of hsoftmax that asked for them and, for
``_local_scalar_dense``, answers 0 so the trace goes on. The test asserts the forward, loss and
evaluation (top-k, rank) of the seed model run on ``cuda`` throughout, that every host sync is
one listed in ``KNOWN_SYNCS`` (with why it is there), and that every hsoftmax op they call on
``cuda`` has a CUDA kernel (a fake kernel alone would pass the trace).

Needs the CUDA build of torch (the CPU build aborts on any fake ``cuda`` op); no GPU. The autograd
engine needs a real device for ``backward()``, so the backward is traced by calling the op's
registered backward directly. CI runs this in the step that installs the CUDA build.
"""

from __future__ import annotations

import traceback
from types import SimpleNamespace

import pytest
import torch
from test_model import TINY, fake_batch, fake_data
from torch.utils._python_dispatch import TorchDispatchMode

pytestmark = pytest.mark.skipif(
    torch.version.cuda is None, reason="needs the CUDA build of torch (no GPU needed)"
)

B = 9  # fake_batch's batch size

# The host syncs the traced calls make: (file, function) -> why. A sync outside this list fails the
# test; each is one device-to-host round trip per call on a GPU.
KNOWN_SYNCS = {
    ("hsoftmax/models/layers.py", "encode_packed"): (
        "nonzero of the padding mask to pack the valid positions before the encoder layers: the "
        "packed size is data. Once per encoder call; running the padded batch unpacked avoids it"
    ),
    ("hsoftmax/models/history.py", "_check_window"): (
        "bool(bad.any()) validating the window's location ids before they index a table"
    ),
    ("hsoftmax/nn/base.py", "_check_target"): (
        "bool(bad.any()) validating the targets' range in the head, to raise IndexError"
    ),
    ("hsoftmax/models/history.py", "topk"): (
        "int(window.num_distinct.max()): the head's top-(k + m) search is sized by the window"
    ),
    ("hsoftmax/models/history.py", "rank"): (
        "bool(out_w.any()) and bool(in_w.any()): which of the two rank corrections to run"
    ),
    ("hsoftmax/nn/base.py", "_nan_to_neg_inf"): (
        "bool(scores.isnan().any()) to skip a torch.where; the where alone needs no sync"
    ),
    ("hsoftmax/nn/base.py", "topk_by_id"): (
        "bool(ambiguous.any()): only rows with ties across the k-th place take the exact path"
    ),
    ("hsoftmax/ops.py", "_check_args"): (
        "torch.aminmax(target) read into two Python ints, to raise IndexError for an out-of-range "
        "target; the CUDA kernel writes NaN for one and never reads out of bounds, so on CUDA the "
        "check (and the head's) could go"
    ),
}


class SyncRecorder(TorchDispatchMode):
    """Records every op that needs the host to read device data, with the hsoftmax frame that
    asked for it; answers a scalar read with 0 and ``nonzero`` with every index, so the trace can
    go on."""

    def __init__(self):
        super().__init__()
        self.syncs: list[tuple[str, str, str]] = []
        self.missing_kernels: list[str] = []

    def _caller(self) -> tuple[str, str]:
        for frame in reversed(traceback.extract_stack()):
            path = frame.filename.replace("\\", "/")
            if "/hsoftmax/" in path and "/tests/" not in path and not frame.name.startswith("<"):
                return path[path.rindex("hsoftmax/") :], frame.name
        return "?", "?"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        # a fake kernel runs any op on any device: a GPU needs a real CUDA kernel too
        on_cuda = any(isinstance(a, torch.Tensor) and a.device.type == "cuda" for a in args)
        if func.namespace == "hsoftmax" and on_cuda:
            if not torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), "CUDA"):
                self.missing_kernels.append(func.name())
        if func is torch.ops.aten._local_scalar_dense.default:
            self.syncs.append((*self._caller(), str(func)))
            return 0 if not args[0].dtype.is_floating_point else 0.0
        if _data_dependent_shape(func, args) or _is_cuda_to_cpu(func, args, kwargs):
            self.syncs.append((*self._caller(), str(func)))
        if func is torch.ops.aten.nonzero.default:
            # the size is data: take every element as nonzero, as for an all-True mask
            (x,) = args
            return torch.empty((x.numel(), x.dim()), dtype=torch.long, device=x.device)
        return func(*args, **kwargs)


def _unexplained(syncs) -> list[tuple[str, str, str]]:
    known = {(suffix, fn) for suffix, fn in KNOWN_SYNCS}
    return [s for s in syncs if (s[0], s[1]) not in known]


def _data_dependent_shape(func, args) -> bool:
    """An op whose output size depends on tensor data (a sync on a GPU). Indexing is only one with
    a boolean mask among its indices."""
    if torch.Tag.dynamic_output_shape not in func.tags:
        return False
    if func is torch.ops.aten.index.Tensor:
        return any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in args[1])
    return True


def _is_cuda_to_cpu(func, args, kwargs) -> bool:
    """A copy from the device to the host (``.cpu()``, ``.to("cpu")``): a sync on a GPU."""
    if func not in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default):
        return False
    src = args[1] if func is torch.ops.aten.copy_.default else args[0]
    dst = args[0].device if func is torch.ops.aten.copy_.default else kwargs.get("device")
    return (
        isinstance(src, torch.Tensor)
        and src.device.type == "cuda"
        and dst is not None
        and torch.device(dst).type == "cpu"
    )


@pytest.fixture(scope="module")
def fake():
    """The seed model (hierarchical head, k-means tree, history mixture) and a batch, moved to a
    fake ``cuda`` device; the FakeTensorMode they live in."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from hsoftmax.models import build_model

    torch.manual_seed(0)
    cfg = {**TINY, "dropout": 0.1, "head": "hsoftmax", "tree": "kmeans", "history": "mixture"}
    cfg["tree_branching"] = 4
    model = build_model(cfg, fake_data())
    batch = fake_batch(b=B)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode:
        model = model.to("cuda")
        batch = {k: v.to("cuda") for k, v in batch.items()}
    return SimpleNamespace(mode=mode, model=model, batch=batch)


@pytest.fixture(autouse=True)
def _real_numpy(monkeypatch):
    """``Tensor.numpy()`` runs ops (detach, resolve_conj) that FakeTensorMode would turn into fake
    tensors; the tree's CPU tables are real, so read them with the fake mode suspended."""
    from torch._subclasses.fake_tensor import FakeTensor, unset_fake_temporarily

    numpy = torch.Tensor.numpy

    def real_numpy(self, *args, **kwargs):
        assert not isinstance(self, FakeTensor), "numpy() of a device tensor: a host sync"
        with unset_fake_temporarily():
            return numpy(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "numpy", real_numpy)


def _report(syncs) -> None:
    for path, fn, op in syncs:
        print(f"host sync: {op} from {path}:{fn}")


def test_forward_and_loss_stay_on_cuda(fake):
    fake.model.train()
    with fake.mode, SyncRecorder() as rec:
        loss = fake.model(fake.batch, label_smoothing=0.05)
        log_prob = fake.model.log_prob(fake.batch)
    _report(rec.syncs)
    assert loss.device.type == "cuda" and loss.shape == ()
    assert log_prob.device.type == "cuda" and log_prob.shape == (B,)
    assert loss.requires_grad
    assert _unexplained(rec.syncs) == []
    assert rec.missing_kernels == []


def test_evaluation_stays_on_cuda(fake):
    fake.model.eval()
    with fake.mode, SyncRecorder() as rec:
        loss, nll, top, ranks = fake.model.evaluate_batch(fake.batch, k=5)
    _report(rec.syncs)
    for t in (loss, nll, top, ranks):
        assert t.device.type == "cuda"
    assert top.shape == (B, 5) and ranks.shape == (B,)
    assert _unexplained(rec.syncs) == []
    assert rec.missing_kernels == []


def test_backward_op_on_cuda(fake):
    """The autograd engine needs a real device, so the op's backward is called directly."""
    tree = fake.model.head.tree
    with fake.mode, SyncRecorder() as rec:
        hidden = torch.randn(B, 16, device="cuda")
        weight = torch.randn(tree.num_leaves - 1, 16, device="cuda")
        target = torch.randint(0, tree.num_leaves, (B,), device="cuda")
        compiled = tree.compiled(hidden.device)
        arrays = (compiled.node_row_ptr, compiled.leaf_path_ptr, compiled.path_node)
        arrays += (compiled.path_choice,)
        lp, coef, _ = torch.ops.hsoftmax.path_log_prob_forward(
            hidden, weight, None, *arrays, target, tree.max_path_rows
        )
        grads = torch.ops.hsoftmax.path_log_prob_backward(
            torch.ones_like(lp), coef, hidden, weight, *arrays, target, False, [True, True, False]
        )
    assert grads[0].shape == hidden.shape and grads[0].device.type == "cuda"
    assert grads[1].shape == weight.shape and grads[1].device.type == "cuda"
    assert rec.syncs == [] and rec.missing_kernels == []


def test_the_trace_catches_wrong_devices_syncs_and_missing_kernels(fake):
    """What this file looks for is seen: a CPU tensor mixed into a cuda op, a read of a device
    value on the host, an hsoftmax op without a CUDA kernel."""
    with fake.mode:
        with pytest.raises(RuntimeError, match="cuda|cpu|device"):
            torch.ones(3, device="cuda") + torch.ones(3, device="cpu")
        with SyncRecorder() as rec:
            int(torch.ones(2, device="cuda").sum())
            torch.ones(2, device="cuda").cpu()
        with SyncRecorder() as cpu_only:  # dropout_mask has a CPU kernel and a fake one only
            torch.ops.hsoftmax.dropout_mask(torch.empty(3, device="cuda"), 0.5, 0)
    ops = [op for _, _, op in rec.syncs]
    assert ops == ["aten._local_scalar_dense.default", "aten._to_copy.default"]
    assert cpu_only.missing_kernels == ["hsoftmax::dropout_mask"]
