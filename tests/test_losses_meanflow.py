"""fmrt.losses.meanflow_loss (SPEC 6): against closed-form derivatives of an analytic model, an
independent autograd JVP (torch.autograd.functional.jvp, double-backward) and finite differences
of a small MLP, CFG-in-training by hand, the time sampler's statistics, the tiny MeanFlow DiT
(forward + backward, checkpointing), the detached adaptive weight, bad input, and MeanFlow
sampling of an exact average velocity."""
import math

import pytest
import torch
from torch import nn

from fmrt import attention as fattn, ops, reference as ref, use_backend
from fmrt.losses import meanflow_loss
from fmrt.models.dit import DiT, DiTConfig
from fmrt.sampling import sample

F64 = dict(rtol=1e-12, atol=1e-12)


def bview(s: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return s.view(-1, *([1] * (x.ndim - 1)))


def adaptive(L: torch.Tensor, p: float, c: float) -> torch.Tensor:
    """mean(L / sg((L + c)^p)), written out by hand."""
    return (L / (L.detach() + c) ** p).mean()


# ---------------------------------------------------------------------------------------------
# (a) analytic model: du/dt along (v, 0, 1) in closed form
# ---------------------------------------------------------------------------------------------

class Analytic(nn.Module):
    """u(z, r, t) = A[c] * z * t + b * r + w * h with h = t - r formed inside, so along (v, 0, 1)
    du/dt = A v t + A z + w (a model fed h with tangent 0 would miss the w)."""

    def __init__(self, channels: int):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.A = nn.Parameter(torch.randn(channels, dtype=torch.float64, generator=g))
        self.b = nn.Parameter(torch.tensor(0.7, dtype=torch.float64))
        self.w = nn.Parameter(torch.tensor(-1.3, dtype=torch.float64))

    def forward(self, z, r, t):
        h = t - r
        return self.A.view(1, -1, 1) * z * bview(t, z) + self.b * bview(r, z) + self.w * bview(h, z)


def analytic_case():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 2, 5, dtype=torch.float64, generator=g)
    noise = torch.randn(3, 2, 5, dtype=torch.float64, generator=g)
    t = torch.tensor([0.9, 0.6, 0.3], dtype=torch.float64)
    r = torch.tensor([0.2, 0.6, 0.0], dtype=torch.float64)
    return x0, noise, t, r


@pytest.mark.parametrize("p,c", [(1.0, 1e-3), (0.75, 1e-2), (0.0, 1e-3)])
def test_analytic_model_exact(p, c):
    x0, noise, t, r = analytic_case()
    m = Analytic(2)
    st = {}
    loss = meanflow_loss(m, x0, noise=noise, t=t, r=r, p=p, c=c, stats=st)
    loss.backward()
    got = {k: q.grad.clone() for k, q in m.named_parameters()}

    A, b, w = m.A.view(1, -1, 1), m.b, m.w
    tt, rr = bview(t, x0), bview(r, x0)
    z, v = (1 - tt) * x0 + tt * noise, noise - x0
    u = A * z * tt + b * rr + w * (tt - rr)
    with torch.no_grad():
        dudt = A * v * tt + A * z + w
        u_tgt = v - (tt - rr) * dudt
    L = (u - u_tgt).square().sum(dim=(1, 2))
    want = adaptive(L, p, c)
    assert loss.dtype == torch.float64 and loss.ndim == 0
    torch.testing.assert_close(loss, want, **F64)
    torch.testing.assert_close(st["L"], L.detach(), **F64)
    torch.testing.assert_close(st["u_tgt_norm"], u_tgt.flatten(1).norm(dim=1), **F64)
    torch.testing.assert_close(st["u_norm"], u.detach().flatten(1).norm(dim=1), **F64)
    torch.testing.assert_close(st["weight"], (L.detach() + c) ** -p, **F64)
    m.zero_grad()
    want.backward()
    for k, q in m.named_parameters():
        torch.testing.assert_close(got[k], q.grad, **F64, msg=k)
    # the r = t sample is plain flow matching: u_tgt = v
    torch.testing.assert_close(st["u_tgt_norm"][1], v[1].norm(), **F64)


