"""Op-level bad input (issue 13 item 7): each case raises the same ValueError / TypeError,
naming the argument, on the torch and on the Triton (interpreter) backend, before any launch;
and the defined edge cases (equal SDE sigmas) give the same result on both."""
import pytest
import torch

from fmrt import ops, use_backend

NAN, INF = float("nan"), float("inf")


def _x(*shape):
    return torch.randn(shape or (2, 3, 4), generator=torch.Generator().manual_seed(0))


def _qk():
    q = _x(1, 2, 1, 4)
    return q, q.clone(), None, None, torch.ones(2, 2), torch.zeros(2, 2)


# name -> (call, exception type, message pattern)
CASES = {
    # cfg_zero_star_scale
    "cfg_zero_star_0d": (lambda: ops.cfg_zero_star_scale(torch.tensor(1.0), torch.tensor(2.0)),
                         ValueError, "v_cond"),
    "cfg_zero_star_batch0": (lambda: ops.cfg_zero_star_scale(_x(0, 3), _x(0, 3)),
                             ValueError, "v_cond"),
    "cfg_zero_star_int": (lambda: ops.cfg_zero_star_scale(torch.ones(2, 3, dtype=torch.int64),
                                                          _x(2, 3)), TypeError, "v_cond"),
    # flow_matching_loss
    "loss_batch0": (lambda: ops.flow_matching_loss(_x(0, 3), _x(0, 3), _x(0, 3)),
                    ValueError, "pred"),
    "loss_batch0_seed": (lambda: ops.flow_matching_loss(_x(0, 3), _x(0, 3), seed=1),
                         ValueError, "pred"),
    "loss_weight_nan": (lambda: ops.flow_matching_loss(_x(), _x(), _x(), weight=NAN),
                        ValueError, "weight"),
    "loss_weight_inf": (lambda: ops.flow_matching_loss(_x(), _x(), _x(), weight=-INF),
                        ValueError, "weight"),
    "loss_weight_tensor_nan": (lambda: ops.flow_matching_loss(
        _x(), _x(), _x(), weight=torch.tensor([1.0, NAN])), ValueError, "weight"),
    "loss_weight_str": (lambda: ops.flow_matching_loss(_x(), _x(), _x(), weight="1"),
                        TypeError, "weight"),
    # sde_step: sigmas, flags
    "sde_equal_sigmas_log_prob": (lambda: ops.sde_step(_x(), _x(), 0.5, 0.5, eta=0.5, seed=1,
                                                       return_log_prob=True),
                                  ValueError, "sigma_next < sigma"),
    "sde_ones_log_prob": (lambda: ops.sde_step(_x(), _x(), 1.0, 1.0, eta=0.5, seed=1,
                                               return_log_prob=True),
                          ValueError, "sigma_next < sigma"),
    "sde_tensor_order": (lambda: ops.sde_step(_x(), _x(), torch.tensor([0.3, 0.5]),
                                              torch.tensor([0.4, 0.2]), eta=0.5, seed=1),
                         ValueError, "sigma_next must not exceed sigma"),
    "sde_tensor_vs_float_order": (lambda: ops.sde_step(_x(), _x(), torch.tensor(0.3), 0.4,
                                                       eta=0.5, seed=1),
                                  ValueError, "sigma_next must not exceed sigma"),
    "sde_tensor_sigma_above_1": (lambda: ops.sde_step(_x(), _x(), torch.tensor([1.5, 0.5]), 0.2,
                                                      eta=0.5, seed=1), ValueError, "sigma"),
    "sde_log_prob_flag_str": (lambda: ops.sde_step(_x(), _x(), 0.5, 0.4, eta=0.5, seed=1,
                                                   return_log_prob="yes"),
                              TypeError, "return_log_prob"),
    "sde_log_prob_shape": (lambda: ops.sde_log_prob(_x(), _x(), 0.5, 0.4, _x(2, 3), eta=0.5),
                           ValueError, "prev_sample"),
    "sde_log_prob_equal": (lambda: ops.sde_log_prob(_x(), _x(), 0.5, 0.5, _x(), eta=0.5),
                           ValueError, "sigma_next < sigma"),
    # tensor sigmas get the float checks (CPU tensors: no device sync)
    "euler_tensor_sigma_above_1": (lambda: ops.euler_step(_x(), _x(), torch.tensor([1.2, 0.5]),
                                                          0.1), ValueError, "sigma"),
    "euler_tensor_sigma_next_negative": (lambda: ops.euler_step(_x(), _x(), 0.5,
                                                                torch.tensor(-0.1)),
                                         ValueError, "sigma_next"),
    "guided_tensor_sigma_nan": (lambda: ops.guided_euler_step(
        _x(), _x(), _x(), 2.0, torch.tensor([NAN, 0.5]), 0.1), ValueError, "sigma"),
    "add_noise_tensor_sigma_nan": (lambda: ops.add_noise(_x(), torch.tensor([0.5, NAN]), seed=1),
                                   ValueError, "sigma"),
    "add_noise_per_frame_sigma_above_1": (lambda: ops.add_noise(
        _x(2, 3, 4), torch.full((2, 1, 4), 1.5), seed=1), ValueError, "sigma"),
    "cfg_scale_tensor_inf": (lambda: ops.cfg_combine(_x(), _x(), torch.tensor([2.0, INF])),
                             ValueError, "scale"),
    "cfg_scale_nan": (lambda: ops.cfg_combine(_x(), _x(), NAN), ValueError, "scale"),
    # flags checked identically on both paths
    "add_noise_return_noise_str": (lambda: ops.add_noise(_x(), 0.5, seed=1, return_noise="yes"),
                                   TypeError, "return_noise"),
    "add_noise_return_noise_int": (lambda: ops.add_noise(_x(), 0.5, seed=1, return_noise=1),
                                   TypeError, "return_noise"),
    "euler_eager_rounding_str": (lambda: ops.euler_step(_x(), _x(), 0.5, 0.4,
                                                        eager_rounding="no"),
                                 TypeError, "eager_rounding"),
    # qk_norm_rope eps
    "qk_eps_inf": (lambda: ops.qk_norm_rope(*_qk(), eps=INF), ValueError, "eps"),
    "qk_eps_nan": (lambda: ops.qk_norm_rope(*_qk(), eps=NAN), ValueError, "eps"),
    "qk_eps_negative": (lambda: ops.qk_norm_rope(*_qk(), eps=-1e-6), ValueError, "eps"),
    "qk_eps_str": (lambda: ops.qk_norm_rope(*_qk(), eps="1e-6"), TypeError, "eps"),
    # flash attention: a mask that requires grad gets no gradient on either path
    "flash_mask_requires_grad": (lambda: ops.flash_attention(
        _x(1, 3, 1, 4), _x(1, 3, 1, 4), _x(1, 3, 1, 4),
        mask=torch.zeros(3, 3, requires_grad=True)), ValueError, "mask requires grad"),
}


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_same_error_on_both_backends(case, backend, monkeypatch):
    call, exc, pattern = CASES[case]
    from fmrt.kernels import noise, step, loss, rope, attention
    for mod in (noise, step, loss, rope, attention):   # nothing may launch
        for name, obj in vars(mod).items():
            if type(obj).__name__ in ("JITFunction", "InterpretedFunction"):
                monkeypatch.setattr(obj, "run", _no_launch, raising=False)
    with use_backend(backend), pytest.raises(exc, match=pattern):
        call()


