"""Row-sparse optimizers (AdamW, SGD) and gradient clipping for row-sparse gradients.

Dimension letters: V rows of a parameter (its first dimension), T rows one step touches, and
``...`` the rest of a row (D for an embedding or head weight, nothing for a bias).

A row-sparse gradient is a sparse COO tensor with ``sparse_dim() == 1``: row ids and (T, ...)
values, as ``hsoftmax.ops.path_log_prob(..., sparse_grad=True)`` and
``nn.Embedding(sparse=True)`` produce. With one, a step costs O(T * D) instead of O(V * D): the
optimizer reads and writes the touched rows of the parameter and of its state, nothing else.

**Lazy semantics** (as TensorFlow's LazyAdam and ``torch.optim.SparseAdam``): a row that a step
does not touch is left exactly as it is: parameter, moments, momentum buffer, and no weight
decay. A touched row is updated as if its own gradient stream were the only one: every row keeps
its own step count, and AdamW's bias corrections use that count. So a row touched at n of the
optimizer's steps has followed exactly the n ``torch.optim.AdamW`` steps of its gradients.
(LazyAdam and ``SparseAdam`` correct with the optimizer's global step instead, which makes a
rarely touched row's first updates several times larger than ``lr``: its moments hold one
gradient but are corrected as if they held many.) A row touched with an all-zero gradient is
still touched: its moments decay and it is decayed.

**Dense gradients** take the same path over all V rows, so a parameter that only ever gets
dense gradients is updated with the same bits as ``torch.optim.AdamW(foreach=False)`` (or
``torch.optim.SGD(foreach=False)``). Sparse gradients that touch every row at every step give
the same bits too: the rows' step counts stay equal, and equal counts take the scalar
bias-correction path that AdamW itself runs. When the touched rows' counts differ, the
corrections are computed per row in float64 with tensor ops, which may round the last bit of a
correction differently from Python's ``beta ** step``; the update then agrees with a per-row
``torch.optim.AdamW`` to within that rounding (a float32 parameter almost always bit for bit).

Duplicate row ids (``nn.Embedding`` emits one per lookup) are summed first, as the dense gradient
would be. Determinism: every step is a fixed sequence of elementwise ops and row gathers and
scatters over unique rows, so CPU results are bit-reproducible.
"""

from __future__ import annotations

import math

import torch

__all__ = ["SparseAdamW", "SparseSGD", "clip_grad_norm_"]


def _check_number(name, value, low=0.0, high=None, high_open=False):
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    if high is not None and (value >= high if high_open else value > high):
        raise ValueError(f"{name} must be {'<' if high_open else '<='} {high}, got {value}")


def _check_flag(name, value):
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


def _check_adamw_group(group: dict) -> None:
    _check_number("lr", group["lr"])
    betas = group["betas"]
    if not isinstance(betas, tuple | list) or len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    for i, beta in enumerate(betas):
        _check_number(f"betas[{i}]", beta, 0.0, 1.0, high_open=True)
    _check_number("eps", group["eps"])
    _check_number("weight_decay", group["weight_decay"])
    _check_flag("amsgrad", group["amsgrad"])
    _check_flag("maximize", group["maximize"])


def _check_sgd_group(group: dict) -> None:
    _check_number("lr", group["lr"])
    _check_number("momentum", group["momentum"])
    _check_number("dampening", group["dampening"], 0.0, 1.0)
    _check_number("weight_decay", group["weight_decay"])
    _check_flag("nesterov", group["nesterov"])
    _check_flag("maximize", group["maximize"])
    if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
        raise ValueError(
            "nesterov=True needs momentum > 0 and dampening == 0, got "
            f"momentum={group['momentum']}, dampening={group['dampening']}"
        )


