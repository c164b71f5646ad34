"""Row-sparse optimizers (hsoftmax.optim) against torch's own optimizers.

The reference for the lazy rule is torch itself: every row of a parameter is made its own
parameter with its own ``torch.optim.AdamW`` (or ``SGD``), and a step gives a gradient only to the
rows it touched. torch skips a parameter whose ``grad`` is None, so an untouched row keeps its
value, moments and step count: exactly the lazy rule with per-row step counts.
"""

from __future__ import annotations

import io

import pytest
import torch

from hsoftmax import HierarchicalSoftmax, Tree
from hsoftmax.ops import path_log_prob
from hsoftmax.optim import SparseAdamW, SparseSGD, clip_grad_norm_

DTYPES = [torch.float32, torch.float64]
# the lazy path computes per-row bias corrections with tensor ops in float64, whose last bit may
# differ from Python's beta ** step (see hsoftmax/optim.py): a few ulps after many steps
LAZY_TOL = {torch.float32: {"rtol": 1e-6, "atol": 1e-7}, torch.float64: {"rtol": 1e-13, "atol": 0}}
ADAMW = {"lr": 0.05, "betas": (0.8, 0.95), "eps": 1e-6, "weight_decay": 0.1}
SGD = {"lr": 0.1, "momentum": 0.9, "dampening": 0.2, "weight_decay": 0.05}


