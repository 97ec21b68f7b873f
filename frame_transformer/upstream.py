"""Checkpoints of the seed's upstream model, and one loader for those and ours.

Upstream is ``kingoomieiii/frame-transformer``: ``frame_transformer_v4.py`` at commit c54fb14, trained by
``train4.py`` (7bdd31d), which saves a bare ``torch.save(model.state_dict(), path)``. Its model is this project's
``v4`` architecture (:mod:`frame_transformer.model`), with a one-to-one key map:

    upstream                                  ours
    enc{n}.body.0.*                           encoders.{n-1}.body.*
    dec{n}.body.0.*                           decoders.{L-1-n}.body.*          (L levels; upstream: 6)
    enc{n}_transformer.* / dec{n}_transformer.*   encoder_transformers.{n-1}.* / decoder_transformers.{L-1-n}.*
      embed*.weight (O, I, 1, 1), .bias         embed*.weight_dw (O, I), .bias_dw
      norm2 (encoder) / norm3 (decoder)         ffn.norm
      linear1, linear2                          ffn.linear1, ffn.linear2
      *_proj.0.weight_pw, *_proj.1.{weight,bias}  *_proj.linear.weight_pw, *_proj.conv.{weight,bias}
    *norm*.weight / .bias (C, 1, F)             the same name, (C, F)
    out (in_channels, C)                      out.weight_dw

every other name and shape is the same (the rotary tables ``*.rotary_embedding.freqs`` included).

API::

    model, info = load_model("upstream.pth" or "checkpoint.pt" or a dict, device="cpu", backend=None)
    info["format"]        # "ftkernels" (a train.py checkpoint) or "upstream-v4" (a bare upstream state_dict)
    info["model"], info["sr"], info["n_fft"], info["hop"], info["cropsize"]   # as train.py's checkpoint["config"]

For an upstream state_dict the configuration comes from the tensor shapes (channels, n_fft, attention maps,
channel multipliers, expansion, num_heads from the rotary tables' lengths); what the shapes cannot tell is
assumed from upstream's defaults and listed in ``info["assumed"]``: sr 44100 and hop n_fft // 2 (train4.py's and
inference_v4.py's 1024 at their n_fft 2048; a hop above n_fft // 2 could not be inverted), cropsize 512 and
padding 1024 (inference_v4.py), dropout 0.1 (train4.py).
``python -m frame_transformer.convert`` writes such a state_dict in this project's checkpoint format.
"""
from __future__ import annotations

import collections
import dataclasses
import os
import re
from typing import Dict, List, Mapping, Optional, Tuple, Union

import torch
from torch import Tensor

from frame_transformer.model import FrameTransformer, ModelConfig

UPSTREAM = "kingoomieiii/frame-transformer frame_transformer_v4.py @ c54fb14"
# what an upstream state_dict cannot tell: upstream's defaults (train4.py @ 7bdd31d, inference_v4.py @ c54fb14)
# hop: 1024 at upstream's n_fft 2048; for a state_dict of another n_fft the assumption is the same ratio, n_fft // 2
UPSTREAM_DEFAULTS = dict(sr=44100, hop=1024, cropsize=512, padding=1024, dropout=0.1)
UPSTREAM_N_FFT = 2048


class CheckpointError(ValueError):
    """A file or dict that is not a checkpoint this project can load (the message says why and what would be)."""


# ----------------------------------------------------------------------------------------------
# key map


_OURS = re.compile(r"(encoders|decoders|encoder_transformers|decoder_transformers)\.(\d+)\.(.+)")


def upstream_name(key: str, levels: int) -> str:
    """Our v4 state_dict key -> upstream's (see the module docstring)."""
    if key == "out.weight_dw":
        return "out"
    m = _OURS.fullmatch(key)
    if m is None:
        raise KeyError(f"{key!r} is not a v4 FrameTransformer key")
    kind, i, rest = m.group(1), int(m.group(2)), m.group(3)
    encoder = kind.startswith("encoder")
    n = i + 1 if encoder else levels - 1 - i
    prefix = f"{'enc' if encoder else 'dec'}{n}"
    if kind in ("encoders", "decoders"):
        return f"{prefix}.body.0.{rest[len('body.'):]}"
    rest = re.sub(r"^(embed\w*)\.weight_dw$", r"\1.weight", rest)
    rest = re.sub(r"^(embed\w*)\.bias_dw$", r"\1.bias", rest)
    rest = re.sub(r"^ffn\.norm\.", "norm2." if encoder else "norm3.", rest)
    rest = re.sub(r"^ffn\.(linear[12])\.", r"\1.", rest)
    rest = re.sub(r"_proj\.linear\.", "_proj.0.", rest)
    rest = re.sub(r"_proj\.conv\.", "_proj.1.", rest)
    return f"{prefix}_transformer.{rest}"


