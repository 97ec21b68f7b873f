"""FrameTransformer: a U-Net over spectrogram frames that resamples only along frequency.

Layout: ``(B, C, F, W)`` = (batch, channels, frequency bins, frames). Every level ``i`` has
``features = max_bin / 2**i`` and ``channels * channel_mults[i]`` channels; frames are never resampled.

    e_i = cat(enc_i(e_{i-1}), enc_i_transformer(enc_i(e_{i-1})))        (encoders; enc_0 keeps features)
    d_i = dec_i(d_{i+1}, e_i);  d_i = cat(d_i, dec_i_transformer(d_i, skip=e_i))
    logits = out(d_0);  mask = sigmoid(logits)                       (channel mix to in_channels)

Two architectures share this wiring, the transformers' embeds, norms, feed-forwards and dropout
(``ModelConfig.architecture``):

``"v4"`` - the seed's published model, upstream ``frame_transformer_v4.py`` at c54fb14 (presets ``v4``,
``v4-tiny``, ``v4-micro``; :mod:`frame_transformer.upstream` loads its checkpoints):

* :class:`ConvResBlock` - ``identity(x) + conv2(relu(conv1(norm(x)))**2)``, 3x3 convs over (frequency, frames)
  without bias; downsampling is stride (2, 1) on conv2 and on the identity, a 1x1 conv whenever the channels
  change or it downsamples.
* :class:`FrameConvAttention` - q, k, v are position-wise multichannel linears (no channel mix), each followed by
  a depth-wise (1, 3) conv over frames with bias (Primer-EZ); rotary embedding from a stored frequency table;
  position-wise out projection.
* ``out`` has no bias; the Nyquist bin (``n_fft // 2``) gets mask 0.

``"linear"`` - the all-linear network (presets ``linear`` = ``default``, ``tiny``, ``micro``):

* :class:`ResBlock` - ``linear2(sqrelu(linear1(norm(x)))) + identity(x)`` on multichannel linears (the
  squared-ReLU feed-forward op; a full F x F matrix per channel, no frame context); the identity is a
  multichannel linear when channels or features change; downsampling ``F -> F / 2`` inside the linears.
* :class:`~ftkernels.MultichannelMultiheadAttention` - q/k/v/out projections position-wise and depth-wise
  (C x C channel mix), fixed rotary, no frame conv.
* ``out`` has a bias; the top bin's mask copies bin ``n_fft // 2 - 1``.

Shared: :class:`FrameDecoder` upsamples features x2 (bilinear along frequency), concatenates the skip, residual
block. :class:`FrameTransformerEncoder` embeds the level's channels to ``num_attention_maps[i]`` (1x1 channel mix
with bias), then pre-norm attention + squared-ReLU feed-forward; :class:`FrameTransformerDecoder` also attends
to the embedded skip (memory). Attention scale 1/sqrt(features), as upstream.

The top STFT bin is dropped at the input and put back at the output, so ``model(x)`` maps
``(B, in_channels, n_fft // 2 + 1, W)`` magnitudes to a mask of the same shape; :meth:`FrameTransformer.forward_logits`
is upstream's ``model(x)``: ``(B, in_channels, n_fft // 2, W)`` -> logits.

Backend switch: ``FrameTransformer(..., backend=...)`` or :meth:`FrameTransformer.set_backend` set the backend
of every ftkernels op module ("auto", "triton", "reference"); the state_dict is the same for all. The v4 convs
are torch ``Conv2d``s (cuDNN on a GPU).
"""
from __future__ import annotations

import dataclasses
import math
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ftkernels import FrameNorm, MultichannelLinear, SquaredReLU, SquaredReLUFeedForward, reference
from ftkernels._common import autocast_dtype, use_triton

try:
    from ftkernels import MultichannelMultiheadAttention, multichannel_attention
except ImportError:  # exported from the package once the attention op lands in __init__
    from ftkernels.multichannel_attention import MultichannelMultiheadAttention, multichannel_attention

ARCHITECTURES = ("linear", "v4")


