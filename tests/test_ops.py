"""path_log_prob against the plain-PyTorch references: values, gradients, registration, errors."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hsoftmax
from hsoftmax import Tree, reference
from hsoftmax.ops import path_log_prob

from conftest import assert_close_to_reference, device_params, random_tree, two_level_tree

TREES = {
    "V1": lambda: Tree.balanced(1),
    "V2": lambda: Tree.balanced(2),
    "V3-binary": lambda: Tree.balanced(3, 2),
    "V7-ternary": lambda: Tree.balanced(7, 3),
    "V1000-binary": lambda: Tree.balanced(1000, 2),
    "V1000-random": lambda: random_tree(1000, seed=7, max_children=6),
    "V15584-binary": lambda: Tree.balanced(15584, 2),
    "V15584-128x2": lambda: two_level_tree(15584, 128),
    "V15584-balanced128": lambda: Tree.balanced(15584, 128),
}
_TREE_CACHE: dict[str, Tree] = {}


def get_tree(name: str) -> Tree:
    if name not in _TREE_CACHE:
        _TREE_CACHE[name] = TREES[name]()
    return _TREE_CACHE[name]


def make_inputs(tree, batch, dim, dtype, device, seed=0, bias=True, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    v = tree.num_leaves
    hidden = torch.randn(batch, dim, generator=g, dtype=torch.float64) * scale
    weight = torch.randn(v - 1, dim, generator=g, dtype=torch.float64) / dim**0.5
    b = torch.randn(v - 1, generator=g, dtype=torch.float64) if bias else None
    target = torch.randint(0, v, (batch,), generator=g)

    def cast(t):
        return None if t is None else t.to(device=device, dtype=dtype).requires_grad_()

    return cast(hidden), cast(weight), cast(b), target.to(device)


def grads_of(fn, hidden, weight, bias, tree, target, seed=1):
    out = fn(hidden, weight, bias, tree, target)
    g = torch.Generator().manual_seed(seed)
    upstream = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out)
    params = [t for t in (hidden, weight, bias) if t is not None]
    return out, torch.autograd.grad(out, params, upstream, allow_unused=True)


def leaf_reference(hidden, weight, bias, tree, target):
    return reference.log_prob_all(hidden, weight, bias, tree).gather(1, target[:, None])[:, 0]


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("tree_name", list(TREES))
def test_matches_reference(tree_name, dtype, device):
    tree = get_tree(tree_name)
    # awkward sizes on purpose: D not a multiple of any SIMD width, B not of any block size
    hidden, weight, bias, target = make_inputs(tree, batch=37, dim=45, dtype=dtype, device=device)
    out, grads = grads_of(path_log_prob, hidden, weight, bias, tree, target)
    h64, w64, b64 = (t.detach().double().requires_grad_() for t in (hidden, weight, bias))
    ref64, grads64 = grads_of(leaf_reference, h64, w64, b64, tree, target)
    h, w, b = (t.detach().clone().requires_grad_() for t in (hidden, weight, bias))
    ref, grads_same = grads_of(leaf_reference, h, w, b, tree, target)
    assert out.dtype == dtype and out.shape == (37,)
    assert_close_to_reference(out.detach(), ref64.detach(), ref.detach(), "log_prob")
    for name, gk, g64, gs in zip(
        ["hidden", "weight", "bias"], grads, grads64, grads_same, strict=True
    ):
        if tree.num_leaves == 1 and name != "hidden":
            continue
        if gk is None:
            assert tree.num_leaves == 1, f"missing grad for {name}"
            continue
        assert_close_to_reference(gk, g64, gs, f"grad_{name}")


@pytest.mark.parametrize("tree_name", ["V7-ternary", "V1000-random", "V15584-128x2"])
def test_gather_reference_agrees(tree_name):
    """The two references (all-leaves and path-gather) agree, so either is a fair oracle."""
    tree = get_tree(tree_name)
    hidden, weight, bias, target = make_inputs(tree, 29, 16, torch.float64, "cpu")
    a = leaf_reference(hidden, weight, bias, tree, target)
    b = reference.path_log_prob(hidden, weight, bias, tree, target)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tree_name", ["V7-ternary", "V1000-random", "V15584-128x2"])
def test_reduced_precision_accumulates_in_float32(tree_name, dtype, device):
    tree = get_tree(tree_name)
    hidden, weight, bias, target = make_inputs(tree, 33, 64, dtype, device)
    out, grads = grads_of(path_log_prob, hidden, weight, bias, tree, target)
    h64, w64, b64 = (t.detach().double().requires_grad_() for t in (hidden, weight, bias))
    ref64, grads64 = grads_of(leaf_reference, h64, w64, b64, tree, target)
    h, w, b = (t.detach().float().to(dtype).requires_grad_() for t in (hidden, weight, bias))
    ref, grads_same = grads_of(leaf_reference, h, w, b, tree, target)
    assert out.dtype == dtype
    assert_close_to_reference(out.detach(), ref64.detach(), ref.detach(), "log_prob")
    for name, gk, g64, gs in zip(
        ["hidden", "weight", "bias"], grads, grads64, grads_same, strict=True
    ):
        assert gk.dtype == dtype, name
        assert_close_to_reference(gk, g64, gs, f"grad_{name}")


@pytest.mark.parametrize("tree_name", ["V2", "V3-binary", "V7-ternary"])
@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck_float64(tree_name, bias):
    tree = get_tree(tree_name)
    hidden, weight, b, target = make_inputs(tree, 6, 5, torch.float64, "cpu", bias=bias)
    args = (hidden, weight, b) if bias else (hidden, weight)

    def fn(*xs):
        return path_log_prob(xs[0], xs[1], xs[2] if bias else None, tree, target)

    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-7)


def test_gradcheck_random_tree():
    tree = random_tree(13, seed=3, max_children=4)
    hidden, weight, b, target = make_inputs(tree, 7, 4, torch.float64, "cpu")
    assert torch.autograd.gradcheck(
        lambda h, w, bb: path_log_prob(h, w, bb, tree, target),
        (hidden, weight, b),
        eps=1e-6,
        atol=1e-7,
    )


def _op_args(tree, hidden, weight, bias, target):
    c = tree.compiled(hidden.device)
    return (
        hidden,
        weight,
        bias,
        c.node_row_ptr,
        c.leaf_path_ptr,
        c.path_node,
        c.path_choice,
        target,
        tree.max_path_rows,
    )


@pytest.mark.parametrize("tree_name", ["V2", "V7-ternary", "V1000-random"])
@pytest.mark.parametrize("bias", [True, False])
def test_opcheck(tree_name, bias):
    tree = get_tree(tree_name)
    hidden, weight, b, target = make_inputs(tree, 9, 8, torch.float32, "cpu", bias=bias)
    for hidden_grad in (False, True):  # with and without the hidden-gradient basis
        torch.library.opcheck(
            torch.ops.hsoftmax.path_log_prob_forward.default,
            (*_op_args(tree, hidden, weight, b, target), False, hidden_grad),
        )
    # the backward op has no autograd of its own; check its schema and fake kernel
    lp, coef, _ = torch.ops.hsoftmax.path_log_prob_forward(
        *_op_args(tree, hidden.detach(), weight.detach(), None, target)
    )
    c = tree.compiled()
    torch.library.opcheck(
        torch.ops.hsoftmax.path_log_prob_backward.default,
        (
            torch.ones_like(lp),
            coef,
            hidden.detach(),
            weight.detach(),
            c.node_row_ptr,
            c.leaf_path_ptr,
            c.path_node,
            c.path_choice,
            target,
            bias,
            [True, True, True],
        ),
        test_utils=("test_schema", "test_faketensor"),
    )


@pytest.mark.parametrize("tree_name", ["V1", "V2", "V7-ternary", "V1000-random"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_hidden_grad_basis_is_the_backward_at_unit_gradient(tree_name, dtype):
    """The forward's third output (hidden_grad=True) is grad_hidden of sum_b log p_b, as the
    backward op computes it from the path's weight rows; asking for it changes nothing else."""
    tree = get_tree(tree_name)
    hidden, weight, b, target = make_inputs(tree, 9, 8, dtype, "cpu")
    args = _op_args(tree, hidden.detach(), weight.detach(), b.detach(), target)
    lp, coef, basis = torch.ops.hsoftmax.path_log_prob_forward(*args, False, True)
    lp0, coef0, empty = torch.ops.hsoftmax.path_log_prob_forward(*args)
    assert empty.shape == (0,)
    assert basis.shape == hidden.shape and basis.dtype == coef.dtype
    assert torch.equal(lp, lp0) and torch.equal(coef, coef0)
    c = tree.compiled()
    tables = (c.node_row_ptr, c.leaf_path_ptr, c.path_node, c.path_choice)
    want = torch.ops.hsoftmax.path_log_prob_backward(
        torch.ones_like(lp),
        coef,
        hidden.detach(),
        weight.detach(),
        *tables,
        target,
        False,
        [True, False, False],
    )[0]
    tol = {torch.bfloat16: 1e-2, torch.float32: 1e-6, torch.float64: 1e-12}[dtype]
    torch.testing.assert_close(basis.to(dtype), want, rtol=tol, atol=tol)