def assert_bits(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def row_sparse(dense: torch.Tensor, rows) -> torch.Tensor:
    """The rows ``rows`` of ``dense`` as a row-sparse COO gradient (uncoalesced if rows repeat)."""
    rows = torch.as_tensor(rows, dtype=torch.int64)
    return torch.sparse_coo_tensor(rows[None], dense[rows], dense.shape, check_invariants=True)


def random_touches(num_rows, steps, seed):
    """A list of sorted row-id sets, some empty, some full, mostly partial."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(steps):
        k = (
            [0, num_rows][i % 2]
            if i % 7 == 3
            else int(torch.randint(1, num_rows, (1,), generator=g))
        )
        out.append(torch.randperm(num_rows, generator=g)[:k].sort().values.tolist())
    return out


def per_row_reference(opt_cls, start, grads, touches, **hyper):
    """Each row its own parameter and torch optimizer; untouched rows get no gradient."""
    rows = [start[i].clone().requires_grad_() for i in range(start.shape[0])]
    opt = opt_cls(rows, foreach=False, **hyper)
    for grad, touched in zip(grads, touches, strict=True):
        for i, row in enumerate(rows):
            row.grad = grad[i].clone() if i in touched else None
        opt.step()
    return torch.stack([r.detach() for r in rows])


# ------------------------------------------------------------------ dense gradients: AdamW's bits


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("maximize", [False, True])
def test_dense_grads_same_bits_as_adamw(dtype, amsgrad, maximize):
    g = torch.Generator().manual_seed(0)
    shapes = [(23, 7), (23,), (), (4, 3, 5)]  # a weight, a bias, a scalar, a 3-d tensor
    start = [torch.randn(s, dtype=dtype, generator=g) for s in shapes]
    ours = [p.clone().requires_grad_() for p in start]
    theirs = [p.clone().requires_grad_() for p in start]
    hyper = dict(ADAMW, amsgrad=amsgrad, maximize=maximize)
    opt = SparseAdamW(ours, **hyper)
    ref = torch.optim.AdamW(theirs, foreach=False, **hyper)
    for _ in range(6):
        for a, b in zip(ours, theirs, strict=True):
            a.grad = torch.randn(a.shape, dtype=dtype, generator=g)
            b.grad = a.grad.clone()
        opt.step()
        ref.step()
    for a, b in zip(ours, theirs, strict=True):
        assert_bits(a, b)
        assert_bits(opt.state[a]["exp_avg_sq"], ref.state[b]["exp_avg_sq"])


@pytest.mark.parametrize("dtype", DTYPES)
def test_sparse_grads_touching_every_row_same_bits_as_adamw(dtype):
    """Every row touched every step (in shuffled order, some ids twice): dense AdamW's bits."""
    g = torch.Generator().manual_seed(1)
    start = torch.randn(19, 6, dtype=dtype, generator=g)
    ours, theirs = start.clone().requires_grad_(), start.clone().requires_grad_()
    opt, ref = SparseAdamW([ours], **ADAMW), torch.optim.AdamW([theirs], foreach=False, **ADAMW)
    for _ in range(8):
        grad = torch.randn(start.shape, dtype=dtype, generator=g)
        ids = torch.randperm(19, generator=g)
        # split rows 0 and 5 over two entries each: coalescing must sum them back
        half = torch.zeros_like(grad)
        half[[0, 5]] = grad[[0, 5]] / 2
        values = torch.cat([(grad - half)[ids], half[[0, 5]]])
        ours.grad = torch.sparse_coo_tensor(
            torch.cat([ids, torch.tensor([0, 5])])[None], values, start.shape, check_invariants=True
        )
        theirs.grad = (grad - half) + half
        opt.step()
        ref.step()
    assert_bits(ours, theirs)


# ------------------------------------------------------------------ the lazy rule


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("amsgrad", [False, True])
def test_lazy_rule_equals_per_row_adamw(dtype, amsgrad):
    g = torch.Generator().manual_seed(2)
    start = torch.randn(17, 5, dtype=dtype, generator=g)
    bias_start = torch.randn(17, dtype=dtype, generator=g)
    touches = random_touches(17, 40, seed=3) + [[]] * 2 + [list(range(17))]
    grads = [torch.randn(17, 5, dtype=dtype, generator=g) for _ in touches]
    bias_grads = [torch.randn(17, dtype=dtype, generator=g) for _ in touches]
    weight, bias = start.clone().requires_grad_(), bias_start.clone().requires_grad_()
    hyper = dict(ADAMW, amsgrad=amsgrad)
    opt = SparseAdamW([weight, bias], **hyper)
    for grad, bias_grad, touched in zip(grads, bias_grads, touches, strict=True):
        weight.grad, bias.grad = row_sparse(grad, touched), row_sparse(bias_grad, touched)
        opt.step()
    expected = per_row_reference(torch.optim.AdamW, start, grads, touches, **hyper)
    expected_bias = per_row_reference(torch.optim.AdamW, bias_start, bias_grads, touches, **hyper)
    torch.testing.assert_close(weight.detach(), expected, **LAZY_TOL[dtype])
    torch.testing.assert_close(bias.detach(), expected_bias, **LAZY_TOL[dtype])
    counts = torch.zeros(17, dtype=torch.int64)
    for touched in touches:
        counts[touched] += 1
    assert_bits(opt.state[weight]["step"], counts)


def test_untouched_rows_and_their_moments_unchanged():
    """A step changes exactly the touched rows, a touched all-zero row included (it decays)."""
    g = torch.Generator().manual_seed(4)
    weight = torch.randn(9, 4, generator=g).requires_grad_()
    opt = SparseAdamW([weight], **ADAMW)
    weight.grad = torch.randn(9, 4, generator=g)
    opt.step()  # every row has moments now
    before = weight.detach().clone(), {k: v.clone() for k, v in opt.state[weight].items()}
    grad = torch.zeros(9, 4)
    grad[2] = torch.randn(4, generator=g)
    weight.grad = row_sparse(grad, [2, 6])  # row 6 touched with a zero gradient
    opt.step()
    changed = (weight.detach() != before[0]).any(1)
    assert changed.nonzero()[:, 0].tolist() == [2, 6]
    for name in ("exp_avg", "exp_avg_sq"):
        moved = (opt.state[weight][name] != before[1][name]).any(1)
        assert moved.nonzero()[:, 0].tolist() == [2, 6]
    assert opt.state[weight]["step"].tolist() == [1, 1, 2, 1, 1, 1, 2, 1, 1]


def test_duplicate_row_ids_are_summed():
    """An uncoalesced gradient (an embedding's: one entry per lookup) equals its coalesced sum."""
    g = torch.Generator().manual_seed(5)
    start = torch.randn(8, 3, generator=g)
    ids = torch.tensor([3, 1, 3, 3, 6, 1])
    values = torch.randn(6, 3, generator=g)
    a, b = start.clone().requires_grad_(), start.clone().requires_grad_()
    opt_a, opt_b = SparseAdamW([a], **ADAMW), SparseAdamW([b], **ADAMW)
    a.grad = torch.sparse_coo_tensor(ids[None], values, (8, 3), check_invariants=True)
    dense = torch.zeros(8, 3).index_add_(0, ids, values)
    b.grad = row_sparse(dense, [1, 3, 6])
    opt_a.step()
    opt_b.step()
    assert_bits(a, b)
    assert_bits(opt_a.state[a]["step"], opt_b.state[b]["step"])


def test_empty_sparse_gradient_changes_nothing():
    weight = torch.randn(5, 2).requires_grad_()
    opt = SparseAdamW([weight], **ADAMW)
    weight.grad = row_sparse(torch.ones(5, 2), [])
    before = weight.detach().clone()
    opt.step()
    assert_bits(weight.detach(), before)
    assert_bits(opt.state[weight]["step"], torch.zeros(5, dtype=torch.int64))


def test_state_dict_round_trip():
    """A fresh optimizer loaded from a state dict (saved through torch.save) continues with the
    same bits as the original, and the per-row step counts survive."""
    g = torch.Generator().manual_seed(6)
    touches = random_touches(11, 12, seed=7)
    grads = [torch.randn(11, 3, generator=g) for _ in touches]
    weight = torch.randn(11, 3, generator=g).requires_grad_()
    opt = SparseAdamW([weight], amsgrad=True, **ADAMW)
    for grad, touched in zip(grads[:6], touches[:6], strict=True):
        weight.grad = row_sparse(grad, touched)
        opt.step()
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    clone = weight.detach().clone().requires_grad_()
    loaded = SparseAdamW([clone], lr=1.0)  # the loaded groups replace these hyper-parameters
    loaded.load_state_dict(torch.load(buffer))
    assert loaded.state[clone]["step"].dtype == torch.int64
    assert_bits(loaded.state[clone]["step"], opt.state[weight]["step"])
    for grad, touched in zip(grads[6:], touches[6:], strict=True):
        weight.grad, clone.grad = row_sparse(grad, touched), row_sparse(grad, touched)
        opt.step()
        loaded.step()
    assert_bits(clone, weight)
    assert loaded.param_groups[0]["lr"] == ADAMW["lr"]


# ------------------------------------------------------------------ the op's sparse gradient


class _DensifyGrad(torch.autograd.Function):
    """Identity whose backward densifies a sparse gradient, so gradcheck can read it."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad.to_dense() if grad.is_sparse else grad


def test_sparse_gradient_of_the_op_gradchecks_in_float64():
    tree = Tree.balanced(13, 3)
    g = torch.Generator().manual_seed(8)
    hidden = torch.randn(6, 4, dtype=torch.float64, generator=g)
    weight = torch.randn(12, 4, dtype=torch.float64, generator=g, requires_grad=True)
    bias = torch.randn(12, dtype=torch.float64, generator=g, requires_grad=True)
    target = torch.tensor([0, 3, 3, 12, 7, 8])

    def sparse_op(w, b):
        return path_log_prob(
            hidden, _DensifyGrad.apply(w), _DensifyGrad.apply(b), tree, target, sparse_grad=True
        )

    assert torch.autograd.gradcheck(sparse_op, (weight, bias))
    assert torch.autograd.gradcheck(
        lambda w, b: path_log_prob(hidden, w, b, tree, target), (weight, bias)
    )
    loss = path_log_prob(hidden, weight, bias, tree, target, sparse_grad=True).square().sum()
    sparse = torch.autograd.grad(loss, (weight, bias))
    loss = path_log_prob(hidden, weight, bias, tree, target).square().sum()
    dense = torch.autograd.grad(loss, (weight, bias))
    for s, d in zip(sparse, dense, strict=True):
        assert s.is_sparse
        assert_bits(s.to_dense(), d)


# ------------------------------------------------------------------ a model


def path_rows(tree: Tree, targets) -> list[int]:
    """Weight rows on the targets' paths, walked from the tree's parents: each internal ancestor
    i (with c children) owns rows child_ptr[i] - i .. + c - 2."""
    parents, child_ptr, v = tree.parents.tolist(), tree.child_ptr.tolist(), tree.num_leaves
    rows = set()
    for node in targets:
        while parents[node] != -1:
            i = parents[node] - v
            rows.update(range(child_ptr[i] - i, child_ptr[i + 1] - i - 1))
            node = parents[node]
    return sorted(rows)


@pytest.mark.parametrize("dtype", DTYPES)
def test_embedding_and_head_train_like_per_row_adamw(dtype):
    """nn.Embedding(sparse=True) -> Linear -> tanh -> head with sparse gradients, trained with
    SparseAdamW, equals the per-row AdamW reference (dense AdamW for the Linear)."""
    num_inputs, emb_dim, hidden_dim, batch, steps = 29, 6, 5, 12, 8
    tree = Tree.balanced(21, 3)
    torch.manual_seed(9)
    embedding = torch.nn.Embedding(num_inputs, emb_dim, sparse=True, dtype=dtype)
    linear = torch.nn.Linear(emb_dim, hidden_dim, dtype=dtype)
    head = HierarchicalSoftmax(hidden_dim, tree, dtype=dtype)
    g = torch.Generator().manual_seed(10)
    data = [
        (
            torch.randint(0, num_inputs, (batch,), generator=g),
            torch.randint(0, 21, (batch,), generator=g),
        )
        for _ in range(steps)
    ]
    hyper = dict(ADAMW, lr=0.03)

    # the module: one SparseAdamW over sparse (embedding, head) and dense (linear) gradients
    params = [embedding.weight, *linear.parameters(), head.weight, head.bias]
    start = [p.detach().clone() for p in params]
    opt = SparseAdamW(params, **hyper)
    for x, y in data:
        opt.zero_grad()
        hidden = torch.tanh(linear(embedding(x)))
        (
            -path_log_prob(hidden, head.weight, head.bias, tree, y, sparse_grad=True).mean()
        ).backward()
        assert embedding.weight.grad.is_sparse and head.weight.grad.is_sparse
        opt.step()

    # the reference: every embedding / head row its own AdamW-optimised tensor
    emb_rows, w_rows, b_rows = (
        [t[i].clone().requires_grad_() for i in range(t.shape[0])]
        for t in (start[0], start[3], start[4])
    )
    lin = [t.clone().requires_grad_() for t in start[1:3]]
    ref = torch.optim.AdamW(emb_rows + w_rows + b_rows + lin, foreach=False, **hyper)
    for x, y in data:
        ref.zero_grad()
        emb = torch.stack(emb_rows)
        hidden = torch.tanh(torch.nn.functional.linear(emb[x], *lin))
        weight, bias = torch.stack(w_rows), torch.stack(b_rows)
        (-path_log_prob(hidden, weight, bias, tree, y).mean()).backward()
        touched = set(x.tolist())
        for i, row in enumerate(emb_rows):
            row.grad = row.grad if i in touched else None
        touched = set(path_rows(tree, y.tolist()))
        for i in range(len(w_rows)):
            if i not in touched:
                w_rows[i].grad = b_rows[i].grad = None
        ref.step()

    expected = [torch.stack(emb_rows), *lin, torch.stack(w_rows), torch.stack(b_rows)]
    for p, e in zip(params, expected, strict=True):
        torch.testing.assert_close(p.detach(), e.detach(), **LAZY_TOL[dtype])
    assert not torch.equal(params[0], start[0])  # it trained


# ------------------------------------------------------------------ SGD


def test_torch_sgd_refuses_a_sparse_gradient_with_weight_decay():
    """Why SparseSGD exists: torch.optim.SGD cannot take weight decay with sparse gradients."""
    embedding = torch.nn.Embedding(10, 3, sparse=True)
    opt = torch.optim.SGD(embedding.parameters(), lr=0.1, weight_decay=0.1)
    embedding(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match=r"add\(sparse, dense\) is not supported"):
        opt.step()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "hyper", [SGD, dict(SGD, dampening=0.0, nesterov=True), {"lr": 0.1, "weight_decay": 0.05}]
)
def test_sgd_dense_same_bits_and_lazy_equals_per_row_sgd(dtype, hyper):
    g = torch.Generator().manual_seed(11)
    start = torch.randn(13, 4, dtype=dtype, generator=g)
    touches = random_touches(13, 15, seed=12)
    grads = [torch.randn(13, 4, dtype=dtype, generator=g) for _ in touches]
    dense, ours = start.clone().requires_grad_(), start.clone().requires_grad_()
    ref = torch.optim.SGD([theirs := start.clone().requires_grad_()], foreach=False, **hyper)
    opt_dense, opt = SparseSGD([dense], **hyper), SparseSGD([ours], **hyper)
    for grad, touched in zip(grads, touches, strict=True):
        dense.grad, theirs.grad, ours.grad = grad.clone(), grad.clone(), row_sparse(grad, touched)
        opt_dense.step()
        ref.step()
        opt.step()
    assert_bits(dense, theirs)
    assert_bits(ours.detach(), per_row_reference(torch.optim.SGD, start, grads, touches, **hyper))


# ------------------------------------------------------------------ gradient clipping


@pytest.mark.parametrize("norm_type", [2.0, 1.0, float("inf")])
@pytest.mark.parametrize("scale", [10.0, 0.01])  # clipped, and left alone
def test_clip_grad_norm_dense_same_bits_as_torch(norm_type, scale):
    g = torch.Generator().manual_seed(13)
    shapes = [(7, 3), (5,), ()]
    ours = [torch.zeros(s, requires_grad=True) for s in shapes]
    theirs = [torch.zeros(s, requires_grad=True) for s in shapes]
    for a, b in zip(ours, theirs, strict=True):
        a.grad = scale * torch.randn(a.shape, generator=g)
        b.grad = a.grad.clone()
    total = clip_grad_norm_(ours, 1.0, norm_type)
    expected = torch.nn.utils.clip_grad_norm_(theirs, 1.0, norm_type, foreach=False)
    assert_bits(total, expected)
    for a, b in zip(ours, theirs, strict=True):
        assert_bits(a.grad, b.grad)


@pytest.mark.parametrize("norm_type", [2.0, float("inf")])
def test_clip_grad_norm_sparse_equals_torch_on_the_dense_gradients(norm_type):
    """Row-sparse (with duplicate rows), empty sparse and dense gradients together: the same
    total norm and clipped gradients as torch's clip of the dense equivalents."""
    g = torch.Generator().manual_seed(14)
    ids = torch.tensor([4, 1, 4, 7])
    values = 5 * torch.randn(4, 3, dtype=torch.float64, generator=g)
    shapes = [(9, 3), (9, 3), (6,)]
    ours = [torch.zeros(s, dtype=torch.float64, requires_grad=True) for s in shapes]
    theirs = [torch.zeros(s, dtype=torch.float64, requires_grad=True) for s in shapes]
    ours[0].grad = torch.sparse_coo_tensor(ids[None], values, (9, 3), check_invariants=True)
    ours[1].grad = row_sparse(torch.ones(9, 3, dtype=torch.float64), [])
    ours[2].grad = torch.randn(6, dtype=torch.float64, generator=g)
    for a, b in zip(ours, theirs, strict=True):
        b.grad = a.grad.to_dense().clone()  # to_dense of a dense tensor is the tensor
    total = clip_grad_norm_(ours, 1.0, norm_type)
    expected = torch.nn.utils.clip_grad_norm_(theirs, 1.0, norm_type, foreach=False)
    torch.testing.assert_close(total, expected, rtol=1e-14, atol=0)
    assert float(expected) > 1.0  # it clipped
    assert ours[0].grad.is_sparse and ours[0].grad._nnz() == 3  # coalesced: duplicates summed
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a.grad.to_dense(), b.grad, rtol=1e-14, atol=0)


