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


MIXED = [(torch.float32, torch.bfloat16, torch.bfloat16),   # diffusers: fp32 latents, bf16 model
         (torch.bfloat16, torch.float32, torch.float32),
         (torch.float16, torch.bfloat16, torch.float32),
         (torch.float32, torch.float16, None)]


def _mixed(shape, x_dtype, v_dtype, sigma_kind, n_v=1):
    def make():
        g = torch.Generator().manual_seed(3)
        x = torch.randn(shape, generator=g).to(x_dtype)
        vs = [torch.randn(shape, generator=g).to(v_dtype) for _ in range(n_v)]
        s, sn = (0.75, 0.5) if sigma_kind == "float" else (torch.tensor([0.9, 0.4, 0.2]),
                                                           torch.tensor([0.8, 0.1, 0.0]))
        return x, vs, s, sn
    return make


@pytest.mark.parametrize("x_dtype,v_dtype,out_dtype", MIXED)
@pytest.mark.parametrize("sigma_kind", ["float", "tensor"])
def test_euler_step_mixed_dtypes_and_out_dtype(x_dtype, v_dtype, out_dtype, sigma_kind):
    make = _mixed((3, 5, 67), x_dtype, v_dtype, sigma_kind)

    def args():
        x, (v,), s, sn = make()
        return (x, v, s, sn), dict(out_dtype=out_dtype)
    check_against_reference(ops.euler_step, lambda *a, out_dtype: ref.euler_step(*a, out_dtype),
                            args, grad=False)
    x, (v,), s, sn = make()
    for backend in ("torch", "triton"):
        with use_backend(backend):
            got = ops.euler_step(x, v, s, sn, out_dtype=out_dtype)
        assert got.dtype == (out_dtype or x_dtype)
        # independent statement: fp64 math, then one rounding
        h = (torch.as_tensor(sn, dtype=torch.float64) - torch.as_tensor(s, dtype=torch.float64))
        h = h.view(-1, 1, 1) if h.ndim else h
        want = (x.double() + h * v.double()).to(got.dtype)
        assert_close(got, want)


@pytest.mark.parametrize("x_dtype,v_dtype,out_dtype", MIXED)
@pytest.mark.parametrize("mode", ["none", "norm", "token"])
def test_guided_euler_step_mixed_dtypes_and_out_dtype(x_dtype, v_dtype, out_dtype, mode):
    make = _mixed((3, 5, 67), x_dtype, v_dtype, "tensor", n_v=2)
    rescale = "none" if mode == "none" else "norm"
    norm_dim = -1 if mode == "token" else None

    def args():
        x, (c, u), s, sn = make()
        return (x, c, u, 3.0, s, sn), dict(rescale=rescale, norm_dim=norm_dim,
                                            out_dtype=out_dtype)
    check_against_reference(
        ops.guided_euler_step,
        lambda *a, rescale, norm_dim, out_dtype: ref.guided_euler_step(*a, rescale, norm_dim,
                                                                       out_dtype),
        args, grad=False)
    (x, c, u, g, s, sn), kw = args()
    with use_backend("triton"):
        got = ops.guided_euler_step(x, c, u, g, s, sn, **kw)
    assert got.dtype == (out_dtype or x_dtype)
    v = ref.guided_velocity(c, u, g, rescale, norm_dim)
    assert_close(got, ops.euler_step(x, v, s, sn, out_dtype=got.dtype), scale=2.0)


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
        ops.euler_step(x, torch.ones(2, 3, dtype=torch.int64), 0.5, 0.4)
    with pytest.raises(TypeError, match="out_dtype"):
        ops.euler_step(x, x, 0.5, 0.4, out_dtype=torch.int32)
    with pytest.raises(TypeError, match="out_dtype"):
        ops.euler_step(x, x, 0.5, 0.4, out_dtype="bfloat16")
    with pytest.raises(TypeError, match="x"):
        ops.euler_step(torch.ones(2, 3, dtype=torch.int64), x, 0.5, 0.4)
    with pytest.raises(ValueError, match="sigma_next"):
        ops.euler_step(x, x, 0.5, torch.rand(3))
    with pytest.raises(ValueError, match="sigma"):
        ops.euler_step(x, x, 1.5, 0.4)


