"""Validation and edge cases every op and module handles with the correct behaviour or a clear, named error:
meta tensors and models built on the meta device, the FTKERNELS_BACKEND variable, eps types, module
constructor arguments, autocast with float64 inputs."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import ftkernels
from helpers import KERNEL_DEVICE, OP_CASES, ORACLE_DTYPE, ORACLE_TOL

BACKENDS = ["reference", "triton"]
CASE_IDS = [c.id for c in OP_CASES]


# ----------------------------------------------------------------------------------------------
# meta device


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", OP_CASES, ids=CASE_IDS)
def test_meta_tensors(case, backend):
    """Every op on meta tensors: an output of the right shape and dtype on meta, and a backward."""
    real = case.make(device="cpu", dtype=torch.float32, requires_grad=False)
    want = case(real, "reference")
    args = {n: torch.empty_like(t, device="meta").requires_grad_() for n, t in real.items()}
    out = case(args, backend)
    assert out.device.type == "meta" and out.shape == want.shape and out.dtype == want.dtype
    grads = torch.autograd.grad(out, list(args.values()), torch.empty_like(out))
    for (n, t), g in zip(args.items(), grads):
        assert g.device.type == "meta" and g.shape == t.shape, n


def _modules(backend):
    return [
        (ftkernels.MultichannelLinear(3, 5, 8, 12, depthwise=True, bias=True, backend=backend), (2, 3, 8, 7)),
        (ftkernels.FrameNorm(3, 8, backend=backend), (2, 3, 8, 7)),
        (ftkernels.SquaredReLUFeedForward(3, 8, expansion=2, bias=True, backend=backend), (2, 3, 8, 7)),
        (ftkernels.MultichannelMultiheadAttention(3, 2, 8, backend=backend), (2, 3, 8, 7)),
    ]


@pytest.mark.parametrize("backend", BACKENDS)
def test_modules_built_on_the_meta_device(backend):
    with torch.device("meta"):
        mods = _modules(backend)
    for m, shape in mods:
        assert all(p.device.type == "meta" for p in m.parameters())
        x = torch.empty(shape, device="meta", requires_grad=True)
        out = m(x)
        assert out.device.type == "meta" and out.shape[0] == shape[0]
        out.sum().backward()
        assert x.grad.shape == x.shape
    # the usual next step: materialise and load weights
    m, shape = mods[0]
    m.to_empty(device="cpu")
    assert m.weight_pw.device.type == "cpu"


@pytest.mark.parametrize("backend", BACKENDS)
def test_model_built_on_the_meta_device(backend):
    model_mod = pytest.importorskip("frame_transformer.model")
    cfg = model_mod.preset("micro")
    with torch.device("meta"):
        model = model_mod.FrameTransformer(cfg, backend=backend)
    x = torch.empty(1, cfg.in_channels, cfg.n_fft // 2 + 1, 8, device="meta")
    out = model(x)
    assert out.device.type == "meta" and out.shape == x.shape


# ----------------------------------------------------------------------------------------------
# FTKERNELS_BACKEND


def _import_with_env(value):
    env = {**os.environ, "FTKERNELS_BACKEND": value}
    return subprocess.run([sys.executable, "-c", "import ftkernels; print(ftkernels.get_backend())"], env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("value,want", [("", "auto"), ("  ", "auto"), ("reference", "reference"),
                                        ("Triton", "triton")])
def test_backend_environment_variable(value, want):
    r = _import_with_env(value)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == want


def test_bogus_backend_environment_variable_names_it():
    r = _import_with_env("cuda")
    assert r.returncode != 0
    assert "FTKERNELS_BACKEND" in r.stderr and "'cuda'" in r.stderr and "auto" in r.stderr


# ----------------------------------------------------------------------------------------------
# eps


def _norm_ops(eps):
    x = torch.randn(1, 2, 4, 3)
    w1, w2 = torch.randn(2, 8, 4), torch.randn(2, 4, 8)
    return [lambda: ftkernels.frame_norm(x, eps=eps), lambda: ftkernels.squared_relu_ffn(x, w1, w2, eps=eps),
            lambda: ftkernels.FrameNorm(2, 4, eps=eps), lambda: ftkernels.SquaredReLUFeedForward(2, 4, eps=eps)]


@pytest.mark.parametrize("eps", [np.float32(1e-5), np.float64(1e-5), 1e-5, 1, np.float16(1e-3)])
def test_eps_real_numbers_accepted(eps):
    for make in _norm_ops(eps):
        make()
    x = torch.randn(1, 2, 4, 3, dtype=ORACLE_DTYPE, device=KERNEL_DEVICE)
    torch.testing.assert_close(ftkernels.frame_norm(x, eps=eps, backend="triton"),
                               ftkernels.reference.frame_norm(x, eps=float(eps)), **ORACLE_TOL)


@pytest.mark.parametrize("eps,match", [(True, "eps must be a positive float, got True"),
                                       (np.bool_(True), "eps must be a positive float"),
                                       ("1e-5", "eps must be a positive float, got '1e-5'"),
                                       (torch.tensor(1e-5), "eps must be a positive float"),
                                       (0.0, "eps must be a positive float"), (-1e-5, "eps must be a positive"),
                                       (float("nan"), "eps must be a positive"), (float("inf"), "eps must be")])
def test_eps_rejected_with_a_named_error(eps, match):
    for make in _norm_ops(eps):
        with pytest.raises((TypeError, ValueError), match=match):
            make()


# ----------------------------------------------------------------------------------------------
# module constructors validate their arguments (not at the first forward)


@pytest.mark.parametrize("make,match", [
    (lambda: ftkernels.MultichannelMultiheadAttention(3, 0, 8), r"num_heads must be a positive int.*got 0"),
    (lambda: ftkernels.MultichannelMultiheadAttention(3, -2, 8), r"num_heads must be a positive int"),
    (lambda: ftkernels.MultichannelMultiheadAttention(3, 2.0, 8), r"num_heads must be a positive int"),
    (lambda: ftkernels.MultichannelMultiheadAttention(3, 3, 8), r"num_heads=3 must divide features=8"),
    (lambda: ftkernels.MultichannelMultiheadAttention(3, 8, 8), r"rotary needs an even head dim.*8 / 8 = 1"),
    (lambda: ftkernels.MultichannelMultiheadAttention(3, 2, 8, scale=float("nan")), r"scale must be finite"),
    (lambda: ftkernels.MultichannelMultiheadAttention(0, 2, 8), r"channels must be a positive int, got 0"),
    (lambda: ftkernels.MultichannelLinear(3, 3, 0, 4), r"in_features must be a positive int, got 0"),
    (lambda: ftkernels.MultichannelLinear(3, 3.5, 4, 4), r"out_channels must be a positive int, got 3.5"),
    (lambda: ftkernels.FrameNorm(0, 4), r"channels must be a positive int, got 0"),
    (lambda: ftkernels.SquaredReLUFeedForward(2, 4, expansion=0.1), r"hidden features.*int\(4 \* 0.1\) = 0"),
    (lambda: ftkernels.SquaredReLUFeedForward(2, 4, expansion=float("nan")), r"expansion must be a positive"),
])
def test_constructor_arguments_named(make, match):
    with pytest.raises((TypeError, ValueError), match=match):
        make()


@pytest.mark.parametrize("make", [
    lambda b: ftkernels.MultichannelLinear(3, 3, 4, 4, backend=b),
    lambda b: ftkernels.FrameNorm(3, 4, backend=b),
    lambda b: ftkernels.SquaredReLUFeedForward(3, 4, backend=b),
    lambda b: ftkernels.MultichannelMultiheadAttention(3, 2, 4, backend=b),
])
def test_constructors_reject_a_bogus_backend(make):
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'triton', 'reference'\).*'bogus'"):
        make("bogus")
    m = make(None)
    with pytest.raises(ValueError, match="backend must be one of"):
        m.backend = "bogus"  # set later (FrameTransformer.set_backend does): caught at once too
    m.backend = "reference"
    assert m.backend == "reference"


def test_odd_head_dim_without_rotary_is_fine():
    m = ftkernels.MultichannelMultiheadAttention(2, 3, 9, rotary=False)
    assert m(torch.randn(1, 2, 9, 4)).shape == (1, 2, 9, 4)


# ----------------------------------------------------------------------------------------------
# autocast follows torch.matmul: float64 stays float64


@pytest.mark.parametrize("case", OP_CASES, ids=CASE_IDS)
def test_autocast_leaves_float64_alone(case):
    args = case.make(device="cpu", dtype=torch.float64, requires_grad=False)
    want = case(args, "auto")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.matmul(args[case.args[0]], args[case.args[0]].transpose(-1, -2)).dtype == torch.float64
        got = case(args, "auto")
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, atol=0, rtol=0)


@pytest.mark.parametrize("case", OP_CASES, ids=CASE_IDS)
def test_autocast_casts_float32_like_matmul(case):
    args = case.make(device="cpu", dtype=torch.float32, requires_grad=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = case(args, "auto")
        want_dtype = torch.matmul(args[case.args[0]], args[case.args[0]].transpose(-1, -2)).dtype
    # frame norm is a normalisation (autocast runs layer_norm in float32), squared_relu elementwise (as relu):
    # they keep x's dtype
    keeps = case.id.startswith("frame_norm") or case.id == "squared_relu"
    assert got.dtype == (torch.float32 if keeps else want_dtype)