class _RowSparseOptimizer(torch.optim.Optimizer):
    """What both optimizers share: checked parameter groups and a step over every parameter
    with a gradient; subclasses supply ``_check_group`` and ``_step_param``."""

    def __init__(self, params, hyperparameters: dict):
        # a subclass passes its __init__'s locals(): its hyperparameters are its arguments
        defaults = {
            k: v for k, v in hyperparameters.items() if k not in ("self", "params", "__class__")
        }
        self._check_group(defaults)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        # a group may override the defaults: check what it will run with before adding it
        self._check_group({k: param_group.get(k, v) for k, v in self.defaults.items()})
        super().add_param_group(param_group)

    @torch.no_grad()
    def step(self, closure=None):
        """One optimizer step over every parameter that has a gradient; returns closure()."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                rows, grad = _rows_and_values(param, param.grad, type(self).__name__)
                if group["maximize"]:
                    grad = -grad
                self._step_param(param, rows, grad, group)
        return loss


class SparseAdamW(_RowSparseOptimizer):
    r"""AdamW (decoupled weight decay) that updates only the rows a sparse gradient touches.

    For each touched row r with gradient g, at its own step count t_r (after incrementing):

    .. math::
        \theta_r &\leftarrow \theta_r (1 - \mathrm{lr}\,\lambda) \\
        m_r &\leftarrow \beta_1 m_r + (1 - \beta_1) g,\qquad
        v_r \leftarrow \beta_2 v_r + (1 - \beta_2) g^2 \\
        \theta_r &\leftarrow \theta_r - \frac{\mathrm{lr}}{1 - \beta_1^{t_r}}\,
            \frac{m_r}{\sqrt{v_r} / \sqrt{1 - \beta_2^{t_r}} + \epsilon}

    (with ``amsgrad``, v_r in the denominator is its running maximum). Untouched rows are not
    changed at all; see the module docstring for the lazy semantics. Dense gradients update
    every row, exactly as ``torch.optim.AdamW(foreach=False)``.

    Args:
        params: parameters or parameter groups, as for any ``torch.optim.Optimizer``.
        lr: learning rate, >= 0.
        betas: (beta1, beta2), each in [0, 1).
        eps: added to the denominator, >= 0.
        weight_decay: decoupled weight decay lambda, >= 0 (AdamW's default 1e-2).
        amsgrad: use the running maximum of the second moment (per row, lazily).
        maximize: ascend the objective instead of descending it.

    State per parameter: ``step`` (V,) int64 per-row step counts (a 0-dim parameter: one
    count), ``exp_avg``, ``exp_avg_sq`` and, with ``amsgrad``, ``max_exp_avg_sq``, each shaped
    like the parameter. ``state_dict`` / ``load_state_dict`` round-trip them.
    """

    _check_group = staticmethod(_check_adamw_group)

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
    ):
        super().__init__(params, locals())

    def _state_of(self, param: torch.Tensor, amsgrad: bool) -> tuple[dict, list[str]]:
        """The parameter's state (created at its first step) and the names of its moments."""
        state = self.state[param]
        names = ["exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if amsgrad else [])
        if not state:
            state["step"] = torch.zeros(param.shape[:1], dtype=torch.int64, device=param.device)
        for name in names:
            if name not in state:
                state[name] = torch.zeros_like(param, memory_format=torch.preserve_format)
        return state, names

    def _step_param(self, param, rows, grad, group: dict) -> None:
        state, names = self._state_of(param, group["amsgrad"])
        if rows is None:  # dense: every row, in place
            state["step"] += 1
            _adamw_update(param, grad, [state[n] for n in names], state["step"], group)
            return
        if rows.numel() == 0:  # nothing touched: nothing to do, not even a step count
            return
        step = state["step"].index_select(0, rows).add_(1)
        state["step"].index_copy_(0, rows, step)
        # gather the touched rows, update them as dense tensors, scatter them back (rows are
        # unique after coalescing, so index_copy_ writes each row once)
        buffers = _workspace(self, param, len(names) + 3, rows.numel())
        sources = [param] + [state[n] for n in names]
        touched = [
            torch.index_select(t, 0, rows, out=b)
            for t, b in zip(sources, buffers[: len(sources)], strict=True)
        ]
        _adamw_update(touched[0], grad, touched[1:], step, group, scratch=buffers[-2:])
        param.index_copy_(0, rows, touched[0])
        for n, t in zip(names, touched[1:], strict=True):
            state[n].index_copy_(0, rows, t)


class SparseSGD(_RowSparseOptimizer):
    r"""SGD with momentum and weight decay that updates only the rows a sparse gradient touches.

    ``torch.optim.SGD`` accepts a sparse gradient only without weight decay (with it,
    ``grad.add(param)`` raises "add(sparse, dense) is not supported"), and with momentum it keeps
    a sparse buffer whose row set grows with every step until it is dense: the update then
    moves untouched rows too, at O(V * D). This one is lazy instead: for each touched row r,

    .. math::
        g \leftarrow g + \lambda \theta_r,\qquad
        b_r \leftarrow \mu b_r + (1 - \tau) g\ \ (b_r \leftarrow g \text{ at the row's first
        step}),\qquad \theta_r \leftarrow \theta_r - \mathrm{lr}\,(g + \mu b_r \text{ if
        nesterov else } b_r)

    and untouched rows (parameter and buffer) are left unchanged. Dense gradients update every
    row, with the same bits as ``torch.optim.SGD(foreach=False)``.

    Args:
        params: parameters or parameter groups.
        lr: learning rate, >= 0.
        momentum: mu >= 0 (0: plain SGD, no state).
        dampening: tau, the fraction of the gradient left out of the buffer.
        weight_decay: lambda >= 0, L2 added to the gradient (as ``torch.optim.SGD``).
        nesterov: Nesterov momentum (needs momentum > 0 and dampening 0).
        maximize: ascend the objective instead of descending it.

    State per parameter (only with momentum): ``step`` (V,) int64 per-row step counts and
    ``momentum_buffer`` shaped like the parameter.
    """

    _check_group = staticmethod(_check_sgd_group)

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
    ):
        super().__init__(params, locals())

    def _step_param(self, param, rows, grad, group: dict) -> None:
        if rows is not None and rows.numel() == 0:
            return
        momentum = group["momentum"]
        state = self.state[param]
        if momentum != 0 and not state:
            state["step"] = torch.zeros(param.shape[:1], dtype=torch.int64, device=param.device)
            state["momentum_buffer"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        if rows is None:
            _sgd_update(param, grad, state.get("momentum_buffer"), state.get("step"), group)
            return
        touched = param.index_select(0, rows)
        buf = step = None
        if momentum != 0:
            buf = state["momentum_buffer"].index_select(0, rows)
            step = state["step"].index_select(0, rows)
        _sgd_update(touched, grad, buf, step, group)
        param.index_copy_(0, rows, touched)
        if momentum != 0:
            state["momentum_buffer"].index_copy_(0, rows, buf)
            state["step"].index_copy_(0, rows, step)


def clip_grad_norm_(
    parameters, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False
) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` that also takes row-sparse gradients (torch's raises
    ``NotImplementedError`` for them: ``linalg_vector_norm`` has no sparse kernel).

    Scales every gradient in place by ``min(1, max_norm / (total_norm + 1e-6))`` and returns the
    total norm: the ``norm_type`` norm of the per-parameter norms. A sparse gradient's norm is
    that of its coalesced values (duplicated rows summed first, as the dense gradient holds
    them), and a gradient with duplicates is replaced by its coalesced form, which the optimizer
    then uses as is. With dense gradients only, the result has the same bits as torch's
    (``foreach=False``); a sparse gradient's norm sums its rows in another order than a dense
    one's, so it agrees with the dense norm to rounding.
    """
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    _check_number("max_norm", max_norm)
    if isinstance(norm_type, bool) or not isinstance(norm_type, int | float) or norm_type <= 0:
        raise ValueError(f"norm_type must be a positive float or inf, got {norm_type!r}")
    params = [p for p in parameters if p.grad is not None]
    if not params:
        return torch.tensor(0.0)
    norms = []
    for p in params:
        grad = p.grad
        if _is_row_sparse(p, grad, "clip_grad_norm_"):
            grad = p.grad = _coalesced(grad)
            grad = grad._values()
            if grad.numel() == 0:  # an inf norm of nothing raises; the norm of nothing is 0
                norms.append(grad.new_zeros(()))
                continue
        norms.append(torch.linalg.vector_norm(grad, norm_type))
    device = params[0].grad.device
    total = torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]), norm_type)
    if error_if_nonfinite and not bool(torch.isfinite(total)):
        raise RuntimeError(
            f"the total norm of order {norm_type} of the gradients is non-finite ({float(total)}),"
            " so it cannot be clipped; pass error_if_nonfinite=False to scale by it anyway"
        )
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for p in params:
        p.grad.mul_(coef.to(p.grad.device))
    return total


# ---------------------------------------------------------------------- row updates


def _rows_and_values(param, grad, who):
    """(rows, values) of a row-sparse gradient, coalesced; (None, grad) for a dense one."""
    if not _is_row_sparse(param, grad, who):
        return None, grad
    grad = _coalesced(grad)
    return grad._indices()[0], grad._values()


def _is_row_sparse(param, grad, who) -> bool:
    """True for a row-sparse COO gradient, False for a dense one; raises for anything else."""
    if param.is_complex() or not param.is_floating_point():
        raise TypeError(f"{who} supports real floating-point parameters, got {param.dtype}")
    if grad.layout == torch.strided:
        return False
    if grad.layout != torch.sparse_coo:
        raise TypeError(f"{who} needs a dense or sparse COO gradient, got layout {grad.layout}")
    if grad.sparse_dim() != 1:
        raise ValueError(
            f"{who} needs a row-sparse gradient (sparse_dim() == 1: whole rows, as "
            f"nn.Embedding(sparse=True) emits), got sparse_dim() = {grad.sparse_dim()} for a "
            f"parameter of shape {tuple(param.shape)}"
        )
    return True


def _coalesced(grad):
    """A row-sparse gradient with sorted unique rows: ``grad`` itself when its rows already are,
    else ``grad.coalesce()`` (an embedding's gradient, one entry per lookup: duplicates summed).
    The op emits sorted unique rows, but autograd's accumulation drops the coalesced flag, and
    coalesce() would then sort and copy every value row: one comparison pass decides instead."""
    rows = grad._indices()[0]
    if grad.is_coalesced() or bool((rows[1:] > rows[:-1]).all()):
        return grad
    return grad.coalesce()


def _column(values, param):
    """(T,) per-row values shaped (T, 1, ...) to broadcast over ``param``'s rows."""
    return values.view((-1,) + (1,) * (param.dim() - 1)) if param.dim() else values


def _workspace(optimizer, param, count, rows):
    """``count`` reusable (rows, ...) buffers shaped like ``param``'s rows, kept per parameter
    across steps (not in the state dict). A fresh multi-megabyte temporary every step costs more
    than the arithmetic on it: glibc hands large blocks back to the OS when they are freed, so
    each new one is page-faulted and zeroed again. Grows by a quarter when a step needs more."""
    cache = optimizer.__dict__.setdefault("_row_buffers", {})
    bufs = cache.get(id(param))
    fits = bufs is not None and len(bufs) >= count and bufs[0].shape[0] >= rows
    like = fits and (bufs[0].shape[1:], bufs[0].dtype, bufs[0].device) == (
        param.shape[1:],
        param.dtype,
        param.device,
    )
    if not like:
        shape = (rows + rows // 4, *param.shape[1:])
        bufs = [param.new_empty(shape) for _ in range(count)]
        cache[id(param)] = bufs
    return [b[:rows] for b in bufs[:count]]


def _adamw_update(param, grad, moments, step, group, scratch=None):
    """AdamW on (T, ...) rows in place: ``moments`` [exp_avg, exp_avg_sq(, max_exp_avg_sq)],
    ``step`` (T,) the rows' incremented counts, ``scratch`` two (T, ...) buffers for the
    temporaries (None: allocate). The op order is ``torch.optim.adam._single_tensor_adam``'s,
    so equal counts reproduce its bits."""
    denom_out, update_out = scratch if scratch is not None else (None, None)
    exp_avg, exp_avg_sq, *max_exp_avg_sq = moments
    lr = group["lr"]
    beta1, beta2 = group["betas"]
    if group["weight_decay"] != 0:
        param.mul_(1 - lr * group["weight_decay"])
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    second = exp_avg_sq
    if max_exp_avg_sq:
        second = torch.maximum(max_exp_avg_sq[0], exp_avg_sq, out=max_exp_avg_sq[0])
    lo, hi = (int(x) for x in torch.aminmax(step))
    if lo == hi:
        # one count for all rows: Python-float corrections, exactly as AdamW computes them
        bias_correction1 = 1 - beta1 ** float(lo)
        bias_correction2_sqrt = (1 - beta2 ** float(lo)) ** 0.5
        # in-place chains: the same arithmetic as AdamW's out-of-place ops, fewer temporaries
        denom = torch.sqrt(second, out=denom_out).div_(bias_correction2_sqrt).add_(group["eps"])
        param.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)
        return
    # per-row corrections as (T, 1, ...) columns; float64 so only their last bit can differ
    # from the scalar path. addcdiv_ computes self + (value * t1) / t2: the same order here.
    count = step.to(torch.float64)
    neg_step_size = _column((-lr / (1 - torch.pow(beta1, count))).to(param.dtype), param)
    bias_correction2_sqrt = _column((1 - torch.pow(beta2, count)).sqrt().to(param.dtype), param)
    denom = torch.sqrt(second, out=denom_out).div_(bias_correction2_sqrt).add_(group["eps"])
    param.add_(torch.mul(exp_avg, neg_step_size, out=update_out).div_(denom))


def _sgd_update(param, grad, buf, step, group):
    """SGD on (T, ...) rows in place, in ``torch.optim.sgd._single_tensor_sgd``'s op order; with
    momentum, ``buf`` (T, ...) and ``step`` (T,) are the rows' buffer and counts (updated)."""
    if group["weight_decay"] != 0:
        grad = grad.add(param, alpha=group["weight_decay"])
    momentum = group["momentum"]
    if momentum != 0:
        first = _column(step == 0, param)
        step += 1
        # SGD starts a buffer as a copy of the gradient; later steps blend into it
        blended = buf.mul(momentum).add_(grad, alpha=1 - group["dampening"])
        buf.copy_(torch.where(first, grad, blended))
        grad = grad.add(buf, alpha=momentum) if group["nesterov"] else buf
    param.add_(grad, alpha=-group["lr"])


# ---------------------------------------------------------------------- argument checks
