"""The frame-transformer vocal remover built on the ftkernels ops.

Modules: :mod:`~frame_transformer.model` (FrameTransformer U-Net), :mod:`~frame_transformer.audio` (I/O, STFT),
:mod:`~frame_transformer.data` (spectrogram cache, voxaug dataset), :mod:`~frame_transformer.synth` (built-in
synthetic demo library), :mod:`~frame_transformer.metrics` (uSDR), :mod:`~frame_transformer.separate`
(``python -m frame_transformer.separate SONG -o OUT --checkpoint CKPT``). Training: ``python train.py``.
"""
from frame_transformer.model import FrameTransformer, ModelConfig, PRESETS, preset

__all__ = ["FrameTransformer", "ModelConfig", "PRESETS", "preset"]
