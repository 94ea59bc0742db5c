"""Ulysses sequence parallelism (fmrt.parallel) on CPU with gloo, 2 and 4 processes: the DiT's
output and every parameter gradient (SFT loss, MeanFlow loss through torch.func.jvp, per-frame
sigma, uneven token counts) equal the single-process run at fp32 tolerance, on the torch path
and on the Triton kernels under the interpreter; bad meshes are clear errors.

Each rank computes the single-process reference itself (the same model, no group) and then the
sequence-parallel run, so one spawn per world size checks everything."""
import os
import socket
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(fn, world: int, *args) -> None:
    mp.spawn(_entry, args=(world, _free_port(), fn, args), nprocs=world, join=True)


def _entry(rank: int, world: int, port: int, fn, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    except BaseException:
        traceback.print_exc()
        raise
    finally:
        dist.destroy_process_group()


def tiny_dit(**kw):
    from fmrt.models import DiT, DiTConfig
    cfg = dict(in_channels=3, dim=64, num_layers=2, num_heads=4, ffn_dim=96, freq_dim=32,
               text_dim=None, num_classes=5, class_tokens=2)
    cfg.update(kw)
    torch.manual_seed(0)
    model = DiT(DiTConfig(**cfg))
    with torch.no_grad():                     # leave adaLN-Zero: every path carries signal
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return model


def _grads(model) -> dict:
    return {n: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
            for n, p in model.named_parameters()}


def _run(model, loss_fn):
    model.zero_grad(set_to_none=True)
    loss = loss_fn(model)
    loss.backward()
    return loss.detach(), _grads(model)


def _compare(loss_fn, model, sp_group, atol=2e-5):
    """loss and gradients: single process vs sequence-parallel (after reduce_gradients)."""
    from fmrt.parallel import disable_sequence_parallel, enable_sequence_parallel, reduce_gradients
    disable_sequence_parallel(model)
    ref_loss, ref_grads = _run(model, loss_fn)
    sp = enable_sequence_parallel(model, sp_group)
    sp_loss, _ = _run(model, loss_fn)
    reduce_gradients(model.parameters(), sp)
    grads = _grads(model)
    disable_sequence_parallel(model)
    torch.testing.assert_close(sp_loss, ref_loss, atol=atol, rtol=1e-5)
    for n, g in ref_grads.items():
        torch.testing.assert_close(grads[n], g, atol=atol, rtol=1e-4, msg=lambda m: f"{n}: {m}")


def _checks(rank: int, world: int, backend: str) -> None:
    from fmrt import use_backend
    from fmrt.losses import meanflow_loss, sft_loss
    from fmrt.parallel import enable_sequence_parallel, make_mesh
    from fmrt.schedule import FlowMatchScheduler
    g = torch.Generator().manual_seed(1)
    # (f, h, w) = (3, 3, 3): 27 tokens, uneven for 2 and 4 ranks (padded)
    x = torch.randn(2, 3, 3, 6, 6, generator=g)
    labels = torch.tensor([1, 4])
    triton = backend == "triton"    # the interpreter is slow: the fused-op paths only
    attn = "triton" if triton else "auto"
    with use_backend(backend):
        mesh = make_mesh(world)
        group = mesh["sp"].get_group()
        model = tiny_dit(attn_backend=attn)

        # forward: the output itself, per-sample and per-frame sigma
        from fmrt.parallel import disable_sequence_parallel
        sigmas = (torch.tensor([0.3, 0.8]), torch.rand(2, 3, generator=g))
        for sigma in sigmas[1:] if triton else sigmas:
            ref = model(x, sigma, labels)
            enable_sequence_parallel(model, group)
            out = model(x, sigma, labels)
            disable_sequence_parallel(model)
            torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)

        # SFT loss (fused noise + loss kernels), gradient checkpointing on the SP run too
        sched = FlowMatchScheduler("Wan")
        sched.set_timesteps(1000, training=True)

        def sft(m):
            return sft_loss(m, x, labels, scheduler=sched, seed=7,
                            sigma=torch.tensor([0.25, 0.7]))
        _compare(sft, model, group)
        if not triton:
            model.enable_gradient_checkpointing(True)
            _compare(sft, model, group)
            model.enable_gradient_checkpointing(False)

            # TI2V: first frame pinned, per-frame sigma
            def ti2v(m):
                return sft_loss(m, x, labels, scheduler=sched, seed=3, first_frame=x[:, :, :1],
                                sigma=torch.tensor([0.5, 0.9]))
            _compare(ti2v, model, group)

        # MeanFlow: torch.func.jvp through the all-to-alls and the JVP attention
        mf = tiny_dit(meanflow=True, attn_backend=attn)

        def meanflow(m):
            return meanflow_loss(lambda z, r, t, c: m(z, t, c, r=r), x, cond=labels,
                                 t=torch.tensor([0.9, 0.6]), r=torch.tensor([0.2, 0.6]), seed=5)
        _compare(meanflow, mf, group)
        if triton:       # fmrt's Triton attention has no backward through its tangent
            return

        # the tangent itself (du/dt) and gradients through it
        z = x.clone()

        def tangent_loss(m):
            def u(z_, t_):
                return m(z_, t_, labels, r=torch.tensor([0.1, 0.3]))
            _, dudt = torch.func.jvp(u, (z, torch.tensor([0.7, 0.5])),
                                     (torch.ones_like(z), torch.ones(2)))
            return dudt.square().mean()
        from fmrt.attention import backend_override
        with backend_override("math"):
            _compare(tangent_loss, mf, group, atol=5e-5)


