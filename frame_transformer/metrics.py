"""Separation metrics."""
from __future__ import annotations

import numpy as np
import torch


def sdr(estimate, reference, eps: float = 1e-8) -> float:
    """uSDR (utterance-level SDR, as in the MDX challenge) in dB:

        10 * log10( sum(s^2) + eps ) / ( sum((s - s_hat)^2) + eps )

    over all channels and samples of one item. Inputs: arrays/tensors of the same shape.
    """
    s = torch.as_tensor(np.asarray(reference) if not isinstance(reference, torch.Tensor) else reference).double()
    e = torch.as_tensor(np.asarray(estimate) if not isinstance(estimate, torch.Tensor) else estimate).double()
    if s.shape != e.shape:
        raise ValueError(f"estimate shape {tuple(e.shape)} != reference shape {tuple(s.shape)}")
    num = s.square().sum() + eps
    den = (s - e).square().sum() + eps
    return float(10.0 * torch.log10(num / den))


def batch_sdr(estimate: torch.Tensor, reference: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """uSDR per item of a batch: (B, ...) -> (B,) float64."""
    s = reference.double().flatten(1)
    e = estimate.double().flatten(1)
    return 10.0 * torch.log10((s.square().sum(1) + eps) / ((s - e).square().sum(1) + eps))
