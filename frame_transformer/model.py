"""FrameTransformer: a U-Net over spectrogram frames that resamples only along frequency.

Layout: ``(B, C, F, W)`` = (batch, channels, frequency bins, frames). Every level ``i`` has
``features = max_bin / 2**i`` and ``channels * channel_mults[i]`` channels; frames are never resampled.

    e_i = cat(enc_i(e_{i-1}), enc_i_transformer(enc_i(e_{i-1})))        (encoders; enc_0 keeps features)
    d_i = dec_i(d_{i+1}, e_i);  d_i = cat(d_i, dec_i_transformer(d_i, skip=e_i))
    mask = sigmoid(out(d_0))                                         (depth-wise linear to in_channels)

* :class:`ResBlock` - ``linear2(sqrelu(linear1(norm(x)))) + identity(x)`` on multichannel linears
  (the squared-ReLU feed-forward op); the identity is a multichannel linear projection when channels or
  features change. Downsampling is ``features -> features / 2`` inside the block's position-wise linears.
* :class:`FrameDecoder` upsamples features x2 (bilinear along frequency only), concatenates the skip, ResBlock.
* :class:`FrameTransformerEncoder` embeds the level's channels down to ``num_attention_maps[i]`` with a
  depth-wise multichannel linear, then pre-norm multichannel attention + squared-ReLU feed-forward.
* :class:`FrameTransformerDecoder` also attends to the (embedded) skip connection as memory.

The top STFT bin (``n_fft // 2``) is dropped at the input and padded back (replicating the last mask bin)
at the output, so ``model(x)`` maps ``(B, in_channels, n_fft // 2 + 1, W)`` magnitudes to a mask of the same shape.

Backend switch: ``FrameTransformer(..., backend=...)`` or :meth:`FrameTransformer.set_backend` set the backend
of every ftkernels op module ("auto", "triton", "reference"); the state_dict is the same for all.
"""
from __future__ import annotations

import dataclasses
import math
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ftkernels import FrameNorm, MultichannelLinear, SquaredReLUFeedForward

try:
    from ftkernels import MultichannelMultiheadAttention
except ImportError:  # exported from the package once the attention op lands in __init__
    from ftkernels.multichannel_attention import MultichannelMultiheadAttention


@dataclasses.dataclass
class ModelConfig:
    in_channels: int = 2
    channels: int = 8
    n_fft: int = 2048
    num_heads: int = 8
    expansion: float = 4
    num_attention_maps: List[int] = dataclasses.field(default_factory=lambda: [4, 6, 8, 12, 14, 16])
    channel_mults: List[int] = dataclasses.field(default_factory=lambda: [1, 2, 4, 6, 8, 10])
    num_levels: Optional[int] = None  # default: len(num_attention_maps)
    dropout: float = 0.1
    block_expansion: Optional[float] = 1  # hidden features of the encoder/decoder residual blocks (None: expansion)

    def levels(self) -> int:
        return self.num_levels or len(self.num_attention_maps)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


PRESETS = {
    # the seed's defaults (n_fft 2048 -> 1024 bins, 6 levels)
    "default": ModelConfig(),
    # fast on CPU: n_fft 256 -> 128 bins, 4 levels (128, 64, 32, 16 features)
    "tiny": ModelConfig(channels=4, n_fft=256, num_heads=2, expansion=2, num_attention_maps=[2, 2, 4, 4],
                        channel_mults=[1, 2, 3, 4], dropout=0.0, block_expansion=2),
    # for the interpreter equivalence test: n_fft 64 -> 32 bins, 3 levels
    "micro": ModelConfig(channels=2, n_fft=64, num_heads=2, expansion=2, num_attention_maps=[1, 2, 2],
                         channel_mults=[1, 2, 2], dropout=0.0, block_expansion=2),
}