@pytest.mark.parametrize("world", [2, 4])
def test_sequence_parallel_matches_single_process(world):
    _spawn(_checks, world, "torch")


def test_sequence_parallel_triton_interpreter():
    """The fused kernels (noise, loss, q/k norm + RoPE, flash attention with JVP) under the
    Triton interpreter, 2 ranks."""
    _spawn(_checks, 2, "triton")


def _bad_meshes(rank: int, world: int) -> None:
    from fmrt.parallel import enable_sequence_parallel, make_mesh
    with pytest.raises(ValueError, match="larger than the world of 2"):
        make_mesh(4)
    with pytest.raises(ValueError, match="sp must be >= 1"):
        make_mesh(0)
    mesh = make_mesh(2)
    with pytest.raises(ValueError, match=r"degree 2 does not divide .* 3 attention heads.*"
                                         r"\[1, 3\]"):
        enable_sequence_parallel(tiny_dit(dim=48, num_heads=3), mesh["sp"].get_group())
    torch.manual_seed(rank)          # different weights on the two ranks
    from fmrt.models import DiT, DiTConfig
    other = DiT(DiTConfig(in_channels=3, dim=32, num_layers=1, num_heads=2, ffn_dim=32,
                          freq_dim=16, text_dim=None))
    with pytest.raises(ValueError, match="different weights"):
        enable_sequence_parallel(other, mesh["sp"].get_group())


def test_bad_meshes_are_clear_errors():
    _spawn(_bad_meshes, 2)


def test_degree_errors_without_processes():
    from fmrt.parallel import check_degree, ulysses_degrees
    assert ulysses_degrees(12) == [1, 2, 3, 4, 6, 12]
    check_degree(4, 12)
    with pytest.raises(ValueError, match=r"degree 8 does not divide .* 12 .*\[1, 2, 3, 4, 6, 12\]"):
        check_degree(8, 12)


# ---------------------------------------------------------------------------------------------
# training: fmrt.train with TrainConfig(sp=2) vs one process; resume on another layout
# ---------------------------------------------------------------------------------------------

def _train_sp(rank: int, world: int, runs: list) -> None:
    from tests.test_train import tiny_config
    from fmrt.train import train
    for out_dir, kw in runs:
        train(tiny_config(out_dir, **dict(dict(sp=world), **kw)))


def _assert_same_weights(a, b, atol=2e-5, optim=True):
    from safetensors.torch import load_file
    sa, sb = load_file(a), load_file(b)
    keys = [k for k in sa if k.split(".")[0] in ("model", "ema", "optim")]
    assert any(k.startswith("model.") for k in keys) and set(keys) <= set(sb)
    assert any(k.startswith("optim.") for k in keys) == optim     # FSDP runs save none
    for k in keys:
        torch.testing.assert_close(sa[k], sb[k], atol=atol, rtol=1e-4, msg=lambda m: f"{k}: {m}")


@pytest.mark.parametrize("objective", ["sft", "meanflow"])
def test_train_sp_matches_one_process_and_resumes_on_another_layout(tmp_path, objective):
    """2 steps with sp=2 (dp=1) give the weights, EMA and optimizer state of 2 steps in one
    process; that checkpoint resumes in one process (sp=1) to step 3, equal to 3 steps straight."""
    from tests.test_train import tiny_config
    from fmrt.train import train
    kw = dict(objective=objective, lr=1e-3, checkpoint_every=2, keep_checkpoints=0)
    _spawn(_train_sp, 2, [(str(tmp_path / "sp"), dict(kw, steps=2))])
    train(tiny_config(tmp_path / "one", steps=3, **kw))
    ck = "checkpoints/step-0000002.safetensors"
    _assert_same_weights(tmp_path / "sp" / ck, tmp_path / "one" / ck)
    out = train(tiny_config(tmp_path / "sp", steps=3, resume="auto", **kw))
    assert out["step"] == 3
    ck3 = "checkpoints/step-0000003.safetensors"
    _assert_same_weights(tmp_path / "sp" / ck3, tmp_path / "one" / ck3)


def test_train_dp2_sp2_fsdp_matches_dp2(tmp_path):
    """4 processes as (dp 2, sp 2) with FSDP2 over dp train as 2 data-parallel processes do
    (same batches, seeds and global batch)."""
    kw = dict(steps=2, lr=1e-3, fsdp=True)
    _spawn(_train_sp, 4, [(str(tmp_path / "sp"), dict(kw, sp=2))])
    _spawn(_train_sp, 2, [(str(tmp_path / "dp"), dict(kw, sp=1))])
    ck = "checkpoints/step-0000002.safetensors"
    _assert_same_weights(tmp_path / "sp" / ck, tmp_path / "dp" / ck, optim=False)