def test_hidden_gradient_same_with_and_without_the_basis():
    """Training (hidden needs a gradient: the basis path) and create_graph (the backward op's
    path) give the same gradients."""
    tree = get_tree("V1000-random")
    hidden, weight, bias, target = make_inputs(tree, 33, 12, torch.float64, "cpu")
    loss = -path_log_prob(hidden, weight, bias, tree, target).sum()
    fused = torch.autograd.grad(loss, (hidden, weight, bias))
    loss = -path_log_prob(hidden, weight, bias, tree, target).sum()
    plain = torch.autograd.grad(loss, (hidden, weight, bias), create_graph=True)
    for a, b in zip(fused, plain, strict=True):
        torch.testing.assert_close(a, b.detach(), rtol=1e-12, atol=1e-12)


def test_torch_compile_fullgraph():
    tree = get_tree("V1000-random")
    hidden, weight, bias, target = make_inputs(tree, 16, 12, torch.float32, "cpu")

    def loss_fn(h, w, b, y):
        return -path_log_prob(h, w, b, tree, y).mean()

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    loss = compiled(hidden, weight, bias, target)
    grads = torch.autograd.grad(loss, (hidden, weight, bias))
    loss_eager = loss_fn(hidden, weight, bias, target)
    grads_eager = torch.autograd.grad(loss_eager, (hidden, weight, bias))
    torch.testing.assert_close(loss, loss_eager)
    for a, b in zip(grads, grads_eager, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    "tree_name", ["V7-ternary", "V1000-random", "V15584-binary", "V15584-128x2"]
)
def test_probabilities_sum_to_one(tree_name):
    """exp(log p) over all V targets sums to 1, using the op itself (no reference)."""
    tree = get_tree(tree_name)
    v = tree.num_leaves
    g = torch.Generator().manual_seed(5)
    weight = torch.randn(v - 1, 24, generator=g) * 0.5
    bias = torch.randn(v - 1, generator=g)
    for _ in range(3):
        h = torch.randn(1, 24, generator=g).expand(v, 24)
        lp = path_log_prob(h, weight, bias, tree, torch.arange(v))
        total = float(torch.logsumexp(lp.double(), 0).exp())
        assert abs(total - 1) < 1e-5, total


