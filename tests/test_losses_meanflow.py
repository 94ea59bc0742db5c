"""fmrt.losses.meanflow_loss against closed forms (analytic models) and a hand-written
double-backward JVP on a tiny attention model (Triton flash attention under the interpreter)."""
import pytest
import torch
import torch.nn as nn

import fmrt.ops
from fmrt import use_backend
from fmrt.attention import attention, backend_override
from fmrt.losses import meanflow_loss, meanflow_time_sample


class Analytic(nn.Module):
    """u = A z (t - r) + A z t + b r + e[cond]: h = t - r is computed inside."""

    def __init__(self, shape, classes=3, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.A = nn.Parameter(torch.randn(shape, generator=g))
        self.b = nn.Parameter(torch.randn(shape, generator=g))
        self.e = nn.Parameter(torch.randn(classes, *shape, generator=g))

    def forward(self, z, r, t, cond=None):
        tt, rr = t.view(-1, *[1] * (z.ndim - 1)), r.view(-1, *[1] * (z.ndim - 1))
        u = self.A * z * (tt - rr) + self.A * z * tt + self.b * rr
        return u if cond is None else u + self.e[cond]


def _data(B=4, shape=(3, 5), seed=1):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(B, *shape, generator=g)
    noise = torch.randn(B, *shape, generator=g)
    t = torch.tensor([0.9, 0.5, 0.3, 0.7])[:B]
    r = torch.tensor([0.2, 0.5, 0.0, 0.1])[:B]
    return x0, noise, t, r


def _closed_form(m, x0, noise, t, r, p, c, v_tilde=None, cond=None):
    """Loss with du/dt written out: du/dt = A v~ (t - r) + A z + A v~ t + A z + b ... (per sample)."""
    sh = (-1,) + (1,) * (x0.ndim - 1)
    tt, rr = t.view(sh), r.view(sh)
    z = (1 - tt) * x0 + tt * noise
    v = noise - x0 if v_tilde is None else v_tilde
    u = m.A * z * (tt - rr) + m.A * z * tt + m.b * rr
    if cond is not None:
        u = u + m.e[cond]
    dudt = m.A * v * (tt - rr) + m.A * z + m.A * v * tt + m.A * z  # d/dt along (v, 0, 1)
    tgt = (v - (tt - rr) * dudt).detach()
    L = ((u - tgt) ** 2).flatten(1).sum(1)
    return (L / (L.detach() + c) ** p).mean()


@pytest.mark.parametrize("p,c", [(1.0, 1e-3), (0.75, 1e-2), (0.0, 1e-3)])
def test_analytic_model_loss_and_grads(p, c):
    x0, noise, t, r = _data()
    m = Analytic(x0.shape[1:])
    loss = meanflow_loss(m, x0, noise=noise, t=t, r=r, p=p, c=c)
    gl = torch.autograd.grad(loss, (m.A, m.b))
    want = _closed_form(m, x0, noise, t, r, p, c)
    gw = torch.autograd.grad(want, (m.A, m.b))
    torch.testing.assert_close(loss, want)
    for a, b in zip(gl, gw):
        torch.testing.assert_close(a, b)


def test_h_with_zero_tangent_would_differ():
    # The closed form is sensitive to the t-derivative through h = t - r: dropping it (what a
    # model fed h with tangent 0 computes) changes the loss, so the test above can fail.
    x0, noise, t, r = _data()
    m = Analytic(x0.shape[1:])
    loss = meanflow_loss(m, x0, noise=noise, t=t, r=r, p=0.0)  # p = 0: the plain mean of L
    torch.testing.assert_close(loss, _closed_form(m, x0, noise, t, r, 0.0, 1e-3))
    sh = (-1, 1, 1)
    tt, rr = t.view(sh), r.view(sh)
    z, v = (1 - tt) * x0 + tt * noise, noise - x0
    u = m.A * z * (tt - rr) + m.A * z * tt + m.b * rr
    wrong = m.A * v * (tt - rr) + m.A * v * tt + m.A * z  # missing the h-term A z
    L = ((u - (v - (tt - rr) * wrong)) ** 2).flatten(1).sum(1)
    assert not torch.allclose(loss, L.mean(), rtol=1e-2)


def test_cfg_and_drop():
    x0, noise, t, r = _data()
    m = Analytic(x0.shape[1:])
    cond = torch.tensor([0, 1, 1, 0])
    uncond = torch.tensor(2)
    om, ka = 2.0, 0.3
    loss = meanflow_loss(m, x0, noise=noise, t=t, r=r, cond=cond, uncond=uncond, cfg_omega=om,
                         cfg_kappa=ka, cond_drop_prob=0.0)
    sh = (-1, 1, 1)
    tt = t.view(sh)
    z, v = (1 - tt) * x0 + tt * noise, noise - x0
    with torch.no_grad():
        u_c = m(z, t, t, cond)
        u_u = m(z, t, t, uncond.expand(4))
    v_g = om * v + ka * u_c + (1 - om - ka) * u_u
    # du/dt of the conditional model along (v_g, 0, 1) is the same closed form (e has no t)
    want = _closed_form(m, x0, noise, t, r, 1.0, 1e-3, v_tilde=v_g, cond=cond)
    torch.testing.assert_close(loss, want)
    # every condition dropped: uncond everywhere, target from the plain v
    stats = {}
    loss_d = meanflow_loss(m, x0, noise=noise, t=t, r=r, cond=cond, uncond=uncond, cfg_omega=om,
                           cfg_kappa=ka, cond_drop_prob=1.0, stats=stats)
    assert stats["dropped"].all()
    want_d = _closed_form(m, x0, noise, t, r, 1.0, 1e-3, cond=uncond.expand(4))
    torch.testing.assert_close(loss_d, want_d)


class TinyAttn(nn.Module):
    """Tokens [B, S, dim] -> one attention layer (backend "auto") with (t, t - r) conditioning."""

    def __init__(self, dim=32, heads=2, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.h = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.o = nn.Linear(dim, dim)
        self.wt = nn.Parameter(torch.randn(dim) * 0.5)
        self.wh = nn.Parameter(torch.randn(dim) * 0.5)

    def forward(self, z, r, t):
        B, S, dim = z.shape
        x = z + t[:, None, None] * self.wt + (t - r)[:, None, None] * self.wh
        q, k, v = self.qkv(x).view(B, S, 3, self.h, dim // self.h).unbind(2)
        a = attention(q, k, v).reshape(B, S, dim)
        return self.o(a) * torch.cos(t)[:, None, None] + z * (t - r)[:, None, None]


def test_tiny_attention_model_vs_double_backward(monkeypatch):
    calls = []
    real = fmrt.ops.flash_attention

    def spy(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(fmrt.ops, "flash_attention", spy)
    g = torch.Generator().manual_seed(3)
    B, S, dim = 2, 17, 32
    x0, noise = torch.randn(B, S, dim, generator=g), torch.randn(B, S, dim, generator=g)
    t, r = torch.tensor([0.8, 0.6]), torch.tensor([0.3, 0.6])
    m = TinyAttn(dim)
    with use_backend("triton"):
        loss = meanflow_loss(m, x0, noise=noise, t=t, r=r)
        grads = torch.autograd.grad(loss, list(m.parameters()))
    assert calls, "the JVP did not go through fmrt's flash attention"
    # hand-written: reverse-over-reverse JVP (torch.autograd.functional.jvp), SDPA attention
    z = (1 - t[:, None, None]) * x0 + t[:, None, None] * noise
    v = noise - x0
    with backend_override("math"):
        _, dudt = torch.autograd.functional.jvp(lambda a, b, c: m(a, b, c), (z, r, t),
                                                (v, torch.zeros_like(r), torch.ones_like(t)))
        u = m(z, r, t)
    tgt = v - (t - r)[:, None, None] * dudt
    L = ((u - tgt) ** 2).flatten(1).sum(1)
    want = (L / (L.detach() + 1e-3)).mean()
    want_grads = torch.autograd.grad(want, list(m.parameters()))
    torch.testing.assert_close(loss, want, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads, want_grads):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("sampler", ["logit_normal", "uniform"])
def test_time_sampler(sampler):
    g = torch.Generator().manual_seed(0)
    t, r = meanflow_time_sample(1000, sampler=sampler, ratio_r_neq_t=0.25, generator=g)
    assert t.shape == r.shape == (1000,) and t.dtype == torch.float32
    assert (t >= r).all() and (r >= 0).all() and (t <= 1).all()
    assert int((t == r).sum()) == 750
    t2, r2 = meanflow_time_sample(1000, sampler=sampler, generator=torch.Generator().manual_seed(0))
    assert torch.equal(t, t2) and torch.equal(r, r2)
    if sampler == "logit_normal":  # logit(t) and logit(r) are the max/min of N(-0.4, 1) pairs
        assert abs(float(torch.logit(t).mean()) - (-0.4 + 0.5642)) < 0.1


def test_sampled_defaults_run_and_fill_stats():
    x0 = torch.randn(4, 3, 5)
    m = Analytic((3, 5))
    stats = {}
    loss = meanflow_loss(m, x0, generator=torch.Generator().manual_seed(0), stats=stats)
    assert loss.ndim == 0 and torch.isfinite(loss)
    for key in ("L", "weight", "u_norm", "u_tgt_norm", "t", "r", "dropped"):
        assert stats[key].shape == (4,)
    loss.backward()
    assert m.A.grad is not None


def test_bad_input():
    x0, noise, t, r = _data()
    m = Analytic(x0.shape[1:])
    with pytest.raises(ValueError, match="t must be >= r"):
        meanflow_loss(m, x0, noise=noise, t=r, r=t)
    with pytest.raises(ValueError, match="t must lie"):
        meanflow_loss(m, x0, noise=noise, t=t + 1, r=r)
    with pytest.raises(ValueError, match="r must lie"):
        meanflow_loss(m, x0, noise=noise, t=t, r=r - 1)
    with pytest.raises(ValueError, match="r must be"):
        meanflow_loss(m, x0, noise=noise, t=t, r=r[:2])
    with pytest.raises(ValueError, match="both t and r"):
        meanflow_loss(m, x0, noise=noise, t=t)
    with pytest.raises(ValueError, match="noise"):
        meanflow_loss(m, x0, noise=noise[:, :2], t=t, r=r)
    with pytest.raises(ValueError, match="model must return"):
        meanflow_loss(lambda z, r_, t_: z[:, :2], x0, noise=noise, t=t, r=r)
    with pytest.raises(ValueError, match="time_sampler"):
        meanflow_loss(m, x0, time_sampler="beta")
    with pytest.raises(ValueError, match="cfg_omega"):
        meanflow_loss(m, x0, noise=noise, t=t, r=r, cfg_omega=2.0)
    with pytest.raises(TypeError, match="x0"):
        meanflow_loss(m, x0.long())


def test_meanflow_dit_with_cfg_vs_hand_written(monkeypatch):
    # fmrt's MeanFlow DiT (attention backend "auto": the loss routes it to fmrt.ops.flash_attention,
    # here on CPU its reference path), training-time CFG, against a hand-written target.
    from fmrt.models.dit import DiT, DiTConfig
    calls = []
    real = fmrt.ops.flash_attention
    monkeypatch.setattr(fmrt.ops, "flash_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.manual_seed(0)
    m = DiT(DiTConfig.preset("tiny", num_layers=1, meanflow=True))
    with torch.no_grad():
        for prm in m.parameters():
            prm.add_(0.1 * torch.randn_like(prm))
    g = torch.Generator().manual_seed(2)
    x0, noise = torch.randn(2, 3, 2, 4, 4, generator=g), torch.randn(2, 3, 2, 4, 4, generator=g)
    t, r = torch.tensor([0.8, 0.4]), torch.tensor([0.3, 0.4])
    cond, uncond = torch.tensor([1, 7]), torch.tensor(10)

    def model(z, r_, t_, c):
        return m(z, t_, c, r=r_)

    loss = meanflow_loss(model, x0, noise=noise, t=t, r=r, cond=cond, uncond=uncond,
                         cfg_omega=1.5, cfg_kappa=0.2, cond_drop_prob=0.0, p=0.5)
    grads = torch.autograd.grad(loss, list(m.parameters()), allow_unused=True)
    assert calls
    sh = (-1, 1, 1, 1, 1)
    z, v = (1 - t.view(sh)) * x0 + t.view(sh) * noise, noise - x0
    with backend_override("math"):
        with torch.no_grad():
            v_g = 1.5 * v + 0.2 * m(z, t, cond, r=t) - 0.7 * m(z, t, uncond.expand(2), r=t)
        _, dudt = torch.autograd.functional.jvp(lambda a, b, c: m(a, c, cond, r=b), (z, r, t),
                                                (v_g, torch.zeros_like(r), torch.ones_like(t)))
        u = m(z, t, cond, r=r)
    L = ((u - (v_g - (t - r).view(sh) * dudt)) ** 2).flatten(1).sum(1)
    want = (L / (L.detach() + 1e-3) ** 0.5).mean()
    want_grads = torch.autograd.grad(want, list(m.parameters()), allow_unused=True)
    torch.testing.assert_close(loss, want, rtol=1e-4, atol=1e-5)
    for a, b in zip(grads, want_grads):
        if b is None:
            assert a is None or not a.any()
        else:
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)