# ---------------------------------------------------------------------------------------------
# sampling: fmrt.sampling.sample with a sharded model; torchrun fmrt sample --sp N
# ---------------------------------------------------------------------------------------------

def _sampling(rank: int, world: int, backend: str) -> None:
    from fmrt import use_backend
    from fmrt.parallel import disable_sequence_parallel, enable_sequence_parallel
    from fmrt.sampling import sample
    noise = torch.randn(2, 3, 3, 6, 6, generator=torch.Generator().manual_seed(3))
    labels, null = torch.tensor([0, 3]), torch.tensor([5, 5])
    runs = [(tiny_dit(), dict(solver="euler", guidance_scale=3.0, rescale="norm")),
            (tiny_dit(), dict(solver="unipc", guidance_scale=2.0, batch_cfg=False)),
            (tiny_dit(meanflow=True), dict(solver="meanflow", guidance_scale=1.0))]
    with use_backend(backend), torch.no_grad():
        for model, kw in runs[:1] if backend == "triton" else runs:
            net = model
            if kw["solver"] == "meanflow":
                def net(z, r, t, c, m=model):
                    return m(z, t, c, r=r)
            uncond = null if kw["guidance_scale"] != 1.0 else None
            ref = sample(net, noise, steps=3, cond=labels, uncond=uncond, seed=1, **kw)
            enable_sequence_parallel(model)
            out = sample(net, noise, steps=3, cond=labels, uncond=uncond, seed=1, **kw)
            disable_sequence_parallel(model)
            torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_sample_with_sharded_model_matches_one_process(backend):
    """CFG (batched and not, norm rescale), Euler / UniPC / MeanFlow; the fused guided steps
    (Triton interpreter) run on every rank's copy of the latent, no extra communication."""
    _spawn(_sampling, 2, backend)


def test_torchrun_fmrt_sample_sp(tmp_path):
    import subprocess
    import sys

    import numpy as np
    env = dict(os.environ, OMP_NUM_THREADS="1")
    common = ["sample", "--num", "2", "--steps", "2", "--guidance-scale", "2", "--no-progress"]
    one = subprocess.run([sys.executable, "-m", "fmrt.cli", *common, "--out",
                          str(tmp_path / "one.npy")], env=env, capture_output=True, text=True)
    assert one.returncode == 0, one.stderr
    sp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                         "--master-port", str(_free_port()), "-m", "fmrt.cli", "--", *common,
                         "--sp", "2", "--out", str(tmp_path / "sp.npy")],
                        env=env, capture_output=True, text=True)
    assert sp.returncode == 0, sp.stderr[-3000:]
    np.testing.assert_allclose(np.load(tmp_path / "sp.npy"), np.load(tmp_path / "one.npy"),
                               atol=1e-5)
    bad = subprocess.run([sys.executable, "-m", "fmrt.cli", *common, "--sp", "2", "--out",
                          str(tmp_path / "bad.npy")], env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "torchrun --nproc-per-node 2" in bad.stderr
    assert not (tmp_path / "bad.npy").exists()


# ---------------------------------------------------------------------------------------------
# diffusers: accelerate_wan's processor under ContextParallelConfig(ulysses_degree=N)
# ---------------------------------------------------------------------------------------------

def _diffusers_cp(rank: int, world: int) -> None:
    from diffusers import ContextParallelConfig
    from fmrt.integrations.diffusers import FmrtWanAttnProcessor, accelerate_wan
    from tests.integrations.test_diffusers import _inputs, _model, _processors
    # diffusers picks rank % accelerator.device_count() as the device: 0 on a CPU build
    torch.accelerator.device_count = lambda: 1
    ref = _model(12, 2, layers=2)(**_inputs(False), return_dict=False)[0]
    for accelerate in (False, True):
        model = _model(12, 2, layers=2)
        if accelerate:
            accelerate_wan(model)
        model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world))
        out = model(**_inputs(False), return_dict=False)[0]
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)
    ps = [p for p in _processors(model) if isinstance(p, FmrtWanAttnProcessor)]
    assert len(ps) == 4
    assert sum(p.fmrt_calls for p in ps) == 4 and sum(p.fallback_calls for p in ps) == 0


def test_diffusers_ulysses_context_parallel_runs_fmrt_processor():
    """Stock diffusers with CP, and accelerate_wan + CP, equal the stock single-process output;
    every attention call (self under Ulysses, cross) ran fmrt's path, none fell back."""
    pytest.importorskip("diffusers")
    _spawn(_diffusers_cp, 2)


def test_fmrt_train_sp_without_torchrun_is_a_clear_error(tmp_path):
    from tests.cli_run import assert_one_line_error, run_fmrt
    r = run_fmrt("train", "--sp", "2", "--out-dir", tmp_path / "run", "--steps", "1",
                 "--device", "cpu", "--no-progress")
    assert_one_line_error(r, "torchrun")
    assert not (tmp_path / "run").exists()