def preset(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose from {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides)


class ResBlock(nn.Module):
    """``ffn(x) + identity(x)``, ffn = linear2(sqrelu(linear1(norm(x)))) : (C_in, F_in) -> (C_out, F_out)."""

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


class FrameEncoder(nn.Module):
    """Residual block; with ``downsample`` the features halve (frames untouched)."""

    def __init__(self, in_channels: int, out_channels: int, features: int, downsample: bool = True,
                 expansion: float = 2, backend: Optional[str] = None):
        super().__init__()
        out_features = features // 2 if downsample else features
        self.body = ResBlock(in_channels, out_channels, features, out_features, expansion, backend)

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


class FrameDecoder(nn.Module):
    """Upsample features x2 (bilinear along frequency), concatenate the skip, residual block to out_channels."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int, features: int,
                 expansion: float = 2, backend: Optional[str] = None):
        super().__init__()
        self.features = features
        self.body = ResBlock(in_channels + skip_channels, out_channels, features, features, expansion, backend)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        x = F.interpolate(x, size=(self.features, x.shape[-1]), mode="bilinear", align_corners=True)
        return self.body(torch.cat((x, skip), dim=1))


class FrameTransformerEncoder(nn.Module):
    """Depth-wise embed to ``out_channels`` maps, then pre-norm attention and squared-ReLU feed-forward."""

    def __init__(self, in_channels: int, out_channels: int, features: int, num_heads: int = 8,
                 expansion: float = 4, dropout: float = 0.1, backend: Optional[str] = None):
        super().__init__()
        self.embed = MultichannelLinear(in_channels, out_channels, features, features, positionwise=False,
                                        depthwise=True, bias=True, backend=backend)
        self.norm1 = FrameNorm(out_channels, features, backend=backend)
        self.attn = MultichannelMultiheadAttention(out_channels, num_heads, features,
                                                   scale=1.0 / math.sqrt(features), backend=backend)
        self.ffn = SquaredReLUFeedForward(out_channels, features, expansion, depthwise=True, backend=backend)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = self.embed(x)
        x = x + self.dropout(self.attn(self.norm1(x)))
        return x + self.dropout(self.ffn(x))


class FrameTransformerDecoder(nn.Module):
    """Embed x and the skip, then self-attention, attention to the skip (memory), feed-forward; pre-norm."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int, features: int,
                 num_heads: int = 8, expansion: float = 4, dropout: float = 0.1, backend: Optional[str] = None):
        super().__init__()
        self.embed_self = MultichannelLinear(in_channels, out_channels, features, features, positionwise=False,
                                             depthwise=True, bias=True, backend=backend)
        self.embed_skip = MultichannelLinear(skip_channels, out_channels, features, features, positionwise=False,
                                             depthwise=True, bias=True, backend=backend)
        scale = 1.0 / math.sqrt(features)
        self.norm1 = FrameNorm(out_channels, features, backend=backend)
        self.self_attn = MultichannelMultiheadAttention(out_channels, num_heads, features, scale=scale,
                                                        backend=backend)
        self.norm2 = FrameNorm(out_channels, features, backend=backend)
        self.skip_attn = MultichannelMultiheadAttention(out_channels, num_heads, features, scale=scale,
                                                        backend=backend)
        self.ffn = SquaredReLUFeedForward(out_channels, features, expansion, depthwise=True, backend=backend)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        x = self.embed_self(x)
        mem = self.embed_skip(skip)
        x = x + self.dropout(self.self_attn(self.norm1(x)))
        x = x + self.dropout(self.skip_attn(self.norm2(x), mem=mem))
        return x + self.dropout(self.ffn(x))


class FrameTransformer(nn.Module):
    def __init__(self, config: Optional[ModelConfig] = None, backend: Optional[str] = None, **kwargs):
        super().__init__()
        if config is None:
            config = ModelConfig(**kwargs)
        elif kwargs:
            config = dataclasses.replace(config, **kwargs)
        self.config = config
        c = config
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
        kw = dict(expansion=c.block_expansion if c.block_expansion is not None else c.expansion, backend=backend)
        tkw = dict(num_heads=c.num_heads, expansion=c.expansion, dropout=c.dropout, backend=backend)

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
                                      bias=True, backend=backend)
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
        """(B, C, max_bin, W) -> (B, C, max_bin, W) mask logits."""
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
        """Magnitudes (B, in_channels, n_fft // 2 + 1, W) -> mask in [0, 1] of the same shape."""
        if x.dim() != 4 or x.shape[1] != self.config.in_channels or x.shape[2] not in (self.max_bin, self.output_bin):
            raise ValueError(f"expected (B, {self.config.in_channels}, {self.output_bin}, W) magnitudes, "
                             f"got {tuple(x.shape)}")
        full = x.shape[2] == self.output_bin
        mask = torch.sigmoid(self.forward_logits(x[:, :, : self.max_bin]))
        if full:
            mask = torch.cat((mask, mask[:, :, -1:]), dim=2)
        return mask


def build_model(config, backend: Optional[str] = None) -> FrameTransformer:
    if isinstance(config, dict):
        config = ModelConfig(**config)
    return FrameTransformer(config, backend=backend)
