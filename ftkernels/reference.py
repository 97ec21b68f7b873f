"""Plain-PyTorch reference for every ftkernels op: the oracle in tests and the CPU path.

Layout everywhere: x ``(B, C, F, W)`` = (batch, channels, features, frames). These functions
take no shortcuts and are differentiable with ordinary autograd in any dtype (float64 in tests).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor


def multichannel_linear(x: Tensor, weight_pw: Optional[Tensor] = None, weight_dw: Optional[Tensor] = None,
                        bias_pw: Optional[Tensor] = None, bias_dw: Optional[Tensor] = None) -> Tensor:
    """x (B, C_in, F_in, W); weight_pw (C_in, F_out, F_in); bias_pw (C_in, F_out);
    weight_dw (C_out, C_in); bias_dw (C_out,)  ->  (B, C_out, F_out, W).

    y[b,c,:,w] = weight_pw[c] @ x[b,c,:,w] + bias_pw[c];  out[b,o] = sum_c weight_dw[o,c] y[b,c] + bias_dw[o].
    """
    y = x
    if weight_pw is not None:
        y = torch.matmul(weight_pw, y)  # (C, Fo, Fi) @ (B, C, Fi, W) -> (B, C, Fo, W)
        if bias_pw is not None:
            y = y + bias_pw[:, :, None]
    if weight_dw is not None:
        y = torch.einsum("oc,bcfw->bofw", weight_dw, y)
        if bias_dw is not None:
            y = y + bias_dw[:, None, None]
    return y


def frame_norm(x: Tensor, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
               eps: float = 1e-5) -> Tensor:
    """Layer norm over the features axis of every (b, c, frame); affine weight/bias (C, F)."""
    xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    mean = xf.mean(dim=2, keepdim=True)
    var = (xf - mean).square().mean(dim=2, keepdim=True)
    y = (xf - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight[None, :, :, None].to(y.dtype)
    if bias is not None:
        y = y + bias[None, :, :, None].to(y.dtype)
    return y.to(x.dtype)


def squared_relu(x: Tensor) -> Tensor:
    return torch.relu(x).square()


def squared_relu_ffn(x: Tensor, weight1_pw: Tensor, weight2_pw: Tensor, weight1_dw: Optional[Tensor] = None,
                     bias1_pw: Optional[Tensor] = None, bias1_dw: Optional[Tensor] = None,
                     weight2_dw: Optional[Tensor] = None, bias2_pw: Optional[Tensor] = None,
                     bias2_dw: Optional[Tensor] = None, norm_weight: Optional[Tensor] = None,
                     norm_bias: Optional[Tensor] = None, eps: float = 1e-5, norm: bool = True) -> Tensor:
    """linear2(relu(linear1(frame_norm(x)))**2); x (B, C, F, W) -> (B, C_out, F_out, W).

    linear1: weight1_pw (C, kF, F) [+ weight1_dw (C1, C)]; linear2: weight2_pw (C1, F_out, kF) [+ weight2_dw].
    The norm is skipped when ``norm=False``.
    """
    h = frame_norm(x, norm_weight, norm_bias, eps) if norm else x
    h = squared_relu(multichannel_linear(h, weight1_pw, weight1_dw, bias1_pw, bias1_dw))
    return multichannel_linear(h, weight2_pw, weight2_dw, bias2_pw, bias2_dw)


def rotary_angles(n: int, head_dim: int, device=None, theta: float = 10000.0) -> Tensor:
    """(n, head_dim // 2) float64 angles pos * theta^(-2i/d) for pair i at frame pos."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64, device=device)[: head_dim // 2] / head_dim)
    return torch.arange(n, dtype=torch.float64, device=device)[:, None] * inv_freq[None, :]


def rotary_freq_angles(freqs: Tensor, n: int) -> Tensor:
    """(n, len(freqs)) angles pos * freqs[i] for frames pos < n, computed in freqs' dtype (at least fp32): the
    rounding of upstream's rotary (rotary-embedding-torch) for its stored frequency table."""
    dt = torch.promote_types(freqs.dtype, torch.float32)
    return torch.arange(n, device=freqs.device, dtype=dt)[:, None] * freqs.to(dt)[None, :]


def apply_rotary(t: Tensor, theta: float = 10000.0, freqs: Optional[Tensor] = None) -> Tensor:
    """Interleaved-pairs rotary embedding over frames. t (..., W, d): pairs (2i, 2i+1) of the last
    dim rotated by angle pos * theta^(-2i/d) (as rotary-embedding-torch's rotate_queries_or_keys).

    With ``freqs`` (n,), n = d // 2: angles pos * freqs[i] rounded as upstream's (:func:`rotary_freq_angles`),
    cos/sin and the rotation in t's dtype promoted to at least fp32, returned in t's dtype; an odd d's last
    feature is not rotated (rotary-embedding-torch's stored-table rotation, upstream's v4 model)."""
    n, d = t.shape[-2], t.shape[-1]
    if freqs is not None:
        npairs = freqs.shape[0]
        dt = torch.promote_types(t.dtype, torch.float32)
        ang = rotary_freq_angles(freqs, n).to(dt)
        cos, sin = ang.cos(), ang.sin()
        x = t.to(dt)
        x0, x1 = x[..., 0:2 * npairs:2], x[..., 1:2 * npairs:2]
        out = torch.stack((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-1).flatten(-2)
        if 2 * npairs < d:
            out = torch.cat((out, x[..., 2 * npairs:]), dim=-1)
        return out.to(t.dtype)
    ang = rotary_angles(n, d, t.device, theta)
    cos, sin = ang.cos().to(t.dtype), ang.sin().to(t.dtype)
    x0, x1 = t[..., 0::2], t[..., 1::2]
    out = torch.stack((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-1)
    return out.flatten(-2)


def _split_heads(t: Tensor, num_heads: int) -> Tensor:
    b, c, f, w = t.shape
    return t.reshape(b, c, num_heads, f // num_heads, w).transpose(-1, -2)  # (B, C, H, W, d)


def multichannel_attention(q: Tensor, k: Tensor, v: Tensor, num_heads: int, scale: Optional[float] = None,
                           rotary: bool = True, rotary_freqs: Optional[Tensor] = None) -> Tensor:
    """Per (batch, channel, head) softmax attention over frames.

    q (B, C, F, W_q); k, v (B, C, F, W_k) (memory attention when W_k != W_q or k is another tensor).
    Head h takes features [h*d, (h+1)*d), d = F // num_heads. Rotary on q and k over their own frame
    index (by the angles pos * 10000^(-2i/d), or pos * rotary_freqs[i]: :func:`apply_rotary`). scale defaults to
    1/sqrt(d). Scores and softmax in float32 (float64 stays float64).
    Returns (B, C, F, W_q) in q's dtype.
    """
    b, c, f, wq = q.shape
    d = f // num_heads
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    qh, kh, vh = (_split_heads(t, num_heads) for t in (q, k, v))
    if rotary:
        qh, kh = apply_rotary(qh, freqs=rotary_freqs), apply_rotary(kh, freqs=rotary_freqs)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    s = torch.matmul(qh.to(acc), kh.to(acc).transpose(-1, -2)) * scale
    o = torch.matmul(torch.softmax(s, dim=-1), vh.to(acc))  # (B, C, H, W_q, d)
    return o.transpose(-1, -2).reshape(b, c, f, wq).to(q.dtype)