@pytest.mark.parametrize("p", [1.0, 0.0])
def test_teacher_velocity_replaces_the_conditional_velocity(p):
    """velocity(z, t, c) is the tangent and the target's v: the analytic model's loss by hand
    with v~ = 0.5 z + t (and x0's noise only entering through z)."""
    x0, noise, t, r = analytic_case()
    m = Analytic(2)
    seen = []

    def velocity(z, t_, c):
        seen.append((torch.is_grad_enabled(), c))
        return 0.5 * z + bview(t_, z)
    st = {}
    loss = meanflow_loss(m, x0, noise=noise, t=t, r=r, p=p, stats=st, velocity=velocity)
    assert seen == [(False, None)]
    A, b, w = m.A.view(1, -1, 1), m.b, m.w
    tt, rr = bview(t, x0), bview(r, x0)
    z = (1 - tt) * x0 + tt * noise
    vt = 0.5 * z + tt
    u = A * z * tt + b * rr + w * (tt - rr)
    with torch.no_grad():
        u_tgt = vt - (tt - rr) * (A * vt * tt + A * z + w)
    want = adaptive((u - u_tgt).square().sum(dim=(1, 2)), p, 1e-3)
    torch.testing.assert_close(loss, want, **F64)
    torch.testing.assert_close(st["u_tgt_norm"][1], vt[1].norm(), **F64)   # r = t: u_tgt = v~


def test_teacher_velocity_sees_the_conditions_after_dropout():
    x0, noise, t, r, cond, uncond = cfg_case(B=8)
    m = CondModel()
    seen = []

    def velocity(z, t_, c):
        seen.append(c)
        return z
    st = {}
    meanflow_loss(m, x0, noise=noise, t=t, r=r, cond=cond, uncond=uncond, cond_drop_prob=0.5,
                  generator=torch.Generator().manual_seed(0), stats=st, velocity=velocity)
    assert 0 < int(st["dropped"].sum()) < 8
    assert torch.equal(seen[0], torch.where(st["dropped"], uncond, cond))
    with pytest.raises(ValueError, match="cfg_omega"):
        meanflow_loss(m, x0, cond=cond, uncond=uncond, cfg_omega=2.0, velocity=velocity)
    with pytest.raises(TypeError, match="velocity must be callable"):
        meanflow_loss(m, x0, cond=cond, velocity=3)
    with pytest.raises(ValueError, match="shape"):
        meanflow_loss(m, x0, cond=cond, velocity=lambda z, t_, c: z[:, :1])


# ---------------------------------------------------------------------------------------------
# (b) a small MLP: target from an independent JVP (double backward) and finite differences
# ---------------------------------------------------------------------------------------------

class MLP(nn.Module):
    def __init__(self, shape, hidden: int = 16, dtype=torch.float64, seed: int = 3):
        super().__init__()
        torch.manual_seed(seed)
        n = math.prod(shape)
        self.shape = shape
        self.net = nn.Sequential(nn.Linear(n + 2, hidden), nn.Tanh(), nn.Linear(hidden, hidden),
                                 nn.SiLU(), nn.Linear(hidden, n)).to(dtype)

    def forward(self, z, r, t):
        h = t - r
        inp = torch.cat([z.flatten(1), t[:, None].to(z.dtype), h[:, None].to(z.dtype)], dim=1)
        return self.net(inp).view(z.shape)