def _no_launch(*args, **kwargs):
    raise AssertionError("a kernel launched before the argument checks")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_sde_equal_sigmas_is_a_zero_step(backend):
    """sigma == sigma_next (also both 1, which gave all NaN): x' = x, no noise."""
    x, v = _x(), _x()
    with use_backend(backend):
        for s in (1.0, 0.5, 0.0):
            assert torch.equal(ops.sde_step(x, v, s, s, eta=0.5, seed=3), x)
        st = torch.tensor([1.0, 0.4])
        assert torch.equal(ops.sde_step(x, v, st, st.clone(), eta=0.5, seed=3), x)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_sde_from_sigma_one_is_finite(backend):
    """sigma = 1 (the first step of a grid): Flow-GRPO's sigma' = sigma_next in the
    coefficient; finite, and the same on both paths."""
    x, v = _x(), _x()
    with use_backend(backend):
        out, lp = ops.sde_step(x, v, 1.0, 0.9, eta=0.5, seed=3, return_log_prob=True)
    assert torch.isfinite(out).all() and torch.isfinite(lp).all()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_loss_of_samples_with_no_elements_is_zero(backend):
    """pred [B, 0]: every sample is 'all masked', whose loss is defined as 0 (both paths)."""
    with use_backend(backend):
        loss = ops.flow_matching_loss(_x(2, 0), _x(2, 0), _x(2, 0))
    assert loss.item() == 0.0
