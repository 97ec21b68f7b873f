"""torch.library integration: opcheck on every custom op, torch.compile(fullgraph=True) with no graph break."""
import pytest
import torch

import ftkernels
from helpers import KERNEL_DEVICE, rand


def _mcl_args():
    return (rand(2, 3, 5, 7), rand(3, 6, 5), rand(4, 3), rand(3, 6), rand(4))


def _fn_args():
    return (rand(2, 3, 5, 7), rand(3, 5), rand(3, 5), 1e-5)


def _ffn_args():
    return (rand(1, 2, 4, 5), rand(2, 8, 4), rand(3, 4, 8), rand(3, 2), rand(2, 8), None, None, rand(3, 4), None,
            rand(2, 4), rand(2, 4), 1e-5, True)


@pytest.mark.parametrize("op,make", [
    ("multichannel_linear", _mcl_args),
    ("frame_norm", _fn_args),
    ("squared_relu_ffn", _ffn_args),
])
def test_opcheck(op, make):
    torch.library.opcheck(getattr(torch.ops.ftkernels, op).default, make())


def test_opcheck_backward_ops():
    x, wpw, wdw, bpw, _ = _mcl_args()
    g = rand(2, 4, 6, 7, requires_grad=False)
    torch.library.opcheck(torch.ops.ftkernels.multichannel_linear_backward.default,
                          (g, x.detach(), wpw.detach(), wdw.detach(), bpw.detach(), True))


class Block(torch.nn.Module):
    """x + ffn(x) after a frame norm and a multichannel linear: all three ops in one graph."""

    def __init__(self):
        super().__init__()
        self.norm = ftkernels.FrameNorm(3, 8, backend="triton")
        self.proj = ftkernels.MultichannelLinear(3, 3, 8, 8, depthwise=True, bias=True, backend="triton")
        self.ffn = ftkernels.SquaredReLUFeedForward(3, 8, expansion=2, backend="triton")

    def forward(self, x):
        h = self.proj(self.norm(x))
        return h + self.ffn(h)


def test_torch_compile_fullgraph_matches_eager():
    m = Block().double().to(KERNEL_DEVICE)
    x = rand(2, 3, 8, 6)
    eager = m(x)
    g_eager = torch.autograd.grad(eager.sum(), [x, *m.parameters()])
    torch._dynamo.reset()
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager" if KERNEL_DEVICE == "cpu" else "inductor")
    out = compiled(x)
    g_comp = torch.autograd.grad(out.sum(), [x, *m.parameters()])
    torch.testing.assert_close(out, eager)
    for a, b in zip(g_comp, g_eager):
        torch.testing.assert_close(a, b)
