"""A pipeline holding fmrt's FlowMatchEulerDiscreteScheduler survives save_pretrained /
from_pretrained (the round trips of diffusers' own pipeline tests, on tiny random Wan
pipelines): the folder names diffusers' scheduler, stock diffusers loads it in a process that
never imports fmrt, and fmrt's scheduler comes back where fmrt loads it."""
import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from diffusers import FlowMatchEulerDiscreteScheduler as DiffusersScheduler  # noqa: E402
from diffusers import WanPipeline  # noqa: E402

from fmrt.integrations.diffusers import FlowMatchEulerDiscreteScheduler  # noqa: E402
from tests.tiny_wan import tiny_wan_pipeline  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CALL = dict(prompt="a red cat runs", negative_prompt="blue", height=16, width=16, num_frames=5,
            num_inference_steps=2, guidance_scale=5.0, output_type="pt")


def _run(pipe):
    return pipe(**CALL, generator=torch.Generator().manual_seed(0)).frames


def _settings(config):
    return {k: v for k, v in config.items() if not k.startswith("_")}


def _same_frames(a, b):
    """As diffusers' own save/load tests compare: the tiny pipeline itself varies by ~5e-6
    between two calls on this CPU."""
    assert a.std() > 0.01
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def fmrt_pipe():
    pipe = tiny_wan_pipeline()
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    return pipe


@pytest.fixture(scope="module")
def saved(fmrt_pipe, tmp_path_factory):
    d = tmp_path_factory.mktemp("wan_fmrt_sched")
    fmrt_pipe.save_pretrained(d)
    return d


def test_folder_names_diffusers_scheduler(fmrt_pipe, saved):
    index = json.loads((saved / "model_index.json").read_text())
    assert index["scheduler"] == ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    cfg = json.loads((saved / "scheduler" / "scheduler_config.json").read_text())
    assert cfg["_class_name"] == "FlowMatchEulerDiscreteScheduler" and cfg["shift"] == 7.0
    assert fmrt_pipe.config.scheduler == ("diffusers", "FlowMatchEulerDiscreteScheduler")


def test_stock_diffusers_loads_it_without_fmrt(fmrt_pipe, saved, tmp_path):
    """A fresh interpreter that never imports fmrt loads the folder (diffusers' own scheduler)
    and samples the frames fmrt's pipeline sampled."""
    out = tmp_path / "frames.pt"
    code = (
        "import sys, torch\n"
        "from diffusers import WanPipeline\n"
        f"pipe = WanPipeline.from_pretrained({str(saved)!r})\n"
        "assert not any(m == 'fmrt' or m.startswith('fmrt.') for m in sys.modules)\n"
        "print(type(pipe.scheduler).__module__)\n"
        f"kw = {CALL!r}\n"
        "f = pipe(**kw, generator=torch.Generator().manual_seed(0)).frames\n"
        f"torch.save(f, {str(out)!r})\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       cwd=str(tmp_path), timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == \
        "diffusers.schedulers.scheduling_flow_match_euler_discrete"
    _same_frames(torch.load(out), _run(fmrt_pipe))


def test_fmrt_loading_gives_fmrt_scheduler_back(fmrt_pipe, saved):
    sched = FlowMatchEulerDiscreteScheduler.from_pretrained(saved, subfolder="scheduler")
    assert type(sched) is FlowMatchEulerDiscreteScheduler
    assert _settings(sched.config) == _settings(fmrt_pipe.scheduler.config)
    pipe = WanPipeline.from_pretrained(saved, scheduler=sched)
    assert pipe.scheduler is sched
    _same_frames(_run(pipe), _run(fmrt_pipe))
    stock = WanPipeline.from_pretrained(saved)         # in this process too: diffusers' own
    assert type(stock.scheduler) is DiffusersScheduler


def test_variant_and_dtype_dict_round_trip(fmrt_pipe, tmp_path):
    """diffusers' test_loading_with_variants / test_torch_dtype_dict on the fmrt pipeline."""
    fmrt_pipe.save_pretrained(tmp_path, variant="fp16")
    pipe = WanPipeline.from_pretrained(tmp_path, variant="fp16", dtype={
        "transformer": torch.bfloat16, "default": torch.float32})
    assert pipe.transformer.dtype == torch.bfloat16 and pipe.vae.dtype == torch.float32
    assert type(pipe.scheduler) is DiffusersScheduler
    assert _settings(pipe.scheduler.config) == _settings(fmrt_pipe.scheduler.config)


def test_folder_saved_before_the_fix_loads_with_fmrt_imported(fmrt_pipe, saved, tmp_path):
    """Folders saved by earlier fmrt name this module as the scheduler's library: diffusers
    finds `SchedulerMixin` there (this process imported it) and loads fmrt's scheduler."""
    import shutil
    old = tmp_path / "old"
    shutil.copytree(saved, old)
    index = json.loads((old / "model_index.json").read_text())
    index["scheduler"] = ["fmrt.integrations.diffusers", "FlowMatchEulerDiscreteScheduler"]
    (old / "model_index.json").write_text(json.dumps(index))
    pipe = WanPipeline.from_pretrained(old)
    assert type(pipe.scheduler) is FlowMatchEulerDiscreteScheduler
    _same_frames(_run(pipe), _run(fmrt_pipe))


def test_swapping_the_scheduler_in_records_diffusers_too():
    """`pipe.scheduler = fmrt_scheduler` (DiffusionPipeline.__setattr__) and a scheduler passed
    to the constructor both record diffusers' class; the scheduler's own module is fmrt's."""
    pipe = tiny_wan_pipeline()
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    assert pipe.config.scheduler == ("diffusers", "FlowMatchEulerDiscreteScheduler")
    assert type(pipe.scheduler).__module__ == "fmrt.integrations.diffusers"
    pipe2 = WanPipeline(**{k: v for k, v in pipe.components.items()})
    assert pipe2.config.scheduler == ("diffusers", "FlowMatchEulerDiscreteScheduler")


def test_fmrt_sample_runs_the_saved_folder_with_fmrt_scheduler(saved, tmp_path, capsys):
    """`fmrt sample --diffusers` (fmrt's own loading) on the saved folder: diffusers' scheduler
    is loaded and fmrt's swapped back in."""
    from fmrt.cli import main
    out = tmp_path / "v.npy"
    argv = ["sample", "--diffusers", str(saved), "--prompt", "a red cat runs", "--height", "16",
            "--width", "16", "--frames", "5", "--steps", "2", "--seed", "0", "--out", str(out)]
    assert main(argv) == 0
    assert "fmrt Euler scheduler" in capsys.readouterr().out
    assert out.stat().st_size > 0
