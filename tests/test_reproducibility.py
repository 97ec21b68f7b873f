"""The suite draws the same inputs on every run: hypothesis derandomized without a database (the "ci"
profile registered in conftest.py), global RNGs seeded before every test, op cases from their own seeded
generators."""
import os
import random

import numpy as np
import pytest
import torch
from hypothesis import settings

from helpers import OP_CASES, TEST_SEED


@pytest.mark.skipif(os.environ.get("HYPOTHESIS_PROFILE", "ci") != "ci", reason="a non-default profile was chosen")
def test_hypothesis_is_derandomized_without_a_database():
    assert settings.default.derandomize is True
    assert settings.default.database is None


@pytest.mark.parametrize("run", [0, 1])
def test_global_rngs_are_seeded_before_every_test(run):
    """Both runs see the state conftest sets, whatever ran before (run 0 consumes numbers on purpose)."""
    got = (torch.randn(3), np.random.rand(), random.random())
    torch.manual_seed(TEST_SEED)
    np.random.seed(TEST_SEED)
    random.seed(TEST_SEED)
    torch.testing.assert_close(got[0], torch.randn(3), atol=0, rtol=0)
    assert got[1:] == (np.random.rand(), random.random())
    torch.randn(100)


def test_op_cases_are_seeded():
    for case in OP_CASES:
        a, b = case.make(device="cpu"), case.make(device="cpu")
        assert all(torch.equal(a[n], b[n]) for n in a)
