"""Upstream v4 checkpoints: the loader, configuration inference, errors, the convert command, and equivalence with
upstream's own numbers (tests/data/upstream_v4_micro*: a random upstream model saved as train4.py saves it, a fixed
input and upstream's outputs, made by tests/upstream_oracle.py from upstream's code)."""
import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

from frame_transformer import convert
from frame_transformer.model import FrameTransformer, ModelConfig, preset
from frame_transformer.upstream import (CheckpointError, UPSTREAM_DEFAULTS, from_upstream, infer_config, load_model,
                                        read_checkpoint, to_upstream)

DATA = os.path.join(os.path.dirname(__file__), "data")
UPSTREAM_PTH = os.path.join(DATA, "upstream_v4_micro.pth")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rel_err(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.fixture(scope="module")
def golden():
    return torch.load(os.path.join(DATA, "upstream_v4_micro_golden.pt"), weights_only=True)


def outputs(model, x, dtype):
    """(logits, mask with the Nyquist bin) of ``model`` in ``dtype`` for max_bin magnitudes x."""
    m = model.to(dtype)
    x = x.to(dtype)
    top = torch.rand(x.shape[0], x.shape[1], 1, x.shape[3], generator=torch.Generator().manual_seed(1), dtype=dtype)
    with torch.no_grad():
        return m.forward_logits(x), m(torch.cat((x, top), dim=2))


# ----------------------------------------------------------------------------------------------
# equivalence with upstream


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_upstream_state_dict_gives_upstream_logits_and_mask(golden, dtype, tol):
    model, info = load_model(UPSTREAM_PTH)
    assert info["format"] == "upstream-v4"
    assert ModelConfig(**info["model"]) == preset("v4-micro", dropout=UPSTREAM_DEFAULTS["dropout"])
    assert not model.training
    name = str(dtype).replace("torch.", "")
    logits, mask = outputs(model, golden["input"], dtype)
    assert rel_err(logits, golden[f"logits_{name}"]) < tol
    assert rel_err(mask, golden[f"mask_{name}"]) < tol
    assert torch.equal(mask[:, :, -1], torch.zeros_like(mask[:, :, -1]))  # upstream's Nyquist bin


def test_export_back_to_upstream_is_bitwise(golden):
    sd = torch.load(UPSTREAM_PTH, weights_only=True)
    model, _ = load_model(sd)  # a dict works as well as a path
    back = to_upstream(model)
    assert list(back) != [] and set(back) == set(sd)
    for k, v in sd.items():
        assert back[k].shape == v.shape and torch.equal(back[k], v), k


def test_stored_rotary_tables_are_used():
    """The golden model's tables differ from the default ones; the model must use the stored values."""
    model, _ = load_model(UPSTREAM_PTH)
    default = FrameTransformer(model.config)
    loaded = model.encoder_transformers[0].attn.rotary_embedding.freqs
    assert not torch.equal(loaded, default.encoder_transformers[0].attn.rotary_embedding.freqs)
    x = torch.rand(1, 2, 64, 12, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model.forward_logits(x)
        for m in model.modules():
            if hasattr(m, "freqs"):
                m.freqs.mul_(1.01)
        assert rel_err(model.forward_logits(x), before) > 1e-4


# ----------------------------------------------------------------------------------------------
# configuration inference


@pytest.mark.parametrize("cfg", [
    preset("v4-micro"),
    preset("v4-tiny"),
    preset("v4-tiny", num_heads=4, expansion=3, num_attention_maps=[3, 1, 2, 5, 2, 4]),
    preset("v4-micro", in_channels=1, channels=3, num_heads=1),
    preset("v4-micro", num_levels=4, channel_mults=[1, 3, 2, 5], num_attention_maps=[2, 1, 1, 2]),
], ids=["micro", "tiny", "heads4-exp3", "mono-heads1", "4-levels"])
def test_config_is_inferred_from_shapes(cfg):
    torch.manual_seed(0)
    model = FrameTransformer(cfg)
    inferred = infer_config(to_upstream(model))
    want = dataclasses.replace(cfg, dropout=UPSTREAM_DEFAULTS["dropout"], num_levels=None,
                               num_attention_maps=cfg.num_attention_maps[:cfg.levels()],
                               channel_mults=cfg.channel_mults[:cfg.levels()])
    assert inferred == want
    _, sd = from_upstream(to_upstream(model))
    assert all(torch.equal(sd[k], v) for k, v in model.state_dict().items())


def test_readme_configuration_is_inferred():
    with open(os.path.join(DATA, "upstream_v4_keys.json")) as f:
        keys = json.load(f)["keys"]
    meta = {k: torch.empty(shape, device="meta") for k, shape, _ in keys}
    assert infer_config(meta) == preset("v4")
    with torch.device("meta"):
        config, sd = from_upstream(meta)
    assert len(sd) == 351 and sum(v.numel() for k, v in sd.items() if not k.endswith("freqs")) == 192_699_428
    _, info = read_checkpoint(meta)  # what the shapes cannot tell: train4.py's STFT and inference_v4.py's crops
    assert (info["sr"], info["n_fft"], info["hop"], info["cropsize"], info["padding"]) == (44100, 2048, 1024, 512, 1024)


# ----------------------------------------------------------------------------------------------
# this project's checkpoints through the same loader


def test_train_checkpoint_format_loads(tmp_path):
    torch.manual_seed(0)
    for name in ("micro", "v4-micro"):
        model = FrameTransformer(preset(name))
        ck = {"model": model.state_dict(), "optimizer": {}, "step": 3,
              "config": {"model": model.config.to_dict(), "sr": 16000, "n_fft": 64, "hop": 32, "cropsize": 64}}
        path = tmp_path / f"{name}.pt"
        torch.save(ck, path)
        loaded, info = load_model(path)
        assert info["format"] == "ftkernels" and info["sr"] == 16000 and info["hop"] == 32
        assert loaded.config == model.config
        assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())


def test_older_checkpoint_without_architecture_is_linear(tmp_path):
    model = FrameTransformer(preset("micro"))
    cfg = model.config.to_dict()
    del cfg["architecture"]
    loaded, _ = load_model({"model": model.state_dict(), "config": {"model": cfg, "sr": 1, "n_fft": 64, "hop": 32}})
    assert loaded.config.architecture == "linear"


# ----------------------------------------------------------------------------------------------
# errors


def _fake(keys):
    return {k: torch.zeros(shape) for k, shape in keys}


@pytest.mark.parametrize("version", ["frame_transformer_v5", "frame_transformer2", "frame_transformer3"])
def test_other_upstream_versions_are_refused(version):
    with open(os.path.join(DATA, "upstream_other_keys.json")) as f:
        sd = _fake(json.load(f)[version])
    with pytest.raises(CheckpointError, match=r"not an upstream v4 state_dict .* keys are not v4's"):
        load_model(sd)


def test_damaged_v4_state_dicts_are_refused():
    good = torch.load(UPSTREAM_PTH, weights_only=True)
    missing = {k: v for k, v in good.items() if k != "dec2_transformer.skip_attn.k_proj.1.bias"}
    with pytest.raises(CheckpointError, match="1 v4 keys are missing .*dec2_transformer.skip_attn.k_proj.1.bias"):
        load_model(missing)
    extra = dict(good, **{"enc1_transformer.attn.q_proj.2.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="keys are not v4's .*q_proj.2.weight"):
        load_model(extra)
    wrong = dict(good, **{"dec3.body.0.conv2.weight": torch.zeros(8, 8, 3, 1)})
    with pytest.raises(CheckpointError, match=r"dec3.body.0.conv2.weight has shape \(8, 8, 3, 1\)"):
        load_model(wrong)
    table = dict(good, **{"enc2_transformer.attn.rotary_embedding.freqs": torch.zeros(3)})
    with pytest.raises(CheckpointError, match="rotary tables .* fit no head count"):
        load_model(table)
    ours = FrameTransformer(preset("v4-micro")).state_dict()
    with pytest.raises(CheckpointError, match="without its configuration"):
        load_model(ours)
    with pytest.raises(CheckpointError, match="do not fit its configuration"):
        load_model({"model": ours, "config": {"model": preset("micro").to_dict()}})
    with pytest.raises(CheckpointError, match="fields this version does not know"):
        load_model({"model": ours, "config": {"model": dict(preset("v4-micro").to_dict(), blocks=3)}})


def test_files_that_are_not_checkpoints_are_refused(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    wav = tmp_path / "song.wav"
    wav.write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt " + bytes(32))
    listing = tmp_path / "list.pt"
    torch.save([1, 2, 3], listing)
    other = tmp_path / "other.pt"
    torch.save({"lr": 0.1, "steps": [1, 2]}, other)
    for path, pattern in ((text, "not a PyTorch checkpoint"), (wav, "not a PyTorch checkpoint"),
                          (listing, "holds a list"), (other, "holds a dict, not a train.py checkpoint")):
        with pytest.raises(CheckpointError, match=pattern):
            load_model(path)
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        load_model(tmp_path / "missing.pth")
    with pytest.raises(IsADirectoryError):
        load_model(tmp_path)


class Payload:
    def __reduce__(self):
        return (print, ("pickled code ran",))


def test_pickled_code_is_not_run(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    torch.save({"model": Payload()}, path)
    with pytest.raises(CheckpointError, match="not loaded without trusting"):
        load_model(path)
    assert "pickled code ran" not in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------
# python -m frame_transformer.convert


def test_convert_round_trip(tmp_path, golden):
    out = tmp_path / "v4.pt"
    assert convert.main([UPSTREAM_PTH, str(out)]) == 0
    ck = torch.load(out, weights_only=True)
    assert set(ck) == {"model", "config"}
    cfg = ck["config"]
    # hop: upstream's ratio n_fft // 2 (1024 at its n_fft 2048)
    assert (cfg["sr"], cfg["hop"], cfg["n_fft"], cfg["cropsize"], cfg["padding"]) == (44100, 64, 128, 512, 1024)
    assert cfg["converted_from"] == "upstream_v4_micro.pth" and "sr" in cfg["assumed"]
    a, info = load_model(out)
    b, _ = load_model(UPSTREAM_PTH)
    assert info["format"] == "ftkernels" and a.config == b.config
    assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())
    logits, _ = outputs(a, golden["input"], torch.float64)
    assert rel_err(logits, golden["logits_float64"]) < 1e-10
    # --sr/--hop replace the assumptions; an existing output needs --force
    assert convert.main([UPSTREAM_PTH, str(out), "--sr", "48000", "--hop", "512", "--force"]) == 0
    cfg = torch.load(out, weights_only=True)["config"]
    assert (cfg["sr"], cfg["hop"]) == (48000, 512) and "sr" not in cfg["assumed"] and "hop" not in cfg["assumed"]


def _cli(args, cwd):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-m", "frame_transformer.convert", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_convert_cli_from_another_folder(tmp_path):
    ok = _cli([UPSTREAM_PTH, "v4.pt"], tmp_path)
    assert ok.returncode == 0 and "v4, channels 2, n_fft 128" in ok.stdout and (tmp_path / "v4.pt").exists()
    bad = _cli(["v4.pt", "again.pt"], tmp_path)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines() == [
        "python -m frame_transformer.convert: error: v4.pt is already a checkpoint of this project; nothing to convert"]


def test_convert_cli_mistakes_get_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert convert.main([UPSTREAM_PTH, "v4.pt"]) == 0
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    cases = [([UPSTREAM_PTH, "v4.pt"], "exists; pass --force"),
             (["missing.pth", "x.pt"], "no such checkpoint"),
             ([str(text), "x.pt"], "not a PyTorch checkpoint"),
             ([str(tmp_path), "x.pt"], "is a folder"),
             ([UPSTREAM_PTH, "no/such/dir/x.pt"], "output folder"),
             ([UPSTREAM_PTH, "x.pt", "--sr", "0"], "positive integer"),
             ([UPSTREAM_PTH], "required: out")]
    capsys.readouterr()
    for args, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            convert.main(args)
        err = capsys.readouterr().err
        lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith(("usage:", " "))]
        assert exit_info.value.code == 2, (args, err)
        assert len(lines) == 1 and message in lines[0], (args, err)
    assert not (tmp_path / "x.pt").exists()
