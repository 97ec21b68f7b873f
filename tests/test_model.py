"""FrameTransformer model: shapes, backend switch, reference-vs-Triton equivalence (float64, CPU interpreter)."""
import pytest
import torch

from frame_transformer.model import FrameTransformer, ModelConfig, preset


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