# ---------------------------------------------------------------------------------------------
# cfg_combine / guided_euler_step
# ---------------------------------------------------------------------------------------------

GUIDED_SHAPES = [(3, 5, 7, 11), (1, 9, 12), (2, 4100)]  # 4100: two flat chunks per sample
RESCALE_MODES = [("none", None), ("norm", None), ("norm", -1)]


def _make_guided(shape, dtype, scale_kind, sigma_kind="float", *, transpose=False, seed=0):
    def make():
        g = torch.Generator().manual_seed(seed)
        x, c, u = (torch.randn(shape, generator=g).to(dtype) for _ in range(3))
        if transpose:
            x, c, u = (t.transpose(-1, -2) for t in (x, c, u))
        B = shape[0]
        scale = 4.5 if scale_kind == "float" else torch.rand(B, generator=g) * 6 + 1
        if sigma_kind == "float":
            s, sn = 0.8, 0.55
        else:
            s = torch.rand(B, generator=g) * 0.5 + 0.5
            sn = s - 0.25
        return x, c, u, scale, s, sn
    return make


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", GUIDED_SHAPES)
@pytest.mark.parametrize("mode", RESCALE_MODES)
def test_cfg_combine_matches_reference(shape, dtype, mode):
    rescale, norm_dim = mode
    make = _make_guided(shape, dtype, "tensor" if shape[0] > 1 else "float")

    def args():
        _, c, u, scale, _, _ = make()
        return (c, u, scale), dict(rescale=rescale, norm_dim=norm_dim)

    check_against_reference(
        ops.cfg_combine, lambda c, u, s, rescale, norm_dim: ref.cfg_combine(c, u, s, rescale,
                                                                            norm_dim),
        args, grad=False)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", GUIDED_SHAPES[:2])
@pytest.mark.parametrize("mode", RESCALE_MODES)
@pytest.mark.parametrize("kinds", [("float", "float"), ("tensor", "tensor")])
def test_guided_euler_step_matches_reference(shape, dtype, mode, kinds):
    rescale, norm_dim = mode
    make = _make_guided(shape, dtype, *kinds)

    def args():
        return make(), dict(rescale=rescale, norm_dim=norm_dim)

    check_against_reference(
        ops.guided_euler_step,
        lambda *a, rescale, norm_dim: ref.guided_euler_step(*a, rescale, norm_dim),
        args, grad=False)


@pytest.mark.parametrize("mode", RESCALE_MODES)
def test_guided_euler_step_strided_and_inputs_untouched(mode):
    rescale, norm_dim = mode
    make = _make_guided((2, 6, 10), torch.float32, "tensor", "tensor", transpose=True)
    args = make()
    assert not args[0].is_contiguous()
    before = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    with use_backend("triton"):
        out = ops.guided_euler_step(*args, rescale=rescale, norm_dim=norm_dim, stats={})
    assert_close(out, ref.guided_euler_step(*before, rescale, norm_dim))
    for a, b in zip(args, before):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b)


def test_cfg_combine_exact_answers():
    c = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    u = torch.zeros(2, 2)
    for backend in ("torch", "triton"):
        with use_backend(backend):
            assert_close(ops.cfg_combine(c, u, 2.0), torch.tensor([[6.0, 8.0], [2.0, 0.0]]))
            # ||c|| / ||v|| = 1/2: norm rescale gives back c's length
            assert_close(ops.cfg_combine(c, u, 2.0, rescale="norm"), c)
            assert_close(ops.cfg_combine(c, u, torch.tensor([1.0, 3.0])),
                         torch.tensor([[3.0, 4.0], [3.0, 0.0]]))
            # v = 0 somewhere (c = u = 0 row): the factor is 1, no nan
            z = torch.zeros(1, 3, 4)
            assert_close(ops.cfg_combine(z, z, 5.0, rescale="norm", norm_dim=-1), z)
            # x + (0.5 - 1) * v
            x = torch.ones(2, 2)
            assert_close(ops.guided_euler_step(x, c, u, 2.0, 1.0, 0.5),
                         torch.tensor([[-2.0, -3.0], [0.0, 1.0]]))


