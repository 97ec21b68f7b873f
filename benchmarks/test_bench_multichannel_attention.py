"""Multichannel attention: q, k, v (B, C, F, W); per (batch, channel, head) softmax attention over frames,
head h on features [h*d, (h+1)*d), d = F / num_heads, rotary on q and k, scale 1/sqrt(d) (passed explicitly).

Providers
---------
seed       the seed's eager float32 version: transposes into (B, C, H, W, d), rotary-embedding-torch's
           rotate_queries_or_keys on q and k, float32 matmul -> softmax -> matmul, transposes back
sdpa       F.scaled_dot_product_attention in the input dtype on (B*C, H, W, d), with the transposes and a
           rotary (cached cos/sin tables) it needs
compile    torch.compile of ftkernels.reference.multichannel_attention
ftkernels  ftkernels.multichannel_attention, backend auto: the fused-rotary flash kernels on CUDA, the
           reference on CPU (so on CPU the column measures the reference formulation)
Forward and forward+backward; peak allocated memory on CUDA.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from benchmarks import bench_utils
from benchmarks.bench_utils import Problem, Unsupported

OP = "multichannel_attention"


def _heads(t, num_heads):
    B, C, F_, W = t.shape
    return t.transpose(2, 3).reshape(B, C, W, num_heads, F_ // num_heads).permute(0, 1, 3, 2, 4)  # (B,C,H,W,d)


def _unheads(o, B, C, F_, W):
    return o.permute(0, 1, 3, 2, 4).reshape(B, C, W, F_).transpose(2, 3)


@functools.lru_cache(maxsize=None)
def _seed_rotary(d, device):
    try:
        from rotary_embedding_torch import RotaryEmbedding
    except ImportError:
        return None
    return RotaryEmbedding(dim=d).to(device)


def seed_attention(q, k, v, num_heads, scale):
    B, C, F_, W = q.shape
    rot = _seed_rotary(F_ // num_heads, q.device)
    if rot is None:  # rotary-embedding-torch is a test extra; the reference's rotary is the same math
        from ftkernels.reference import apply_rotary as rotate
    else:
        rotate = rot.rotate_queries_or_keys
    qh, kh, vh = rotate(_heads(q, num_heads)), rotate(_heads(k, num_heads)), _heads(v, num_heads)
    with torch.autocast(q.device.type, enabled=False):
        s = torch.matmul(qh.float(), kh.float().transpose(3, 4)) * scale
        o = torch.matmul(F.softmax(s, dim=-1), vh.float())
    return _unheads(o, B, C, F_, W).to(q.dtype)


@functools.lru_cache(maxsize=32)
def _cos_sin(n, d, device, dtype):
    from ftkernels.reference import rotary_angles
    ang = rotary_angles(n, d, device)
    return ang.cos().to(dtype), ang.sin().to(dtype)


def _rotate(t, cos, sin):
    t0, t1 = t[..., 0::2], t[..., 1::2]
    return torch.stack((t0 * cos - t1 * sin, t1 * cos + t0 * sin), dim=-1).flatten(-2)


def sdpa_attention(q, k, v, num_heads, scale):
    B, C, F_, W = q.shape
    d = F_ // num_heads
    cos, sin = _cos_sin(W, d, q.device, q.dtype)
    qh = _rotate(_heads(q, num_heads), cos, sin).reshape(B * C, num_heads, W, d)
    kh = _rotate(_heads(k, num_heads), cos, sin).reshape(B * C, num_heads, W, d)
    vh = _heads(v, num_heads).reshape(B * C, num_heads, W, d)
    o = F.scaled_dot_product_attention(qh, kh, vh, scale=scale)
    return _unheads(o.view(B, C, num_heads, W, d), B, C, F_, W)


PROVIDERS = ["seed", "sdpa", "compile", "ftkernels"]

# (B, C, F, num_heads, W)
SMOKE = [(2, 2, 32, 4, 16)]
CPU = [(1, 4, 256, 8, 256), (1, 8, 512, 8, 256), (1, 4, 256, 8, 512), (1, 16, 128, 8, 512)]
CPU_BWD = [(1, 4, 256, 8, 256), (1, 8, 512, 8, 256)]
GPU = [(4, 4, 512, 8, 256), (8, 8, 512, 8, 512), (4, 16, 256, 8, 512), (2, 4, 1024, 8, 512),
       (8, 16, 1024, 8, 256), (4, 4, 2048, 8, 256)]
GPU_BWD = [(4, 4, 512, 8, 256), (8, 8, 512, 8, 512), (2, 4, 1024, 8, 512), (8, 16, 1024, 8, 256)]


def size_label(B, C, F_, H, W):
    return f"B{B} C{C} F{F_} H{H} W{W}"


def problem(dims, device, dtype) -> Problem:
    B, C, F_, H, W = dims

    def make_inputs(i):
        g = torch.Generator(device="cpu").manual_seed(400 + i)
        return tuple(torch.randn(B, C, F_, W, generator=g).to(device, dtype) for _ in range(3))

    scale = 1.0 / math.sqrt(F_ // H)

    def oracle(q, k, v):
        from ftkernels import reference
        return reference.multichannel_attention(q, k, v, H, scale)

    elt = torch.tensor([], dtype=dtype).element_size()
    return Problem(OP, size_label(*dims), dict(B=B, C=C, F=F_, heads=H, d=F_ // H, W=W), make_inputs, oracle,
                   flops=4 * B * C * F_ * W * W, bytes=elt * 4 * B * C * F_ * W, grad_argnums=(0, 1, 2),
                   bwd_flops_factor=2.5, bwd_bytes_factor=2.0)


def make_provider(provider, dims, full):
    B, C, F_, H, W = dims
    scale = 1.0 / math.sqrt(F_ // H)
    if provider == "seed":
        return lambda q, k, v: seed_attention(q, k, v, H, scale)
    if provider == "sdpa":
        return lambda q, k, v: sdpa_attention(q, k, v, H, scale)
    if provider == "compile":
        from ftkernels import reference
        fn = torch.compile(reference.multichannel_attention, dynamic=False)
        return lambda q, k, v: fn(q, k, v, H, scale)
    try:
        from ftkernels.multichannel_attention import MAX_HEAD_DIM, multichannel_attention
    except ImportError as e:
        raise Unsupported(f"ftkernels.multichannel_attention is not importable: {e}")
    if bench_utils.HAS_CUDA and F_ // H > MAX_HEAD_DIM:
        raise Unsupported(f"head dim {F_ // H} > {MAX_HEAD_DIM}, the kernels' limit")
    return lambda q, k, v: multichannel_attention(q, k, v, H, scale)


pytest_generate_tests = bench_utils.case_parametrizer(PROVIDERS, size_label, SMOKE, CPU, CPU_BWD, GPU, GPU_BWD)


def test_multichannel_attention(request, bench, case):
    note = "computes in float32 (as the seed)" if case[2] == "seed" and bench.dtype != torch.float32 else ""
    bench_utils.run_case(request, bench, case, problem, make_provider, baseline="seed", note=note,
                         cpu_reference_note=True)
