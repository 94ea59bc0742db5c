import pytest
import torch

from fmrt import ops, reference as ref, use_backend
from tests.helpers import DTYPES, assert_close, check_against_reference

SHAPES = [(3, 5, 7, 11), (1, 16, 3, 9, 13), (1, 1), (3, 2049)]


def _make(shape, dtype, sigma_kind, *, transpose=False, seed=0):
    def make():
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(shape, generator=g).to(dtype)
        v = torch.randn(shape, generator=g).to(dtype)
        if transpose and x.ndim >= 3:
            x, v = x.transpose(1, 2), v.transpose(1, 2)
        B = x.shape[0]
        if sigma_kind == "float":
            s, sn = 0.75, 0.5
        else:
            s = torch.rand(B, generator=g)
            sn = s * 0.5
        return (x, v, s, sn), {}
    return make


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("sigma_kind", ["float", "tensor"])
def test_euler_step_matches_reference(shape, dtype, sigma_kind):
    check_against_reference(ops.euler_step, ref.euler_step, _make(shape, dtype, sigma_kind),
                            grad=False)


def test_euler_step_strided():
    check_against_reference(ops.euler_step, ref.euler_step,
                            _make((3, 5, 7, 11), torch.float32, "tensor", transpose=True),
                            grad=False)


def test_euler_step_exact_answer():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    v = torch.tensor([[1.0, -1.0], [2.0, 0.5]])
    want = torch.tensor([[0.75, 2.25], [2.0, 3.75]])  # sigma 1 -> 0.75 for sample 0, 0.5 for 1
    s = torch.tensor([1.0, 1.0])
    sn = torch.tensor([0.75, 0.5])
    for backend in ("torch", "triton"):
        with use_backend(backend):
            assert_close(ops.euler_step(x, v, s, sn), want)


def test_euler_step_to_zero_recovers_x0():
    # x_t = (1-s) x0 + s eps with the exact velocity eps - x0: one step to sigma 0 gives x0.
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 4, generator=g)
    x_t, v = ref.add_noise(x0, 0.3, eps)
    with use_backend("triton"):
        assert_close(ops.euler_step(x_t, v, 0.3, 0.0), x0)


def test_euler_step_bad_input():
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="v"):
        ops.euler_step(x, torch.randn(2, 4), 0.5, 0.4)
    with pytest.raises(TypeError, match="v"):
        ops.euler_step(x, torch.randn(2, 3, dtype=torch.float16), 0.5, 0.4)
    with pytest.raises(TypeError, match="x"):
        ops.euler_step(torch.ones(2, 3, dtype=torch.int64), x, 0.5, 0.4)
    with pytest.raises(ValueError, match="sigma_next"):
        ops.euler_step(x, x, 0.5, torch.rand(3))
    with pytest.raises(ValueError, match="sigma"):
        ops.euler_step(x, x, 1.5, 0.4)