@dataclasses.dataclass
class ModelConfig:
    in_channels: int = 2
    channels: int = 8
    n_fft: int = 2048
    num_heads: int = 8
    expansion: float = 4  # transformer feed-forward hidden features = features * expansion
    num_attention_maps: List[int] = dataclasses.field(default_factory=lambda: [4, 6, 8, 12, 14, 16])
    channel_mults: List[int] = dataclasses.field(default_factory=lambda: [1, 2, 4, 6, 8, 10])
    num_levels: Optional[int] = None  # default: len(num_attention_maps)
    dropout: float = 0.1
    # hidden features of the "linear" architecture's residual blocks (None: expansion); v4's conv blocks have none
    block_expansion: Optional[float] = 1
    architecture: str = "linear"  # "linear" (the all-linear network) or "v4" (the seed's published model)

    def levels(self) -> int:
        return self.num_levels or len(self.num_attention_maps)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


PRESETS = {
    # the all-linear network: per-frame multichannel-linear residual blocks, n_fft 2048 -> 1024 bins, 6 levels
    "linear": ModelConfig(),
    "default": ModelConfig(),  # = "linear" (the name train.py and earlier checkpoints use)
    # all-linear, fast on CPU: n_fft 256 -> 128 bins, 4 levels (128, 64, 32, 16 features)
    "tiny": ModelConfig(channels=4, n_fft=256, num_heads=2, expansion=2, num_attention_maps=[2, 2, 4, 4],
                        channel_mults=[1, 2, 3, 4], dropout=0.0, block_expansion=2),
    # all-linear, for the interpreter equivalence test: n_fft 64 -> 32 bins, 3 levels
    "micro": ModelConfig(channels=2, n_fft=64, num_heads=2, expansion=2, num_attention_maps=[1, 2, 2],
                         channel_mults=[1, 2, 2], dropout=0.0, block_expansion=2),
    # the seed's published model: frame_transformer_v4.py with channels 32, feedforward_expansion 4, num_heads 8,
    # everything else upstream's default (n_fft 2048, 6 levels, dropout 0.1): 192,699,428 parameters
    "v4": ModelConfig(architecture="v4", channels=32, expansion=4, num_heads=8, block_expansion=None),
    # v4 architecture, upstream-compatible (6 levels, upstream's channel_mults), small enough for the CPU:
    # n_fft 256 -> 128 bins (128 ... 4 features)
    "v4-tiny": ModelConfig(architecture="v4", channels=4, n_fft=256, num_heads=2, expansion=2,
                           num_attention_maps=[2, 2, 4, 4, 6, 6], dropout=0.0, block_expansion=None),
    # v4 architecture for tests and the upstream golden file: n_fft 128 -> 64 bins (64 ... 2 features)
    "v4-micro": ModelConfig(architecture="v4", channels=2, n_fft=128, num_heads=2, expansion=1,
                            num_attention_maps=[1, 1, 2, 3, 2, 1], dropout=0.0, block_expansion=None),
}


