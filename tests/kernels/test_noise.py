"""add_noise: the Triton kernel (interpreter on CPU) against the reference, the seeded Philox
noise (reproducibility, independence, moments), invariants and bad input."""
import pytest
import torch
import triton
import triton.language as tl

from fmrt import ops, reference as ref, use_backend
from fmrt.kernels.noise import box_muller_radius, philox_normal4
from tests.helpers import DTYPES, assert_close, check_against_reference

SHAPES = [(3, 5, 7, 11), (1, 16, 3, 9, 13), (1, 1), (3, 2049)]


def _make(shape, dtype, sigma_kind, *, noise=True, transpose=False, seed=0):
    def make():
        g = torch.Generator().manual_seed(seed)
        x0 = torch.randn(shape, generator=g).to(dtype)
        eps = torch.randn(shape, generator=g).to(dtype)
        if transpose:
            x0, eps = x0.transpose(1, 2), eps.transpose(1, 2)
        B = x0.shape[0]
        if sigma_kind == "float":
            s = 0.37
        elif sigma_kind == "tensor":
            s = torch.rand(B, generator=g)
        elif sigma_kind == "0d":
            s = torch.rand((), generator=g)
        else:  # per frame: varies along dim 2 (and the batch), broadcast elsewhere
            sh = [B] + [1] * (x0.ndim - 1)
            sh[2] = x0.shape[2]
            s = torch.rand(sh, generator=g)
            s[:, :, 0] = 0.0
        if noise:
            return (x0, s, eps), {}
        return (x0, s), {"seed": 1234}
    return make


def _ref_seeded(x0, sigma, *, seed):
    return ref.add_noise(x0, sigma, ref.philox_normal(x0.shape, seed))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_add_noise_matches_reference(shape, dtype):
    kind = "frame" if len(shape) >= 3 else "tensor"
    check_against_reference(ops.add_noise, ref.add_noise, _make(shape, dtype, kind), grad=False)


