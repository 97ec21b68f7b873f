"""Root pytest config: without a GPU, run Triton kernels through the CPU interpreter; make every test reproducible.

TRITON_INTERPRET must be set before triton is first imported, hence here (pytest loads this first).
On a CUDA machine the kernels compile for real and the suite also runs its fp16/bf16 GPU checks.

Reproducibility: every test starts from the same RNG state (torch, numpy, random seeded with
``FTKERNELS_TEST_SEED``, default 0; set it to sweep seeds when checking that a test is not on an edge), and
hypothesis runs derandomized without an example database (profile "ci", the default), so a run on a clean
clone draws exactly the inputs of every other run. ``HYPOTHESIS_PROFILE=explore`` randomizes hypothesis
for local bug hunting (failures then print a reproduction blob).
"""
import os
import random

import numpy as np
import pytest
import torch
from hypothesis import settings

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
# One intra-op thread: with 2 cores shared by the compile-gate workers, OpenMP spinning made
# multi-threaded CPU ops several times slower than single-threaded ones here.
torch.set_num_threads(1)

settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
settings.register_profile("explore", derandomize=False, database=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

TEST_SEED = int(os.environ.get("FTKERNELS_TEST_SEED", "0"))


@pytest.fixture(autouse=True)
def _seed_rngs():
    """Seed torch (CPU and CUDA), numpy and random before every test."""
    torch.manual_seed(TEST_SEED)
    np.random.seed(TEST_SEED)
    random.seed(TEST_SEED)
    yield