def preset(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose from {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides)


# ----------------------------------------------------------------------------------------------
# residual blocks


class ResBlock(nn.Module):
    """All-linear: ``ffn(x) + identity(x)``, ffn = linear2(sqrelu(linear1(norm(x)))).
    (B, C_in, F_in, W) -> (B, C_out, F_out, W)."""

    def __init__(self, in_channels: int, out_channels: int, in_features: int, out_features: int,
                 expansion: float = 2, backend: Optional[str] = None):
        super().__init__()
        self.ffn = SquaredReLUFeedForward(in_channels, in_features, expansion, out_channels=out_channels,
                                          out_features=out_features, depthwise=True, backend=backend)
        self.identity = (MultichannelLinear(in_channels, out_channels, in_features, out_features,
                                            positionwise=in_features != out_features, backend=backend)
                         if in_channels != out_channels or in_features != out_features else nn.Identity())

    def forward(self, x: Tensor) -> Tensor:
        return self.identity(x) + self.ffn(x)


class ConvResBlock(nn.Module):
    """v4: ``identity(x) + conv2(relu(conv1(norm(x)))**2)``. (B, C_in, F, W) -> (B, C_out, F / s, W).

    conv1, conv2: 3x3 over (frequency, frames), zero padding 1, no bias; with ``downsample`` conv2 and the identity
    have stride s = (2, 1). The identity is a 1x1 conv (no bias) whenever the channels change or it downsamples.

    On the Triton path the norm writes exactly what conv1 reads -- the autocast dtype, channels-last (memory
    order B, F, W, C) -- and relu^2 is one kernel each way (:func:`ftkernels.squared_relu`). cuDNN's tensor-core
    convolutions work in NHWC and transpose NCHW tensors in and out (NVIDIA's guidance behind channels_last), so
    channels-last in keeps conv1, relu^2 and conv2 channels-last with no transpose; the one layout change is
    the residual add reading h in place. Byte model at the ``v4`` preset's training step (B 8, W 256, bf16: the
    11 blocks' norms read Sx = 1.13 G elements, conv1 makes S1 = 0.83 G, the blocks return S2 = 0.59 G), the
    traffic around the convs:

    ======================  ===================================  =====================================
    per step                NCHW (resident norm, eager relu^2)   channels-last + squared_relu (this)
    ======================  ===================================  =====================================
    forward                 28.3 GB: norm 4 B Sx, conv1 in/out   11.3-13.6 GB: norm 4-6 B Sx (the
                            transposes 4 B Sx + 4 B S1, relu,    channels-last tiles stream x twice,
                            square 8 B S1, conv2 in/out 4 B S1   the second pass partly from L2),
                            + 4 B S2, add 6 B S2                 relu^2 4 B S1, add 6 B S2
    backward                38.2 GB: dy to NHWC 4 B S2, conv2    14.2-18.7 GB: dy to NHWC 4 B S2,
                            input/dgrad 8 B S1, relu/square      relu^2 6 B S1, norm (dy channels-
                            12 B S1, conv1 grad/input/dgrad      last, read twice) 6-10 B Sx
                            4 B S1 + 8 B Sx, norm 6 B Sx
    ======================  ===================================  =====================================

    34-41 GB less a step, 13-15 ms at 80% of an H100's 3.35 TB/s (relu^2's share: 8.3 GB, 3.1 ms; under
    torch.compile PyTorch fuses it too), beside about 16 ms of conv math (3.9 TFLOP forward, twice that
    backward, at 70% of the bf16 peak). A prediction, not a measurement: benchmarks/test_bench_model.py times
    it on the first GPU. The reference path (CPU) keeps the contiguous layout and x's dtype.
    """

    def __init__(self, in_channels: int, out_channels: int, features: int, downsample: bool = False,
                 backend: Optional[str] = None):
        super().__init__()
        stride = (2, 1) if downsample else 1
        self.norm = FrameNorm(in_channels, features, backend=backend)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, stride=stride, bias=False)
        self.identity = (nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False)
                         if in_channels != out_channels or downsample else nn.Identity())
        self.activation = SquaredReLU(backend=backend)  # no parameters: the state_dict is upstream's

    def _conv_input(self, x: Tensor) -> dict:
        """The norm's output format: what conv1 reads, when the kernels write it (see the class docstring)."""
        if not use_triton(x, self.norm.backend, "frame_norm"):
            return {}
        dtype = autocast_dtype(x.device.type) if x.dtype != torch.float64 else None
        return dict(out_dtype=dtype, memory_format=torch.channels_last)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv2(self.activation(self.conv1(self.norm(x, **self._conv_input(x)))))
        return self.identity(x) + h


class FrameEncoder(nn.Module):
    """Residual block on the level's input features; with ``downsample`` the features halve (frames untouched).
    (B, C_in, F, W) -> (B, C_out, F or F / 2, W)."""

    def __init__(self, in_channels: int, out_channels: int, features: int, downsample: bool = True,
                 expansion: float = 2, architecture: str = "linear", backend: Optional[str] = None):
        super().__init__()
        if architecture == "v4":
            self.body = ConvResBlock(in_channels, out_channels, features, downsample, backend)
        else:
            out_features = features // 2 if downsample else features
            self.body = ResBlock(in_channels, out_channels, features, out_features, expansion, backend)

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


