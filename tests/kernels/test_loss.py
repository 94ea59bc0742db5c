"""flow_matching_loss: the Triton kernel (interpreter on CPU) against the reference, values and
gradients; DiffSynth's formula; masks, weights, reductions; seeded noise shared with add_noise;
torch.compile; bad input."""
import pytest
import torch
import torch.nn.functional as F

from fmrt import ops, reference as ref, use_backend
from tests.helpers import DTYPES, assert_close, check_against_reference

SHAPES = [(3, 5, 7, 11), (1, 16, 3, 9, 13), (1, 1), (3, 2049)]


def _make(shape, dtype, *, weight="float", mask=None, reduction="mean", seeded=False,
          transpose=False, seed=0):
    def make():
        g = torch.Generator().manual_seed(seed)
        pred = torch.randn(shape, generator=g).to(dtype)
        x0 = torch.randn(shape, generator=g).to(dtype)
        eps = torch.randn(shape, generator=g).to(dtype)
        if transpose:
            pred, x0, eps = (t.transpose(1, 2) for t in (pred, x0, eps))
        pred.requires_grad_(True)
        B = pred.shape[0]
        w = {"none": None, "float": 0.7, "tensor": torch.rand(B, generator=g) + 0.5}[weight]
        m = None
        if mask == "frame":
            sh = [B] + [1] * (pred.ndim - 1)
            sh[2] = pred.shape[2]
            m = torch.ones(sh)
            m[:, :, 0] = 0.0
        elif mask == "element":
            m = torch.rand(pred.shape, generator=g) > 0.3
        elif mask == "last":
            m = torch.rand(pred.shape[-1], generator=g)
        kw = dict(weight=w, mask=m, reduction=reduction)
        if seeded:
            return (pred, x0), dict(seed=77, **kw)
        return (pred, x0, eps), kw
    return make


def _ref_seeded(pred, x0, *, seed, **kw):
    return ref.flow_matching_loss(pred, x0, ref.philox_normal(x0.shape, seed), **kw)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_loss_matches_reference(shape, dtype):
    check_against_reference(ops.flow_matching_loss, ref.flow_matching_loss,
                            _make(shape, dtype, weight="tensor"), scale=2.0)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("mask", [None, "frame", "element", "last"])
def test_loss_masks_and_reductions(mask, reduction):
    check_against_reference(ops.flow_matching_loss, ref.flow_matching_loss,
                            _make((3, 5, 7, 11), torch.float32, weight="tensor", mask=mask,
                                  reduction=reduction))


@pytest.mark.parametrize("dtype", DTYPES)
def test_loss_seeded_matches_reference(dtype):
    check_against_reference(ops.flow_matching_loss, _ref_seeded,
                            _make((3, 5, 7, 11), dtype, mask="frame", seeded=True,
                                  reduction="none"), scale=2.0)


def test_loss_non_contiguous():
    check_against_reference(ops.flow_matching_loss, ref.flow_matching_loss,
                            _make((3, 5, 7, 11), torch.float32, mask="frame", transpose=True))
    check_against_reference(ops.flow_matching_loss, _ref_seeded,
                            _make((3, 7, 5, 11), torch.float32, seeded=True, transpose=True))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_loss_equals_diffsynth_mse(backend, dtype):
    # DiffSynth: mse_loss(noise_pred.float(), training_target.float()) * training_weight
    g = torch.Generator().manual_seed(1)
    pred, x0, eps = (torch.randn(2, 4, 3, 6, 5, generator=g).to(dtype) for _ in range(3))
    target = (eps - x0)           # rounded in dtype, as DiffSynth's training_target
    want = F.mse_loss(pred.float(), target.float()) * 0.8125
    with use_backend(backend):
        got = ops.flow_matching_loss(pred, x0, eps, weight=0.8125)
    # ours subtracts in fp32 (one rounding); DiffSynth rounds the target to dtype first
    tol = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=tol, atol=0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_loss_exact_per_sample_values(backend):
    # independent hand computation: per-sample masked means, weights, reductions
    pred = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[0.0, 1.0], [1.0, 1.0]]])
    x0 = torch.zeros(2, 2, 2)
    eps = torch.tensor([[[0.0, 0.0], [1.0, 1.0]], [[1.0, 1.0], [1.0, 1.0]]])
    mask = torch.tensor([[1.0], [0.0]])                 # row 0 of every sample
    w = torch.tensor([2.0, 3.0])
    # sample 0: d = [1, 2] -> (1 + 4) / 2 = 2.5 -> *2 = 5; sample 1: d = [-1, 0] -> 0.5 -> 1.5
    with use_backend(backend):
        none = ops.flow_matching_loss(pred, x0, eps, weight=w, mask=mask, reduction="none")
        s = ops.flow_matching_loss(pred, x0, eps, weight=w, mask=mask, reduction="sum")
        m = ops.flow_matching_loss(pred, x0, eps, weight=w, mask=mask)
        z = ops.flow_matching_loss(pred, x0, eps, mask=torch.zeros(2, 1, 1), reduction="none")
    assert_close(none, torch.tensor([5.0, 1.5]))
    assert_close(s, torch.tensor(6.5))
    assert_close(m, torch.tensor(3.25))
    assert_close(z, torch.zeros(2))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_loss_regenerates_add_noise_noise(backend):
    x0 = torch.randn(3, 4, 5, 6)
    with use_backend(backend):
        x_t, target, eps = ops.add_noise(x0, torch.rand(3), seed=31, return_noise=True)
        pred = (target + 0.25).requires_grad_(True)
        seeded = ops.flow_matching_loss(pred, x0, seed=31, reduction="none")
        explicit = ops.flow_matching_loss(pred, x0, eps, reduction="none")
    assert_close(seeded, torch.full((3,), 0.0625), scale=3.0)
    assert_close(seeded, explicit, scale=3.0)