@pytest.mark.parametrize("sigma_kind", ["float", "0d", "tensor", "frame"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_add_noise_seeded_matches_reference(sigma_kind, dtype):
    check_against_reference(ops.add_noise, _ref_seeded,
                            _make((3, 5, 7, 11), dtype, sigma_kind, noise=False), grad=False)


def test_add_noise_seeded_other_shapes():
    for shape in [(1, 16, 3, 9, 13), (3, 2049), (2, 1)]:
        check_against_reference(ops.add_noise, _ref_seeded,
                                _make(shape, torch.float32, "tensor", noise=False), grad=False)


def test_add_noise_non_contiguous():
    check_against_reference(ops.add_noise, ref.add_noise,
                            _make((3, 5, 7, 11), torch.float32, "frame", transpose=True),
                            grad=False)
    # seeded: a non-contiguous x0 gets the noise of its contiguous copy (logical index)
    x0 = torch.randn(3, 7, 5, 11).transpose(1, 2)
    assert not x0.is_contiguous()
    for backend in ("torch", "triton"):
        with use_backend(backend):
            a = ops.add_noise(x0, 0.5, seed=9, return_noise=True)
            b = ops.add_noise(x0.contiguous(), 0.5, seed=9, return_noise=True)
        for u, v in zip(a, b):
            assert torch.equal(u, v)


def test_add_noise_exact_answer():
    x0 = torch.tensor([[1.0, 2.0], [3.0, -4.0]])
    eps = torch.tensor([[0.5, -1.0], [1.0, 0.0]])
    s = torch.tensor([0.25, 0.5])
    want_xt = torch.tensor([[0.875, 1.25], [2.0, -2.0]])
    want_tg = torch.tensor([[-0.5, -3.0], [-2.0, 4.0]])
    for backend in ("torch", "triton"):
        with use_backend(backend):
            x_t, tg = ops.add_noise(x0, s, eps)
        assert_close(x_t, want_xt)
        assert_close(tg, want_tg)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_add_noise_endpoints(backend):
    x0 = torch.randn(2, 3, 5, 7)
    with use_backend(backend):
        x_t, tg, eps = ops.add_noise(x0, 0.0, seed=3, return_noise=True)
        assert torch.equal(x_t, x0)
        x_t1, tg1, eps1 = ops.add_noise(x0, torch.ones(2), seed=3, return_noise=True)
        assert torch.equal(x_t1, eps1)
        assert torch.equal(eps, eps1)
        assert_close(tg, eps - x0)


def test_seeded_noise_kernel_equals_reference_noise():
    x0 = torch.zeros(3, 4, 1500)   # 6000 per sample: two groups, the last one partial
    with use_backend("triton"):
        _, _, eps = ops.add_noise(x0, 0.5, seed=2 ** 40 + 17, return_noise=True)
    want = ref.philox_normal(x0.shape, 2 ** 40 + 17)
    assert_close(eps, want, scale=2.0)


def test_seeded_noise_determinism_and_independence():
    x0 = torch.zeros(3, 4096)
    with use_backend("triton"):
        a = ops.add_noise(x0, 1.0, seed=5, return_noise=True)[2]
        b = ops.add_noise(x0, 1.0, seed=5, return_noise=True)[2]
        c = ops.add_noise(x0, 1.0, seed=6, return_noise=True)[2]
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    # samples and seeds are uncorrelated
    for u, v in [(a[0], a[1]), (a[1], a[2]), (a[0], c[0])]:
        r = torch.corrcoef(torch.stack([u, v]))[0, 1]
        assert abs(r) < 5 / 4096 ** 0.5
    # kernel moments (small check): mean, variance
    flat = a.flatten()
    assert abs(flat.mean()) < 5 / flat.numel() ** 0.5
    assert abs(flat.var() - 1) < 5 * (2 / flat.numel()) ** 0.5


def test_seed_none_follows_manual_seed():
    x0 = torch.zeros(2, 64)
    for backend in ("torch", "triton"):
        with use_backend(backend):
            torch.manual_seed(0)
            a = ops.add_noise(x0, 1.0, return_noise=True)[2]
            torch.manual_seed(0)
            b = ops.add_noise(x0, 1.0, return_noise=True)[2]
            c = ops.add_noise(x0, 1.0, return_noise=True)[2]
        assert torch.equal(a, b)
        assert not torch.equal(b, c)


def test_reference_noise_is_standard_normal():
    # a few hundred thousand draws on the reference path: moments of N(0, 1) within ~5 sigma
    n = ref.philox_normal((4, 80_000), 20260).double().flatten()
    N = n.numel()
    m, v = n.mean(), n.var()
    skew = ((n - m) ** 3).mean() / v ** 1.5
    kurt = ((n - m) ** 4).mean() / v ** 2
    assert abs(m) < 5 / N ** 0.5
    assert abs(v - 1) < 5 * (2 / N) ** 0.5
    assert abs(skew) < 5 * (6 / N) ** 0.5
    assert abs(kurt - 3) < 5 * (24 / N) ** 0.5
    # tails: P(|z| > 2) = 0.0455, P(|z| > 3) = 0.0027
    for z, p in [(2.0, 0.0455003), (3.0, 0.0026998)]:
        frac = (n.abs() > z).double().mean()
        assert abs(frac - p) < 5 * (p * (1 - p) / N) ** 0.5
    # different per sample: per-row means are not identical and rows are uncorrelated
    rows = n.view(4, -1)
    assert abs(torch.corrcoef(rows)[0, 1]) < 5 / rows.shape[1] ** 0.5


def test_reference_philox_matches_triton_randint():
    # the torch Philox is triton's: compare with tl.randint4x run by the interpreter
    import triton
    import triton.language as tl

    @triton.jit
    def k(out_ptr, seed, N: tl.constexpr):
        off = tl.arange(0, N)
        a, b, c, d = tl.randint4x(seed, off)
        tl.store(out_ptr + off, a.to(tl.int64) & 0xFFFFFFFF)
        tl.store(out_ptr + N + off, d.to(tl.int64) & 0xFFFFFFFF)

    out = torch.empty(2 * 64, dtype=torch.int64)
    k[(1,)](out, 987654321, N=64)
    c = torch.arange(64, dtype=torch.int64)
    z = torch.zeros_like(c)
    a, _, _, d = ref.philox4x32(987654321, c, z, z, z)
    assert torch.equal(out[:64], a)
    assert torch.equal(out[64:], d)


def test_add_noise_does_not_modify_inputs():
    x0 = torch.randn(2, 3, 4)
    eps = torch.randn(2, 3, 4)
    s = torch.rand(2)
    copies = [t.clone() for t in (x0, eps, s)]
    for backend in ("torch", "triton"):
        with use_backend(backend):
            ops.add_noise(x0, s, eps, return_noise=True)
            ops.add_noise(x0, s, seed=1, return_noise=True)
    for t, c in zip((x0, eps, s), copies):
        assert torch.equal(t, c)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_add_noise_bad_input(backend, monkeypatch):
    x = torch.randn(2, 3, 4)

    def boom(*a, **k):
        raise AssertionError("a kernel ran before the arguments were checked")
    from fmrt.kernels import noise as K
    monkeypatch.setattr(K, "add_noise", boom)
    with use_backend(backend):
        with pytest.raises(TypeError, match="x0"):
            ops.add_noise(torch.ones(2, 3, dtype=torch.int64), 0.5, seed=1)
        with pytest.raises(ValueError, match="sigma"):
            ops.add_noise(x, torch.rand(3), seed=1)
        with pytest.raises(ValueError, match="sigma"):
            ops.add_noise(x, 1.5, seed=1)
        with pytest.raises(ValueError, match="sigma"):
            ops.add_noise(x, -0.1, seed=1)
        with pytest.raises(ValueError, match="noise"):
            ops.add_noise(x, 0.5, torch.randn(2, 3, 5))
        with pytest.raises(TypeError, match="noise"):
            ops.add_noise(x, 0.5, torch.ones(2, 3, 4, dtype=torch.int32))
        with pytest.raises(ValueError, match="seed"):
            ops.add_noise(x, 0.5, torch.randn(2, 3, 4), seed=1)
        with pytest.raises(ValueError, match="seed"):
            ops.add_noise(x, 0.5, seed=-1)
        with pytest.raises(TypeError, match="seed"):
            ops.add_noise(x, 0.5, seed=1.5)
        with pytest.raises(TypeError, match="sigma"):
            ops.add_noise(x, torch.ones(2, dtype=torch.int64), seed=1)


def test_add_noise_compiles_without_graph_break():
    x0 = torch.randn(2, 3, 5)
    s = torch.rand(2)

    def f(x0, s):
        x_t, tg = ops.add_noise(x0, s, seed=11)
        return x_t * 2 + tg

    with use_backend("triton"):
        want = f(x0, s)
        got = torch.compile(f, fullgraph=True, backend="aot_eager")(x0, s)
    assert_close(got, want)


def test_add_noise_sigma_with_separate_varying_dims():
    # sigma varying along dims 1 and 3 (not one run): the per-element fallback
    def make():
        g = torch.Generator().manual_seed(8)
        x0, eps = torch.randn(3, 5, 7, 11, generator=g), torch.randn(3, 5, 7, 11, generator=g)
        return (x0, torch.rand(3, 5, 1, 11, generator=g), eps), {}
    check_against_reference(ops.add_noise, ref.add_noise, make, grad=False)


def test_add_noise_64bit_index_path(monkeypatch):
    # the int64 index math used when a sample has >= 2^31 elements, forced on a small tensor
    from fmrt.kernels import noise as K
    monkeypatch.setattr(K, "IDX64_FROM", 0)
    check_against_reference(ops.add_noise, ref.add_noise,
                            _make((3, 5, 7, 11), torch.float32, "frame"), grad=False)


@triton.jit
def _normals_kernel(out_ptr, seed_ptr, b, g, Q: tl.constexpr):
    n1, n2, n3, n4 = philox_normal4(tl.load(seed_ptr), b, g, Q)
    q = tl.arange(0, Q)
    tl.store(out_ptr + q, n1)
    tl.store(out_ptr + Q + q, n2)
    tl.store(out_ptr + 2 * Q + q, n3)
    tl.store(out_ptr + 3 * Q + q, n4)


def test_philox_counter_above_2_32():
    # groups far out (counter g Q + q > 2^32 uses the second counter word) and a large batch
    # index: the kernel's normals equal the reference's Philox + Box-Muller
    Q = ref.NOISE_Q
    seed, b, g = 2 ** 62 + 12345, 70000, 3 * 2 ** 22 + 5
    out = torch.empty(4 * Q)
    _normals_kernel[(1,)](out, torch.tensor(seed), b, g, Q=Q)
    cnt = g * Q + torch.arange(Q, dtype=torch.int64)
    assert int(cnt[0]) >> 32 > 0
    i = ref.philox4x32(seed, cnt & 0xFFFFFFFF, cnt >> 32, torch.full_like(cnt, b),
                       torch.zeros_like(cnt))
    u = [ref.uint_to_uniform(w) for w in i]
    n1, n2 = ref.box_muller(u[0], u[1])
    n3, n4 = ref.box_muller(u[2], u[3])
    assert_close(out, torch.cat([n1, n2, n3, n4]), scale=2.0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_noise_gradients(dtype):
    def make():
        (x0, s, eps), kw = _make((3, 5, 7, 11), dtype, "frame")()
        return (x0.requires_grad_(True), s, eps.requires_grad_(True)), kw
    check_against_reference(ops.add_noise, ref.add_noise, make)

    def make_seeded():
        (x0, s), kw = _make((3, 5, 7, 11), dtype, "tensor", noise=False)()
        return (x0.requires_grad_(True), s), kw
    check_against_reference(ops.add_noise, _ref_seeded, make_seeded)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_add_noise_cuda_matches_cpu_reference(dtype):
    # the compiled kernel (GPU transcendental approximations) against the CPU reference noise
    x0 = torch.randn(3, 16, 5, 30, 52).to(dtype)
    s = torch.rand(3)
    want = _ref_seeded(x0, s, seed=2024)
    got = ops.add_noise(x0.cuda(), s.cuda(), seed=2024)
    assert_close(tuple(t.cpu() for t in got), want, scale=4.0)
    _, _, eps = ops.add_noise(x0.cuda(), s.cuda(), seed=2024, return_noise=True)
    n = eps.float().flatten()
    assert abs(n.mean().item()) < 5 / n.numel() ** 0.5
    slack = 0.0 if dtype == torch.float32 else 0.01      # rounding of the stored noise
    assert abs(n.var().item() - 1) < 5 * (2 / n.numel()) ** 0.5 + slack


def test_magic_division_exact():
    # the magic-number division of the broadcast index math, on edge values and at random,
    # in exact integer arithmetic (what the kernel's umulhi / shift compute)
    import random
    from fmrt.kernels.noise import magic31
    rng = random.Random(0)
    ds = [1, 2, 3, 5, 7, 12, 1000, 1024, 6240, 14400, 65536, 2 ** 30 - 1, 2 ** 30, 2 ** 31 - 1]
    ds += [rng.randrange(1, 2 ** 31) for _ in range(40)]
    for d in ds:
        m, l = magic31(d)
        assert 0 < m < 2 ** 32
        ns = [0, 1, 2 ** 31 - 1, 2 ** 31 - 2, 2 ** 30] + [rng.randrange(2 ** 31) for _ in range(300)]
        ns += [k * d + r for k in (1, 3, (2 ** 31 - 1) // d) for r in (-1, 0, 1)
               if 0 <= k * d + r < 2 ** 31]
        for n in ns:
            assert ((2 * n * m) >> 32) >> l == n // d, (n, d)


@pytest.mark.parametrize("idx64", [False, True])
def test_add_noise_per_frame_sigma_large_rows(monkeypatch, idx64):
    # H W = 1600 >= the 1024-element lanes: the two-row broadcast path (rows straddle lanes)
    from fmrt.kernels import noise as K
    if idx64:
        monkeypatch.setattr(K, "IDX64_FROM", 0)
    check_against_reference(ops.add_noise, ref.add_noise,
                            _make((2, 3, 5, 40, 40), torch.float32, "frame"), grad=False)
    check_against_reference(ops.add_noise, _ref_seeded,
                            _make((2, 3, 5, 40, 40), torch.bfloat16, "frame", noise=False),
                            grad=False)


@triton.jit
def _radius_kernel(log_ptr, out_ptr, N: tl.constexpr):
    i = tl.arange(0, N)
    tl.store(out_ptr + i, box_muller_radius(tl.load(log_ptr + i)))


def test_box_muller_radius_never_takes_the_root_of_a_negative():
    # the hardware log of u1 = 1 - 2^-24 may come out slightly positive: the radius is then 0,
    # not NaN; elsewhere it is sqrt(-2 log u1)
    logs = torch.tensor([-16.1, -1.0, -2.0 ** -24, 0.0, 2.0 ** -24, 1e-7, 3e-38, -0.0])
    out = torch.empty_like(logs)
    _radius_kernel[(1,)](logs, out, N=8)
    want = torch.sqrt(torch.clamp(-2.0 * logs, min=0.0))
    assert torch.isfinite(out).all() and (out >= 0).all()
    torch.testing.assert_close(out, want, rtol=1e-6, atol=0)


@pytest.mark.gpu
def test_fast_math_noise_is_finite_over_2_30_draws():
    # the compiled kernels use the hardware log: 2^30 normals (8 calls of 2^27, the b8 Wan 14B
    # latent is 7.7e7) through add_noise, the fused loss and sde_step's shared Philox lanes
    n, calls = 2 ** 27, 8
    x0 = torch.zeros(8, n // 8, device="cuda")
    bad = 0
    for seed in range(calls):
        _, _, eps = ops.add_noise(x0, 1.0, seed=1000 + seed, return_noise=True)
        bad += int((~torch.isfinite(eps)).sum())
        assert abs(eps.mean().item()) < 1e-3 and abs(eps.std().item() - 1) < 1e-3
    assert bad == 0, f"{bad} non-finite normals in {calls * n}"
    del eps
    x = torch.zeros(8, n // 8, device="cuda")
    out = ops.sde_step(x, x, 0.9, 0.8, eta=1.0, seed=7)   # noise * std_dt, drawn in-kernel
    assert torch.isfinite(out).all()
    pred = torch.zeros_like(x0, requires_grad=True)
    loss = ops.flow_matching_loss(pred, x0, seed=11)      # mean(noise^2): finite, ~1
    loss.backward()
    assert torch.isfinite(loss) and abs(loss.item() - 1) < 1e-3
    assert torch.isfinite(pred.grad).all()


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("xd, nd", [(torch.bfloat16, torch.bfloat16), (torch.float16,
                                     torch.float16), (torch.float32, torch.float32),
                                    (torch.bfloat16, torch.float32),
                                    (torch.float32, torch.float16)])
@pytest.mark.parametrize("sigma_kind", ["float", "per_sample", "per_frame"])
def test_add_noise_eager_rounding_is_torch_promotion_bit_for_bit(backend, xd, nd, sigma_kind):
    """eager_rounding against torch evaluating diffusers' scale_noise expression itself,
    `s * noise + (1.0 - s) * x0` with s a tensor in x0's dtype: same bits, same dtype (the
    promotion of x0's and noise's), odd sizes, per-sample and per-frame sigma."""
    g = torch.Generator().manual_seed(11)
    x0 = torch.randn(3, 2, 5, 3, 7, generator=g).to(xd)
    noise = torch.randn(3, 2, 5, 3, 7, generator=g).to(nd)
    sigma = {"float": 0.3141,
             "per_sample": torch.rand(3, generator=g),
             "per_frame": torch.rand(3, 1, 5, 1, 1, generator=g)}[sigma_kind]
    s = ref.broadcast_sigma(sigma, x0).to(xd)
    s = s.reshape(-1, *[1] * (x0.ndim - 1)) if s.ndim == 0 else s   # a tensor with dims
    want = s * noise + (1.0 - s) * x0
    with use_backend(backend):
        got = ops.noised_sample(x0, sigma, noise, None, return_target=False,
                                eager_rounding=True)[0]
    assert got.dtype == want.dtype == torch.promote_types(xd, nd)
    assert torch.equal(got, want)


def test_add_noise_eager_rounding_needs_noise_and_no_target():
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match="eager_rounding"):
        ops.noised_sample(x, 0.5, None, torch.tensor(1), return_target=False,
                          eager_rounding=True)
    with pytest.raises(ValueError, match="eager_rounding"):
        ops.noised_sample(x, 0.5, x, None, eager_rounding=True)


@pytest.mark.parametrize("used", ["x_t", "target"])
def test_add_noise_backward_with_an_unused_output(used):
    # an unused x_t or target gets no materialised zeros of x0's size; gradients as the
    # reference's
    from tests.helpers import large_allocations
    g = torch.Generator().manual_seed(4)
    x0, noise = (torch.randn(2, 3, 40, generator=g).requires_grad_() for _ in range(2))
    w = torch.randn(2, 3, 40, generator=g)
    sigma = torch.tensor([0.3, 0.8])

    def loss(x_t, target):
        return ((x_t if used == "x_t" else target) * w).sum()

    with use_backend("triton"):
        lt = loss(*ops.add_noise(x0, sigma, noise))
    with large_allocations(x0.numel()) as found:
        got = torch.autograd.grad(lt, (x0, noise))
    assert "aten.zeros.default" not in found
    want = torch.autograd.grad(loss(*ref.add_noise(x0, sigma, noise)), (x0, noise))
    assert_close(got, want)
