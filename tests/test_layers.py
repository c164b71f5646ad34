"""The fast CPU dropout (``torch.ops.hsoftmax.dropout_mask``) and the model's encoder layer,
against ``F.dropout``'s definition and ``nn.TransformerEncoderLayer``."""

import math

import pytest
import torch
from torch import nn

from hsoftmax.models.layers import (
    EncoderLayer,
    encode_packed,
    scaled_masked_softmax,
    self_attention,
)
from hsoftmax.nn import Dropout, dropout


def _mask(shape, p, seed, dtype=torch.float32):
    return torch.ops.hsoftmax.dropout_mask(torch.empty(shape, dtype=dtype), p, seed)


@pytest.mark.parametrize("p", [0.1, 0.2, 0.5, 0.9])
def test_mask_values_and_keep_rate(p):
    n = 1 << 20
    m = _mask((n,), p, seed=12345)
    kept = m != 0
    assert torch.all(m[kept] == torch.tensor(1 / (1 - p), dtype=torch.float32))
    # the keep rate is 1 - p within 6 binomial standard deviations
    sd = math.sqrt(n * p * (1 - p))
    assert abs(kept.sum().item() - n * (1 - p)) < 6 * sd
    # neighbours are independent: P(both kept) = (1 - p)^2 for adjacent and far pairs
    for lag in (1, 8, 1024):
        both = (kept[:-lag] & kept[lag:]).double().mean().item()
        assert abs(both - (1 - p) ** 2) < 6 * math.sqrt((1 - p) ** 2 / n)


def test_mask_deterministic_per_seed_and_thread_count():
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _mask((3, 1000, 70), 0.3, seed=7)
        torch.set_num_threads(2)
        two = _mask((3, 1000, 70), 0.3, seed=7)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)
    other = _mask((3, 1000, 70), 0.3, seed=8)
    agree = ((one != 0) == (other != 0)).double().mean().item()
    assert abs(agree - (0.7**2 + 0.3**2)) < 0.01  # independent seeds agree only by chance
    # a seed's mask does not depend on the sign bits: large and negative seeds work
    assert _mask((10,), 0.5, seed=-(2**63)).shape == (10,)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_mask_dtypes_follow_input(dtype):
    m = _mask((4096,), 0.25, seed=3, dtype=dtype)
    assert m.dtype == dtype
    assert torch.equal(m != 0, _mask((4096,), 0.25, seed=3) != 0)


def test_mask_bad_input():
    with pytest.raises(RuntimeError, match="p must be in"):
        _mask((4,), 1.0, seed=0)
    with pytest.raises(RuntimeError, match="floating-point"):
        torch.ops.hsoftmax.dropout_mask(torch.zeros(4, dtype=torch.int64), 0.5, 0)


def test_mask_opcheck():
    x = torch.randn(5, 7)
    torch.library.opcheck(torch.ops.hsoftmax.dropout_mask.default, (x, 0.2, 11))


def test_dropout_function():
    x = torch.randn(64, 33, requires_grad=True)
    assert dropout(x, 0.3, training=False) is x
    assert dropout(x, 0.0) is x
    assert torch.count_nonzero(dropout(x, 1.0)) == 0
    with pytest.raises(ValueError, match="dropout probability"):
        dropout(x, 1.5)
    torch.manual_seed(0)
    y = dropout(x, 0.3)
    torch.manual_seed(0)
    assert torch.equal(dropout(x, 0.3), y)  # torch.manual_seed fixes the mask
    kept = y != 0
    assert torch.allclose(y[kept], x[kept] / 0.7)
    y.sum().backward()
    assert torch.allclose(x.grad, kept.float() / 0.7)  # d y / d x is the mask


def test_dropout_module_is_a_drop_in():
    m = Dropout(0.4)
    assert m.p == 0.4 and list(m.state_dict()) == []
    x = torch.ones(1000, 100)
    y = m(x)
    assert abs((y != 0).float().mean().item() - 0.6) < 0.01
    m.eval()
    assert m(x) is x