def test_loss_gradient_is_exact_and_only_for_pred():
    g = torch.Generator().manual_seed(4)
    pred = torch.randn(3, 2, 4, 5, generator=g).requires_grad_(True)
    x0 = torch.randn(3, 2, 4, 5, generator=g).requires_grad_(True)
    eps = torch.randn(3, 2, 4, 5, generator=g)
    w = torch.tensor([1.0, 2.0, 0.5])
    with use_backend("triton"):
        loss = ops.flow_matching_loss(pred, x0, eps, weight=w)
        gp, gx = torch.autograd.grad(loss * 3.0, [pred, x0], allow_unused=True)
    want = 3.0 * 2 * (pred - (eps - x0)).detach() * w.view(3, 1, 1, 1) / (40 * 3)
    assert_close(gp, want)
    assert gx is None


def test_loss_without_grad_skips_gradient(monkeypatch):
    from fmrt.kernels import loss as K
    seen = []
    real = K.flow_matching_loss

    def spy(*a):
        seen.append(a[-1])
        return real(*a)
    monkeypatch.setattr(K, "flow_matching_loss", spy)
    pred, x0 = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    with use_backend("triton"):
        ops.flow_matching_loss(pred, x0, seed=1)
        ops.flow_matching_loss(pred.requires_grad_(True), x0, seed=1)
        with torch.no_grad():
            ops.flow_matching_loss(pred, x0, seed=1)
    assert seen == [False, True, False]


def test_loss_second_backward_raises():
    pred = torch.randn(2, 3, 4, requires_grad=True)
    with use_backend("triton"):
        loss = ops.flow_matching_loss(pred, torch.randn(2, 3, 4), seed=1)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError):
        loss.backward()


def test_loss_does_not_modify_inputs():
    g = torch.Generator().manual_seed(2)
    ts = [torch.randn(2, 3, 4, generator=g) for _ in range(3)]
    mask, w = torch.rand(2, 1, 4, generator=g), torch.rand(2, generator=g)
    copies = [t.clone() for t in ts + [mask, w]]
    pred = ts[0].clone().requires_grad_(True)
    for backend in ("torch", "triton"):
        with use_backend(backend):
            ops.flow_matching_loss(pred, ts[1], ts[2], weight=w, mask=mask).backward()
            ops.flow_matching_loss(pred, ts[1], seed=3, weight=w, mask=mask).backward()
    for t, c in zip(ts + [mask, w], copies):
        assert torch.equal(t, c)
    assert torch.equal(pred.detach(), copies[0])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_loss_bad_input(backend, monkeypatch):
    p, x = torch.randn(2, 3, 4), torch.randn(2, 3, 4)

    def boom(*a, **k):
        raise AssertionError("a kernel ran before the arguments were checked")
    from fmrt.kernels import loss as K
    monkeypatch.setattr(K, "flow_matching_loss", boom)
    with use_backend(backend):
        with pytest.raises(TypeError, match="pred"):
            ops.flow_matching_loss(p.long(), x, seed=1)
        with pytest.raises(ValueError, match="x0"):
            ops.flow_matching_loss(p, torch.randn(2, 3, 5), seed=1)
        with pytest.raises(ValueError, match="noise"):
            ops.flow_matching_loss(p, x, torch.randn(2, 4, 3))
        with pytest.raises(ValueError, match="seed"):
            ops.flow_matching_loss(p, x, torch.randn(2, 3, 4), seed=1)
        with pytest.raises(ValueError, match="seed"):
            ops.flow_matching_loss(p, x)
        with pytest.raises(ValueError, match="weight"):
            ops.flow_matching_loss(p, x, seed=1, weight=torch.rand(3))
        with pytest.raises(TypeError, match="weight"):
            ops.flow_matching_loss(p, x, seed=1, weight="2")
        with pytest.raises(ValueError, match="mask"):
            ops.flow_matching_loss(p, x, seed=1, mask=torch.ones(2, 1, 3))
        with pytest.raises(ValueError, match="mask"):
            ops.flow_matching_loss(p, x, seed=1, mask=torch.ones(1, 2, 3, 4))
        with pytest.raises(TypeError, match="mask"):
            ops.flow_matching_loss(p, x, seed=1, mask=torch.ones(2, 3, 4, dtype=torch.int64))
        with pytest.raises(ValueError, match="reduction"):
            ops.flow_matching_loss(p, x, seed=1, reduction="avg")


