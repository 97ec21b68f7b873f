"""The frame-conv fusion estimate (benchmarks/frame_conv_roofline.py): shapes from the real model, prices by
the static report's constants."""
import math

import pytest

from benchmarks import frame_conv_roofline as fcr
from frame_transformer.model import PRESETS, FrameConvProjection, FrameTransformer
from ftkernels import static_report as sr


def test_projection_shapes_cover_every_frame_conv():
    shapes = fcr.projection_shapes("v4-micro", batch=2, frames=12)
    n_modules = sum(isinstance(m, FrameConvProjection)
                    for m in FrameTransformer(PRESETS["v4-micro"], backend="reference").modules())
    assert sum(shapes.values()) == n_modules > 0
    assert all(s[0] == 2 and s[3] == 12 for s in shapes)
    assert max(s[2] for s in shapes) == PRESETS["v4-micro"].n_fft // 2


def test_estimate_prices():
    chip = sr.CHIPS[90]
    e = fcr.estimate((2, 3, 256, 64), 4, chip)
    elements = 2 * 3 * 256 * 64 * 4
    assert e["gemm"] == pytest.approx(6 * 256 * elements / (chip.peak_tc16 * sr.EFF["wgmma"]))
    assert e["separate"] == pytest.approx(10 * elements / (chip.hbm * sr.EFF["memory"]) + 8 * sr.LAUNCH_S)
    assert e["prologue"] == pytest.approx(2 * (9 * math.ceil(256 / 128) + 3) * elements
                                          / (chip.peak_fp32 * sr.EFF["FFMA"]))


def test_block_convs_price_every_other_conv():
    """v4-micro at B 1, W 4: the 3x3 / 1x1 block convs' FLOPs, counted by hand from the modules."""
    import torch
    from frame_transformer.model import FrameConvProjection

    net = FrameTransformer(PRESETS["v4-micro"], backend="reference")
    frame = {id(m.conv) for m in net.modules() if isinstance(m, FrameConvProjection)}
    flops = []
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d) and id(m) not in frame:
            m.register_forward_hook(lambda m, i, o: flops.append(2 * o.numel() * m.weight[0].numel()))
    net(torch.zeros(1, 2, PRESETS["v4-micro"].n_fft // 2, 4))
    chip = sr.CHIPS[90]
    assert len(flops) > 10
    assert fcr.block_conv_seconds("v4-micro", 1, 4, chip) == pytest.approx(
        3 * sum(flops) / (chip.peak_tc16 * sr.EFF["wgmma"]))


def test_cli(capsys):
    assert fcr.main(["--preset", "v4-micro", "--batch", "2", "--frames", "16", "--step-ms", "10"]) == 0
    out = capsys.readouterr().out
    assert "STATIC ESTIMATE" in out and "total" in out and "the most a fusion could save" in out
    with pytest.raises(SystemExit):
        fcr.main(["--preset", "linear"])