def _layers(d=32, heads=4, p=0.2):
    torch.manual_seed(1)
    ours = EncoderLayer(d, heads, 2 * d, p, batch_first=True, norm_first=True)
    ref = nn.TransformerEncoderLayer(d, heads, 2 * d, p, batch_first=True, norm_first=True)
    ref.load_state_dict(ours.state_dict())  # same parameter names and shapes
    return ours, ref


def _masks(batch=5, length=9):
    lengths = torch.tensor([9, 1, 4, 7, 2])[:batch]
    pad = torch.arange(length)[None, :] >= lengths[:, None]
    causal = torch.triu(torch.full((length, length), -math.inf), 1)
    return causal, pad


def _softmax_case(dtype, mask_kind):
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(3, 2, 6, 6, generator=g, dtype=dtype) * 4
    causal, pad = _masks(batch=3, length=6)
    pad = torch.zeros(pad.shape, dtype=dtype).masked_fill(pad, -math.inf)[:, None, None, :]
    mask = {"none": None, "causal": causal.to(dtype), "pad": pad, "both": causal.to(dtype) + pad}
    return scores, mask[mask_kind]


@pytest.mark.parametrize("mask_kind", ["none", "causal", "pad", "both"])
@pytest.mark.parametrize("scale", [1.0, 0.27])
def test_scaled_masked_softmax_matches_torch_softmax(mask_kind, scale):
    scores, mask = _softmax_case(torch.float32, mask_kind)
    x = scores.clone().requires_grad_()
    ref = scores.clone().requires_grad_()
    got = scaled_masked_softmax(x, scale, mask)
    want = torch.softmax(ref * scale + (0 if mask is None else mask), dim=-1)
    assert torch.allclose(got, want, atol=1e-6)
    assert torch.equal(got == 0, want == 0)  # masked entries are exactly 0
    grad = torch.randn(got.shape)
    got.backward(grad)
    want.backward(grad)
    assert torch.allclose(x.grad, ref.grad, atol=1e-6)
    assert torch.equal(scores, x.detach())  # the input is not written in place


@pytest.mark.parametrize("mask_kind", ["none", "both"])
def test_scaled_masked_softmax_gradcheck(mask_kind):
    scores, mask = _softmax_case(torch.float64, mask_kind)
    assert torch.autograd.gradcheck(
        lambda s: scaled_masked_softmax(s, 0.4, mask), (scores.requires_grad_(),)
    )


def test_scaled_masked_softmax_other_dtypes_take_torch_softmax():
    scores, mask = _softmax_case(torch.float32, "both")
    got = scaled_masked_softmax(scores.bfloat16(), 0.5, mask.bfloat16())
    want = torch.softmax(scores.bfloat16() * 0.5 + mask.bfloat16(), dim=-1)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, want)


@pytest.mark.parametrize("bool_masks", [False, True])
def test_self_attention_matches_multihead_attention(bool_masks):
    ours, _ = _layers()
    ours.eval()  # the reference without its attention dropout
    x = torch.randn(5, 9, 32)
    causal, pad = _masks()
    if not bool_masks:
        pad = torch.zeros(pad.shape).masked_fill(pad, -math.inf)
    else:
        causal = causal == -math.inf
    want = ours.self_attn(x, x, x, attn_mask=causal, key_padding_mask=pad, need_weights=False)[0]
    got = self_attention(x, ours.self_attn, causal, pad, p=0.0)
    assert torch.allclose(got, want, atol=1e-5)


def test_encoder_layer_equals_torch_layer_without_dropout():
    ours, ref = _layers()
    x = torch.randn(5, 9, 32)
    causal, pad = _masks()
    pad = torch.zeros(pad.shape).masked_fill(pad, -math.inf)
    ours.eval(), ref.eval()
    assert torch.allclose(ours(x, causal, pad), ref(x, causal, pad), atol=1e-5)
    ours0, ref0 = _layers(p=0.0)
    assert torch.allclose(ours0(x, causal, pad), ref0(x, causal, pad), atol=1e-5)