def test_single_leaf_tree_is_certain():
    tree = Tree.balanced(1)
    hidden = torch.randn(4, 3, requires_grad=True)
    lp = path_log_prob(
        hidden, torch.zeros(0, 3), torch.zeros(0), tree, torch.zeros(4, dtype=torch.long)
    )
    assert torch.equal(lp, torch.zeros(4))


@pytest.mark.parametrize("device", device_params())
def test_empty_batch(device):
    tree = get_tree("V7-ternary")
    hidden, weight, bias, _ = make_inputs(tree, 0, 8, torch.float32, device)
    out = path_log_prob(hidden, weight, bias, tree, torch.zeros(0, dtype=torch.long, device=device))
    assert out.shape == (0,)
    out.sum().backward()
    assert torch.equal(weight.grad, torch.zeros_like(weight))
    assert hidden.grad.shape == (0, 8)


@pytest.mark.parametrize("device", device_params())
def test_non_contiguous_inputs(device):
    tree = get_tree("V1000-random")
    g = torch.Generator().manual_seed(0)
    big_h = torch.randn(20, 2 * 16, generator=g).to(device)
    big_w = torch.randn(16, tree.num_rows, generator=g).to(device)  # transposed storage
    big_b = torch.randn(2 * tree.num_rows, generator=g).to(device)
    h, w, b = big_h[:, ::2], big_w.t(), big_b[::2]
    target = torch.randint(0, tree.num_leaves, (40,), generator=g).to(device)[::2]
    assert not (h.is_contiguous() or w.is_contiguous() or b.is_contiguous())
    out = path_log_prob(h, w, b, tree, target)
    ref = path_log_prob(h.contiguous(), w.contiguous(), b.contiguous(), tree, target.contiguous())
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


