"""Squared-ReLU feed-forward: linear2(relu(linear1(frame_norm(x)))**2) on multichannel linears
(weight1_pw (C, 4F, F), weight2_pw (C, F, 4F), norm affine (C, F); no depth-wise mix, no biases).

Providers: eager (ftkernels.reference.squared_relu_ffn, the baseline), compile (torch.compile of the
reference), ftkernels (ftkernels.squared_relu_ffn, backend auto: the fused Triton kernels on CUDA; on CPU it
*is* the eager reference, so it is only smoke-checked there).
"""
from __future__ import annotations

import torch

from benchmarks import bench_utils
from benchmarks.bench_utils import Problem, Unsupported

OP = "squared_relu_ffn"
EXPANSION = 4


def _eager():
    from ftkernels import reference
    return lambda x, w1, w2, nw, nb: reference.squared_relu_ffn(x, w1, w2, norm_weight=nw, norm_bias=nb)


def _compiled():
    from ftkernels import reference
    fn = torch.compile(reference.squared_relu_ffn, dynamic=False)
    return lambda x, w1, w2, nw, nb: fn(x, w1, w2, norm_weight=nw, norm_bias=nb)


def _ftkernels(full):
    def make():
        import ftkernels
        if full and not bench_utils.HAS_CUDA:
            raise Unsupported("on CPU ftkernels.squared_relu_ffn runs the eager reference (same code as 'eager')")
        return lambda x, w1, w2, nw, nb: ftkernels.squared_relu_ffn(x, w1, w2, norm_weight=nw, norm_bias=nb)
    return make


PROVIDERS = ["eager", "compile", "ftkernels"]

# (B, C, F, W); hidden = 4F
SMOKE = [(2, 3, 16, 8)]
CPU = [(1, 4, 256, 256), (1, 16, 128, 256), (2, 8, 256, 256)]
CPU_BWD = [(1, 4, 256, 256)]
GPU = [(8, 4, 1024, 256), (4, 4, 2048, 256), (8, 8, 512, 512), (8, 16, 256, 512), (4, 32, 128, 512)]
GPU_BWD = [(8, 4, 1024, 256), (8, 8, 512, 512), (4, 32, 128, 512)]


def size_label(B, C, F_, W):
    return f"B{B} C{C} F{F_} W{W}"


def problem(dims, device, dtype) -> Problem:
    B, C, F_, W = dims
    H = EXPANSION * F_

    def make_inputs(i):
        g = torch.Generator(device="cpu").manual_seed(300 + i)
        x = torch.randn(B, C, F_, W, generator=g)
        w1 = torch.randn(C, H, F_, generator=g) / F_ ** 0.5
        w2 = torch.randn(C, F_, H, generator=g) / H ** 0.5
        nw = 1 + 0.1 * torch.randn(C, F_, generator=g)
        nb = 0.1 * torch.randn(C, F_, generator=g)
        return tuple(t.to(device, dtype) for t in (x, w1, w2, nw, nb))

    def oracle(x, w1, w2, nw, nb):
        from ftkernels import reference
        return reference.squared_relu_ffn(x, w1, w2, norm_weight=nw, norm_bias=nb)

    elt = torch.tensor([], dtype=dtype).element_size()
    n = B * C * F_ * W
    flops = 2 * 2 * B * C * W * F_ * H
    nbytes = elt * (2 * n + 2 * C * H * F_ + 2 * C * F_)
    return Problem(OP, size_label(*dims), dict(B=B, C=C, F=F_, hidden=H, W=W), make_inputs, oracle, flops, nbytes,
                   grad_argnums=(0, 1, 2, 3, 4))


pytest_generate_tests = bench_utils.case_parametrizer(PROVIDERS, size_label, SMOKE, CPU, CPU_BWD, GPU, GPU_BWD)


def make_provider(provider, dims, full):
    return {"eager": _eager, "compile": _compiled, "ftkernels": _ftkernels(full)}[provider]()


def test_squared_relu_ffn(request, bench, case):
    bench_utils.run_case(request, bench, case, problem, make_provider, baseline="eager")
