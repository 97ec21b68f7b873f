"""Root pytest config: without a GPU, run Triton kernels through the CPU interpreter.

TRITON_INTERPRET must be set before triton is first imported, hence here (pytest loads this first).
On a CUDA machine the kernels compile for real and the suite also runs its fp16/bf16 GPU checks.
"""
import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
# One intra-op thread: with 2 cores shared by the compile-gate workers, OpenMP spinning made
# multi-threaded CPU ops several times slower than single-threaded ones here.
torch.set_num_threads(1)