def test_torch_clip_grad_norm_refuses_a_sparse_gradient():
    """Why hsoftmax.optim.clip_grad_norm_ exists: torch's has no sparse norm kernel."""
    embedding = torch.nn.Embedding(10, 3, sparse=True)
    embedding(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(NotImplementedError, match="linalg_vector_norm"):
        torch.nn.utils.clip_grad_norm_(embedding.parameters(), 1.0)


def test_clip_grad_norm_bad_input():
    weight = torch.zeros(3, requires_grad=True)
    weight.grad = torch.full((3,), float("nan"))
    with pytest.raises(ValueError, match="max_norm must be >= 0.0, got -1"):
        clip_grad_norm_([weight], -1)
    with pytest.raises(ValueError, match="norm_type must be a positive float or inf, got 0"):
        clip_grad_norm_([weight], 1.0, norm_type=0)
    with pytest.raises(RuntimeError, match="the total norm of order 2.0 of the gradients is non-"):
        clip_grad_norm_([weight], 1.0, error_if_nonfinite=True)


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"lr": -0.1}, ValueError, "lr must be >= 0.0, got -0.1"),
        ({"lr": float("nan")}, ValueError, "lr must be finite, got nan"),
        ({"lr": torch.tensor(0.1)}, TypeError, "lr must be a float, got Tensor"),
        ({"betas": (0.9, 1.0)}, ValueError, r"betas\[1\] must be < 1.0, got 1.0"),
        ({"betas": (-0.1, 0.9)}, ValueError, r"betas\[0\] must be >= 0.0, got -0.1"),
        ({"betas": 0.9}, ValueError, r"betas must be a pair \(beta1, beta2\), got 0.9"),
        ({"eps": -1e-8}, ValueError, "eps must be >= 0.0, got -1e-08"),
        ({"weight_decay": -0.01}, ValueError, "weight_decay must be >= 0.0, got -0.01"),
        ({"amsgrad": 1}, TypeError, "amsgrad must be a bool, got int"),
    ],
)
def test_adamw_bad_hyper_parameters(kwargs, error, message):
    with pytest.raises(error, match=message):
        SparseAdamW([torch.zeros(2, requires_grad=True)], **kwargs)