def mlp_case(B=4, shape=(2, 3), seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(B, *shape, dtype=torch.float64, generator=g)
    noise = torch.randn(B, *shape, dtype=torch.float64, generator=g)
    t = torch.rand(B, dtype=torch.float64, generator=g) * 0.8 + 0.2
    r = t * torch.rand(B, dtype=torch.float64, generator=g)
    r[0] = t[0]
    return x0, noise, t, r


def test_mlp_target_and_gradients_independent():
    x0, noise, t, r = mlp_case()
    m = MLP((2, 3))
    st = {}
    loss = meanflow_loss(m, x0, noise=noise, t=t, r=r, stats=st)
    loss.backward()
    got = {k: q.grad.clone() for k, q in m.named_parameters()}

    tt, rr = bview(t, x0), bview(r, x0)
    z, v = (1 - tt) * x0 + tt * noise, noise - x0
    _, dudt = torch.autograd.functional.jvp(m, (z, r, t), (v, torch.zeros_like(r),
                                                          torch.ones_like(t)))
    # finite differences (fp64, central) agree with the double-backward JVP
    eps = 1e-6
    fd = (m(z + eps * v, r, t + eps) - m(z - eps * v, r, t - eps)) / (2 * eps)
    torch.testing.assert_close(fd.detach(), dudt, rtol=1e-7, atol=1e-8)
    u_tgt = (v - (tt - rr) * dudt).detach()
    u = m(z, r, t)
    L = (u - u_tgt).square().sum(dim=(1, 2))
    want = adaptive(L, 1.0, 1e-3)
    torch.testing.assert_close(loss, want, **F64)
    torch.testing.assert_close(st["u_tgt_norm"], u_tgt.flatten(1).norm(dim=1), **F64)
    m.zero_grad()
    want.backward()
    nonzero = 0
    for k, q in m.named_parameters():
        torch.testing.assert_close(got[k], q.grad, **F64, msg=k)
        nonzero += int(got[k].abs().sum() > 0)
    assert nonzero == len(got)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_seeded_noise_is_add_noise_philox(dtype):
    """noise=None: the noise is ops.add_noise's Philox noise of `seed` (float64 x0, which the
    ops do not take: the same Philox reference noise)."""
    x0, _, t, r = mlp_case()
    x0, t, r = x0.to(dtype), t.to(dtype), r.to(dtype)
    m = MLP((2, 3), dtype=dtype)
    if dtype == torch.float64:
        eps = ref.philox_normal(x0.shape, 1234)
    else:
        _, _, eps = ops.add_noise(x0, t, seed=1234, return_noise=True)
    a = meanflow_loss(m, x0, t=t, r=r, seed=1234)
    b = meanflow_loss(m, x0, t=t, r=r, noise=eps)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert not torch.equal(a, meanflow_loss(m, x0, t=t, r=r, seed=1235))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_half_precision_close_to_float64(dtype):
    """Half-precision model and data: the loss (accumulated in fp32) is a float32 scalar close
    to the float64 one; gradients reach every parameter."""
    x0, noise, t, r = mlp_case(B=3)
    want = meanflow_loss(MLP((2, 3)), x0, noise=noise, t=t, r=r, p=0.0)
    m = MLP((2, 3), dtype=dtype)
    loss = meanflow_loss(m, x0.to(dtype), noise=noise.to(dtype), t=t.float(), r=r.float(), p=0.0)
    assert loss.dtype == torch.float32
    rel = {torch.float32: 1e-5, torch.bfloat16: 5e-2, torch.float16: 1e-2}[dtype]
    torch.testing.assert_close(loss.double(), want, rtol=rel, atol=0)
    loss.backward()
    assert all(q.grad is not None and q.grad.dtype == dtype and bool(q.grad.abs().sum() > 0)
               for q in m.parameters())


# ---------------------------------------------------------------------------------------------
# (g) p = 0 and the detached adaptive weight
# ---------------------------------------------------------------------------------------------

def test_p0_is_plain_mean_and_weight_is_detached():
    x0, noise, t, r = mlp_case(B=2, seed=4)
    m = MLP((2, 3))
    st = {}
    l0 = meanflow_loss(m, x0, noise=noise, t=t, r=r, p=0.0, stats=st)
    torch.testing.assert_close(l0, st["L"].mean(), **F64)
    assert torch.equal(st["weight"], torch.ones(2, dtype=torch.float64))
    # per-sample L-gradients (p = 0, batch of one) ...
    per, Ls = [], []
    for i in range(2):
        m.zero_grad()
        s = {}
        sl = slice(i, i + 1)
        meanflow_loss(m, x0[sl], noise=noise[sl], t=t[sl], r=r[sl], p=0.0, stats=s).backward()
        per.append({k: q.grad.clone() for k, q in m.named_parameters()})
        Ls.append(s["L"][0])
    # ... divided by the stop-gradient weight give the p-weighted loss's gradient
    p, c = 0.75, 1e-2
    m.zero_grad()
    meanflow_loss(m, x0, noise=noise, t=t, r=r, p=p, c=c).backward()
    for k, q in m.named_parameters():
        want = sum(per[i][k] / (Ls[i] + c) ** p for i in range(2)) / 2
        torch.testing.assert_close(q.grad, want, rtol=1e-10, atol=1e-12, msg=k)


# ---------------------------------------------------------------------------------------------
# (d) CFG inside training
# ---------------------------------------------------------------------------------------------

NULL = 5


class CondModel(nn.Module):
    """u = a[c] t + b[c] (t - r) + s[c] z, so du/dt along (v~, 0, 1) = s[c] v~ + a[c] + b[c]
    (with s = 0 the model ignores z). Records whether each call had gradients, and its cond."""

    def __init__(self, z_coef: bool = True):
        super().__init__()
        g = torch.Generator().manual_seed(7)
        self.a = nn.Parameter(torch.randn(NULL + 1, dtype=torch.float64, generator=g))
        self.b = nn.Parameter(torch.randn(NULL + 1, dtype=torch.float64, generator=g))
        s = 0.5 * torch.randn(NULL + 1, dtype=torch.float64, generator=g)
        self.s = nn.Parameter(s if z_coef else torch.zeros_like(s))
        self.calls = []

    def forward(self, z, r, t, cond):
        self.calls.append((torch.is_grad_enabled(), cond))
        val = self.a[cond] * t + self.b[cond] * (t - r)
        return bview(self.s[cond], z) * z + bview(val, z)


def cfg_hand(m, x0, noise, t, r, cond, dropped, omega, kappa, p=1.0, c=1e-3):
    tt, rr = bview(t, x0), bview(r, x0)
    z, v = (1 - tt) * x0 + tt * noise, noise - x0
    null = torch.full_like(cond, NULL)
    a, b, s = m.a.detach(), m.b.detach(), m.s.detach()
    c_in = torch.where(dropped, null, cond)
    u_c = bview(a[cond] * t, x0) + bview(s[cond], x0) * z           # u(z, t, t | c)
    u_u = bview(a[null] * t, x0) + bview(s[null], x0) * z           # u(z, t, t | null)
    v_g = omega * v + kappa * u_c + (1 - omega - kappa) * u_u
    v_g = torch.where(bview(dropped, x0), v, v_g)
    u_tgt = v_g - (tt - rr) * (bview(s[c_in], x0) * v_g + bview(a[c_in] + b[c_in], x0))
    u = bview(m.a[c_in] * t + m.b[c_in] * (t - r), x0) + bview(m.s[c_in], x0) * z
    return adaptive((u - u_tgt).square().sum(dim=(1, 2)), p, c)


def cfg_case(B=6):
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(B, 2, 3, dtype=torch.float64, generator=g)
    noise = torch.randn(B, 2, 3, dtype=torch.float64, generator=g)
    t = torch.rand(B, dtype=torch.float64, generator=g) * 0.7 + 0.3
    r = t * torch.rand(B, dtype=torch.float64, generator=g)
    cond = torch.randint(0, NULL, (B,), generator=g)
    return x0, noise, t, r, cond, torch.full_like(cond, NULL)


@pytest.mark.parametrize("omega,kappa,z_coef", [(2.0, 0.0, True), (1.0, 0.5, True),
                                                (1.5, 0.3, True), (1.5, 0.3, False)])
def test_cfg_in_training_formula(omega, kappa, z_coef):
    x0, noise, t, r, cond, uncond = cfg_case()
    m = CondModel(z_coef)
    st = {}
    loss = meanflow_loss(m, x0, noise=noise, t=t, r=r, cond=cond, uncond=uncond,
                         cfg_omega=omega, cfg_kappa=kappa, cond_drop_prob=0.0, stats=st)
    assert not st["dropped"].any()
    loss.backward()
    got = {k: q.grad.clone() for k, q in m.named_parameters()}
    # the guidance forwards ran without gradients; only the JVP forward had them
    assert [g for g, _ in m.calls] == [False] * (len(m.calls) - 1) + [True]
    assert len(m.calls) == 1 + (kappa != 0) + (1 - omega - kappa != 0)
    m.zero_grad()
    want = cfg_hand(m, x0, noise, t, r, cond, st["dropped"], omega, kappa)
    torch.testing.assert_close(loss, want, **F64)
    want.backward()
    for k, q in m.named_parameters():
        torch.testing.assert_close(got[k], q.grad, **F64, msg=k)


def test_cfg_dropped_conditions():
    x0, noise, t, r, cond, uncond = cfg_case(B=8)
    m = CondModel()
    st = {}
    loss = meanflow_loss(m, x0, noise=noise, t=t, r=r, cond=cond, uncond=uncond, cfg_omega=1.5,
                         cfg_kappa=0.3, cond_drop_prob=0.5,
                         generator=torch.Generator().manual_seed(0), stats=st)
    dropped = st["dropped"]
    assert 0 < int(dropped.sum()) < 8
    torch.testing.assert_close(m.calls[-1][1], torch.where(dropped, uncond, cond), rtol=0, atol=0)
    want = cfg_hand(m, x0, noise, t, r, cond, dropped, 1.5, 0.3)
    torch.testing.assert_close(loss, want, **F64)
    # every condition dropped: plain MeanFlow with uncond
    all_drop = meanflow_loss(m, x0, noise=noise, t=t, r=r, cond=cond, uncond=uncond,
                             cfg_omega=1.5, cfg_kappa=0.3, cond_drop_prob=1.0)
    plain = meanflow_loss(m, x0, noise=noise, t=t, r=r, cond=uncond)
    torch.testing.assert_close(all_drop, plain, **F64)


def test_cfg_dropped_embeddings():
    """Embedding conditions [B, L, D]: dropped samples get uncond's rows."""
    B = 8
    x0, noise, t, r, _, _ = cfg_case(B)
    cond = torch.randn(B, 3, 4, dtype=torch.float64)
    uncond = torch.zeros(B, 3, 4, dtype=torch.float64)
    seen = []

    def model(z, r_, t_, c):
        seen.append(c)
        return z * bview(c.sum(dim=(1, 2)), z) * t_.view(-1, 1, 1)

    st = {}
    meanflow_loss(model, x0, noise=noise, t=t, r=r, cond=cond, uncond=uncond,
                  cond_drop_prob=0.5, generator=torch.Generator().manual_seed(1), stats=st)
    d = st["dropped"]
    assert 0 < int(d.sum()) < B and len(seen) == 1       # no CFG: only the JVP forward
    torch.testing.assert_close(seen[0], torch.where(d[:, None, None], uncond, cond), rtol=0,
                               atol=0)


# ---------------------------------------------------------------------------------------------
# (e) time sampler
# ---------------------------------------------------------------------------------------------

def time_stats(B, **kw):
    st = {}
    x0 = torch.zeros(B, 1)
    meanflow_loss(lambda z, r, t: z + (t - r)[:, None], x0, noise=torch.zeros(B, 1), stats=st,
                  **kw)
    return st["t"], st["r"]


@pytest.mark.parametrize("ratio", [0.25, 0.6])
def test_time_sampler_logit_normal(ratio):
    B = 4000
    t, r = time_stats(B, ratio_r_neq_t=ratio, time_mu=-0.4, time_sigma=1.0,
                      generator=torch.Generator().manual_seed(3))
    assert t.dtype == torch.float32 and t.shape == (B,)
    assert bool((t >= r).all()) and bool(((t > 0) & (t < 1)).all())
    eq = r == t
    assert int(eq.sum()) == math.floor((1 - ratio) * B + 1e-9)
    pooled = torch.logit(torch.cat([t[~eq], r[~eq]]).double())     # the two raw draws
    assert abs(pooled.mean().item() + 0.4) < 0.08
    assert abs(pooled.std().item() - 1.0) < 0.08
    # the larger of two draws: P(t > sigmoid(mu)) = 3/4 for the r != t samples
    frac = (t[~eq] > torch.sigmoid(torch.tensor(-0.4))).float().mean().item()
    assert abs(frac - 0.75) < 0.05


def test_time_sampler_uniform_and_determinism():
    B = 4000
    g = torch.Generator().manual_seed(5)
    t, r = time_stats(B, time_sampler="uniform", ratio_r_neq_t=1.0, generator=g)
    assert not bool((r == t).any()) and bool((t >= r).all())
    assert abs(t.double().mean().item() - 2 / 3) < 0.02         # max of two U(0, 1)
    assert abs(r.double().mean().item() - 1 / 3) < 0.02         # min of two U(0, 1)
    t0, r0 = time_stats(16, ratio_r_neq_t=0.0, generator=torch.Generator().manual_seed(5))
    assert torch.equal(t0, r0)
    # same generator state -> same times, noise (seed from the generator), drops, loss
    m = MLP((2, 3), dtype=torch.float32)
    x0 = torch.randn(5, 2, 3)

    def run(seed):
        st = {}
        loss = meanflow_loss(m, x0, generator=torch.Generator().manual_seed(seed), stats=st)
        return loss, st

    (l1, s1), (l2, s2), (l3, s3) = run(11), run(11), run(12)
    assert torch.equal(l1, l2) and torch.equal(s1["t"], s2["t"]) and torch.equal(s1["r"], s2["r"])
    assert not torch.equal(s1["t"], s3["t"]) and not torch.equal(l1, l3)


# ---------------------------------------------------------------------------------------------
# (c) the tiny MeanFlow DiT
# ---------------------------------------------------------------------------------------------

def tiny_dit(**kw):
    torch.manual_seed(0)
    m = DiT(DiTConfig.preset("tiny", num_layers=1, meanflow=True, dim=64, num_heads=2,
                             ffn_dim=96, **kw))
    with torch.no_grad():
        for q in m.parameters():                 # perturb the zero-initialised gates / head
            q.add_(0.1 * torch.randn_like(q))
    return m


def test_dit_forward_backward_and_checkpointing():
    m = tiny_dit(attn_backend="math")

    def model(z, r, t, c):
        return m(z, t, c, r=r)

    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 3, 2, 4, 4, generator=g)
    noise = torch.randn(2, 3, 2, 4, 4, generator=g)
    t, r = torch.tensor([0.8, 0.5]), torch.tensor([0.3, 0.5])
    cond, uncond = torch.tensor([1, 7]), torch.tensor([10, 10])
    kw = dict(noise=noise, t=t, r=r, cond=cond, uncond=uncond, cfg_omega=1.0, cfg_kappa=0.5,
              cond_drop_prob=0.0)

    def grads():
        m.zero_grad()
        st = {}
        loss = meanflow_loss(model, x0, stats=st, **kw)
        loss.backward()
        return loss.detach(), st, {k: q.grad.clone() for k, q in m.named_parameters()}

    l0, st, g0 = grads()
    assert torch.isfinite(l0) and bool((st["L"] > 0).all())
    assert all(torch.isfinite(v).all() for v in g0.values())
    assert sum(int(v.abs().sum() > 0) for v in g0.values()) >= len(g0) - 2
    m.enable_gradient_checkpointing()
    l1, _, g1 = grads()
    torch.testing.assert_close(l1, l0)
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-5, atol=1e-7, msg=k)


