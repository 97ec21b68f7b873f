"""torch.func transforms. torch 2.13's custom-op autograd registration builds an autograd.Function without
the setup_context staticmethod that functorch needs, so the Triton path cannot run under an autograd
transform (grad, jacrev, jacfwd, ...): it raises an error naming the op and the alternatives, and
backend="auto" (the default) takes the reference there, which supports every transform. vmap alone runs
the kernels (PyTorch loops them over the batch)."""
import pytest
import torch

from ftkernels import _common
from helpers import OP_CASES, ORACLE_TOL

CASES = [c for c in OP_CASES if c.id in ("multichannel_linear-pw_mix", "frame_norm", "squared_relu_ffn-both_mixes",
                                          "multichannel_attention")]
IDS = [c.id for c in CASES]


def _fn(case, args, backend):
    first = case.args[0]

    def f(t):
        return case({**args, first: t}, backend)
    return first, f


@pytest.mark.parametrize("transform", ["grad", "jacrev", "jacfwd", "vmap-grad"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_triton_path_raises_a_clear_error(case, transform):
    args = {n: t.detach() for n, t in case.make().items()}
    first, f = _fn(case, args, "triton")
    op = case.id.split("-")[0]
    wrapped = {"grad": torch.func.grad(lambda t: f(t).sum()), "jacrev": torch.func.jacrev(f),
               "jacfwd": torch.func.jacfwd(f), "vmap-grad": torch.func.vmap(torch.func.grad(lambda t: f(t).sum()))
               }[transform]
    x = args[first][None] if transform.startswith("vmap") else args[first]
    with pytest.raises(RuntimeError, match=rf"ftkernels\.{op}: .*torch\.func.*backend='reference'"):
        wrapped(x)


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_vmap_runs_the_kernels(case):
    args = {n: t.detach() for n, t in case.make().items()}
    first, f = _fn(case, args, "triton")
    xs = torch.stack([args[first], 2 * args[first]])
    got = torch.func.vmap(f)(xs)
    want = torch.stack([case({**args, first: t}, "reference") for t in xs])
    torch.testing.assert_close(got, want, **ORACLE_TOL)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_auto_backend_takes_the_reference_under_transforms(case, monkeypatch):
    """Where "auto" would pick the kernels (CUDA tensors; simulated here), a torch.func transform gets the
    reference: torch.func.grad equals torch.autograd.grad through the kernels."""
    monkeypatch.setattr(_common, "_kernel_device", lambda x: True)
    args = {n: t.detach() for n, t in case.make().items()}
    first, f = _fn(case, args, "auto")
    got = torch.func.grad(lambda t: f(t).square().sum())(args[first])
    x = args[first].clone().requires_grad_()
    want, = torch.autograd.grad(case({**args, first: x}, "triton").square().sum(), [x])  # "auto": the kernels
    torch.testing.assert_close(got, want, **ORACLE_TOL)
    jac = torch.func.jacrev(f)(args[first])
    assert jac.shape == f(args[first]).shape + args[first].shape


def test_functorch_detection():
    x = torch.ones(3)
    active = _common.functorch_autograd_active
    assert not active()
    seen = []
    torch.func.grad(lambda t: (seen.append(active()), t.sum())[1])(x)
    torch.func.jacfwd(lambda t: (seen.append(active()), t)[1])(x)
    torch.func.vmap(lambda t: (seen.append(active()), t)[1])(x)
    assert seen == [True, True, False]
