"""Ulysses sequence parallelism (fmrt.parallel) on CPU with gloo, 2 and 4 processes: the DiT's
output and every parameter gradient (SFT loss, MeanFlow loss through torch.func.jvp, per-frame
sigma, uneven token counts) equal the single-process run at fp32 tolerance, on the torch path
and on the Triton kernels under the interpreter; sharded sampling (the latent split by token
rows through the loop, only the final latent gathered) equals one process; bad meshes and
options sharded sampling refuses are clear errors.

Each rank computes the single-process reference itself (the same model, no group) and then the
sequence-parallel run, so one spawn per world size runs many checks (a process start imports
torch and fmrt: seconds each); the interpreter cases use a one-block model and <= 9 tokens."""
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
        # every rank done before any tears gloo down: a rank that destroys its group while a
        # peer's gloo threads still talk to it has aborted a 4-process run ("terminate called
        # without an active exception", once in CI on 2 busy cores)
        dist.barrier()
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


def _model_checks(rank: int, world: int, backend: str) -> None:
    """Forward (per-sample and per-frame sigma), SFT (with and without checkpointing, TI2V),
    MeanFlow, the tangent and gradients through it: sequence-parallel == one process."""
    from fmrt import use_backend
    from fmrt.losses import meanflow_loss, sft_loss
    from fmrt.parallel import disable_sequence_parallel, enable_sequence_parallel, make_mesh
    from fmrt.schedule import FlowMatchScheduler
    g = torch.Generator().manual_seed(1)
    triton = backend == "triton"    # the interpreter is slow: the fused-op paths, tiny shapes
    if triton:   # (f, h, w) = (1, 3, 3): 9 tokens, uneven for 2 ranks; one block, 2 heads
        x = torch.randn(2, 3, 1, 6, 6, generator=g)
        arch = dict(dim=32, num_layers=1, num_heads=2, ffn_dim=32, freq_dim=16,
                    attn_backend="triton")
    else:        # (f, h, w) = (3, 3, 3): 27 tokens, uneven for 2 and 4 ranks (padded)
        x = torch.randn(2, 3, 3, 6, 6, generator=g)
        arch = dict(attn_backend="auto")
    labels = torch.tensor([1, 4])
    with use_backend(backend):
        mesh = make_mesh(world)
        group = mesh["sp"].get_group()
        model = tiny_dit(**arch)

        # forward: the output itself, per-sample and per-frame sigma
        sigmas = (torch.tensor([0.3, 0.8]), torch.rand(2, x.shape[2], generator=g))
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
        mf = tiny_dit(meanflow=True, **arch)

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


def _sharded_sampling(rank: int, world: int, backend: str) -> None:
    """sample(..., sequence_parallel=sp) with a sharded_io model equals one process; the model
    and the fused guided step see only this rank's shard [B, C, T, H / world, W]."""
    from fmrt import ops, use_backend
    from fmrt.parallel import disable_sequence_parallel, enable_sequence_parallel
    from fmrt.sampling import sample
    triton = backend == "triton"
    arch = (dict(dim=32, num_layers=1, num_heads=2, ffn_dim=32, freq_dim=16) if triton
            else {})
    # H = 8: 4 token rows (patch 2), split over 2 or 4 ranks; the torch runs use 3 frames
    noise = torch.randn(2, 3, 1 if triton else 3, 8, 6, generator=torch.Generator().manual_seed(3))
    labels, null = torch.tensor([0, 3]), torch.tensor([5, 5])
    shard = (*noise.shape[:3], 8 // world, 6)
    scale = torch.tensor([3.0, 2.0])     # a tensor scale: the fused guided step, not the lerp
    runs = [(tiny_dit(**arch), dict(solver="euler", guidance_scale=scale))]
    if not triton:
        runs += [(tiny_dit(), dict(solver="heun", guidance_scale=2.0, rescale="norm",
                                   norm_dim=-1, first_frame=noise[:, :, :1])),
                 (tiny_dit(), dict(solver="unipc", guidance_scale=2.0, batch_cfg=False,
                                   x_init=noise.flip(0), denoising_strength=0.8)),
                 (tiny_dit(meanflow=True), dict(solver="meanflow", guidance_scale=1.0))]
    seen = {"model": [], "step": []}
    fused = ops._guided_euler_step

    def guided_step(x, *args):
        seen["step"].append(tuple(x.shape))
        return fused(x, *args)
    ops._guided_euler_step = guided_step
    try:
        with use_backend(backend), torch.no_grad():
            for model, kw in runs:
                def net(z, *args, m=model, mf=kw["solver"] == "meanflow"):
                    seen["model"].append(tuple(z.shape))
                    return m(z, args[1], args[2], r=args[0]) if mf else m(z, *args)
                uncond = null if kw["guidance_scale"] is scale or kw["guidance_scale"] != 1.0 \
                    else None
                ref = sample(net, noise, steps=3, cond=labels, uncond=uncond, seed=1, **kw)
                seen["model"].clear(), seen["step"].clear()
                sp = enable_sequence_parallel(model, sharded_io=True)
                out = sample(net, noise, steps=3, cond=labels, uncond=uncond, seed=1,
                             sequence_parallel=sp, **kw)
                disable_sequence_parallel(model)
                torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)
                batch = 2 * len(labels) if (uncond is not None and kw.get("batch_cfg", True)) \
                    else len(labels)
                assert seen["model"] and set(seen["model"]) == {(batch, *shard[1:])}, seen
                if kw["guidance_scale"] is scale:
                    assert seen["step"] == [shard] * 3, seen
    finally:
        ops._guided_euler_step = fused


