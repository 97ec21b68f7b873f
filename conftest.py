"""Root pytest config: without a GPU, run Triton kernels through the CPU interpreter.

TRITON_INTERPRET must be set before triton is first imported, hence here (pytest loads this first).
On a CUDA machine the kernels compile for real and the suite also runs its fp16/bf16 GPU checks.
"""
import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
torch.set_num_threads(max(1, os.cpu_count() or 1))
