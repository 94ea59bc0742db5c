"""Derivatives of the sampling ops on both backends (issue 13 item 6): the Triton path
differentiates exactly what the torch path does (reverse and forward mode), gradcheck of the
reference in float64, the same requires_grad on both paths, no autograd work when nothing
needs it, and the Flow-GRPO log-prob gradient."""
import pytest
import torch

from fmrt import ops, reference as ref, use_backend
from tests.helpers import assert_close

BACKENDS = ("torch", "triton")
MODES = [("none", None), ("norm", None), ("norm", -1)]


def _inputs(dtype=torch.float32, shape=(2, 3, 5), grad=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, c, u, z = (torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
                  for _ in range(4))
    s = torch.tensor([0.8, 0.55], dtype=torch.float64).to(dtype)
    sn = torch.tensor([0.6, 0.3], dtype=torch.float64).to(dtype)
    scale = torch.tensor([3.0, 4.5], dtype=torch.float64).to(dtype)
    ts = [x, c, u, z, s, sn, scale]
    return [t.requires_grad_(grad) for t in ts]


# op name -> (ops call, reference call, indices of the inputs it uses)
def _cases():
    return {
        "euler_step": (lambda x, c, u, z, s, sn, g: ops.euler_step(x, c, s, sn),
                       lambda x, c, u, z, s, sn, g: ref.euler_step(x, c, s, sn), (0, 1, 4, 5)),
        **{f"cfg_combine_{r}_{d}": (
            lambda x, c, u, z, s, sn, g, r=r, d=d: ops.cfg_combine(c, u, g, rescale=r, norm_dim=d),
            lambda x, c, u, z, s, sn, g, r=r, d=d: ref.cfg_combine(c, u, g, r, d), (1, 2, 6))
           for r, d in MODES},
        **{f"guided_euler_step_{r}_{d}": (
            lambda x, c, u, z, s, sn, g, r=r, d=d: ops.guided_euler_step(
                x, c, u, g, s, sn, rescale=r, norm_dim=d),
            lambda x, c, u, z, s, sn, g, r=r, d=d: ref.guided_euler_step(x, c, u, g, s, sn, r, d),
            (0, 1, 2, 4, 5, 6)) for r, d in MODES},
        "sde_step": (
            lambda x, c, u, z, s, sn, g: ops.sde_step(x, c, s, sn, eta=0.7, noise=z,
                                                      return_log_prob=True),
            lambda x, c, u, z, s, sn, g: ref.sde_step(x, c, s, sn, 0.7, z, True), (0, 1, 3, 4, 5)),
        "sde_log_prob": (
            lambda x, c, u, z, s, sn, g: ops.sde_log_prob(x, c, s, sn, u, eta=0.7),
            lambda x, c, u, z, s, sn, g: ref.sde_log_prob(x, c, s, sn, 0.7, u), (0, 1, 4, 5)),
    }


CASES = list(_cases())


def _flat(out):
    return list(out) if isinstance(out, tuple) else [out]


@pytest.mark.parametrize("case", CASES)
def test_reference_gradcheck_float64(case):
    """The reference's reverse and forward derivatives in float64, every differentiable input
    (tensor sigmas and scales included). sde_step's log-prob holds its own sample constant
    (Flow-GRPO), which finite differences cannot see: its x' is checked here, the log-prob
    through sde_log_prob (a constant sample) and the analytic test below."""
    _, reference, used = _cases()[case]
    ins = _inputs(torch.float64)
    n_out = 1 if case == "sde_step" else None

    def f(*picked):
        args = list(ins)
        for i, t in zip(used, picked):
            args[i] = t
        return tuple(_flat(reference(*args))[:n_out])

    assert torch.autograd.gradcheck(f, tuple(ins[i] for i in used), check_forward_ad=True)


def _grads(backend, op, ins, used, seed=1):
    with use_backend(backend):
        outs = _flat(op(*ins))
    g = torch.Generator().manual_seed(seed)
    cots = [torch.randn(o.shape, generator=g).to(o.dtype) for o in outs]
    grads = torch.autograd.grad(outs, [ins[i] for i in used], cots, allow_unused=True)
    return outs, grads


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_gradients_match_torch(case, dtype):
    op, _, used = _cases()[case]
    outs_t, grads_t = _grads("triton", op, _inputs(dtype), used)
    outs_r, grads_r = _grads("torch", op, _inputs(dtype), used)
    for a, b in zip(outs_t, outs_r):
        assert a.requires_grad and b.requires_grad
        assert_close(a, b, scale=2.0)
    for i, a, b in zip(used, grads_t, grads_r):
        assert a is not None and b is not None, f"input {i}"
        assert_close(a, b, scale=4.0, msg=f"grad of input {i}")


@pytest.mark.parametrize("case", CASES)
def test_triton_jvp_matches_torch(case):
    op, _, used = _cases()[case]
    ins = _inputs(grad=False)
    g = torch.Generator().manual_seed(5)
    tangents = tuple(torch.randn(ins[i].shape, generator=g) for i in used)

    def f(*picked):
        args = list(ins)
        for i, t in zip(used, picked):
            args[i] = t
        return tuple(_flat(op(*args)))

    res = {}
    for backend in BACKENDS:
        with use_backend(backend):
            res[backend] = torch.func.jvp(f, tuple(ins[i] for i in used), tangents)
    assert_close(res["triton"][0], res["torch"][0], scale=2.0)
    assert_close(res["triton"][1], res["torch"][1], scale=4.0)


@pytest.mark.parametrize("case", [c for c in CASES if c != "sde_log_prob"])
def test_triton_forward_agrees_with_its_derivatives(case):
    """The Triton path's derivatives come from the reference: check they are the derivatives
    of what the kernels compute, by central differences of the Triton forward (fp32) along a
    random direction in every differentiable input (sde_step: x' only; its log-prob holds x'
    constant by definition)."""
    op, _, used = _cases()[case]
    ins = _inputs(grad=False)
    g = torch.Generator().manual_seed(9)
    dirs = {i: torch.randn(ins[i].shape, generator=g) * (0.05 if i in (4, 5) else 1.0)
            for i in used}

    def f(t):
        args = [a + t * dirs[i] if i in dirs else a for i, a in enumerate(ins)]
        return _flat(op(*args))[0].double()

    with use_backend("triton"):
        eps = 1e-3
        fd = (f(eps) - f(-eps)) / (2 * eps)
        leaves = [a.clone().requires_grad_(i in dirs) for i, a in enumerate(ins)]
        out = _flat(op(*leaves))[0]
        _, tangent = torch.func.jvp(lambda t: f(t), (torch.zeros(()),), (torch.ones(()),))
    torch.testing.assert_close(tangent, fd, rtol=2e-3, atol=2e-3)        # forward mode
    grads = torch.autograd.grad(out, [leaves[i] for i in used], fd.to(out.dtype))
    got = sum((gr.double() * dirs[i].double()).sum() for i, gr in zip(used, grads))
    torch.testing.assert_close(got, (fd * fd).sum(), rtol=2e-3, atol=0)  # reverse mode


def test_torch_func_grad_on_the_triton_path():
    x, c, u, *_ = _inputs(grad=False)
    want = torch.func.grad(lambda a: ref.guided_euler_step(x, a, u, 3.0, 0.8, 0.6, "norm")
                           .pow(2).sum())(c)
    with use_backend("triton"):
        got = torch.func.grad(lambda a: ops.guided_euler_step(x, a, u, 3.0, 0.8, 0.6,
                                                              rescale="norm").pow(2).sum())(c)
    assert_close(got, want, scale=4.0)


# ---------------------------------------------------------------------------------------------
# same requires_grad on both paths, no autograd work when nothing needs it
# ---------------------------------------------------------------------------------------------

def _all_ops(x, c, u, s, sn):
    q = x.reshape(2, 3, 1, 5)[..., :4]
    cs = torch.ones(3, 2)
    return {
        "euler_step": lambda: ops.euler_step(x, c, s, sn),
        "cfg_combine": lambda: ops.cfg_combine(c, u, 3.0, stats={}, sigma=s),
        "guided_euler_step": lambda: ops.guided_euler_step(x, c, u, 3.0, s, sn, stats={}),
        "sde_step": lambda: ops.sde_step(x, c, s, sn, eta=0.5, seed=3, return_log_prob=True),
        "add_noise": lambda: ops.add_noise(x, s, seed=3),
        "flow_matching_loss": lambda: ops.flow_matching_loss(x, c, seed=3, weight=s),
        "qk_norm_rope": lambda: ops.qk_norm_rope(q, q, None, None, cs, cs * 0),
        "flash_attention": lambda: ops.flash_attention(q, q, q),
        "flash_attention_jvp": lambda: ops.flash_attention_jvp(q, q, q, q, q, q),
    }


@pytest.mark.parametrize("op", list(_all_ops(*[torch.zeros(2, 3, 5)] * 3, None, None)))
@pytest.mark.parametrize("setting", ["grad", "no_grad_inputs", "no_grad_mode", "sigma_grad"])
def test_same_requires_grad_on_both_paths(op, setting):
    x, c, u, _, s, sn, _ = _inputs(grad=setting in ("grad", "no_grad_mode"))
    if setting == "sigma_grad":   # only the sigma tensors require grad
        s.requires_grad_()
        sn.requires_grad_()
    flags = {}
    for backend in BACKENDS:
        with use_backend(backend), torch.set_grad_enabled(setting != "no_grad_mode"):
            out = _all_ops(x, c, u, s, sn)[op]()
        flags[backend] = [t.requires_grad for t in _flat(out)]
    assert flags["triton"] == flags["torch"], flags


@pytest.mark.parametrize("backend", BACKENDS)
def test_guidance_statistics_are_never_differentiable(backend):
    x, c, u, _, s, sn, _ = _inputs()
    stats = {}
    with use_backend(backend):
        out = ops.guided_euler_step(x, c, u, 3.0, s, sn, stats=stats)
    assert out.requires_grad
    assert stats and not any(t.requires_grad for t in stats.values())


def test_no_autograd_function_when_nothing_requires_grad(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("autograd path taken")
    monkeypatch.setattr(ops._RefGradJvp, "apply", refuse)
    monkeypatch.setattr(ops._RefGrad, "apply", refuse)
    x, c, u, z, s, sn, g = _inputs(grad=False)
    with use_backend("triton"):
        outs = [ops.euler_step(x, c, s, sn), ops.cfg_combine(c, u, g, rescale="norm"),
                ops.guided_euler_step(x, c, u, g, s, sn, stats={}),
                ops.sde_step(x, c, s, sn, eta=0.5, noise=z, return_log_prob=True)[0]]
        x.requires_grad_()
        with torch.no_grad():
            outs.append(ops.euler_step(x, c, s, sn))
    assert all(o.grad_fn is None and not o.requires_grad for o in outs)


# ---------------------------------------------------------------------------------------------
# Flow-GRPO: the log-prob's gradient with respect to v (the mean)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("noise_kind", ["explicit", "seed"])
def test_sde_log_prob_gradient_wrt_v_is_the_flow_grpo_one(backend, noise_kind):
    """d mean_j(log N(x'_j; mean_j, std^2)) / d v_j with x' a constant:
    (x' - mean) / std^2 * d mean / d v / n = z / std * (1 + k (1 - s)) dt / n."""
    x, v, _, z, *_ = _inputs(grad=False)
    v.requires_grad_()
    s, sn, eta = 0.7, 0.4, 0.8
    kw = dict(noise=z) if noise_kind == "explicit" else dict(seed=21)
    with use_backend(backend):
        out, lp = ops.sde_step(x, v, s, sn, eta=eta, return_log_prob=True, **kw)
    gv, = torch.autograd.grad(lp.sum(), [v])
    k, std_dt = ref.sde_coefficients(s, sn, eta, x)
    mean, _ = ref.sde_mean(x, v.detach(), s, sn, eta)
    zz = (out.detach() - mean) / std_dt   # the noise the step drew
    n = x[0].numel()
    want = zz / std_dt * (1 + k * (1 - s)) * (sn - s) / n
    assert gv.abs().max() > 0
    torch.testing.assert_close(gv, want, rtol=1e-4, atol=1e-6)
    # re-evaluating the stored step: the same log-prob, the same gradient
    v2 = v.detach().clone().requires_grad_()
    with use_backend(backend):
        lp2 = ops.sde_log_prob(x, v2, s, sn, out.detach(), eta=eta)
    torch.testing.assert_close(lp2, lp.detach(), rtol=1e-5, atol=1e-5)
    gv2, = torch.autograd.grad(lp2.sum(), [v2])
    torch.testing.assert_close(gv2, want, rtol=1e-4, atol=1e-6)


def test_sde_log_prob_ratio_of_a_moved_policy():
    """GRPO's ratio exp(lp_new - lp_old) for a stored step: 1 for the same v, and the log-prob
    falls when the mean moves away from the stored sample."""
    x, v, _, z, *_ = _inputs(grad=False)
    out, lp_old = ops.sde_step(x, v, 0.7, 0.4, eta=0.8, noise=z, return_log_prob=True)
    same = ops.sde_log_prob(x, v, 0.7, 0.4, out, eta=0.8)
    torch.testing.assert_close(same, lp_old, rtol=1e-5, atol=1e-5)
    moved = ops.sde_log_prob(x, v + 1.0, 0.7, 0.4, out, eta=0.8)
    assert torch.all(moved < lp_old)