def _replicated_sampling(rank: int, world: int) -> None:
    """sharded_io=False (the model gathers its output): any sampler runs unchanged, e.g. the
    per-sample norm rescale that sharded sampling refuses."""
    from fmrt.parallel import disable_sequence_parallel, enable_sequence_parallel
    from fmrt.sampling import sample
    noise = torch.randn(2, 3, 3, 6, 6, generator=torch.Generator().manual_seed(3))
    labels, null = torch.tensor([0, 3]), torch.tensor([5, 5])
    model = tiny_dit()
    kw = dict(steps=3, cond=labels, uncond=null, seed=1, solver="euler", guidance_scale=3.0,
              rescale="norm")
    with torch.no_grad():
        ref = sample(model, noise, **kw)
        enable_sequence_parallel(model)
        out = sample(model, noise, **kw)
        disable_sequence_parallel(model)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)


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


def _bad_sharded(rank: int, world: int) -> None:
    """What sharded sampling cannot run without extra communication is a clear error, raised
    on every rank before any collective."""
    from fmrt.cache import FirstBlockCache, MagCache
    from fmrt.guidance import AdaptiveGuidanceReuse
    from fmrt.parallel import disable_sequence_parallel, enable_sequence_parallel
    from fmrt.sampling import DiagnosticsRecorder, sample
    model = tiny_dit()
    noise = torch.randn(2, 3, 1, 8, 6, generator=torch.Generator().manual_seed(3))
    labels, null = torch.tensor([0, 3]), torch.tensor([5, 5])
    kw = dict(steps=2, cond=labels, uncond=null, guidance_scale=2.0)
    sp = enable_sequence_parallel(model)                 # not sharded_io
    with pytest.raises(ValueError, match="sharded_io=True"):
        sample(model, noise, sequence_parallel=sp, **kw)
    sp = enable_sequence_parallel(model, sharded_io=True)
    bad = [(dict(rescale="norm"), "rescale='norm' per sample"),
           (dict(cfg_zero_star=True), "cfg_zero_star"),
           (dict(recorder=DiagnosticsRecorder()), "recorder"),
           (dict(solver="euler_maruyama"), "euler_maruyama"),
           (dict(guidance_reuse=AdaptiveGuidanceReuse()), "adaptive guidance reuse"),
           (dict(cache=FirstBlockCache(0.05)), "first-block caching")]
    for extra, msg in bad:
        with pytest.raises(ValueError, match=f"sharded sampling .*{msg}"):
            sample(model, noise, sequence_parallel=sp, **kw, **extra)
    with pytest.raises(ValueError, match=r"3 token rows .* over the 2 ranks.*\[1, 3\]"):
        sample(model, noise[:, :, :, :6], sequence_parallel=sp, **kw)
    with torch.no_grad():     # MagCache decides before the loop: it runs sharded
        x = sample(model, noise, sequence_parallel=sp, **dict(kw, batch_cfg=False),
                   cache=MagCache([1.0] * 2, threshold=0.5))
    assert x.shape == noise.shape and torch.isfinite(x).all()
    from fmrt.cache import BranchCache
    with pytest.raises(ValueError, match="first-block caching .* sequence-parallel"):
        model(sp.shard_latent(noise), 0.5, labels, cache=BranchCache(FirstBlockCache(0.05)))
    disable_sequence_parallel(model)


def _diffusers_cp(rank: int, world: int) -> None:
    """Stock diffusers with CP, and accelerate_wan + CP, equal the stock single-process output;
    every attention call (self under Ulysses, cross) ran fmrt's path, none fell back."""
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