class FrameDecoder(nn.Module):
    """Upsample features x2 (bilinear along frequency), concatenate the skip, residual block to out_channels.
    (B, C_in, F / 2, W), skip (B, C_skip, F, W) -> (B, C_out, F, W)."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int, features: int,
                 expansion: float = 2, architecture: str = "linear", backend: Optional[str] = None):
        super().__init__()
        self.features = features
        if architecture == "v4":
            self.body = ConvResBlock(in_channels + skip_channels, out_channels, features, backend=backend)
        else:
            self.body = ResBlock(in_channels + skip_channels, out_channels, features, features, expansion, backend)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        x = F.interpolate(x, size=(self.features, x.shape[-1]), mode="bilinear", align_corners=True)
        return self.body(torch.cat((x, skip), dim=1))


# ----------------------------------------------------------------------------------------------
# v4 attention


class RotaryEmbedding(nn.Module):
    """Rotary embedding over frames from a stored frequency table, as upstream's (rotary-embedding-torch).

    ``freqs`` (head_dim // 2,) is a persistent buffer (checkpoints carry it), by default
    ``1 / 10000 ** (2i / head_dim)`` computed in fp32. ``forward(x (B, C, F, W), num_heads)`` rotates the feature
    pairs (2i, 2i+1) of every head (features [h*d, (h+1)*d)) by ``frame * freqs[i]``; angles and rotation in
    fp32, or fp64 for a float64 model or input (upstream's numbers in both), returned in x's dtype.
    """

    def __init__(self, head_dim: int, theta: int = 10000):
        super().__init__()
        freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))
        self.register_buffer("freqs", freqs)

    def forward(self, x: Tensor, num_heads: int) -> Tensor:
        B, C, Fe, W = x.shape
        if self.freqs.numel() == 0:
            return x
        heads = x.reshape(B, C, num_heads, Fe // num_heads, W).transpose(3, 4)  # (B, C, H, W, d)
        rotated = reference.apply_rotary(heads, freqs=self.freqs)
        return rotated.transpose(3, 4).reshape(B, C, Fe, W)

    def extra_repr(self) -> str:
        return f"head_dim_pairs={self.freqs.numel()}"


class FrameConvProjection(nn.Module):
    """Position-wise multichannel linear (no channel mix), then a depth-wise (1, 3) conv over frames with bias
    (Primer-EZ). (B, C, F, W) -> (B, C, F, W)."""

    def __init__(self, channels: int, features: int, kernel_size: int = 3, backend: Optional[str] = None):
        super().__init__()
        self.linear = MultichannelLinear(channels, channels, features, features, backend=backend)
        self.conv = nn.Conv2d(channels, channels, kernel_size=(1, kernel_size), padding=(0, kernel_size // 2),
                              groups=channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(self.linear(x))


class FrameConvAttention(nn.Module):
    """v4 multichannel multi-head attention. (B, C, F, W) [, mem (B, C, F, Wm)] -> (B, C, F, W).

    q = rotary(q_proj(x)), k = rotary(k_proj(mem or x)), v = v_proj(mem or x), each projection a
    :class:`FrameConvProjection`; softmax attention over frames per (channel, head), head h on features
    [h*d, (h+1)*d), scale 1/sqrt(features); out_proj position-wise. The rotary is the attention op's own
    (``rotary_freqs`` = the stored table ``rotary_embedding.freqs``, fused into the kernels).
    """

    def __init__(self, channels: int, num_heads: int, features: int, backend: Optional[str] = None):
        super().__init__()
        if features % num_heads != 0:
            raise ValueError(f"num_heads must divide features={features}, got {num_heads}")
        self.channels, self.num_heads, self.features = channels, num_heads, features
        self.scale = 1.0 / math.sqrt(features)
        self.backend = backend
        self.rotary_embedding = RotaryEmbedding(features // num_heads)
        self.q_proj = FrameConvProjection(channels, features, backend=backend)
        self.k_proj = FrameConvProjection(channels, features, backend=backend)
        self.v_proj = FrameConvProjection(channels, features, backend=backend)
        self.out_proj = MultichannelLinear(channels, channels, features, features, backend=backend)

    def forward(self, x: Tensor, mem: Optional[Tensor] = None) -> Tensor:
        src = x if mem is None else mem
        # the rotary embedding runs inside the attention op (fused into the kernels' q/k tile loads) from the
        # stored table: the same angles and rotation as self.rotary_embedding(q, num_heads)
        a = multichannel_attention(self.q_proj(x), self.k_proj(src), self.v_proj(src), self.num_heads, self.scale,
                                   rotary=True, rotary_freqs=self.rotary_embedding.freqs, backend=self.backend)
        return self.out_proj(a)

    def extra_repr(self) -> str:
        return (f"channels={self.channels}, num_heads={self.num_heads}, features={self.features}, "
                f"scale={self.scale:.4g}")


def _attention(channels: int, num_heads: int, features: int, architecture: str, backend: Optional[str]):
    if architecture == "v4":
        return FrameConvAttention(channels, num_heads, features, backend=backend)
    return MultichannelMultiheadAttention(channels, num_heads, features, scale=1.0 / math.sqrt(features),
                                          backend=backend)


# ----------------------------------------------------------------------------------------------
# transformers


class FrameTransformerEncoder(nn.Module):
    """Embed to ``out_channels`` maps (1x1 channel mix with bias), then pre-norm attention and squared-ReLU
    feed-forward, dropout on both residual branches. (B, C_in, F, W) -> (B, out_channels, F, W)."""

    def __init__(self, in_channels: int, out_channels: int, features: int, num_heads: int = 8,
                 expansion: float = 4, dropout: float = 0.1, architecture: str = "linear",
                 backend: Optional[str] = None):
        super().__init__()
        self.embed = MultichannelLinear(in_channels, out_channels, features, features, positionwise=False,
                                        depthwise=True, bias=True, backend=backend)
        self.norm1 = FrameNorm(out_channels, features, backend=backend)
        self.attn = _attention(out_channels, num_heads, features, architecture, backend)
        self.ffn = SquaredReLUFeedForward(out_channels, features, expansion, depthwise=True, backend=backend)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = self.embed(x)
        x = x + self.dropout(self.attn(self.norm1(x)))
        return x + self.dropout(self.ffn(x))


class FrameTransformerDecoder(nn.Module):
    """Embed x and the skip, then self-attention, attention to the skip (memory), feed-forward; pre-norm.
    (B, C_in, F, W), skip (B, C_skip, F, W) -> (B, out_channels, F, W)."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int, features: int,
                 num_heads: int = 8, expansion: float = 4, dropout: float = 0.1, architecture: str = "linear",
                 backend: Optional[str] = None):
        super().__init__()
        self.embed_self = MultichannelLinear(in_channels, out_channels, features, features, positionwise=False,
                                             depthwise=True, bias=True, backend=backend)
        self.embed_skip = MultichannelLinear(skip_channels, out_channels, features, features, positionwise=False,
                                             depthwise=True, bias=True, backend=backend)
        self.norm1 = FrameNorm(out_channels, features, backend=backend)
        self.self_attn = _attention(out_channels, num_heads, features, architecture, backend)
        self.norm2 = FrameNorm(out_channels, features, backend=backend)
        self.skip_attn = _attention(out_channels, num_heads, features, architecture, backend)
        self.ffn = SquaredReLUFeedForward(out_channels, features, expansion, depthwise=True, backend=backend)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        x = self.embed_self(x)
        mem = self.embed_skip(skip)
        x = x + self.dropout(self.self_attn(self.norm1(x)))
        x = x + self.dropout(self.skip_attn(self.norm2(x), mem=mem))
        return x + self.dropout(self.ffn(x))


# ----------------------------------------------------------------------------------------------
# the U-Net


class FrameTransformer(nn.Module):
    """The U-Net of the module docstring for a :class:`ModelConfig` (or its fields as keyword arguments)."""

    def __init__(self, config: Optional[ModelConfig] = None, backend: Optional[str] = None, **kwargs):
        super().__init__()
        if config is None:
            config = ModelConfig(**kwargs)
        elif kwargs:
            config = dataclasses.replace(config, **kwargs)
        self.config = config
        c = config
        if c.architecture not in ARCHITECTURES:
            raise ValueError(f"architecture must be one of {ARCHITECTURES}, got {c.architecture!r}")
        L = c.levels()
        if len(c.num_attention_maps) < L or len(c.channel_mults) < L:
            raise ValueError(f"{L} levels need {L} num_attention_maps and channel_mults, got "
                             f"{c.num_attention_maps} and {c.channel_mults}")
        self.max_bin = c.n_fft // 2
        self.output_bin = c.n_fft // 2 + 1
        if self.max_bin % (2 ** (L - 1)) != 0:
            raise ValueError(f"n_fft // 2 = {self.max_bin} must be divisible by 2**(levels-1) = {2 ** (L - 1)}")
        feats = [self.max_bin // 2 ** i for i in range(L)]
        chans = [c.channels * m for m in c.channel_mults[:L]]
        maps = list(c.num_attention_maps[:L])
        for f in feats:
            if f % c.num_heads:
                raise ValueError(f"num_heads={c.num_heads} must divide every level's features {feats}")
        self.features, self.level_channels, self.maps = feats, chans, maps
        arch = c.architecture
        kw = dict(expansion=c.block_expansion if c.block_expansion is not None else c.expansion,
                  architecture=arch, backend=backend)
        tkw = dict(num_heads=c.num_heads, expansion=c.expansion, dropout=c.dropout, architecture=arch,
                   backend=backend)

        self.encoders = nn.ModuleList()
        self.encoder_transformers = nn.ModuleList()
        in_ch = c.in_channels
        for i in range(L):
            in_feat = feats[i - 1] if i > 0 else feats[0]
            self.encoders.append(FrameEncoder(in_ch, chans[i], in_feat, downsample=i > 0, **kw))
            self.encoder_transformers.append(FrameTransformerEncoder(chans[i], maps[i], feats[i], **tkw))
            in_ch = chans[i] + maps[i]
        self.decoders = nn.ModuleList()
        self.decoder_transformers = nn.ModuleList()
        for i in reversed(range(L - 1)):
            skip_ch = chans[i] + maps[i]
            self.decoders.append(FrameDecoder(in_ch, skip_ch, chans[i], feats[i], **kw))
            self.decoder_transformers.append(FrameTransformerDecoder(chans[i], skip_ch, maps[i], feats[i], **tkw))
            in_ch = chans[i] + maps[i]
        self.out = MultichannelLinear(in_ch, c.in_channels, feats[0], feats[0], positionwise=False, depthwise=True,
                                      bias=arch != "v4", backend=backend)
        self.backend = backend

    # ------------------------------------------------------------------------------------------
    def set_backend(self, backend: Optional[str]) -> "FrameTransformer":
        """Run every op module on ``backend`` ("auto", "triton", "reference"; None = process default)."""
        for m in self.modules():
            if hasattr(m, "backend"):
                m.backend = backend
        return self

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward_logits(self, x: Tensor) -> Tensor:
        """(B, C, max_bin, W) magnitudes -> (B, C, max_bin, W) mask logits (upstream's ``model(x)``)."""
        skips = []
        h = x
        for enc, tr in zip(self.encoders, self.encoder_transformers):
            h = enc(h)
            h = torch.cat((h, tr(h)), dim=1)
            skips.append(h)
        skips.pop()
        for dec, tr in zip(self.decoders, self.decoder_transformers):
            skip = skips.pop()
            h = dec(h, skip)
            h = torch.cat((h, tr(h, skip)), dim=1)
        return self.out(h)

    def forward(self, x: Tensor) -> Tensor:
        """Magnitudes (B, in_channels, n_fft // 2 + 1, W) -> mask in [0, 1] of the same shape (the top bin's mask
        is 0 for v4, a copy of the bin below for the linear architecture); (B, in_channels, n_fft // 2, W) -> mask
        without the top bin."""
        if x.dim() != 4 or x.shape[1] != self.config.in_channels or x.shape[2] not in (self.max_bin, self.output_bin):
            raise ValueError(f"expected (B, {self.config.in_channels}, {self.output_bin}, W) magnitudes, "
                             f"got {tuple(x.shape)}")
        full = x.shape[2] == self.output_bin
        mask = torch.sigmoid(self.forward_logits(x[:, :, : self.max_bin]))
        if full:
            top = torch.zeros_like(mask[:, :, -1:]) if self.config.architecture == "v4" else mask[:, :, -1:]
            mask = torch.cat((mask, top), dim=2)
        return mask


def build_model(config, backend: Optional[str] = None) -> FrameTransformer:
    if isinstance(config, dict):
        config = ModelConfig(**config)
    return FrameTransformer(config, backend=backend)
