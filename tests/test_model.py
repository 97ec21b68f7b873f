"""FrameTransformer model: shapes, backend switch, reference-vs-Triton equivalence (float64, CPU interpreter);
the v4 architecture's structure, parameter count and upstream keys (numbers against upstream: test_upstream.py)."""
import copy
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

from ftkernels import reference
from frame_transformer.model import (ConvResBlock, FrameConvAttention, FrameTransformer, ModelConfig, RotaryEmbedding,
                                     preset)
from frame_transformer.upstream import key_map
from helpers import KERNEL_DEVICE, assert_low_precision_ok

DATA = os.path.join(os.path.dirname(__file__), "data")


def test_tiny_shapes_and_mask_range():
    torch.manual_seed(0)
    m = FrameTransformer(preset("tiny"))
    assert m.features == [128, 64, 32, 16]
    x = torch.rand(2, 2, 129, 12)
    with torch.no_grad():
        y = m(x)
    assert y.shape == x.shape
    assert float(y.min()) >= 0 and float(y.max()) <= 1
    # top bin is padded back by replicating the last mask bin
    assert torch.equal(y[:, :, -1], y[:, :, -2])
    # the model also takes max_bin inputs (top bin already dropped)
    assert m(x[:, :, :128]).shape == (2, 2, 128, 12)
    assert m.num_parameters() == sum(p.numel() for p in m.parameters()) > 0


def test_frames_are_never_resampled_any_width():
    m = FrameTransformer(preset("micro"))
    for w in (1, 5, 17):
        assert m(torch.rand(1, 2, 33, w)).shape == (1, 2, 33, w)


def test_bad_input_shapes_are_refused():
    m = FrameTransformer(preset("micro"))
    with pytest.raises(ValueError, match="expected"):
        m(torch.rand(1, 2, 40, 4))
    with pytest.raises(ValueError, match="expected"):
        m(torch.rand(1, 1, 33, 4))
    with pytest.raises(ValueError, match="num_heads"):
        FrameTransformer(preset("micro", num_heads=3))
    with pytest.raises(ValueError, match="levels"):
        FrameTransformer(preset("micro", num_levels=4))


def test_structure_matches_spec():
    m = FrameTransformer(preset("tiny"))
    enc_t = m.encoder_transformers[1]
    # embeds the level's channels (8) down to num_attention_maps[1] (2) maps, depth-wise only
    assert enc_t.embed.weight_pw is None and tuple(enc_t.embed.weight_dw.shape) == (2, 8)
    assert abs(enc_t.attn.scale - 64 ** -0.5) < 1e-12  # 1/sqrt(features) as in the seed
    dec_t = m.decoder_transformers[0]
    assert hasattr(dec_t, "skip_attn") and hasattr(dec_t, "self_attn")
    assert tuple(m.out.weight_dw.shape) == (2, m.level_channels[0] + m.maps[0])
    # configurable: levels, channels, heads, expansion, maps
    cfg = ModelConfig(channels=3, n_fft=128, num_heads=4, expansion=1, num_attention_maps=[1, 2],
                      channel_mults=[1, 2], dropout=0.2)
    m2 = FrameTransformer(cfg)
    assert len(m2.encoders) == 2 and len(m2.decoders) == 1
    assert m2(torch.rand(1, 2, 65, 4)).shape == (1, 2, 65, 4)


def test_set_backend_reaches_every_op_module():
    m = FrameTransformer(preset("micro"), backend="reference")
    with_backend = [mod for mod in m.modules() if hasattr(mod, "backend")]
    assert len(with_backend) > 20 and all(mod.backend == "reference" for mod in with_backend)
    m.set_backend("triton")
    assert all(mod.backend == "triton" for mod in with_backend)
    m.set_backend(None)
    assert all(mod.backend is None for mod in with_backend)


def test_same_state_dict_for_every_backend():
    a = FrameTransformer(preset("micro"), backend="reference")
    b = FrameTransformer(preset("micro"), backend="triton")
    assert list(a.state_dict()) == list(b.state_dict())
    b.load_state_dict(a.state_dict())


def _rel_err(a, b):
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def test_reference_vs_triton_outputs_and_gradients():
    """The same micro model on the Triton kernels and on the reference ops: same output and parameter gradients.
    Without a GPU the kernels run in the CPU interpreter in float64 (tight tolerances); on a GPU in float32."""
    from ftkernels import _common

    if _common.INTERPRET:
        device, dtype, tol = "cpu", torch.float64, 1e-10
    elif torch.cuda.is_available():
        device, dtype, tol = "cuda", torch.float32, 2e-4
    else:
        pytest.skip("needs TRITON_INTERPRET=1 or a GPU")
    torch.manual_seed(0)
    m = FrameTransformer(preset("micro"), backend="reference").to(device, dtype)
    x = torch.rand(1, 2, 33, 8, dtype=dtype, device=device)
    y_ref = m(x)
    (y_ref.square().sum()).backward()
    g_ref = {k: p.grad.clone() for k, p in m.named_parameters()}
    m.zero_grad(set_to_none=True)
    m.set_backend("triton")
    y_tri = m(x)
    (y_tri.square().sum()).backward()
    assert _rel_err(y_tri, y_ref) < tol
    for k, p in m.named_parameters():
        assert p.grad is not None, k
        assert _rel_err(p.grad, g_ref[k]) < tol * 10, k