@pytest.mark.parametrize("tree_name", ["V1000-random", "V15584-binary"])
def test_backward_is_deterministic(tree_name):
    """Two runs, and runs with 1 and 2 threads, give bit-identical gradients on CPU."""
    tree = get_tree(tree_name)
    hidden, weight, bias, target = make_inputs(tree, 300, 33, torch.float32, "cpu")
    target[:100] = target[0]  # many examples share rows: the order of the sum matters

    def run():
        out, grads = grads_of(path_log_prob, hidden, weight, bias, tree, target)
        return [out.detach(), *grads]

    threads = torch.get_num_threads()
    try:
        first, second = run(), run()
        torch.set_num_threads(1)
        single = run()
    finally:
        torch.set_num_threads(threads)
    for a, b, c in zip(first, second, single, strict=True):
        assert torch.equal(a, b)
        assert torch.equal(a, c)


@pytest.mark.parametrize("needs", list(itertools.product([False, True], repeat=3)))
def test_requires_grad_combinations(needs):
    """Every requires_grad combination yields exactly the gradients it should."""
    tree = get_tree("V7-ternary")
    hidden, weight, bias, target = make_inputs(tree, 5, 6, torch.float64, "cpu")
    tensors = [
        t.detach().requires_grad_(n) for t, n in zip((hidden, weight, bias), needs, strict=True)
    ]
    out = path_log_prob(*tensors, tree, target)
    assert out.requires_grad == any(needs)
    if not any(needs):
        return
    out.sum().backward()
    ref_tensors = [t.detach().requires_grad_() for t in (hidden, weight, bias)]
    leaf_reference(*ref_tensors, tree, target).sum().backward()
    for t, r, n in zip(tensors, ref_tensors, needs, strict=True):
        if n:
            torch.testing.assert_close(t.grad, r.grad)
        else:
            assert t.grad is None


# ------------------------------------------------------------------------ bad input


@pytest.fixture
def good():
    tree = get_tree("V7-ternary")
    hidden, weight, bias, target = make_inputs(tree, 4, 5, torch.float32, "cpu")
    return dict(hidden=hidden, weight=weight, bias=bias, tree=tree, target=target)