def upstream_shape(key: str, shape: Tuple[int, ...]) -> Tuple[int, ...]:
    """Our v4 tensor's shape -> upstream's: FrameNorm (C, F) -> (C, 1, F), embeds (O, I) -> (O, I, 1, 1)."""
    module, name = key.split(".")[-2:]
    if re.fullmatch(r"norm\d*", module):
        return (shape[0], 1, shape[1])
    if module.startswith("embed") and name == "weight_dw":
        return (*shape, 1, 1)
    return tuple(shape)


def key_map(model: FrameTransformer) -> "collections.OrderedDict[str, Tuple[str, Tuple[int, ...]]]":
    """upstream key -> (our key, upstream shape) for every tensor of a v4 model's state_dict."""
    if model.config.architecture != "v4":
        raise ValueError(f"only the v4 architecture has upstream keys, not {model.config.architecture!r}")
    L = model.config.levels()
    out = collections.OrderedDict()
    for k, v in model.state_dict().items():
        out[upstream_name(k, L)] = (k, upstream_shape(k, tuple(v.shape)))
    return out


def to_upstream(model: FrameTransformer) -> "collections.OrderedDict[str, Tensor]":
    """A v4 model's state_dict under upstream's keys and shapes (loads into upstream's FrameTransformer)."""
    sd = model.state_dict()
    return collections.OrderedDict((up, sd[ours].reshape(shape)) for up, (ours, shape) in key_map(model).items())


# ----------------------------------------------------------------------------------------------
# configuration from an upstream state_dict


def _v4_names(levels: int) -> List[str]:
    """Upstream's v4 key names at ``levels`` levels (enc1's identity conv included: it exists unless
    in_channels == channels)."""
    cfg = ModelConfig(architecture="v4", in_channels=1, channels=2, n_fft=2 ** (levels + 1), num_heads=1,
                      expansion=1, num_attention_maps=[1] * levels, channel_mults=[1] * levels, block_expansion=None)
    with torch.device("meta"):
        return list(key_map(FrameTransformer(cfg)))


def _levels(sd: Mapping[str, Tensor]) -> int:
    levels = 0
    while f"enc{levels + 1}.body.0.conv1.weight" in sd:
        levels += 1
    return levels


def _not_v4(sd: Mapping[str, Tensor], expected: List[str], optional=()) -> CheckpointError:
    expected_set = set(expected)
    extra = [k for k in sd if k not in expected_set]
    missing = [k for k in expected if k not in sd and k not in optional]
    head = lambda ks: ", ".join(ks[:3]) + (", ..." if len(ks) > 3 else "")  # noqa: E731
    if any(k.startswith(("encoders.", "decoders.")) for k in sd):
        return CheckpointError("this is a FrameTransformer state_dict of this project without its configuration; "
                               "load the train.py checkpoint it came from (it has 'model' and 'config')")
    what = []
    if extra:
        what.append(f"{len(extra)} of its {len(sd)} keys are not v4's ({head(extra)})")
    if missing:
        what.append(f"{len(missing)} v4 keys are missing ({head(missing)})")
    return CheckpointError(f"not an upstream v4 state_dict ({UPSTREAM}): {' and '.join(what)}; only that "
                           "upstream model and this project's checkpoints load")


def _check_names(sd: Mapping[str, Tensor]) -> int:
    """The number of levels of an upstream v4 state_dict; CheckpointError unless its key names are v4's."""
    levels = _levels(sd)
    expected = _v4_names(levels or 6)
    optional = {"enc1.body.0.identity.weight"}
    if levels == 0 or set(sd) - optional != set(expected) - optional:
        raise _not_v4(sd, expected, optional)
    return levels


def _shape(sd: Mapping[str, Tensor], key: str, ndim: int) -> Tuple[int, ...]:
    t = sd[key]
    if t.dim() != ndim:
        raise CheckpointError(f"{key} has shape {tuple(t.shape)}; upstream v4 has a {ndim}-d tensor there")
    return tuple(t.shape)