# ----------------------------------------------------------------------------------------------
# the v4 architecture (the seed's published model)


def test_v4_preset_has_the_seed_parameter_count_and_upstream_keys():
    with torch.device("meta"):
        m = FrameTransformer(preset("v4"))
    assert m.num_parameters() == 192_699_428
    with open(os.path.join(DATA, "upstream_v4_keys.json")) as f:
        up = json.load(f)
    assert up["parameters"] == 192_699_428
    assert sum(math.prod(shape) for _, shape, kind in up["keys"] if kind == "parameter") == 192_699_428
    # one-to-one: every upstream key from exactly one of ours, same shape up to FrameNorm/embed singleton dims
    kmap = key_map(m)
    assert len(kmap) == len(m.state_dict()) == len(up["keys"]) == 351
    assert {k: list(shape) for k, (_, shape) in kmap.items()} == {k: shape for k, shape, _ in up["keys"]}
    ours = m.state_dict()
    params = {n for n, _ in m.named_parameters()}
    for k, shape, kind in up["keys"]:
        key = kmap[k][0]
        assert ours[key].numel() == math.prod(shape), k
        assert (key in params) == (kind == "parameter"), k  # the rotary tables are buffers, as upstream's


def test_all_linear_presets_keep_their_architecture():
    with torch.device("meta"):
        counts = {n: FrameTransformer(preset(n)).num_parameters() for n in ("default", "linear", "tiny", "micro")}
    assert counts == {"default": 319_912_102, "linear": 319_912_102, "tiny": 2_746_074, "micro": 89_832}
    assert preset("default") == preset("linear") and preset("default").architecture == "linear"


def test_v4_structure():
    m = FrameTransformer(preset("v4-tiny"))
    assert len(m.encoders) == 6 and m.features == [128, 64, 32, 16, 8, 4]
    e0, e1 = m.encoders[0].body, m.encoders[1].body
    assert isinstance(e0, ConvResBlock) and e0.conv2.stride == (1, 1) and e0.identity.stride == (1, 1)
    assert tuple(e0.identity.weight.shape) == (4, 2, 1, 1)  # 2 -> 4 channels: 1x1 conv
    assert e1.conv2.stride == (2, 1) and e1.identity.stride == (2, 1) and e1.conv1.bias is None
    assert tuple(e1.norm.weight.shape) == (4 + 2, 128)  # the norm sees the input features
    # same channels, no downsampling: the identity is the identity
    assert isinstance(ConvResBlock(3, 3, 8).identity, torch.nn.Identity)
    # a channel mix even when C_in == C_out, when downsampling
    assert isinstance(ConvResBlock(3, 3, 8, downsample=True).identity, torch.nn.Conv2d)
    attn = m.encoder_transformers[0].attn
    assert isinstance(attn, FrameConvAttention) and attn.q_proj.linear.weight_dw is None
    assert tuple(attn.q_proj.conv.weight.shape) == (2, 1, 1, 3) and attn.q_proj.conv.bias is not None
    assert attn.out_proj.weight_dw is None and attn.rotary_embedding.freqs.numel() == 128 // 2 // 2
    assert abs(attn.scale - 128 ** -0.5) < 1e-15
    assert m.out.bias_dw is None and m.out.weight_pw is None


def test_conv_res_block_is_the_formula():
    torch.manual_seed(0)
    blk = ConvResBlock(3, 5, 8, downsample=True).double()
    with torch.no_grad():
        blk.norm.weight.normal_(1, 0.3), blk.norm.bias.normal_(0, 0.3)
    x = torch.randn(2, 3, 8, 7, dtype=torch.float64)
    n = F.layer_norm(x.transpose(2, 3), (8,)).transpose(2, 3) * blk.norm.weight[:, :, None] + blk.norm.bias[:, :, None]
    h = F.conv2d(F.conv2d(n, blk.conv1.weight, padding=1).relu() ** 2, blk.conv2.weight, padding=1, stride=(2, 1))
    want = F.conv2d(x, blk.identity.weight, stride=(2, 1)) + h
    got = blk(x)
    assert got.shape == (2, 5, 4, 7)
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)


