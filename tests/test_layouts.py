"""Memory layouts: every tensor argument of every op (and the gradient flowing into its backward) as a
transposed view, a step-2 slice and a view at a storage offset; forward and every gradient on the Triton
kernels vs the reference in float64 (the interpreter; float32 on a GPU)."""
import pytest
import torch

from helpers import OP_CASES, ORACLE_TOL, VIEW_KINDS, as_layout, assert_close_all, case_args, run_case


def check_views(case, args, grad=None):
    """Triton vs reference on ``args`` (some of them views): the forward and every gradient."""
    out, g = run_case(case, args, "triton", grad)
    ref, g_ref = run_case(case, args, "reference", grad)
    torch.testing.assert_close(out, ref, **ORACLE_TOL, msg=lambda m: f"forward: {m}")
    assert_close_all([g[n] for n in g_ref], list(g_ref.values()), names=[f"d{n}" for n in g_ref], **ORACLE_TOL)


def check_argument_layout(case, arg: str, kind: str):
    """``case`` with argument ``arg`` (or, for "grad", the gradient entering the backward) as a ``kind`` view."""
    args = case.make()
    grad = None
    if arg == "grad":
        with torch.no_grad():
            grad = as_layout(case.grad_out(case(args, "reference")), kind)
    else:
        args[arg] = as_layout(args[arg], kind)
    check_views(case, args, grad)


@pytest.mark.parametrize("kind", VIEW_KINDS)
@pytest.mark.parametrize("case,arg", case_args())
def test_argument_layout(case, arg, kind):
    check_argument_layout(case, arg, kind)


@pytest.mark.parametrize("case", OP_CASES, ids=[c.id for c in OP_CASES])
def test_all_arguments_as_views_at_once(case):
    """Every argument a different kind of view in one call (strides of unrelated arguments are not mixed up)."""
    args = case.make()
    for i, name in enumerate(case.args):
        args[name] = as_layout(args[name], VIEW_KINDS[i % len(VIEW_KINDS)])
    check_views(case, args)
