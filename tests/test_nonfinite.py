"""NaN and Inf propagate like the reference: one NaN, +Inf or -Inf in any tensor argument of any op (or in the
gradient entering its backward) gives NaN/Inf at exactly the positions where the reference has them, with the
same signs, forward and every gradient; all other values agree as in the finite tests. (train.py's NaN-step
skip relies on a NaN reaching the loss.)"""
import math

import pytest
import torch

from helpers import ORACLE_TOL, case_args, run_case

SPECIALS = (math.nan, math.inf, -math.inf)
# the interpreter (numpy) warns on every Inf - Inf it meets
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning",
                                        "ignore:overflow encountered:RuntimeWarning")


def _poison(t: torch.Tensor, value: float, index: int) -> torch.Tensor:
    t = t.detach().clone()
    t.view(-1)[index % t.numel()] = value
    return t


def assert_nonfinite_like(actual, expected, what):
    """Non-finite at exactly the reference's positions, Inf signs equal where both are Inf, finite values
    close. Where the math meets Inf - Inf (or 0 * Inf) the result is undefined, and whether a formula
    produces NaN or an Inf there depends on its algebraic form (the kernels' closed-form gradients are
    not autograd's chain), so NaN vs Inf is not compared."""
    fa, fe = actual.isfinite(), expected.isfinite()
    assert torch.equal(fa, fe), (f"{what}: non-finite positions differ: kernel finite where the reference is "
                                 f"not at {int((fa & ~fe).sum())}, the reverse at {int((~fa & fe).sum())}")
    both_inf = actual.isinf() & expected.isinf()
    assert torch.equal(actual[both_inf].sign(), expected[both_inf].sign()), f"{what}: Inf signs differ"
    torch.testing.assert_close(actual[fa], expected[fe], **ORACLE_TOL, msg=lambda m: f"{what}: {m}")


def _check(case, arg, value, index):
    args = case.make()
    grad = None
    if arg == "grad":
        with torch.no_grad():
            grad = _poison(case.grad_out(case(args, "reference")), value, index)
    else:
        args[arg] = _poison(args[arg], value, index).requires_grad_()
    out, g = run_case(case, args, "triton", grad)
    ref, g_ref = run_case(case, args, "reference", grad)
    if math.isnan(value):
        assert not all(t.isfinite().all() for t in (ref, *g_ref.values())), "the NaN reached nothing: a vacuous case"
    assert_nonfinite_like(out, ref, f"forward, {arg} = {value}")
    for name, want in g_ref.items():
        assert_nonfinite_like(g[name], want, f"d{name}, {arg} = {value}")


@pytest.mark.parametrize("case,arg", case_args())
def test_nan_inf_positions_match_reference(case, arg):
    """A -Inf in a pre-activation bias or weight also checks relu's zero side (relu(-Inf) = 0)."""
    for value in SPECIALS:
        _check(case, arg, value, index=5)
