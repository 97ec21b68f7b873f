"""Upstream's own code as the oracle for the v4 model (a developer tool; not run in CI, which has no upstream code).

Needs a folder with upstream's ``frame_transformer_v4.py`` and ``rotary_embedding_torch.py`` (kingoomieiii/
frame-transformer at c54fb14; einops installed), e.g.::

    git -C MIRROR show c54fb14:frame_transformer_v4.py > /tmp/up/frame_transformer_v4.py   # same for the other
    python tests/upstream_oracle.py /tmp/up check --preset v4 --frames 64     # README configuration
    python tests/upstream_oracle.py /tmp/up golden                              # regenerate tests/data/upstream_v4_*

``check`` builds a random upstream model (norm affines, conv biases and rotary tables perturbed so that every
tensor matters), saves its state_dict as train4.py does, loads that file with
:func:`frame_transformer.upstream.load_model` and compares logits and the Nyquist-0 mask with upstream's in
float32 and float64. Upstream casts q, k, v to float32 inside its attention; the float64 run lets ``.float()``
keep float64 tensors, so that upstream's float64 numbers are float64 throughout. ``keys`` writes the README
configuration's key/shape list, ``golden`` the small golden files the tests compare against.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import json
import os
import sys
import tempfile

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from frame_transformer.model import ModelConfig, preset  # noqa: E402
from frame_transformer.upstream import load_model  # noqa: E402

DATA = os.path.join(HERE, "data")
UPSTREAM_LEVELS, UPSTREAM_MULTS = 6, [1, 2, 4, 6, 8, 10]


def upstream_class(folder: str):
    sys.path.insert(0, os.path.abspath(folder))
    return importlib.import_module("frame_transformer_v4").FrameTransformer


def build_upstream(cls, cfg: ModelConfig, seed: int) -> torch.nn.Module:
    """A random upstream model for ``cfg`` (which must be upstream-shaped), every tensor perturbed from its init."""
    if cfg.architecture != "v4" or cfg.levels() != UPSTREAM_LEVELS or cfg.channel_mults[:6] != UPSTREAM_MULTS:
        raise SystemExit("upstream's frame_transformer_v4 has 6 levels with channel_mults [1, 2, 4, 6, 8, 10]")
    torch.manual_seed(seed)
    m = cls(in_channels=cfg.in_channels, channels=cfg.channels, dropout=cfg.dropout, n_fft=cfg.n_fft,
            num_heads=cfg.num_heads, expansion=int(cfg.expansion), num_attention_maps=list(cfg.num_attention_maps))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, t in m.state_dict().items():
            if "norm" in name and name.endswith("weight"):
                t.copy_(1 + 0.2 * torch.randn(t.shape, generator=g))
            elif "norm" in name or name.endswith("bias"):
                t.copy_(0.2 * torch.randn(t.shape, generator=g))
            elif name.endswith("freqs"):  # any table must be used as stored
                t.mul_(1 + 0.05 * torch.rand(t.shape, generator=g))
    return m.eval()


@contextlib.contextmanager
def float64_attention():
    """Upstream's attention calls q.float() etc.; keep float64 tensors float64 for the float64 oracle."""
    orig = torch.Tensor.float

    def keep64(self, *args, **kwargs):
        return self if self.dtype == torch.float64 else orig(self, *args, **kwargs)

    torch.Tensor.float = keep64
    try:
        yield
    finally:
        torch.Tensor.float = orig


def upstream_outputs(cls, cfg, state_dict, x32):
    """{dtype: (logits, mask)} of upstream's model, mask as inference_v4.py makes it (sigmoid, Nyquist bin 0)."""
    out = {}
    for dtype in (torch.float32, torch.float64):
        m = cls(in_channels=cfg.in_channels, channels=cfg.channels, dropout=cfg.dropout, n_fft=cfg.n_fft,
                num_heads=cfg.num_heads, expansion=int(cfg.expansion),
                num_attention_maps=list(cfg.num_attention_maps))
        m.load_state_dict(state_dict)
        m = m.to(dtype).eval()  # fresh model per dtype: upstream's rotary caches angles by length only
        ctx = float64_attention() if dtype == torch.float64 else contextlib.nullcontext()
        with torch.no_grad(), ctx:
            logits = m(x32.to(dtype))
        mask = torch.nn.functional.pad(torch.sigmoid(logits), (0, 0, 0, 1))
        out[dtype] = (logits, mask)
    return out


def our_outputs(model, x32):
    out = {}
    for dtype in (torch.float32, torch.float64):
        m = model.to(dtype)
        with torch.no_grad():
            x = x32.to(dtype)
            full = torch.cat((x, torch.rand_like(x[:, :, :1])), dim=2)  # any top bin: its mask is 0
            out[dtype] = (m.forward_logits(x), m(full))
    model.float()
    return out


