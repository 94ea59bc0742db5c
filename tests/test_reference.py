"""Exact answers and invariants of the SPEC 1-2 reference formulas."""
import torch

from fmrt import reference as ref
from tests.helpers import assert_close


def test_add_noise_endpoints():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 5, generator=g), torch.randn(3, 4, 5, generator=g)
    x_t, target = ref.add_noise(x0, 0.0, eps)
    assert torch.equal(x_t, x0)
    assert torch.equal(target, eps - x0)
    x_t, _ = ref.add_noise(x0, 1.0, eps)
    assert torch.equal(x_t, eps)


def test_add_noise_per_sample_and_per_frame_sigma():
    x0 = torch.ones(2, 1, 3, 1)
    eps = torch.zeros(2, 1, 3, 1)
    x_t, _ = ref.add_noise(x0, torch.tensor([0.25, 0.5]), eps)
    assert torch.equal(x_t[:, 0, 0, 0], torch.tensor([0.75, 0.5]))
    per_frame = torch.tensor([0.0, 0.5, 1.0]).view(1, 1, 3, 1)
    x_t, _ = ref.add_noise(x0, per_frame, eps)
    assert torch.equal(x_t[0, 0, :, 0], torch.tensor([1.0, 0.5, 0.0]))


def test_predictions_invert_the_forward_process():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 8, generator=g), torch.randn(2, 8, generator=g)
    sigma = torch.tensor([0.2, 0.9])
    x_t, v = ref.add_noise(x0, sigma, eps)
    assert_close(ref.x0_from_velocity(x_t, v, sigma), x0)
    assert_close(ref.eps_from_velocity(x_t, v, sigma), eps)


def test_half_inputs_round_once():
    x0 = torch.tensor([1.0, 3.0], dtype=torch.bfloat16)
    eps = torch.tensor([2.0, -1.0], dtype=torch.bfloat16)
    x_t, target = ref.add_noise(x0, 1 / 3, eps)
    want = ((1 - 1 / 3) * x0.float() + (1 / 3) * eps.float()).to(torch.bfloat16)
    assert x_t.dtype == torch.bfloat16 and torch.equal(x_t, want)
    assert torch.equal(target, torch.tensor([1.0, -4.0], dtype=torch.bfloat16))