def _suite(rank: int, world: int, checks: list) -> None:
    """Several checks in one spawn (each process start imports torch and fmrt: seconds)."""
    for fn, *args in checks:
        fn(rank, world, *args)


def test_sequence_parallel_2_processes():
    """2 ranks, torch path: model outputs / losses / gradients, sharded and replicated sampling,
    bad meshes and bad sharded-sampling options; diffusers' Ulysses CP running fmrt's processor
    where diffusers installs."""
    import importlib.util
    checks = [(_model_checks, "torch"), (_sharded_sampling, "torch"), (_replicated_sampling,),
              (_bad_meshes,), (_bad_sharded,)]
    if importlib.util.find_spec("diffusers") is not None:
        checks.append((_diffusers_cp,))
    _spawn(_suite, 2, checks)


def test_sequence_parallel_4_processes():
    """4 ranks (uneven: 27 tokens padded to 28; sharded sampling with one token row each)."""
    _spawn(_suite, 4, [(_model_checks, "torch"), (_sharded_sampling, "torch")])


def test_sequence_parallel_triton_interpreter():
    """The fused kernels (noise, loss, q/k norm + RoPE, flash attention with JVP, the fused
    guided Euler step on the shard) under the Triton interpreter, 2 ranks, tiny shapes."""
    _spawn(_suite, 2, [(_model_checks, "triton"), (_sharded_sampling, "triton")])


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


def test_train_sp_matches_one_process_and_resumes_on_another_layout(tmp_path):
    """SFT and MeanFlow (one spawn for both): 2 steps with sp=2 (dp=1) give the weights, EMA
    and optimizer state of 2 steps in one process; that checkpoint resumes in one process
    (sp=1) to step 3, equal to 3 steps straight."""
    from tests.test_train import tiny_config
    from fmrt.train import train
    kws = {obj: dict(objective=obj, lr=1e-3, checkpoint_every=2, keep_checkpoints=0)
           for obj in ("sft", "meanflow")}
    _spawn(_train_sp, 2, [(str(tmp_path / obj / "sp"), dict(kw, steps=2))
                          for obj, kw in kws.items()])
    ck = "checkpoints/step-0000002.safetensors"
    ck3 = "checkpoints/step-0000003.safetensors"
    for obj, kw in kws.items():
        one, sp = tmp_path / obj / "one", tmp_path / obj / "sp"
        train(tiny_config(one, steps=3, **kw))
        _assert_same_weights(sp / ck, one / ck)
        out = train(tiny_config(sp, steps=3, resume="auto", **kw))
        assert out["step"] == 3
        _assert_same_weights(sp / ck3, one / ck3)


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

def test_torchrun_fmrt_sample_sp(tmp_path, capsys):
    """torchrun fmrt sample --sp 2 (sharded sampling) writes the clips of one process; --sp
    without torchrun, or with --diagnostics, is a one-line error that writes nothing."""
    import subprocess
    import sys

    import numpy as np
    from fmrt.cli import main
    common = ["sample", "--num", "2", "--steps", "2", "--guidance-scale", "2", "--no-progress"]
    assert main([*common, "--out", str(tmp_path / "one.npy")]) == 0
    env = dict(os.environ, OMP_NUM_THREADS="1")
    sp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                         "--master-port", str(_free_port()), "-m", "fmrt.cli", "--", *common,
                         "--sp", "2", "--out", str(tmp_path / "sp.npy")],
                        env=env, capture_output=True, text=True)
    assert sp.returncode == 0, sp.stderr[-3000:]
    np.testing.assert_allclose(np.load(tmp_path / "sp.npy"), np.load(tmp_path / "one.npy"),
                               atol=1e-5)
    capsys.readouterr()
    for extra, needle in (([], "torchrun --nproc-per-node 2"),
                          (["--diagnostics", str(tmp_path / "d.png")], "--diagnostics")):
        assert main([*common, "--sp", "2", *extra, "--out", str(tmp_path / "bad.npy")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and needle in err, err
    assert not (tmp_path / "bad.npy").exists() and not (tmp_path / "d.png").exists()


def test_fmrt_train_sp_without_torchrun_is_a_clear_error(tmp_path):
    from tests.cli_run import assert_one_line_error, run_fmrt
    r = run_fmrt("train", "--sp", "2", "--out-dir", tmp_path / "run", "--steps", "1",
                 "--device", "cpu", "--no-progress")
    assert_one_line_error(r, "torchrun")
    assert not (tmp_path / "run").exists()