def infer_config(sd: Mapping[str, Tensor]) -> ModelConfig:
    """The v4 :class:`ModelConfig` of an upstream state_dict, from its tensor shapes (dropout: upstream's 0.1)."""
    levels = _check_names(sd)
    conv1 = [_shape(sd, f"enc{n}.body.0.conv1.weight", 4) for n in range(1, levels + 1)]
    in_channels, channels = conv1[0][1], conv1[0][0]
    max_bin = _shape(sd, "enc1.body.0.norm.weight", 3)[-1]
    mults = []
    for n, (c_out, *_rest) in enumerate(conv1, 1):
        if c_out % channels:
            raise CheckpointError(f"enc{n}.body.0.conv1.weight has {c_out} output channels, not a multiple of "
                                  f"enc1's {channels}")
        mults.append(c_out // channels)
    maps = [_shape(sd, f"enc{n}_transformer.embed.weight", 4)[0] for n in range(1, levels + 1)]
    hidden = _shape(sd, "enc1_transformer.linear1.weight_pw", 3)[1]
    expansion = hidden // max_bin if hidden % max_bin == 0 else hidden / max_bin
    features = [max_bin // 2 ** i for i in range(levels)]
    heads = _num_heads(sd, features, levels)
    return ModelConfig(architecture="v4", in_channels=in_channels, channels=channels, n_fft=2 * max_bin,
                       num_heads=heads, expansion=expansion, num_attention_maps=maps, channel_mults=mults,
                       dropout=UPSTREAM_DEFAULTS["dropout"], block_expansion=None)


def _num_heads(sd: Mapping[str, Tensor], features: List[int], levels: int) -> int:
    """The head count for which every attention's rotary table has (features // heads) // 2 entries."""
    tables = []  # (features, table length)
    for n in range(1, levels + 1):
        tables.append((features[n - 1], f"enc{n}_transformer.attn.rotary_embedding.freqs"))
    for n in range(1, levels):
        for a in ("self_attn", "skip_attn"):
            tables.append((features[n - 1], f"dec{n}_transformer.{a}.rotary_embedding.freqs"))
    lengths = [(f, _shape(sd, k, 1)[0]) for f, k in tables]
    fits = [h for h in range(1, features[0] + 1)
            if all(f % h == 0 and (f // h) // 2 == n for f, n in lengths)]
    if len(fits) != 1:
        found = ", ".join(f"{n} at {f} features" for f, n in lengths[:3])
        raise CheckpointError(f"the rotary tables ({found}, ...) fit {'no head count' if not fits else fits}; "
                              "upstream v4 has (features // num_heads) // 2 entries in each")
    return fits[0]


def from_upstream(sd: Mapping[str, Tensor], config: Optional[ModelConfig] = None,
                  ) -> Tuple[ModelConfig, "collections.OrderedDict[str, Tensor]"]:
    """(config, our state_dict) from an upstream v4 state_dict (config inferred unless given)."""
    config = config or infer_config(sd)
    with torch.device("meta"):
        model = FrameTransformer(config)
    kmap = key_map(model)
    if set(kmap) != set(sd):
        missing, extra = sorted(set(kmap) - set(sd)), sorted(set(sd) - set(kmap))
        raise CheckpointError(f"the state_dict does not fit the v4 configuration {_describe(config)}: "
                              f"missing {missing[:3]}, unexpected {extra[:3]}")
    ours = collections.OrderedDict()
    for up, (key, shape) in kmap.items():
        t = sd[up]
        if tuple(t.shape) != shape:
            raise CheckpointError(f"{up} has shape {tuple(t.shape)}, but the configuration inferred from the other "
                                  f"tensors ({_describe(config)}) needs {shape}")
        ours[key] = t.reshape(model.state_dict()[key].shape)
    return config, ours


def _describe(c: ModelConfig) -> str:
    return (f"channels {c.channels}, n_fft {c.n_fft}, num_heads {c.num_heads}, expansion {c.expansion}, "
            f"num_attention_maps {c.num_attention_maps}, channel_mults {c.channel_mults}")


# ----------------------------------------------------------------------------------------------
# reading files and loading models


def _safe_globals() -> list:
    """What train.py checkpoints hold besides tensors and plain containers: numpy arrays and scalars (RNG state)."""
    import numpy as np

    ma = getattr(np, "_core", None) or np.core
    dtypes = (np.bool_, np.uint8, np.int32, np.int64, np.uint32, np.uint64, np.float32, np.float64)
    return [ma.multiarray._reconstruct, ma.multiarray.scalar, np.ndarray, np.dtype] + [
        type(np.dtype(t)) for t in dtypes]


def _torch_load(path: str):
    """torch.load without running pickled code (weights_only), with numpy's arrays and scalars allowed."""
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"PK\x03\x04" and magic[:1] != b"\x80":  # torch.save's zip archive, or a (legacy) pickle
        raise CheckpointError(f"{path} is not a PyTorch checkpoint (it is neither a torch.save zip archive nor a "
                              f"pickle: it starts with {magic!r})")
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds for a file that is not a checkpoint
        msg = " ".join(str(e).split())
        if "Weights only load failed" in msg:
            found = re.search(r"Unsupported global: GLOBAL (\S+)", msg)
            raise CheckpointError(
                f"{path} holds Python objects that are not loaded without trusting the file"
                f"{f' ({found.group(1)})' if found else ''}; if you trust it, pass "
                "torch.load(path, weights_only=False) to load_model") from None
        raise CheckpointError(f"{path} is not a PyTorch checkpoint ({type(e).__name__}: {msg[:100]})") from None


def _is_state_dict(obj) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items())


def read_checkpoint(source: Union[str, os.PathLike, Mapping]) -> Tuple[Dict[str, Tensor], dict]:
    """(state_dict in this project's keys, info) from a path or an already loaded dict; see :func:`load_model`."""
    name = os.fspath(source) if isinstance(source, (str, os.PathLike)) else "the given dict"
    if isinstance(source, (str, os.PathLike)):
        if not os.path.exists(name):
            raise FileNotFoundError(f"no such checkpoint: {name}")
        if os.path.isdir(name):
            raise IsADirectoryError(f"{name} is a folder, not a checkpoint file")
        obj = _torch_load(name)
    else:
        obj = source
    if isinstance(obj, Mapping) and "model" in obj and "config" in obj:  # train.py's checkpoint
        cfg = obj["config"]
        if not (isinstance(cfg, Mapping) and isinstance(cfg.get("model"), Mapping) and _is_state_dict(obj["model"])):
            raise CheckpointError(f"{name} has 'model' and 'config' entries but not a train.py checkpoint's "
                                  "(config['model'] a dict, model a state_dict)")
        fields = {f.name for f in dataclasses.fields(ModelConfig)}
        unknown = sorted(set(cfg["model"]) - fields)
        if unknown:
            raise CheckpointError(f"{name}: its model config has fields this version does not know: {unknown}")
        info = dict(cfg)
        info["format"] = "ftkernels"
        return dict(obj["model"]), info
    if isinstance(obj, Mapping) and not _is_state_dict(obj):
        for key in ("state_dict", "model"):  # a state_dict wrapped in a dict without our config
            if _is_state_dict(obj.get(key)):
                obj = obj[key]
                break
    if not _is_state_dict(obj):
        kind = type(obj).__name__
        raise CheckpointError(f"{name} is not a model checkpoint: it holds a {kind}, not a train.py checkpoint "
                              "(dict with 'model' and 'config') or an upstream v4 state_dict")
    config, sd = from_upstream(obj)
    hop = config.n_fft * UPSTREAM_DEFAULTS["hop"] // UPSTREAM_N_FFT
    info = dict(model=config.to_dict(), n_fft=config.n_fft, sr=UPSTREAM_DEFAULTS["sr"], hop=hop,
                cropsize=UPSTREAM_DEFAULTS["cropsize"], padding=UPSTREAM_DEFAULTS["padding"], format="upstream-v4",
                upstream=UPSTREAM, assumed=sorted(UPSTREAM_DEFAULTS))
    return sd, info


def load_model(source: Union[str, os.PathLike, Mapping], device="cpu", backend: Optional[str] = None,
               ) -> Tuple[FrameTransformer, dict]:
    """(model in eval mode on ``device``, info) from a train.py checkpoint or a bare upstream v4 state_dict.

    ``source``: a path, or the dict ``torch.load`` returned. ``info`` is the checkpoint's ``config`` dict
    (``model`` config dict, ``sr``, ``n_fft``, ``hop``, ``cropsize``, ...) plus ``format``: ``"ftkernels"`` or
    ``"upstream-v4"``; for upstream files also ``padding``, ``upstream`` and ``assumed`` (the entries taken from
    upstream's defaults). Floating tensors are loaded as float32. Raises :class:`CheckpointError` (a ValueError)
    for anything else, naming what it found, and FileNotFoundError for a missing file.
    """
    sd, info = read_checkpoint(source)
    try:
        config = ModelConfig(**info["model"])
        with torch.device("meta"):  # no init work: every tensor comes from the checkpoint
            model = FrameTransformer(config, backend=backend)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"the checkpoint's model config is not valid: {e}") from None
    _check_fits(model, sd, config)
    sd = {k: (v.float() if v.is_floating_point() else v).contiguous() for k, v in sd.items()}
    model.load_state_dict(sd, strict=True, assign=True)
    return model.to(device).eval(), info


def _check_fits(model: FrameTransformer, sd: Mapping[str, Tensor], config: ModelConfig) -> None:
    want = model.state_dict()
    missing = [k for k in want if k not in sd]
    extra = [k for k in sd if k not in want]
    wrong = [f"{k} {tuple(sd[k].shape)} (expected {tuple(v.shape)})" for k, v in want.items()
             if k in sd and sd[k].shape != v.shape]
    problems = []
    for label, items in (("missing", missing), ("unexpected", extra), ("wrong shape", wrong)):
        if items:
            problems.append(f"{len(items)} {label}: {', '.join(items[:2])}{', ...' if len(items) > 2 else ''}")
    if problems:
        raise CheckpointError(f"the checkpoint's tensors do not fit its configuration ({config.architecture}: "
                              f"{_describe(config)}): {'; '.join(problems)}")