@pytest.mark.parametrize(
    "change,error,message",
    [
        (dict(hidden=torch.randn(4, 5, 1)), ValueError, "hidden must have shape"),
        (dict(hidden=torch.randint(0, 3, (4, 5))), TypeError, "hidden must be float"),
        (
            dict(weight=torch.randn(7, 5)),
            ValueError,
            r"weight must have shape \(V - 1, D\) = \(6, 5\)",
        ),
        (dict(weight=torch.randn(6, 4)), ValueError, "weight must have shape"),
        (dict(weight=torch.randn(6, 5, dtype=torch.float64)), TypeError, "weight dtype"),
        (dict(bias=torch.randn(7)), ValueError, "bias must have shape"),
        (dict(bias=torch.randn(6, dtype=torch.float64)), TypeError, "bias dtype"),
        (dict(target=torch.tensor([0, 1, 2])), ValueError, "target must have shape"),
        (dict(target=torch.tensor([0.0, 1, 2, 3])), TypeError, "target must be an integer"),
        (dict(target=torch.tensor([0, 1, 7, 3])), IndexError, r"target\[2\] = 7 is out of range"),
        (dict(target=torch.tensor([0, -1, 2, 3])), IndexError, r"target\[1\] = -1"),
        (dict(tree="not a tree"), TypeError, "tree must be an hsoftmax.Tree"),
        (dict(hidden=[[0.0] * 5] * 4), TypeError, "hidden must be a torch.Tensor"),
        (dict(weight=torch.randn(6, 5, device="meta")), ValueError, "weight is on meta"),
        (
            dict(target=torch.zeros(4, dtype=torch.long, device="meta")),
            ValueError,
            "target is on meta",
        ),
    ],
)
def test_bad_input_raises_before_kernel(good, change, error, message):
    args = {**good, **change}
    with pytest.raises(error, match=message):
        path_log_prob(args["hidden"], args["weight"], args["bias"], args["tree"], args["target"])


def test_direct_op_call_checks_target_range(good):
    """Calling torch.ops directly skips the Python checks; the C++ kernel still refuses."""
    c = good["tree"].compiled()
    with pytest.raises(IndexError, match="out of range"):
        torch.ops.hsoftmax.path_log_prob_forward(
            good["hidden"].detach(),
            good["weight"].detach(),
            None,
            c.node_row_ptr,
            c.leaf_path_ptr,
            c.path_node,
            c.path_choice,
            torch.tensor([0, 1, 99, 2]),
            good["tree"].max_path_rows,
        )


def test_int32_target_is_accepted(good):
    out = path_log_prob(
        good["hidden"], good["weight"], good["bias"], good["tree"], good["target"].int()
    )
    ref = path_log_prob(good["hidden"], good["weight"], good["bias"], good["tree"], good["target"])
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    parents=st.lists(st.integers(-2, 30), min_size=1, max_size=30),
    targets=st.lists(st.integers(-3, 40), min_size=0, max_size=12),
    dim=st.integers(1, 9),
)
def test_fuzz_never_crashes(parents, targets, dim):
    """Random (mostly malformed) trees and targets: a clean Python error or a valid result."""
    try:
        tree = Tree.from_parents(parents)
    except ValueError:
        return
    v = tree.num_leaves
    hidden = torch.randn(len(targets), dim)
    weight = torch.randn(v - 1, dim)
    target = torch.tensor(targets, dtype=torch.long)
    try:
        out = path_log_prob(hidden, weight, torch.randn(v - 1), tree, target)
    except IndexError:
        assert any(t < 0 or t >= v for t in targets)
        return
    assert torch.isfinite(out).all() and (out <= 1e-6).all()


def test_fuzz_random_valid_trees():
    for seed in range(30):
        g = torch.Generator().manual_seed(seed)
        v = int(torch.randint(1, 50, (1,), generator=g))
        tree = random_tree(v, seed, max_children=int(torch.randint(2, 8, (1,), generator=g)))
        hidden, weight, bias, target = make_inputs(tree, 11, 3, torch.float64, "cpu", seed=seed)
        torch.testing.assert_close(
            path_log_prob(hidden, weight, bias, tree, target),
            leaf_reference(hidden, weight, bias, tree, target),
        )


def test_build_info():
    assert hsoftmax.has_cuda_kernels() == (hsoftmax.cuda_version() is not None)


@pytest.mark.parametrize("device", device_params())
def test_deterministic_mode(device):
    """Both backends run under use_deterministic_algorithms and repeat their bits (the CUDA
    weight gradient is a sorted segmented sum, no atomics)."""
    tree = get_tree("V7-ternary")
    hidden, weight, bias, target = make_inputs(tree, 8, 4, torch.float32, device)
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        grads = []
        for _ in range(2):
            weight.grad = None
            path_log_prob(hidden, weight, bias, tree, target).sum().backward()
            grads.append(weight.grad.clone())
        assert torch.equal(grads[0], grads[1])
    finally:
        torch.use_deterministic_algorithms(was)