def test_encoder_layer_training_path_is_seeded_and_differentiable():
    ours, _ = _layers()
    ours = ours.double()
    causal, pad = _masks(batch=3, length=5)
    causal = causal.double()
    pad = torch.zeros(pad.shape, dtype=torch.float64).masked_fill(pad, -math.inf)
    x = torch.randn(3, 5, 32, dtype=torch.float64, requires_grad=True)

    def f(inp):
        torch.manual_seed(5)  # the same masks on every call
        return ours(inp, causal, pad)

    assert ours.training
    assert torch.equal(f(x), f(x))
    torch.manual_seed(6)
    assert not torch.equal(ours(x, causal, pad), f(x))  # another seed, other masks
    assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-5)


def _stacks(d=32, heads=4, p=0.2, n=2):
    torch.manual_seed(2)
    ours = nn.TransformerEncoder(
        EncoderLayer(d, heads, 2 * d, p, batch_first=True, norm_first=True),
        n,
        norm=nn.LayerNorm(d),
        enable_nested_tensor=False,
    )
    ref = nn.TransformerEncoder(
        nn.TransformerEncoderLayer(d, heads, 2 * d, p, batch_first=True, norm_first=True),
        n,
        norm=nn.LayerNorm(d),
        enable_nested_tensor=False,
    )
    with torch.no_grad():  # distinct weights per layer, then the same in both stacks
        for prm in ours.parameters():
            prm.normal_(0, 0.3)
    ref.load_state_dict(ours.state_dict())
    return ours, ref


def test_encode_packed_matches_transformer_encoder_at_real_positions():
    ours, ref = _stacks()
    ours.eval(), ref.eval()
    x = torch.randn(5, 9, 32)
    causal, pad = _masks()
    valid = ~pad
    got = encode_packed(ours, x, valid, causal)
    want = ref(x, mask=causal, src_key_padding_mask=pad)
    assert torch.allclose(got[valid], want[valid], atol=1e-5)
    assert torch.count_nonzero(got[pad]) == 0
    # and the layers' own forward (nn.TransformerEncoder over EncoderLayer) agrees too
    assert torch.allclose(
        ours(x, mask=causal, src_key_padding_mask=pad)[valid], want[valid], atol=1e-5
    )


def test_encode_packed_training_gradient():
    ours, _ = _stacks(d=16, heads=2)
    ours = ours.double()
    causal, pad = _masks(batch=4, length=6)
    x = torch.randn(4, 6, 16, dtype=torch.float64, requires_grad=True)

    def f(inp):
        torch.manual_seed(9)
        return encode_packed(ours, inp, ~pad, causal.double())

    assert torch.equal(f(x), f(x))
    assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-5)


def test_history_encoder_uses_packed_layers_with_torch_results():
    from hsoftmax.models.history_centric import HistoryEncoder

    torch.manual_seed(3)
    enc = HistoryEncoder(50, 6, d_model=32, num_layers=2, nhead=4, dim_feedforward=64).eval()
    assert all(isinstance(layer, EncoderLayer) for layer in enc.layers.layers)
    plain = HistoryEncoder(50, 6, d_model=32, num_layers=2, nhead=4, dim_feedforward=64).eval()
    plain.layers = nn.TransformerEncoder(
        nn.TransformerEncoderLayer(32, 4, 64, 0.2, batch_first=True, norm_first=True),
        2,
        norm=nn.LayerNorm(32),
        enable_nested_tensor=False,
    )
    plain.load_state_dict(enc.state_dict())  # the same keys: old checkpoints still load
    plain.eval()
    lengths = torch.tensor([5, 1, 3])
    mask = torch.arange(5)[None, :] < lengths[:, None]
    g = torch.Generator().manual_seed(0)
    batch = {
        k: torch.randint(0, 7, (3, 5), generator=g) * mask
        for k in ("time", "weekday", "duration", "diff")
    }
    batch.update(
        x=torch.randint(1, 50, (3, 5), generator=g) * mask, mask=mask, user=torch.tensor([1, 2, 5])
    )
    assert torch.allclose(enc(batch), plain(batch), atol=1e-5)
    assert torch.allclose(
        enc(batch, all_positions=True)[mask], plain(batch, all_positions=True)[mask], atol=1e-5
    )