def test_rotary_table_matches_the_reference_rotation():
    """With exact float64 frequencies the stored-table rotation is ftkernels' reference rotary; an odd head dim
    leaves its last feature alone."""
    torch.manual_seed(0)
    B, C, H, d, W = 2, 3, 2, 6, 9
    rot = RotaryEmbedding(d).double()
    rot.freqs.copy_(10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float64) / d))
    x = torch.randn(B, C, H * d, W, dtype=torch.float64)
    heads = x.reshape(B, C, H, d, W).transpose(3, 4)  # (B, C, H, W, d)
    want = reference.apply_rotary(heads).transpose(3, 4).reshape(B, C, H * d, W)
    assert torch.allclose(rot(x, H), want, rtol=1e-13, atol=1e-13)
    odd = RotaryEmbedding(5)
    y = torch.randn(1, 1, 10, 4)
    out = odd(y, 2)
    assert torch.equal(out.reshape(1, 1, 2, 5, 4)[:, :, :, 4], y.reshape(1, 1, 2, 5, 4)[:, :, :, 4])
    assert not torch.equal(out, y)
    assert odd(y.to(torch.bfloat16), 2).dtype == torch.bfloat16


def test_v4_mask_has_nyquist_zero_and_takes_any_width():
    torch.manual_seed(0)
    m = FrameTransformer(preset("v4-micro")).eval()
    for w in (1, 5, 17):
        x = torch.rand(2, 2, 65, w)
        with torch.no_grad():
            y, logits = m(x), m.forward_logits(x[:, :, :64])
        assert y.shape == x.shape
        assert torch.equal(y[:, :, -1], torch.zeros_like(y[:, :, -1]))
        assert torch.equal(y[:, :, :64], torch.sigmoid(logits))
    assert m(torch.rand(1, 2, 64, 3)).shape == (1, 2, 64, 3)


@pytest.mark.skipif(KERNEL_DEVICE == "cuda", reason="CPU autocast in fp16 (the interpreter computes fp16 faithfully)")
def test_v4_conv_block_norm_writes_what_conv1_reads():
    """On the Triton path the block's norm writes conv1's input directly in the autocast dtype and channels-last
    (no cast, no layout copy); the block's output stays contiguous. Forward and every gradient within the
    low-precision rule of the reference path under the same autocast (vs float64); without autocast the same
    numbers as the reference path."""
    torch.manual_seed(0)
    block = ConvResBlock(3, 5, 16, downsample=True, backend="triton")
    seen = []
    block.conv1.register_forward_pre_hook(lambda m, a: seen.append(
        (a[0].dtype, a[0].is_contiguous(memory_format=torch.channels_last))))
    x = torch.randn(2, 3, 16, 9) + 0.5

    def run(backend, dtype=torch.float32, amp=None):
        b = copy.deepcopy(block).to(dtype)
        b.norm.backend = backend
        xx = x.to(dtype).requires_grad_()
        with torch.autocast("cpu", dtype=amp, enabled=amp is not None):
            y = b(xx)
        g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        grads = torch.autograd.grad(y, [xx, *b.parameters()], g.to(y.dtype))
        return y, grads

    y, g = run("triton", amp=torch.float16)
    assert seen[-1] == (torch.float16, True) and y.is_contiguous()
    y_low, g_low = run("reference", amp=torch.float16)
    assert seen[-1] == (torch.float32, False)
    y64, g64 = run("reference", torch.float64)
    assert_low_precision_ok(y, y_low, y64, "block output")
    for i, (a, b_, c) in enumerate(zip(g, g_low, g64)):
        assert_low_precision_ok(a, b_, c, f"gradient {i}")
    y, g = run("triton", torch.float64)
    assert seen[-1] == (torch.float64, True)
    assert _rel_err(y, y64) < 1e-12
    assert all(_rel_err(a, c) < 1e-10 for a, c in zip(g, g64))


def test_v4_reference_vs_triton_outputs_and_gradients():
    """v4-micro on the Triton kernels and on the reference: same output and parameter gradients (float64 in the
    CPU interpreter, float32 on a GPU)."""
    from ftkernels import _common

    if _common.INTERPRET:
        device, dtype, tol = "cpu", torch.float64, 1e-10
    elif torch.cuda.is_available():
        device, dtype, tol = "cuda", torch.float32, 2e-4
    else:
        pytest.skip("needs TRITON_INTERPRET=1 or a GPU")
    torch.manual_seed(0)
    m = FrameTransformer(preset("v4-micro"), backend="reference").to(device, dtype)
    x = torch.rand(1, 2, 65, 4, dtype=dtype, device=device)
    # fp32 convolutions, not cuDNN's TF32 default, which rounds the two paths' last-bit differences to 10 bits
    # (on an H200, with TF32 convolutions, the outputs were 2.3e-4 apart: just over this test's 2e-4)
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        y_ref = m(x)
        y_ref.square().sum().backward()
        g_ref = {k: p.grad.clone() for k, p in m.named_parameters()}
        scale = max(float(g.norm()) for g in g_ref.values())
        m.zero_grad(set_to_none=True)
        m.set_backend("triton")
        y_tri = m(x)
        y_tri.square().sum().backward()
    assert _rel_err(y_tri, y_ref) < tol
    for k, p in m.named_parameters():  # some biases have zero gradient (softmax shift-invariance): scale floor
        err = float((p.grad - g_ref[k]).norm()) / max(float(g_ref[k].norm()), 1e-6 * scale)
        assert err < tol * 10, k