def _qwen_true_cfg(pos, neg, scale):
    """diffusers' QwenImagePipeline true CFG (the peer's formula, per token over the last dim)."""
    comb = neg + scale * (pos - neg)
    cond_norm = torch.norm(pos, dim=-1, keepdim=True)
    noise_norm = torch.norm(comb, dim=-1, keepdim=True)
    return comb * (cond_norm / noise_norm)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_cfg_combine_per_token_matches_qwen_image(backend):
    g = torch.Generator().manual_seed(3)
    pos, neg = torch.randn(2, 7, 64, generator=g), torch.randn(2, 7, 64, generator=g)
    with use_backend(backend):
        out = ops.cfg_combine(pos, neg, 4.0, rescale="norm", norm_dim=-1)
    assert_close(out, _qwen_true_cfg(pos, neg, 4.0))
    # per-token rescale keeps every token's norm equal to the conditional one
    assert_close(out.norm(dim=-1), pos.norm(dim=-1))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_cfg_combine_per_sample_norm_matches_definition(backend):
    g = torch.Generator().manual_seed(4)
    c, u = torch.randn(3, 2, 4100, generator=g), torch.randn(3, 2, 4100, generator=g)
    with use_backend(backend):
        out = ops.cfg_combine(c, u, 5.0, rescale="norm")
    assert_close(out.flatten(1).norm(dim=1), c.flatten(1).norm(dim=1), scale=4)
    comb = u + 5.0 * (c - u)
    cos = torch.nn.functional.cosine_similarity(out.flatten(1), comb.flatten(1), dim=1)
    assert_close(cos, torch.ones(3))


# ---------------------------------------------------------------------------------------------
# in-pass diagnostics
# ---------------------------------------------------------------------------------------------

STAT_KEYS = {"sigma", "cond_mean", "cond_std", "uncond_mean", "uncond_std", "cfg_diff_mean",
             "cfg_diff_std", "cfg_diff_norm", "vel_diff_norm", "x0_diff_norm", "rescale_ratio"}


def _stats_oracle(c, u, scale, sigma):
    """Seed 000's diagnostics computed directly from their definitions (float64)."""
    c, u = c.double().flatten(1), u.double().flatten(1)
    B = c.shape[0]
    s = (sigma.double() if isinstance(sigma, torch.Tensor) else torch.tensor(sigma).double())
    s = s.expand(B)
    x = torch.zeros_like(c)
    d = c - u
    sc = scale.double() if isinstance(scale, torch.Tensor) else torch.tensor(scale).double()
    v = u + sc.expand(B)[:, None] * d
    return {
        "sigma": s, "cond_mean": c.mean(1), "cond_std": c.std(1), "uncond_mean": u.mean(1),
        "uncond_std": u.std(1), "cfg_diff_mean": d.mean(1), "cfg_diff_std": d.std(1),
        "cfg_diff_norm": torch.linalg.vector_norm(d, dim=1),
        "vel_diff_norm": torch.linalg.vector_norm(d * s[:, None], dim=1),
        "x0_diff_norm": torch.linalg.vector_norm((x - s[:, None] * c) - (x - s[:, None] * u),
                                                 dim=1),
        "rescale_ratio": torch.linalg.vector_norm(c, dim=1) / torch.linalg.vector_norm(v, dim=1),
    }


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("mode", RESCALE_MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 2, 4100), (3, 5, 60)])  # split sums / one program each
def test_guided_stats_match_definitions(backend, mode, dtype, shape):
    rescale, norm_dim = mode
    x, c, u, scale, s, sn = _make_guided(shape, dtype, "tensor", "tensor", seed=5)()
    c = c + 0.3  # non-zero means
    stats = {}
    with use_backend(backend):
        out = ops.guided_euler_step(x, c, u, scale, s, sn, rescale=rescale, norm_dim=norm_dim,
                                    stats=stats)
    assert_close(out, ref.guided_euler_step(x, c, u, scale, s, sn, rescale, norm_dim))
    assert set(stats) == STAT_KEYS
    want = _stats_oracle(c, u, scale, s)
    for key in STAT_KEYS:
        got = stats[key]
        assert got.dtype == torch.float32 and got.shape == (3,), key
        torch.testing.assert_close(got.double(), want[key], rtol=1e-4, atol=1e-5,
                                   msg=lambda m: f"{key}: {m}")


