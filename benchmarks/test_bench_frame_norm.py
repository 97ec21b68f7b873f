"""Frame norm: layer norm over the features of every (b, c, frame), per-channel affine (C, F).

Providers: eager (ftkernels.reference.frame_norm, the baseline), layer_norm (F.layer_norm on the transposed
view + per-channel affine), compile (torch.compile of the reference), ftkernels (ftkernels.frame_norm, backend
auto: the Triton kernels on CUDA; on CPU it *is* the eager reference, so it is only smoke-checked there), and
the v4 conv blocks' form, y written channels-last (what cuDNN's convolutions read): compile_channels_last
(torch.compile of the reference followed by the layout change, which inductor fuses into the norm's write)
against ftkernels_channels_last (the kernels' channels-last tiles). Sizes: F 2048 runs the chunked kernels,
the others the resident one-read kernels; (8, 106, 1024, 256) and (8, 340, 256, 256) are v4 conv-block inputs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmarks import bench_utils
from benchmarks.bench_utils import Problem, Unsupported

OP = "frame_norm"
EPS = 1e-5


def _eager():
    from ftkernels import reference
    return lambda x, w, b: reference.frame_norm(x, w, b, EPS)


def layer_norm(x, w, b):
    y = F.layer_norm(x.transpose(2, 3), (x.shape[2],), eps=EPS).transpose(2, 3)
    return torch.addcmul(b[None, :, :, None], y, w[None, :, :, None])


def _compiled():
    from ftkernels import reference
    fn = torch.compile(reference.frame_norm, dynamic=False)
    return lambda x, w, b: fn(x, w, b, EPS)


def _compiled_channels_last():
    from ftkernels import reference
    fn = torch.compile(lambda x, w, b: reference.frame_norm(x, w, b, EPS).contiguous(memory_format=CL),
                       dynamic=False)
    return fn


def _ftkernels(full, memory_format=torch.contiguous_format):
    def make():
        import ftkernels
        if full and not bench_utils.HAS_CUDA:
            raise Unsupported("on CPU ftkernels.frame_norm runs the eager reference (same code as 'eager')")
        return lambda x, w, b: ftkernels.frame_norm(x, w, b, EPS, memory_format=memory_format)
    return make


CL = torch.channels_last
PROVIDERS = ["eager", "layer_norm", "compile", "ftkernels", "compile_channels_last", "ftkernels_channels_last"]

# (B, C, F, W)
SMOKE = [(2, 3, 16, 8)]
CPU = [(1, 4, 1024, 256), (1, 16, 256, 512), (4, 32, 128, 256)]
CPU_BWD = [(1, 16, 256, 512)]
GPU = [(8, 4, 2048, 512), (8, 16, 512, 512), (8, 32, 1024, 256), (8, 128, 256, 512), (8, 320, 128, 512),
       (8, 106, 1024, 256), (8, 340, 256, 256)]
GPU_BWD = [(8, 4, 2048, 512), (8, 32, 1024, 256), (8, 320, 128, 512), (8, 106, 1024, 256)]


def size_label(B, C, F_, W):
    return f"B{B} C{C} F{F_} W{W}"


def problem(dims, device, dtype) -> Problem:
    B, C, F_, W = dims

    def make_inputs(i):
        g = torch.Generator(device="cpu").manual_seed(200 + i)
        x = torch.randn(B, C, F_, W, generator=g) * 2 + 0.5
        w = 1 + 0.1 * torch.randn(C, F_, generator=g)
        b = 0.1 * torch.randn(C, F_, generator=g)
        return tuple(t.to(device, dtype) for t in (x, w, b))

    def oracle(x, w, b):
        from ftkernels import reference
        return reference.frame_norm(x, w, b, EPS)

    elt = torch.tensor([], dtype=dtype).element_size()
    n = B * C * F_ * W
    return Problem(OP, size_label(*dims), dict(B=B, C=C, F=F_, W=W), make_inputs, oracle, flops=8 * n,
                   bytes=elt * (2 * n + 2 * C * F_), grad_argnums=(0, 1, 2), bwd_flops_factor=1.5,
                   bwd_bytes_factor=1.5, metric="bytes")


pytest_generate_tests = bench_utils.case_parametrizer(PROVIDERS, size_label, SMOKE, CPU, CPU_BWD, GPU, GPU_BWD)


def make_provider(provider, dims, full):
    return {"eager": _eager, "layer_norm": lambda: layer_norm, "compile": _compiled,
            "ftkernels": _ftkernels(full), "compile_channels_last": _compiled_channels_last,
            "ftkernels_channels_last": _ftkernels(full, CL)}[provider]()


def test_frame_norm(request, bench, case):
    bench_utils.run_case(request, bench, case, problem, make_provider, baseline="eager")