def rel_err(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def check(cls, cfg, frames: int, seed: int, batch: int = 1) -> dict:
    up = build_upstream(cls, cfg, seed)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "upstream.pth")
        torch.save(up.state_dict(), path)  # as train4.py saves
        model, info = load_model(path, backend="reference")
        sd = torch.load(path, weights_only=True)
    g = torch.Generator().manual_seed(seed + 2)
    x = torch.rand(batch, cfg.in_channels, cfg.n_fft // 2, frames, generator=g)
    ref, ours = upstream_outputs(cls, cfg, sd, x), our_outputs(model, x)
    inferred = ModelConfig(**info["model"])
    res = {"inferred_config_matches": inferred == dataclasses.replace(cfg, dropout=inferred.dropout),
           "params": model.num_parameters()}
    for dtype in (torch.float32, torch.float64):
        name = str(dtype).replace("torch.", "")
        res[f"{name}_logits_rel_err"] = rel_err(ours[dtype][0], ref[dtype][0])
        res[f"{name}_mask_rel_err"] = rel_err(ours[dtype][1], ref[dtype][1])
        res[f"{name}_mask_max_abs_err"] = float((ours[dtype][1] - ref[dtype][1]).abs().max())
    # how far apart upstream's own float32 and float64 are (the scale of fp32 rounding)
    res["upstream_fp32_vs_fp64_logits_rel_err"] = rel_err(ref[torch.float32][0], ref[torch.float64][0])
    return res


def write_keys(cls, path: str) -> None:
    cfg = preset("v4")
    with torch.device("meta"):
        m = cls(in_channels=2, channels=32, expansion=4, n_fft=2048, dropout=0.1, num_heads=8)
    params = {n for n, _ in m.named_parameters()}
    keys = [[k, list(v.shape), "parameter" if k in params else "buffer"] for k, v in m.state_dict().items()]
    doc = {"source": "kingoomieiii/frame-transformer frame_transformer_v4.py @ c54fb14: FrameTransformer("
                     "in_channels=2, channels=32, expansion=4, n_fft=2048, dropout=0.1, num_heads=8), the seed "
                     "README's configuration; state_dict order",
           "parameters": sum(p.numel() for p in m.parameters()), "config": cfg.to_dict(), "keys": keys}
    with open(path, "w") as f:
        f.write(json.dumps({k: v for k, v in doc.items() if k != "keys"}, indent=1)[:-2] + ',\n "keys": [\n')
        f.write(",\n".join(json.dumps(k) for k in keys) + "\n ]\n}\n")


def write_golden(cls, folder: str, seed: int = 0) -> None:
    """upstream_v4_micro.pth: a random upstream model at the v4-micro preset, saved as train4.py saves it;
    upstream_v4_micro_golden.pt: a fixed input and upstream's logits and masks for it in float32 and float64."""
    cfg = preset("v4-micro")
    up = build_upstream(cls, cfg, seed)
    sd = up.state_dict()
    torch.save(sd, os.path.join(folder, "upstream_v4_micro.pth"))
    x = torch.rand(2, cfg.in_channels, cfg.n_fft // 2, 16, generator=torch.Generator().manual_seed(seed + 2))
    ref = upstream_outputs(cls, cfg, sd, x)
    torch.save({"about": "upstream frame_transformer_v4.py @ c54fb14 at the v4-micro preset (tests/upstream_oracle.py "
                         "golden): input magnitudes (B, 2, n_fft // 2, W) and upstream's logits and masks "
                         "(sigmoid, Nyquist bin 0)",
                "config": cfg.to_dict(), "input": x,
                "logits_float32": ref[torch.float32][0], "mask_float32": ref[torch.float32][1],
                "logits_float64": ref[torch.float64][0], "mask_float64": ref[torch.float64][1]},
               os.path.join(folder, "upstream_v4_micro_golden.pt"))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("upstream", help="folder with upstream's frame_transformer_v4.py and rotary_embedding_torch.py")
    p.add_argument("what", choices=["check", "keys", "golden"])
    p.add_argument("--preset", default="v4-micro")
    p.add_argument("--frames", type=int, default=32)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    cls = upstream_class(a.upstream)
    if a.what == "check":
        print(json.dumps(check(cls, preset(a.preset), a.frames, a.seed, a.batch), indent=1))
    elif a.what == "keys":
        write_keys(cls, os.path.join(DATA, "upstream_v4_keys.json"))
    else:
        write_golden(cls, DATA, a.seed)


if __name__ == "__main__":
    main()