def test_cfg_combine_stats_without_sigma():
    _, c, u, scale, _, _ = _make_guided((2, 3, 5), torch.float32, "float")()
    for backend in ("torch", "triton"):
        stats = {}
        with use_backend(backend):
            ops.cfg_combine(c, u, scale, stats=stats)
        assert set(stats) == STAT_KEYS - {"sigma", "vel_diff_norm", "x0_diff_norm"}
        stats = {}
        with use_backend(backend):
            ops.cfg_combine(c, u, scale, stats=stats, sigma=0.5)
        assert set(stats) == STAT_KEYS
        torch.testing.assert_close(stats["vel_diff_norm"],
                                   _stats_oracle(c, u, scale, 0.5)["vel_diff_norm"].float())


def test_cfg_zero_star_scale_matches_diffusers_formula():
    g = torch.Generator().manual_seed(6)
    c, u = torch.randn(3, 4, 5, generator=g), torch.randn(3, 4, 5, generator=g)
    pf, nf = c.view(3, -1), u.view(3, -1)
    want = (pf * nf).sum(1, keepdim=True) / ((nf ** 2).sum(1, keepdim=True) + 1e-8)
    assert_close(ops.cfg_zero_star_scale(c, u), want[:, 0])


# ---------------------------------------------------------------------------------------------
# sde_step
# ---------------------------------------------------------------------------------------------