@pytest.mark.parametrize("device", device_params())
def test_out_of_range_target_direct_call_never_reads_out_of_bounds(device):
    """Bypassing the Python checks: CPU raises, CUDA writes NaN (no device-side sync/abort)."""
    tree = get_tree("V7-ternary")
    hidden, weight, _, _ = make_inputs(tree, 2, 4, torch.float32, device)
    c = tree.compiled(device)
    target = torch.tensor([1, 50], device=device)
    args = (
        hidden.detach(),
        weight.detach(),
        None,
        c.node_row_ptr,
        c.leaf_path_ptr,
        c.path_node,
        c.path_choice,
        target,
        tree.max_path_rows,
    )
    if device == "cpu":
        with pytest.raises(IndexError):
            torch.ops.hsoftmax.path_log_prob_forward(*args)
    else:
        lp, _, _ = torch.ops.hsoftmax.path_log_prob_forward(*args)
        assert torch.isfinite(lp[0]) and torch.isnan(lp[1])


@pytest.mark.parametrize("tree_name", ["V1", "V7-ternary", "V1000-random", "V15584-128x2"])
@pytest.mark.parametrize("batch", [0, 1, 57])
def test_sparse_grad_equals_dense(tree_name, batch):
    """sparse_grad=True holds exactly the touched rows, and densifies to the dense gradient."""
    tree = get_tree(tree_name)
    hidden, weight, bias, target = make_inputs(tree, batch, 9, torch.float64, "cpu")
    dense_out, dense = grads_of(path_log_prob, hidden, weight, bias, tree, target)
    sparse_out, sparse = grads_of(
        lambda *a: path_log_prob(*a, sparse_grad=True), hidden, weight, bias, tree, target
    )
    torch.testing.assert_close(sparse_out, dense_out, rtol=0, atol=0)
    torch.testing.assert_close(sparse[0], dense[0], rtol=0, atol=0)
    for s, d in zip(sparse[1:], dense[1:], strict=True):
        assert s.is_sparse and s.is_coalesced() and s.shape == d.shape
        torch.testing.assert_close(s.to_dense(), d, rtol=0, atol=0)
    # the rows held are exactly the rows on the batch's paths
    c = tree.compiled()
    touched = set()
    for y in target.tolist():
        for s in range(int(c.leaf_path_ptr[y]), int(c.leaf_path_ptr[y + 1])):
            n = int(c.path_node[s])
            touched.update(range(int(c.node_row_ptr[n]), int(c.node_row_ptr[n + 1])))
    assert sorted(touched) == sparse[1].indices()[0].tolist()


