"""MITr: parameter counts of the paper's variants, the window (shifted, padded) and cross-window attentions
against brute-force references over the whole map, the object-aware token's attention, shapes, ablation
switches, bad inputs and torch.compile."""
import math

import pytest
import torch
import torch.nn.functional as F

from fastkd.models import mitr
from fastkd.models.mitr import MITr, variant_spec
from fastkd.models.mitr_attention import CrossWindowAttention, WindowAttention


@pytest.mark.parametrize("variant, paper_millions", [("s", 33), ("m", 62), ("l", 108)])
def test_parameter_counts_match_table_2_within_ten_percent(variant, paper_millions):
    with torch.device("meta"):  # no memory, no initialisation cost
        model = mitr(variant, 80)
    count = sum(p.numel() for p in model.parameters())
    assert abs(count / 1e6 - paper_millions) <= 0.1 * paper_millions, f"{variant}: {count / 1e6:.1f} M"


def brute_force_window_attention(attention: WindowAttention, x, shift):
    """Attention over every pixel of the (unpadded, unrolled) map, each pixel allowed the pixels of its own
    shifted window region: region of row y = floor((y - shift) / ws) (rows above the shift form their own
    region), columns alike; bias looked up by the true offset (dy, dx)."""
    b, h, w, c = x.shape
    heads, ws = attention.heads, attention.window
    d = c // heads
    q, k, v = attention.qkv(x.reshape(b, h * w, c)).view(b, h * w, 3, heads, d).unbind(2)
    ys, xs = (t.flatten() for t in torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij"))
    ry, rx = torch.div(ys - shift, ws, rounding_mode="floor"), torch.div(xs - shift, ws, rounding_mode="floor")
    allowed = (ry[:, None] == ry[None]) & (rx[:, None] == rx[None])
    logits = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(d)
    if attention.bias_table is not None:
        dy = (ys[:, None] - ys[None]).clamp(-ws + 1, ws - 1) + ws - 1
        dx = (xs[:, None] - xs[None]).clamp(-ws + 1, ws - 1) + ws - 1
        logits = logits + attention.bias_table[dy * (2 * ws - 1) + dx].permute(2, 0, 1)
    weights = logits.masked_fill(~allowed, float("-inf")).softmax(-1)
    out = torch.einsum("bhij,bjhd->bihd", weights, v).reshape(b, h * w, c)
    return attention.proj(out).view(b, h, w, c)


@pytest.mark.parametrize("h, w, window, shift, heads, bias", [
    (8, 8, 4, 0, 2, True), (8, 8, 4, 2, 2, True), (12, 8, 4, 2, 1, False),  # plain, shifted, no bias
    (6, 10, 4, 2, 2, True),   # padded to 8 x 12, then shifted
    (3, 3, 4, 0, 2, True),    # one padded window (the last stage of mitr-tiny)
    (14, 7, 7, 3, 3, True),   # odd window and shift
])
def test_window_attention_matches_brute_force(h, w, window, shift, heads, bias):
    torch.manual_seed(0)
    attention = WindowAttention(6, heads, window, position_bias=bias).double()
    if bias:
        torch.nn.init.normal_(attention.bias_table)  # large enough to matter
    x = torch.randn(2, h, w, 6, dtype=torch.float64)
    torch.testing.assert_close(attention(x, shift), brute_force_window_attention(attention, x, shift))


def test_shift_changes_which_pixels_meet():
    torch.manual_seed(0)
    attention = WindowAttention(4, 1, 4).double()
    x = torch.randn(1, 8, 8, 4, dtype=torch.float64, requires_grad=True)
    for shift, reached in ((0, False), (2, True)):
        x.grad = None
        attention(x, shift)[0, 3, 3].sum().backward()  # pixel (3, 3): window 0 unshifted, with (4, 4) shifted
        assert bool(x.grad[0, 4, 4].abs().sum() > 0) == reached


def brute_force_cross_window_attention(attention: CrossWindowAttention, x):
    """Per image and channel, the windows' ws^2 values of that channel as tokens, one at a time."""
    b, h, w, c = x.shape
    ws, heads = attention.window, attention.heads
    hp, wp = -(-h // ws) * ws, -(-w // ws) * ws
    padded = F.pad(x, (0, 0, 0, wp - w, 0, hp - h))
    out = torch.zeros_like(padded)
    corners = [(i, j) for i in range(0, hp, ws) for j in range(0, wp, ws)]
    n, dh = ws * ws, ws * ws // heads
    for image in range(b):
        for channel in range(c):
            tokens = torch.stack([padded[image, i:i + ws, j:j + ws, channel].reshape(n) for i, j in corners])
            q, k, v = attention.qkv(tokens).split(n, -1)
            heads_out = []
            for head in range(heads):
                part = slice(head * dh, (head + 1) * dh)
                weights = (q[:, part] @ k[:, part].t() / math.sqrt(dh)).softmax(-1)
                heads_out.append(weights @ v[:, part])
            mixed = attention.proj(torch.cat(heads_out, -1))
            for token, (i, j) in zip(mixed, corners):
                out[image, i:i + ws, j:j + ws, channel] = token.view(ws, ws)
    return out[:, :h, :w]


@pytest.mark.parametrize("h, w, window, heads", [(6, 6, 3, 1), (8, 4, 2, 2), (5, 7, 3, 3), (4, 4, 4, 1)])
def test_cross_window_attention_matches_brute_force(h, w, window, heads):
    torch.manual_seed(1)
    attention = CrossWindowAttention(window, heads).double()
    x = torch.randn(2, h, w, 3, dtype=torch.float64)
    torch.testing.assert_close(attention(x), brute_force_cross_window_attention(attention, x))


def test_single_window_cross_attention_is_a_linear_mixing_of_positions():
    attention = CrossWindowAttention(3).double()
    x = torch.randn(1, 3, 3, 2, dtype=torch.float64)
    n = 9
    v_weight, v_bias = attention.qkv.weight[2 * n:], attention.qkv.bias[2 * n:]
    tokens = x.permute(0, 3, 1, 2).reshape(2, n)  # one token per channel
    expected = attention.proj(tokens @ v_weight.t() + v_bias).view(1, 2, 3, 3).permute(0, 2, 3, 1)
    torch.testing.assert_close(attention(x), expected)


def test_token_attends_to_itself_and_every_pixel():
    torch.manual_seed(2)
    attention = WindowAttention(4, 2, 2).double()
    token, x = torch.randn(3, 1, 4, dtype=torch.float64), torch.randn(3, 5, 6, 4, dtype=torch.float64)
    keys = torch.cat([token, x.reshape(3, 30, 4)], 1)
    q = (token @ attention.qkv.weight.t() + attention.qkv.bias)[..., :4].view(3, 1, 2, 2)
    kv = (keys @ attention.qkv.weight.t() + attention.qkv.bias)[..., 4:].view(3, 31, 2, 2, 2)
    weights = torch.einsum("bqhd,bkhd->bhqk", q, kv[:, :, 0]).div(math.sqrt(2)).softmax(-1)
    expected = attention.proj(torch.einsum("bhqk,bkhd->bqhd", weights, kv[:, :, 1]).reshape(3, 1, 4))
    torch.testing.assert_close(attention.attend_token(token, x), expected)


def test_tiny_forward_shapes_features_and_gradients():
    torch.manual_seed(0)
    model = mitr("tiny", 10, in_channels=1)
    images = torch.randn(2, 1, 48, 48)
    logits, counts = model(images)
    assert logits.shape == (2, 10) and counts.shape == (2, 11)
    assert model.features(images).shape == (2, 128, 3, 3)
    assert logits.abs().max() <= 8.0 + 1e-5  # arc sigmoid: s cos(theta) within [-s, s]
    (logits.sum() + counts.sum()).backward()
    unused = [n for n, p in model.named_parameters() if p.grad is None]
    assert not unused, unused


def test_bf16_autocast_forward():
    model = mitr("tiny", 10, in_channels=1, image_size=24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, counts = model(torch.randn(2, 1, 24, 24))
    assert logits.isfinite().all() and counts.isfinite().all()


def test_ablation_switches_remove_their_parts():
    full = mitr("tiny", 10, in_channels=1)
    bare = mitr("tiny", 10, in_channels=1, position_bias=False, shift=False, cross_window=False,
                arc_sigmoid=False, count_token=False)
    names = {n for n, _ in bare.named_parameters()}
    assert not any("bias_table" in n or "count" in n for n in names)
    assert sum(p.numel() for p in bare.parameters()) < sum(p.numel() for p in full.parameters())
    logits, counts = bare(torch.randn(2, 1, 48, 48))
    assert counts is None and logits.shape == (2, 10) and isinstance(bare.classifier, torch.nn.Linear)
    shifts = [layer.shift for stage in full.encoder.stages for layer in stage if hasattr(layer, "shift")]
    assert shifts == [0, 2, 0, 2, 0, 2, 0, 0]  # maps 24, 12, 6, 3: the last fits one window of 4


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="variant must be one of"):
        mitr("xl", 80)
    with pytest.raises(ValueError, match="image_size must be >= 16"):
        variant_spec("tiny", 8)
    with pytest.raises(ValueError, match=r"images must be \(B, 1, H, W\)"):
        mitr("tiny", 10, in_channels=1)(torch.randn(2, 3, 48, 48))
    with pytest.raises(ValueError, match="num_classes"):
        MITr(variant_spec("tiny"), 0)
    with pytest.raises(ValueError, match="image_size must be >= 32"):
        variant_spec("tiny", 24, patch=4)  # three halvings of 4 px patches need 32 px
    with pytest.raises(ValueError, match="patch must be >= 1"):
        variant_spec("tiny", 48, patch=0)


def test_patch_option():
    spec = variant_spec("tiny", 48, patch=4)
    assert (spec.patch, spec.image_size, variant_spec("tiny").patch) == (4, 48, 2)
    model = MITr(spec, 10, 1)
    assert model.features(torch.randn(2, 1, 48, 48)).shape == (2, 128, 2, 2)  # maps 12, 6, 3, 2


def _compile_check(backend, device):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = mitr("tiny", 4, in_channels=1, image_size=16).to(device)
    images = torch.randn(2, 1, 16, 16, device=device)

    def loss_fn(m, x):
        logits, counts = m(x)
        return logits.square().sum() + counts.logsumexp(-1).sum()

    eager = loss_fn(model, images)
    eager.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled = torch.compile(loss_fn, fullgraph=True, backend=backend)(model, images)
    compiled.backward()
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
    for got, want in zip((p.grad for p in model.parameters()), grads):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-5)


def test_torch_compile_traces_the_whole_model_in_one_graph():
    # fullgraph: Dynamo takes the forward without a graph break. AOT autograd adds a minute and Inductor's code
    # generation of the whole model 12 minutes on the shared 2-core CPU, so the Inductor check (forward and
    # backward) runs where a GPU is.
    _compile_check("eager", "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (Inductor on CPU takes minutes)")
def test_torch_compile_inductor_on_gpu():
    _compile_check("inductor", "cuda")
