"""ftkernels: Triton kernels for the frame transformer.

Ops take x in the model's layout ``(B, C, F, W)`` (batch, channels, features, frames); each has a
functional form, an ``nn.Module`` form and a plain-PyTorch reference in :mod:`ftkernels.reference`.
CUDA tensors run the Triton kernels, everything else the reference (see :func:`set_backend`).
"""
from ftkernels._common import get_backend, set_backend
from ftkernels.frame_norm import FrameNorm, frame_norm
from ftkernels.multichannel_attention import MultichannelMultiheadAttention, multichannel_attention
from ftkernels.multichannel_linear import MultichannelLinear, multichannel_linear
from ftkernels.squared_relu import SquaredReLU, squared_relu
from ftkernels.squared_relu_ffn import SquaredReLUFeedForward, squared_relu_ffn
from ftkernels import reference

__all__ = [
    "set_backend", "get_backend", "reference",
    "multichannel_linear", "MultichannelLinear",
    "frame_norm", "FrameNorm",
    "squared_relu", "SquaredReLU",
    "squared_relu_ffn", "SquaredReLUFeedForward",
    "multichannel_attention", "MultichannelMultiheadAttention",
]
__version__ = "0.1.0"