def test_sparse_grad_trains_like_dense_with_sgd():
    """Plain SGD takes the same steps from sparse and dense gradients, and learns."""
    tree = get_tree("V1000-random")
    hidden, weight0, bias0, target = make_inputs(tree, 64, 8, torch.float64, "cpu")
    h = hidden.detach()
    runs = {}
    for sparse in (False, True):
        weight = torch.nn.Parameter(weight0.detach().clone())
        bias = torch.nn.Parameter(bias0.detach().clone())
        opt = torch.optim.SGD([weight, bias], lr=2.0)
        losses = []
        for _ in range(30):
            opt.zero_grad()
            loss = -path_log_prob(h, weight, bias, tree, target, sparse_grad=sparse).mean()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        runs[sparse] = (losses, weight.detach(), bias.detach())
    assert runs[True][0][-1] < runs[True][0][0] - 1.0, runs[True][0]
    torch.testing.assert_close(runs[True][1], runs[False][1], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(runs[True][2], runs[False][2], rtol=1e-12, atol=1e-12)


def test_sparse_grad_refused_on_cuda_before_kernel():
    tree = get_tree("V7-ternary")
    hidden, weight, bias, target = make_inputs(tree, 3, 4, torch.float32, "meta")
    with pytest.raises(NotImplementedError, match="CPU only"):
        path_log_prob(hidden, weight, bias, tree, target, sparse_grad=True)


# ------------------------------------------------------------ malformed tree arrays (direct ops)


def _tree_arrays(good) -> dict:
    c = good["tree"].compiled()
    return {k: getattr(c, k) for k in ("node_row_ptr", "leaf_path_ptr", "path_node", "path_choice")}


def _backward_raw(good, coef, arrays=None):
    """torch.ops backward call with the tree's arrays (or ``arrays``): no Python check runs."""
    a = _tree_arrays(good) if arrays is None else arrays
    return torch.ops.hsoftmax.path_log_prob_backward(
        torch.ones(4),
        coef,
        good["hidden"].detach(),
        good["weight"].detach(),
        a["node_row_ptr"],
        a["leaf_path_ptr"],
        a["path_node"],
        a["path_choice"],
        good["target"],
        False,
        [True, True, False],
    )


def _forward_raw(good, **arrays):
    """torch.ops call with the tree's arrays, some replaced: no Python check runs."""
    a = {**_tree_arrays(good), "max_path_rows": good["tree"].max_path_rows, **arrays}
    return torch.ops.hsoftmax.path_log_prob_forward(
        good["hidden"].detach(),
        good["weight"].detach(),
        None,
        a["node_row_ptr"],
        a["leaf_path_ptr"],
        a["path_node"],
        a["path_choice"],
        good["target"],
        a["max_path_rows"],
    )


def test_direct_op_refuses_malformed_tree_arrays(good):
    """Arrays that would make the kernel read or write out of bounds are refused first."""
    c = good["tree"].compiled()
    with pytest.raises(RuntimeError, match="more than max_path_rows = 1"):
        _forward_raw(good, max_path_rows=1)
    with pytest.raises(RuntimeError, match=r"path_choice\[0\] = 5 but node"):
        _forward_raw(good, path_choice=torch.full_like(c.path_choice, 5))
    with pytest.raises(RuntimeError, match="is not an internal node"):
        _forward_raw(good, path_node=torch.full_like(c.path_node, 99))
    with pytest.raises(RuntimeError, match="is not a range of the"):
        _forward_raw(good, leaf_path_ptr=c.leaf_path_ptr * 100)
    with pytest.raises(RuntimeError, match="weight rows"):
        _forward_raw(good, node_row_ptr=c.node_row_ptr * 50)
    # the backward checks its coefficient width against the paths the same way
    _, coef, _ = _forward_raw(good)
    with pytest.raises(RuntimeError, match="more than max_path_rows = 1"):
        _backward_raw(good, coef[:, :1].contiguous())


@pytest.mark.parametrize(
    "name,value,message",
    [
        ("path_node", 99, "is not an internal node"),
        ("path_choice", 5, r"path_choice\[\d+\] = 5 but node"),
        ("node_row_ptr", 1000, "weight rows"),
        ("leaf_path_ptr", 1000, "is not a range of the"),
    ],
)
@pytest.mark.parametrize("inference", [False, True])
def test_in_place_change_to_checked_tree_arrays_is_caught(good, name, value, message, inference):
    """After a first call has checked every leaf path of a tree's arrays, the kernels check only
    the targets' range; an in-place change to an array (a new version) brings the path check
    back. Inference tensors (no version counter) are checked on every call."""
    with torch.inference_mode(inference):
        arrays = {k: t.clone() for k, t in _tree_arrays(good).items()}
    want, coef, _ = _forward_raw(good, **arrays)
    want_grads = _backward_raw(good, coef, arrays)
    torch.testing.assert_close(_forward_raw(good, **arrays)[0], want, rtol=0, atol=0)
    saved = arrays[name].clone()
    with torch.inference_mode(inference):
        arrays[name].fill_(value)  # the same tensor, written in place
    with pytest.raises(RuntimeError, match=message):
        _forward_raw(good, **arrays)
    with pytest.raises(RuntimeError, match=message):
        _backward_raw(good, coef, arrays)
    with torch.inference_mode(inference):
        arrays[name].copy_(saved)
    torch.testing.assert_close(_forward_raw(good, **arrays)[0], want, rtol=0, atol=0)
    for got, expected in zip(_backward_raw(good, coef, arrays), want_grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def _raw_topk(hidden, weight, bias, st, k):
    # the kernel itself, fed tables a Tree would never produce
    args = (st.child_ptr, st.children, st.node_row_ptr, st.root, k)
    return torch.ops.hsoftmax.topk_leaves(hidden, weight, bias, *args)


def _raw_rank(hidden, weight, bias, st, target):
    tables = (st.child_ptr, st.children, st.node_row_ptr, st.leaf_path_ptr, st.path_node)
    return torch.ops.hsoftmax.leaf_rank(
        hidden, weight, bias, *tables, st.path_choice, st.root, target
    )


def test_search_ops_refuse_malformed_child_lists():
    topk_leaves, leaf_rank = _raw_topk, _raw_rank

    def search_tree(tree):
        return tree.search_tables()

    tree = Tree.balanced(16, 2)
    st_ = search_tree(tree)
    hidden, weight = torch.randn(2, 3), torch.randn(15, 3)
    for wrong_root in (4, st_.root - 1):  # a leaf, an internal node below the root
        with pytest.raises(RuntimeError, match=rf"children\[\d+\] = {wrong_root} is .* the root"):
            topk_leaves(hidden, weight, None, dataclasses.replace(st_, root=wrong_root), 2)
    # every node listed once, but nodes 5 and 3 hang off a cycle (5 is its own child)
    small = search_tree(Tree.balanced(4, 2))
    assert small.root == 6 and small.children.tolist() == [0, 1, 2, 3, 4, 5]
    cyclic = dataclasses.replace(
        small, children=torch.tensor([0, 1, 3, 5, 4, 2], dtype=torch.int32)
    )
    with pytest.raises(RuntimeError, match="only 5 of the 7 nodes are reached from root 6"):
        topk_leaves(torch.randn(2, 3), torch.randn(3, 3), None, cyclic, 2)
    children = st_.children.clone()
    children[3] = children[4]
    with pytest.raises(RuntimeError, match="a second entry of the same node"):
        topk_leaves(hidden, weight, None, dataclasses.replace(st_, children=children), 2)
    with pytest.raises(RuntimeError, match=r"path_choice\[\d+\] = 3 but node"):
        leaf_rank(
            hidden,
            weight,
            None,
            dataclasses.replace(st_, path_choice=torch.full_like(st_.path_choice, 3)),
            torch.tensor([0, 5]),
        )
    # the intact arrays still work
    assert topk_leaves(hidden, weight, None, st_, 2)[1].shape == (2, 2)


def test_double_backward_raises_instead_of_returning_none():
    tree = get_tree("V7-ternary")
    hidden, weight, bias, target = make_inputs(tree, 3, 4, torch.float64, "cpu")
    hidden.requires_grad_()
    (g,) = torch.autograd.grad(
        path_log_prob(hidden, weight, bias, tree, target).sum(), hidden, create_graph=True
    )
    with pytest.raises(NotImplementedError, match="double backward"):
        torch.autograd.grad((g**2).sum(), [hidden, weight])


def test_sparse_grad_refuses_strided_weight():
    tree = get_tree("V7-ternary")
    hidden, weight, bias, target = make_inputs(tree, 3, 4, torch.float32, "cpu")
    strided = weight.detach().t().contiguous().t().requires_grad_()
    with pytest.raises(ValueError, match="sparse_grad=True needs a contiguous weight"):
        path_log_prob(hidden, strided, bias, tree, target, sparse_grad=True)


def test_dropout_mask_refuses_an_overflowing_scale():
    with pytest.raises(RuntimeError, match="overflow"):
        torch.ops.hsoftmax.dropout_mask(torch.empty(4, dtype=torch.float16), 0.99999, 0)
    assert torch.isfinite(torch.ops.hsoftmax.dropout_mask(torch.empty(4), 0.99999, 0)).all()
