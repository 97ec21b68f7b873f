"""Multichannel linear: x (B, C, F_in, W) -> per-channel linear along features (weight_pw (C, F_out, F_in))
-> depth-wise channel mix (weight_dw (C_out, C)). Same inputs for every provider, no biases.

Providers
---------
seed       the seed's formulation: matmul on transposed views, then a matmul over the channel axis moved last
conv1d     grouped 1x1 conv1d over (B, C*F_in, W) with groups=C, then the channel mix as a 1x1 conv2d
bmm        batch folded into the frames: one bmm (C, F_out, F_in) @ (C, F_in, B*W), then one mm for the mix
einsum     two einsums ("cof,bcfw->bcow", "oc,bcfw->bofw")
compile    torch.compile of ftkernels.reference.multichannel_linear (default mode, static shapes)
ftkernels  ftkernels.multichannel_linear, backend auto: the Triton kernels on CUDA, the reference on CPU
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmarks import bench_utils
from benchmarks.bench_utils import Problem

OP = "multichannel_linear"


def seed_linear(x, w_pw, w_dw):
    y = torch.matmul(x.transpose(2, 3), w_pw.transpose(1, 2)).transpose(2, 3)
    return torch.matmul(y.transpose(1, 3), w_dw.t()).transpose(1, 3)


def conv1d_linear(x, w_pw, w_dw):
    B, C, Fi, W = x.shape
    Fo = w_pw.shape[1]
    y = F.conv1d(x.reshape(B, C * Fi, W), w_pw.reshape(C * Fo, Fi, 1), groups=C).view(B, C, Fo, W)
    return F.conv2d(y, w_dw[:, :, None, None])


def bmm_linear(x, w_pw, w_dw):
    B, C, Fi, W = x.shape
    Fo, Co = w_pw.shape[1], w_dw.shape[0]
    xc = x.permute(1, 2, 0, 3).reshape(C, Fi, B * W)
    y = torch.bmm(w_pw, xc)  # (C, Fo, B*W)
    out = torch.mm(w_dw, y.view(C, Fo * B * W))
    return out.view(Co, Fo, B, W).permute(2, 0, 1, 3)


def einsum_linear(x, w_pw, w_dw):
    return torch.einsum("oc,bcfw->bofw", w_dw, torch.einsum("cgf,bcfw->bcgw", w_pw, x))


def _compiled():
    from ftkernels import reference
    return torch.compile(reference.multichannel_linear, dynamic=False)


def _ftkernels():
    import ftkernels
    return lambda x, w_pw, w_dw: ftkernels.multichannel_linear(x, w_pw, w_dw)


PROVIDERS = {
    "seed": lambda: seed_linear,
    "conv1d": lambda: conv1d_linear,
    "bmm": lambda: bmm_linear,
    "einsum": lambda: einsum_linear,
    "compile": _compiled,
    "ftkernels": _ftkernels,
}

# (B, C, F_in, F_out, C_out, W)
SMOKE = [(2, 3, 16, 16, 3, 8), (1, 4, 8, 32, 2, 16)]
CPU = [(1, 4, 1024, 1024, 4, 256), (1, 16, 256, 256, 16, 256), (1, 32, 512, 512, 32, 256),
       (1, 128, 128, 128, 128, 256), (2, 8, 256, 1024, 8, 512)]
CPU_BWD = [(1, 4, 1024, 1024, 4, 256), (1, 32, 512, 512, 32, 256)]
GPU = [(4, 4, 4096, 4096, 4, 256), (8, 4, 2048, 2048, 4, 512), (4, 8, 1024, 1024, 8, 512),
       (8, 16, 512, 512, 16, 512), (8, 16, 32, 32, 16, 512), (4, 8, 512, 2048, 8, 512),
       (4, 32, 1024, 1024, 32, 256), (4, 64, 512, 512, 64, 512), (8, 128, 256, 256, 128, 512),
       (8, 320, 128, 128, 320, 256), (2, 320, 32, 32, 320, 512)]
GPU_BWD = [(4, 4, 4096, 4096, 4, 256), (8, 16, 512, 512, 16, 512), (4, 8, 512, 2048, 8, 512),
           (4, 64, 512, 512, 64, 512), (8, 320, 128, 128, 320, 256)]


def size_label(B, C, Fi, Fo, Co, W):
    f = f"F{Fi}" if Fi == Fo else f"F{Fi}>{Fo}"
    c = f"C{C}" if C == Co else f"C{C}>{Co}"
    return f"B{B} {c} {f} W{W}"


def problem(dims, device, dtype) -> Problem:
    B, C, Fi, Fo, Co, W = dims

    def make_inputs(i):
        g = torch.Generator(device="cpu").manual_seed(100 + i)
        x = torch.randn(B, C, Fi, W, generator=g)
        w_pw = torch.randn(C, Fo, Fi, generator=g) / Fi ** 0.5
        w_dw = torch.randn(Co, C, generator=g) / C ** 0.5
        return tuple(t.to(device, dtype) for t in (x, w_pw, w_dw))

    def oracle(x, w_pw, w_dw):
        from ftkernels import reference
        return reference.multichannel_linear(x, w_pw, w_dw)

    elt = torch.tensor([], dtype=dtype).element_size()
    flops = 2 * B * C * Fo * Fi * W + 2 * B * Co * C * Fo * W
    nbytes = elt * (B * C * Fi * W + C * Fo * Fi + Co * C + B * Co * Fo * W)
    return Problem(OP, size_label(*dims), dict(B=B, C=C, F_in=Fi, F_out=Fo, C_out=Co, W=W), make_inputs, oracle,
                   flops, nbytes, grad_argnums=(0, 1, 2))


pytest_generate_tests = bench_utils.case_parametrizer(PROVIDERS, size_label, SMOKE, CPU, CPU_BWD, GPU, GPU_BWD)


def make_provider(provider, dims, full):
    return PROVIDERS[provider]()


def test_multichannel_linear(request, bench, case):
    bench_utils.run_case(request, bench, case, problem, make_provider, baseline="seed", cpu_reference_note=True)
