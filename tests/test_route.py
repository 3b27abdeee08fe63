"""fastpeft/route.py: the op path computes through a base weight's registered route, eager and as
the custom op (whose schema carries a non-dense base as tensor, state tensors and format)."""
import pytest
import torch

from fastpeft import ops, route


class _Wrapped:
    """A stand-in for a quantized base: a dense W behind another format, with one state tensor."""

    format = "wrapped"

    def __init__(self, w, state=None):
        self.w, self.shape, self.device = w, w.shape, w.device
        self.state = w.new_ones(1) if state is None else state

    def op_args(self):
        return self.w, [self.state], "wrapped:v1"


@pytest.fixture
def wrapped_route():
    calls = []

    def forward(x2, weight, *args):
        calls.append("forward")
        return route.dense_forward(x2, weight.w * weight.state, *args)

    def dx(dy2, x_dtype, weight, *args):
        calls.append("dx")
        return route.dense_dx(dy2, x_dtype, weight.w * weight.state, *args)

    def rebuild(tensor, state, fmt):
        assert fmt == "wrapped:v1" and len(state) == 1
        return _Wrapped(tensor, state[0])

    route.register("wrapped", route.BaseRoute(forward, dx, rebuild))
    yield calls
    route._ROUTES.pop("wrapped")


def _grads(fn, x, a, b, g):
    x, a, b = (t.detach().clone().requires_grad_() for t in (x, a, b))
    y = fn(x, a, b)
    y.backward(g)
    return y.detach(), x.grad, a.grad, b.grad


@pytest.mark.parametrize("p", [0.0, 0.1], ids=["p0", "p0.1"])
def test_a_registered_base_runs_its_route(kernels_on, wrapped_route, p):
    torch.manual_seed(1)
    x = torch.randn(3, 11, 24, device=kernels_on)
    w, bias = torch.randn(20, 24, device=kernels_on), torch.randn(20, device=kernels_on)
    a, b, g = torch.randn(4, 24, device=kernels_on), torch.randn(20, 4, device=kernels_on), torch.randn(3, 11, 20,
                                                                                                          device=kernels_on)
    seed = torch.tensor([7], device=kernels_on) if p else None
    dense = _grads(lambda x, a, b: ops.lora_linear(x, w, bias, a, b, 2.0, p, seed), x, a, b, g)
    other = _grads(lambda x, a, b: ops.lora_linear(x, _Wrapped(w), bias, a, b, 2.0, p, seed), x, a, b, g)
    assert wrapped_route == ["forward", "dx"]
    # the custom op (the torch.compile path) takes the same base through op_args and rebuilds it
    op = _grads(lambda x, a, b: torch.ops.fastpeft.lora_linear(x, *route.op_args(_Wrapped(w)), bias, a, b, 2.0, p,
                                                              seed)[0], x, a, b, g)
    assert wrapped_route == ["forward", "dx"] * 2
    for d, o, c in zip(dense, other, op):
        torch.testing.assert_close(o, d)
        torch.testing.assert_close(c, d)


def test_an_unknown_format_is_named(kernels_on):
    x, w = torch.randn(2, 8, device=kernels_on), torch.randn(6, 8, device=kernels_on)
    a, b = torch.randn(2, 8, device=kernels_on), torch.randn(6, 2, device=kernels_on)
    with pytest.raises(NotImplementedError, match=r"no route computes a base weight of format 'wrapped'; known: "
                                                  r"\['4bit', 'dense'\]"):
        ops.lora_linear(x, _Wrapped(w), None, a, b, 1.0)