def test_training_step_compiles_without_graph_break():
    g = torch.Generator().manual_seed(5)
    x0 = torch.randn(2, 3, 5, generator=g)
    lin = torch.nn.Linear(5, 5)
    s = torch.rand(2, generator=g)

    def step(x0, s):
        x_t, _ = ops.add_noise(x0, s, seed=21)
        return ops.flow_matching_loss(lin(x_t), x0, seed=21, weight=s)

    with use_backend("triton"):
        want = step(x0, s)
        gw = torch.autograd.grad(want, lin.weight)[0]
        got = torch.compile(step, fullgraph=True, backend="aot_eager")(x0, s)
        gc = torch.autograd.grad(got, lin.weight)[0]
    assert_close(got, want)
    assert_close(gc, gw)


def test_loss_64bit_index_path(monkeypatch):
    from fmrt.kernels import noise as K
    monkeypatch.setattr(K, "IDX64_FROM", 0)
    check_against_reference(ops.flow_matching_loss, ref.flow_matching_loss,
                            _make((3, 5, 7, 11), torch.float32, mask="frame"))


def test_loss_backward_reuses_the_forward_gradient_buffer(monkeypatch):
    # the only x0-sized tensor the loss makes is the gradient buffer; the backward scales it in
    # place and autograd hands that very buffer to pred.grad
    from fmrt.kernels import loss as K
    bufs = []
    real = K.flow_matching_loss

    def spy(*a):
        out = real(*a)
        bufs.append(out[1])
        return out
    monkeypatch.setattr(K, "flow_matching_loss", spy)
    pred = torch.randn(2, 3, 4, requires_grad=True)
    with use_backend("triton"):
        ops.flow_matching_loss(pred, torch.randn(2, 3, 4), seed=1, weight=0.5).backward()
    assert pred.grad.data_ptr() == bufs[0].data_ptr()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_loss_extra_memory_cuda(dtype):
    x0 = torch.randn(2, 16, 9, 64, 64, device="cuda").to(dtype)
    pred = torch.randn_like(x0).requires_grad_(True)
    w = torch.rand(2, device="cuda")
    size = x0.numel() * x0.element_size()
    ops.flow_matching_loss(pred, x0, seed=3, weight=w).backward()    # warm up
    pred.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    ops.flow_matching_loss(pred, x0, seed=3, weight=w).backward()
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - base <= size + (1 << 20)
    ref_loss = ref.flow_matching_loss(pred, x0, ref.philox_normal(x0.shape, 3, "cuda"), weight=w)
    assert_close(ops.flow_matching_loss(pred, x0, seed=3, weight=w), ref_loss.detach(),
                 scale=10.0)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_loss_finish_loops_over_partials(monkeypatch, reduction):
    # several tiles of per-program partial sums in the finishing kernel (tile forced small)
    from fmrt.kernels import loss as K
    monkeypatch.setattr(K, "FINISH_TILE", 8)
    check_against_reference(ops.flow_matching_loss, ref.flow_matching_loss,
                            _make((3, 9000), torch.float32, weight="tensor",
                                  reduction=reduction))


@pytest.mark.parametrize("idx64", [False, True])
def test_loss_frame_mask_large_rows(monkeypatch, idx64):
    from fmrt.kernels import noise as K
    if idx64:
        monkeypatch.setattr(K, "IDX64_FROM", 0)
    check_against_reference(ops.flow_matching_loss, _ref_seeded,
                            _make((2, 3, 5, 40, 40), torch.float32, weight="tensor",
                                  mask="frame", seeded=True, reduction="none"))


def test_loss_backward_allocates_no_full_size_tensor():
    # the backward scales the forward's gradient buffer in place: no tensor of pred's size is
    # allocated (autograd used to materialise zeros of that size for the unused buffer output,
    # which an H200 run showed as twice the expected peak memory)
    from tests.helpers import large_allocations
    pred = torch.randn(2, 3, 40, requires_grad=True)
    with use_backend("triton"):
        loss = ops.flow_matching_loss(pred, torch.randn(2, 3, 40), seed=1,
                                      weight=torch.rand(2))
    with large_allocations(pred.numel()) as found:
        loss.backward()
    assert found == []
    assert pred.grad is not None