def _make_sde(shape, dtype, sigma_kind, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, v, z = (torch.randn(shape, generator=g).to(dtype) for _ in range(3))
    if sigma_kind == "float":
        s, sn = 0.7, 0.5
    else:
        s = torch.rand(shape[0], generator=g) * 0.5 + 0.45
        s[0] = 1.0  # Flow-GRPO's sigma = 1 case
        sn = s - 0.2
    return x, v, z, s, sn


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sigma_kind", ["float", "tensor"])
def test_sde_step_explicit_noise_matches_reference(dtype, sigma_kind):
    x, v, z, s, sn = _make_sde((3, 5, 33), dtype, sigma_kind)
    with use_backend("triton"):
        out, lp = ops.sde_step(x, v, s, sn, eta=0.8, noise=z, return_log_prob=True)
    out_r, lp_r = ref.sde_step(x, v, s, sn, 0.8, z, True)
    assert_close(out, out_r)
    assert lp.shape == (3,) and lp.dtype == torch.float32
    # the kernel's log-prob comes from its noise; the reference from (x' - mean): in half
    # types x' - mean is not rounded in either, so both agree tightly
    torch.testing.assert_close(lp, lp_r, rtol=1e-4, atol=1e-4)


def test_sde_step_flow_grpo_formula_and_log_prob():
    """Flow-GRPO's `sde_step_with_logprob` written out with torch.distributions as the oracle."""
    x, v, z, s, sn = _make_sde((2, 3, 8), torch.float32, "float")
    eta = 0.7
    std_t = eta * (s / (1 - s)) ** 0.5
    dt = sn - s
    mean = x * (1 + std_t ** 2 / (2 * s) * dt) + v * (1 + std_t ** 2 * (1 - s) / (2 * s)) * dt
    want = mean + std_t * (-dt) ** 0.5 * z
    lp_want = torch.distributions.Normal(mean, std_t * (-dt) ** 0.5).log_prob(want)
    lp_want = lp_want.flatten(1).mean(1)
    for backend in ("torch", "triton"):
        with use_backend(backend):
            out, lp = ops.sde_step(x, v, s, sn, eta=eta, noise=z, return_log_prob=True)
        assert_close(out, want)
        torch.testing.assert_close(lp, lp_want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sde_step_eta_zero_is_exactly_euler(dtype):
    x, v, z, s, sn = _make_sde((3, 4, 9), dtype, "tensor")
    for backend in ("torch", "triton"):
        with use_backend(backend):
            got = ops.sde_step(x, v, s, sn, eta=0.0, noise=z)
            seeded = ops.sde_step(x, v, s, sn, eta=0.0, seed=11)
            assert torch.equal(got, ops.euler_step(x, v, s, sn))
            assert torch.equal(seeded, got)


def test_sde_step_seeded_noise_statistics():
    # x = v = 0: x' = std_dt * z, so z = x' / std_dt is the kernel's Philox noise
    shape = (2, 4, 64, 64)
    x = torch.zeros(shape)
    s, sn, eta = 0.6, 0.4, 1.0
    _, std_dt = ref.sde_coefficients(s, sn, eta, x)
    with use_backend("triton"):
        a = ops.sde_step(x, x, s, sn, eta=eta, seed=1234)
        b = ops.sde_step(x, x, s, sn, eta=eta, seed=1234)
        c = ops.sde_step(x, x, s, sn, eta=eta, seed=1235)
    assert torch.equal(a, b)
    z = (a / std_dt).double()
    n = z.numel()
    assert abs(z.mean().item()) < 4 / n ** 0.5
    assert abs(z.std().item() - 1) < 4 * (0.5 / n) ** 0.5
    assert abs((z ** 4).mean().item() - 3) < 0.1  # Gaussian kurtosis
    zc = (c / std_dt).double()
    assert abs((z * zc).mean().item()) < 4 / n ** 0.5  # another seed: independent
    f = z.flatten()
    assert abs((f[1:] * f[:-1]).mean().item()) < 4 / n ** 0.5  # neighbours uncorrelated
    assert abs((z[0] * z[1]).mean().item()) < 8 / n ** 0.5  # samples differ
    # log-prob of the seeded step agrees with the reference on the recovered noise
    with use_backend("triton"):
        _, lp = ops.sde_step(x, x, s, sn, eta=eta, seed=1234, return_log_prob=True)
    _, lp_r = ref.sde_step(x, x, s, sn, eta, (a / std_dt), True)
    torch.testing.assert_close(lp, lp_r, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("seed_kind", ["int", "tensor"])
def test_sde_step_seeded_noise_is_fmrt_philox_on_both_paths(seed_kind):
    # x = v = 0: x' = std_dt * z with z the Philox noise of ops.add_noise for the same seed
    shape = (2, 3, 1500)  # two Philox groups per sample, a ragged tail
    x = torch.zeros(shape)
    seed = 77 if seed_kind == "int" else torch.tensor(77)
    _, std_dt = ref.sde_coefficients(0.5, 0.3, 0.9, x)
    want = std_dt * ref.philox_normal(shape, 77)
    for backend in ("torch", "triton"):
        with use_backend(backend):
            got = ops.sde_step(x, x, 0.5, 0.3, eta=0.9, seed=seed)
            noise = ops.add_noise(x, 1.0, seed=seed)[0]
        assert_close(got, want)
        assert_close(got, std_dt * noise)


def test_sampling_ops_bad_input():
    x = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="v_uncond"):
        ops.cfg_combine(x, torch.randn(2, 3, 5), 2.0)
    with pytest.raises(TypeError, match="v_uncond"):
        ops.cfg_combine(x, x.half(), 2.0)
    with pytest.raises(ValueError, match="v_cond"):
        ops.guided_euler_step(x, torch.randn(2, 3, 5), torch.randn(2, 3, 5), 2.0, 0.5, 0.4)
    with pytest.raises(TypeError, match="v_cond"):
        ops.guided_euler_step(x, x.half(), x, 2.0, 0.5, 0.4)
    with pytest.raises(TypeError, match="out_dtype"):
        ops.guided_euler_step(x, x, x, 2.0, 0.5, 0.4, out_dtype=torch.float64)
    with pytest.raises(ValueError, match="rescale"):
        ops.guided_euler_step(x, x, x, 2.0, 0.5, 0.4, rescale="bogus")
    with pytest.raises(ValueError, match="norm_dim"):
        ops.cfg_combine(x, x, 2.0, rescale="norm", norm_dim=1)
    with pytest.raises(TypeError, match="stats"):
        ops.guided_euler_step(x, x, x, 2.0, 0.5, 0.4, stats=[])
    with pytest.raises(ValueError, match="scale"):
        ops.cfg_combine(x, x, torch.ones(3), )
    with pytest.raises(TypeError, match="scale"):
        ops.cfg_combine(x, x, "2")
    with pytest.raises(ValueError, match="eta"):
        ops.sde_step(x, x, 0.5, 0.4, eta=-0.1)
    with pytest.raises(ValueError, match="sigma_next"):
        ops.sde_step(x, x, 0.4, 0.5, eta=1.0)
    with pytest.raises(ValueError, match="noise"):
        ops.sde_step(x, x, 0.5, 0.4, eta=1.0, noise=torch.randn(2, 3))
    with pytest.raises(ValueError, match="log_prob"):
        ops.sde_step(x, x, 0.5, 0.4, eta=0.0, return_log_prob=True)
    with pytest.raises(TypeError, match="seed"):
        ops.sde_step(x, x, 0.5, 0.4, eta=1.0, seed=1.5)
    with pytest.raises(ValueError, match="seed"):
        ops.sde_step(x, x, 0.5, 0.4, eta=1.0, seed=-1)
    with pytest.raises(ValueError, match="sigma"):
        ops.guided_euler_step(x, x, x, 2.0, torch.rand(3), 0.4)


def test_sde_step_strided_tensor_sigmas_inputs_untouched():
    x, v, z, s, sn = _make_sde((3, 6, 10), torch.float32, "tensor", seed=9)
    xt, vt, zt = x.transpose(1, 2), v.transpose(1, 2), z.transpose(1, 2)
    before = [t.clone() for t in (xt, vt, zt, s, sn)]
    with use_backend("triton"):
        out = ops.sde_step(xt, vt, s, sn, eta=0.5, noise=zt)
        out1 = ops.sde_step(xt, vt, s[:1], sn[:1], eta=0.5, noise=zt)  # [1] broadcasts
    assert_close(out, ref.sde_step(*before[:2], s, sn, 0.5, before[2]))
    assert_close(out1, ref.sde_step(*before[:2], s[0], sn[0], 0.5, before[2]))
    for t, b in zip((xt, vt, zt, s, sn), before):
        assert torch.equal(t, b)



@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("vdtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("per_sample", [False, True])
def test_euler_eager_rounding_is_torch_promotion_bit_for_bit(backend, vdtype, per_sample):
    """eager_rounding against diffusers' own expression `(sample.float() + dt * model_output)
    .to(model_output.dtype)` evaluated by torch (dt a 0-d fp32 tensor: torch's promotion rounds
    it and the product to the model dtype; a per-sample dt is given in the model dtype, as that
    promotion would make it)."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(3, 4, 9, 7, generator=g) * 3
    v = (torch.randn(3, 4, 9, 7, generator=g) * 2).to(vdtype)
    s = torch.tensor([0.9731, 0.5117, 0.2003]) if per_sample else torch.tensor(0.6121)
    sn = s - torch.tensor(0.0377)
    dt = (sn - s).view(-1, 1, 1, 1).to(vdtype) if per_sample else sn - s
    want = (x.float() + dt * v).to(vdtype)
    with use_backend(backend):
        got = ops.euler_step(x, v, s, sn, out_dtype=vdtype, eager_rounding=True)
        plain = ops.euler_step(x, v, s, sn, out_dtype=vdtype)
    assert got.dtype == vdtype
    assert torch.equal(got, want)
    if vdtype != torch.float32:   # the default keeps the product in fp32: not the same numbers
        assert not torch.equal(plain, want)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # NaN bits wrap, kept
def test_euler_eager_rounding_specials_and_ties():
    """NaN stays NaN, inf stays inf, overflow rounds to inf, exact ties go to even, in the
    kernel as in torch (the kernel writes bf16 round-to-nearest-even out by hand)."""
    x = torch.tensor([[0.0, 1.0, 1.0, float("nan"), 3.3e38, 1.0, -1.0, 2.0]])
    v = -torch.tensor([[float("inf"), float("nan"), 2.0 ** -8, 1.0, 1.0e38, 3 * 2.0 ** -8,
                        -(2.0 ** -8), 0.0]]).to(torch.bfloat16)
    s, sn = 1.0, 0.0   # dt = -1
    want = ops.euler_step(x, v, s, sn, out_dtype=torch.bfloat16, eager_rounding=True)
    with use_backend("triton"):
        got = ops.euler_step(x, v, s, sn, out_dtype=torch.bfloat16, eager_rounding=True)
    torch.testing.assert_close(got, want, atol=0, rtol=0, equal_nan=True)
    assert got[0, 0].isinf() and got[0, 1].isnan() and got[0, 4].isinf()
    # ties to even: 1 + 2^-8 -> 1, 1 + 3 * 2^-8 -> 1 + 2^-6
    assert got[0, 2] == 1.0 and got[0, 5] == 1.015625


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("vdtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("stats", [False, True])
def test_guided_eager_rounding_is_the_eager_pipeline_bit_for_bit(backend, vdtype, stats):
    """eager_rounding against the pipeline's own expressions evaluated by torch: the combine
    `u + g * (c - u)` in the model dtype, then diffusers' `(x.float() + dt * v).to(v.dtype)`."""
    g = torch.Generator().manual_seed(8)
    x = torch.randn(2, 4, 9, 7, generator=g) * 3
    c, u = ((torch.randn(2, 4, 9, 7, generator=g) * 2).to(vdtype) for _ in range(2))
    s, sn = torch.tensor(0.7311), torch.tensor(0.6902)
    v = u + 4.5 * (c - u)
    want = (x.float() + (sn - s) * v).to(vdtype)
    st = {} if stats else None
    with use_backend(backend):
        got = ops.guided_euler_step(x, c, u, 4.5, s, sn, out_dtype=vdtype, eager_rounding=True,
                                    stats=st)
        plain = ops.guided_euler_step(x, c, u, 4.5, s, sn, out_dtype=vdtype)
    assert torch.equal(got, want)
    if vdtype != torch.float32:
        assert not torch.equal(plain, want)
    if stats:
        assert set(st) >= {"cond_mean", "cfg_diff_norm"}


def test_guided_eager_rounding_bad_input():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="rescale must be 'none'"):
        ops.guided_euler_step(x, x, x, 2.0, 0.5, 0.4, rescale="norm", eager_rounding=True)
    with pytest.raises(ValueError, match="scale a float"):
        ops.guided_euler_step(x, x, x, torch.tensor([2.0, 3.0]), 0.5, 0.4, eager_rounding=True)
    with pytest.raises(TypeError, match="eager_rounding"):
        ops.guided_euler_step(x, x, x, 2.0, 0.5, 0.4, eager_rounding="yes")


def test_euler_eager_rounding_bad_input():
    x = torch.zeros(2, 3)
    with pytest.raises(TypeError, match="eager_rounding"):
        ops.euler_step(x, x, 0.5, 0.4, eager_rounding=1)

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("mode", RESCALE_MODES)
def test_guided_and_sde_on_cuda_at_wan_size(dtype, mode):
    rescale, norm_dim = mode
    dev = torch.device("cuda")
    shape = (2, 16, 21, 60, 104)
    g = torch.Generator(device=dev).manual_seed(0)
    x, c, u = (torch.randn(shape, generator=g, device=dev).to(dtype) for _ in range(3))
    s = torch.tensor([0.9, 0.4], device=dev)
    sn = s - 0.05
    scale = torch.tensor([5.0, 3.0], device=dev)
    stats = {}
    out = ops.guided_euler_step(x, c, u, scale, s, sn, rescale=rescale, norm_dim=norm_dim,
                                stats=stats)
    assert_close(out, ref.guided_euler_step(x, c, u, scale, s, sn, rescale, norm_dim))
    want = ref.guidance_stats(c, u, scale, s)
    for key, val in want.items():
        torch.testing.assert_close(stats[key], val, rtol=1e-3, atol=1e-4)
    got = ops.sde_step(x, c, s, sn, eta=0.7, seed=5)
    z = ref.philox_normal(shape, 5, device=dev)
    assert_close(got, ref.sde_step(x, c, s, sn, 0.7, z), scale=2)



@pytest.mark.gpu
@pytest.mark.parametrize("vdtype", [torch.bfloat16, torch.float16, torch.float32])
def test_euler_eager_rounding_on_cuda_is_diffusers_bit_for_bit(vdtype):
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn((2, 16, 21, 60, 104), generator=g, device=dev)
    v = torch.randn(x.shape, generator=g, device=dev).to(vdtype)
    s, sn = torch.tensor(0.8123, device=dev), torch.tensor(0.7531, device=dev)
    got = ops.euler_step(x, v, s, sn, out_dtype=vdtype, eager_rounding=True)
    assert torch.equal(got, (x.float() + (sn - s) * v).to(vdtype))
    c, u = v, torch.randn(x.shape, generator=g, device=dev).to(vdtype)
    got = ops.guided_euler_step(x, c, u, 5.0, s, sn, out_dtype=vdtype, eager_rounding=True)
    assert torch.equal(got, (x.float() + (sn - s) * (u + 5.0 * (c - u))).to(vdtype))


_AOT_SCRIPT = r'''
import json, re
from collections import Counter
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fmrt.kernels import step as K

def comp(fn, sig, const, warps):
    names = list(sig)
    attrs = {(names.index(n),): [["tt.divisibility", 16]]
             for n in names if sig[n].startswith("*") or n in ("inner", "C")}
    sig = {**sig, **{k: "constexpr" for k in const}}
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs),
                       target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
    ptx = k.asm["ptx"]
    return [Counter(re.findall(r"ld\.global[\.\w]*", ptx)),
            Counter(re.findall(r"st\.global[\.\w]*", ptx))]

g = {n: "*bf16" for n in ("x_ptr", "c_ptr", "u_ptr", "out_ptr")}
for n in ("g", "s", "sn"):
    g.update({n + "_ptr": "*fp32", n + "_val": "fp32", n + "_st": "i32"})
g.update(ratio_ptr="*fp32", part_ptr="*fp32", inner="i32", C="i32", n_chunks="i32")
base = dict(STEP=True, WRITE=True, G_TENSOR=True, S_TENSOR=True, SN_TENSOR=True, RESCALE=0,
            STATS=True, TOKEN=False, EAGER_ROUNDING=False, ROWS=1, BLOCK_C=4096)
out = {
    "flat": comp(K._guided_kernel, g, base, 8),
    "token": comp(K._guided_kernel, g, dict(base, RESCALE=2, TOKEN=True, ROWS=64, BLOCK_C=64), 8),
    "norm_pass1": comp(K._guided_kernel, g, dict(base, STEP=False, WRITE=False), 8),
    "fused_stats": comp(K._guided_kernel, g, dict(base, STATS=2), 8),
}
s = {n: "*bf16" for n in ("x_ptr", "v_ptr", "z_ptr", "out_ptr")}
for n in ("s", "sn"):
    s.update({n + "_ptr": "*fp32", n + "_val": "fp32", n + "_st": "i32"})
s.update(eta="fp32", seed_ptr="*i64", part_ptr="*fp32", inner="i32", n_groups="i32")
out["sde"] = comp(K._sde_kernel, s, dict(HAS_NOISE=False, S_TENSOR=True, SN_TENSOR=True,
                                         LOGP=True, Q=1024, FAST=True), 4)
ratio = triton.compile(ASTSource(fn=K._ratio_kernel, signature={"part_ptr": "*fp32",
                       "ratio_ptr": "*fp32", "n_chunks": "i32", "BLOCK": "constexpr"},
                       constexprs={"BLOCK": 32}), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": 1})
assert "ld.global" in ratio.asm["ptx"]
stats = triton.compile(ASTSource(fn=K._stats_kernel, signature={
    "part_ptr": "*fp32", "out_ptr": "*fp32", "s_ptr": "*fp32", "s_val": "fp32", "s_st": "i32",
    "n_chunks": "i32", "n": "i32", "B": "i32", "S_TENSOR": "constexpr", "BLOCK": "constexpr"},
    constexprs={"S_TENSOR": True, "BLOCK": 32}), target=GPUTarget("cuda", 90, 32),
    options={"num_warps": 1})
assert "st.global" in stats.asm["ptx"]
print(json.dumps(out))
'''


def test_kernels_compile_for_h100_with_vector_memory_ops():
    """Compile the step kernels for sm_90 ahead of time (no GPU needed; the interpreter never
    lowers them) and check that the bf16 loads and stores are 128-bit vectors."""
    import json
    import os
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    res = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], env=env, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    for name, (loads, stores) in out.items():
        assert loads.get("ld.global.v4.b32", 0) > 0, (name, loads)
        if name != "norm_pass1":
            assert stores.get("st.global.v4.b32", 0) > 0, (name, stores)
            assert not any(k.endswith(".b16") for k in list(loads) + list(stores)), name