def test_dit_default_attention_under_jvp():
    """torch's CPU SDPA has no forward AD: attention backend "auto" works only because the loss
    runs the JVP inside backend_override("triton") (math without fmrt's Triton attention);
    an explicit "sdpa" model fails with a message naming the fix."""
    x0 = torch.randn(1, 3, 1, 2, 2)

    def loss_of(m):
        return meanflow_loss(lambda z, r, t: m(z, t, None, r=r), x0, t=0.7, r=0.2, seed=0)

    want = loss_of(tiny_dit(attn_backend="math"))
    torch.testing.assert_close(loss_of(tiny_dit()), want, rtol=1e-4, atol=1e-5)
    q = torch.randn(1, 4, 2, 8)
    assert fattn.resolve_backend("auto", q) == "sdpa"          # the override was undone
    with pytest.raises(NotImplementedError, match="attn_backend='auto'"):
        loss_of(tiny_dit(attn_backend="sdpa"))


def test_dit_triton_ops_under_jvp_match_reference():
    """The DiT on fmrt's Triton kernels (interpreter; attention 'auto' = Triton flash attention
    under the loss's override) gives the reference path's MeanFlow target."""
    x0 = torch.randn(1, 3, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    out = {}
    for name, backend in (("torch", "torch"), ("triton", "triton")):
        m = tiny_dit()
        st = {}
        with use_backend(backend):
            meanflow_loss(lambda z, r, t: m(z, t, None, r=r), x0, t=0.8, r=0.3, seed=0, p=0.0,
                          stats=st)
        out[name] = st
    torch.testing.assert_close(out["triton"]["u_norm"], out["torch"]["u_norm"], rtol=1e-4,
                               atol=1e-5)
    torch.testing.assert_close(out["triton"]["u_tgt_norm"], out["torch"]["u_tgt_norm"],
                               rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# MeanFlow sampling of an exact average velocity
# ---------------------------------------------------------------------------------------------

def point_mass(cpt):
    """Data = the point cpt: on the path z_t = (1 - t) cpt + t eps the velocity is constant,
    so the exact average velocity is u(z, r, t) = (z - cpt) / t for every r."""
    def model(z, r, t, cond=None):
        return (z - cpt) / bview(t, z)
    return model


def test_meanflow_sampling_of_exact_average_velocity():
    cpt = torch.tensor([[0.5, -1.0], [2.0, 0.25]]).view(1, 1, 2, 2)
    noise = torch.randn(3, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    want = cpt.expand_as(noise)
    one = sample(point_mass(cpt), noise, sigmas=torch.tensor([1.0, 0.0]), solver="meanflow")
    torch.testing.assert_close(one, want, rtol=1e-6, atol=1e-6)
    two = sample(point_mass(cpt), noise, sigmas=torch.tensor([1.0, 0.4, 0.0]), solver="meanflow")
    torch.testing.assert_close(two, want, rtol=1e-6, atol=1e-6)
    # ... and the MeanFlow identity holds for it: the loss (r != t, random t) vanishes
    st = {}
    c64 = cpt.double()
    loss = meanflow_loss(point_mass(c64), c64.expand(3, 1, 2, 2).clone(), ratio_r_neq_t=1.0,
                         stats=st, generator=torch.Generator().manual_seed(0))
    assert bool((st["r"] < st["t"]).all())
    assert loss.item() < 1e-20


# ---------------------------------------------------------------------------------------------
# (f) bad input
# ---------------------------------------------------------------------------------------------

def _ok_model(z, r, t, *c):
    return z * bview(t - r, z)


BAD = [
    (dict(t=0.2, r=0.5), ValueError, "r must be <= t"),
    (dict(t=torch.tensor([0.5, 0.2, 0.3]), r=torch.tensor([0.1, 0.3, 0.0])), ValueError,
     "r must be <= t"),
    (dict(t=1.5, r=0.5), ValueError, "t must lie"),
    (dict(t=torch.tensor([0.5, 0.5, 0.5]), r=torch.tensor([0.1, -0.1, 0.0])), ValueError,
     "r must lie"),
    (dict(t=0.5), ValueError, "both t and r"),
    (dict(t=torch.full((4,), 0.5), r=0.1), ValueError, r"t must be .*\[B=3\]"),
    (dict(t=torch.full((3, 1), 0.5), r=0.1), ValueError, r"t must be"),
    (dict(t=torch.ones(3, dtype=torch.long), r=0.0), TypeError, "t must be a floating"),
    (dict(t="0.5", r=0.1), TypeError, "t must be"),
    (dict(noise=torch.randn(3, 2, 4)), ValueError, "noise"),
    (dict(noise=torch.randn(3, 2, 3), seed=1), ValueError, "seed"),
    (dict(seed=-1), ValueError, "seed"),
    (dict(seed=1.5), TypeError, "seed"),
    (dict(p=-1.0), ValueError, "p must be"),
    (dict(p="1"), TypeError, "p must be"),
    (dict(p=float("nan")), ValueError, "p must be finite"),
    (dict(c=0.0), ValueError, "c must be"),
    (dict(ratio_r_neq_t=1.5), ValueError, "ratio_r_neq_t"),
    (dict(cond_drop_prob=-0.1), ValueError, "cond_drop_prob"),
    (dict(time_sampler="lognorm"), ValueError, "time_sampler"),
    (dict(time_sigma=0.0), ValueError, "time_sigma"),
    (dict(cfg_omega=None), TypeError, "cfg_omega"),
    (dict(uncond=torch.zeros(3, dtype=torch.long)), ValueError, "uncond needs cond"),
    (dict(cond=torch.zeros(3, dtype=torch.long), cfg_omega=2.0), ValueError, "needs uncond"),
    (dict(cond=torch.zeros(2, dtype=torch.long)), ValueError, r"cond must be \[B=3"),
    (dict(cond=torch.zeros(3, dtype=torch.long), uncond=torch.zeros(3, 2, dtype=torch.long)),
     ValueError, "uncond must have cond's shape"),
    (dict(cond=torch.zeros(3, dtype=torch.long), uncond=torch.zeros(3)), TypeError,
     "uncond must have cond's dtype"),
    (dict(generator=0), TypeError, "generator"),
    (dict(stats=[]), TypeError, "stats"),
]


@pytest.mark.parametrize("kw,exc,match", BAD)
def test_bad_input(kw, exc, match):
    x0 = torch.randn(3, 2, 3)
    with pytest.raises(exc, match=match):
        meanflow_loss(_ok_model, x0, **kw)


def test_bad_model_and_x0():
    x0 = torch.randn(3, 2, 3)
    with pytest.raises(ValueError, match="model output must have x0's shape"):
        meanflow_loss(lambda z, r, t: z[:, :1], x0, t=0.5, r=0.1)
    with pytest.raises(ValueError, match="model output must have x0's shape"):
        meanflow_loss(lambda z, r, t, c: z[:, :1], x0, t=0.5, r=0.1, cond=torch.zeros(3),
                      uncond=torch.ones(3), cfg_omega=2.0)
    with pytest.raises(TypeError, match="model must be callable"):
        meanflow_loss(None, x0)
    with pytest.raises(TypeError, match="x0"):
        meanflow_loss(_ok_model, torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="x0"):
        meanflow_loss(_ok_model, torch.tensor(1.0))


# ---------------------------------------------------------------------------------------------
# CUDA (skipped without a GPU)
# ---------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_and_sampling_path_has_no_host_sync():
    m = MLP((2, 3), dtype=torch.float32).cuda()
    x0 = torch.randn(64, 2, 3, device="cuda")
    cond = torch.randint(0, NULL, (64,), device="cuda")

    def model(z, r, t, c):
        return m(z, r, t) * (1 + 0.1 * c.to(z.dtype)).view(-1, 1, 1)

    kw = dict(cond=cond, uncond=torch.full_like(cond, NULL), cfg_omega=1.5, cfg_kappa=0.3)
    st = {}
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:      # sampled (t, r), drops and Philox noise, all on the device: no host reads
        loss = meanflow_loss(model, x0, generator=torch.Generator("cuda").manual_seed(0),
                             stats=st, **kw)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    loss.backward()
    assert all(torch.isfinite(q.grad).all() for q in m.parameters())
    # CUDA vs CPU on the same times (the sampled ones), explicit noise and no drops
    noise = torch.randn_like(x0)
    t, r = st["t"], st["r"]
    a = meanflow_loss(model, x0, noise=noise, t=t, r=r, cond_drop_prob=0.0, **kw)
    mc = MLP((2, 3), dtype=torch.float32)
    mc.load_state_dict({k: v.cpu() for k, v in m.state_dict().items()})

    def model_cpu(z, r_, t_, c):
        return mc(z, r_, t_) * (1 + 0.1 * c.to(z.dtype)).view(-1, 1, 1)

    b = meanflow_loss(model_cpu, x0.cpu(), noise=noise.cpu(), t=t.cpu(), r=r.cpu(),
                      cond_drop_prob=0.0, cond=cond.cpu(), uncond=kw["uncond"].cpu(),
                      cfg_omega=1.5, cfg_kappa=0.3)
    torch.testing.assert_close(a.cpu(), b, rtol=1e-4, atol=1e-6)