def test_adamw_checks_a_param_group_override():
    opt = SparseAdamW([torch.zeros(2, requires_grad=True)])
    with pytest.raises(ValueError, match="weight_decay must be >= 0.0, got -1"):
        opt.add_param_group({"params": [torch.zeros(3, requires_grad=True)], "weight_decay": -1})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"momentum": -0.5}, "momentum must be >= 0.0, got -0.5"),
        ({"dampening": 1.5}, "dampening must be <= 1.0, got 1.5"),
        ({"nesterov": True}, "nesterov=True needs momentum > 0 and dampening == 0, got momentum=0"),
        (
            {"nesterov": True, "momentum": 0.9, "dampening": 0.1},
            "nesterov=True needs momentum > 0 and dampening == 0, got momentum=0.9, dampening=0.1",
        ),
    ],
)
def test_sgd_bad_hyper_parameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SparseSGD([torch.zeros(2, requires_grad=True)], **kwargs)


@pytest.mark.parametrize("optimizer", [SparseAdamW, SparseSGD])
def test_refuses_a_gradient_that_is_not_row_sparse(optimizer):
    weight = torch.zeros(4, 3, requires_grad=True)
    weight.grad = torch.eye(4, 3).to_sparse()  # element-sparse: sparse_dim 2
    before = weight.detach().clone()
    with pytest.raises(
        ValueError,
        match=r"needs a row-sparse gradient \(sparse_dim\(\) == 1.*got "
        r"sparse_dim\(\) = 2 for a parameter of shape \(4, 3\)",
    ):
        optimizer([weight], lr=0.1).step()
    assert_bits(weight.detach(), before)


def test_refuses_a_complex_parameter():
    weight = torch.zeros(3, dtype=torch.complex64, requires_grad=True)
    weight.grad = torch.ones(3, dtype=torch.complex64)
    with pytest.raises(
        TypeError, match="SparseAdamW supports real floating-point parameters, got torch.complex64"
    ):
        SparseAdamW([weight]).step()
