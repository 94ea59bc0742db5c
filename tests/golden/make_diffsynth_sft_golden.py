"""Regenerate `diffsynth_sft_loss.json`, the golden values of
`tests/test_losses_sft.py::test_sft_loss_diffsynth_compat_golden`. Not run by CI (CI has no
DiffSynth). Usage, from the repository root:

    for f in flow_match loss; do git --git-dir=<DiffSynth.git> show \
        <commit>:diffsynth/diffusion/$f.py > /tmp/ds_$f.py; done
    python tests/golden/make_diffsynth_sft_golden.py /tmp/ds_flow_match.py /tmp/ds_loss.py <commit>

It runs DiffSynth's own `FlowMatchSFTLoss` (its `.base_pipeline` import stubbed) with
DiffSynth's own `FlowMatchScheduler` and a stub pipeline whose `model_fn` is the toy velocity
model of the test, on latents made by the test's `diffsynth_inputs`, after
`torch.manual_seed(rng_seed)` (DiffSynth draws its timestep index and noise from the global RNG),
under `tests.helpers.stable_randn_like` (bf16 noise drawn in fp32 and cast: torch's CPU bf16
`randn` stream differs between releases, its fp32 stream does not).
"""
import importlib.util
import json
import sys
import types

import torch

sys.path.insert(0, ".")
from tests.helpers import stable_randn_like  # noqa: E402
from tests.test_losses_sft import diffsynth_inputs, toy_velocity  # noqa: E402

CASES = [  # name, template, shape, dtype, ti2v, min/max boundary, data seed, rng seed
    ("wan_bf16", "Wan", [1, 4, 3, 6, 8], "bfloat16", False, 0.0, 1.0, 1, 10),
    ("wan_bf16_b2", "Wan", [2, 4, 3, 6, 8], "bfloat16", False, 0.0, 1.0, 2, 11),
    ("wan_bf16_ti2v", "Wan", [1, 4, 5, 6, 8], "bfloat16", True, 0.0, 1.0, 3, 12),
    ("wan_fp32", "Wan", [1, 4, 3, 6, 8], "float32", False, 0.0, 1.0, 4, 13),
    ("wan_fp32_ti2v_window", "Wan", [1, 4, 4, 6, 8], "float32", True, 0.3, 0.6, 5, 14),
    ("flux_bf16", "FLUX.1", [2, 16, 8, 8], "bfloat16", False, 0.0, 1.0, 6, 15),
    ("flux_bf16_high", "FLUX.1", [1, 16, 8, 8], "bfloat16", False, 0.0, 0.1, 7, 16),
    ("wan_bf16_high", "Wan", [1, 4, 3, 6, 8], "bfloat16", False, 0.0, 0.02, 8, 17),
]


def load(name, path, package=None):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    if package:
        mod.__package__ = package
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


class Pipe:
    in_iteration_models = ()

    def __init__(self, scheduler, dtype):
        self.scheduler, self.torch_dtype, self.device = scheduler, dtype, "cpu"
        self.timesteps_seen = []

    def model_fn(self, latents, timestep, **_):
        self.timesteps_seen.append(float(timestep.float().flatten()[0]))
        return toy_velocity(latents, timestep.float().expand(latents.shape[0]))


def main(flow_match_path, loss_path, commit):
    pkg = types.ModuleType("ds")
    pkg.__path__ = []
    sys.modules["ds"] = pkg
    base = types.ModuleType("ds.base_pipeline")
    base.BasePipeline = object
    sys.modules["ds.base_pipeline"] = base
    fm = load("ds.flow_match", flow_match_path, "ds")
    loss_mod = load("ds.loss", loss_path, "ds")
    out = {"diffsynth_commit": commit, "cases": []}
    for name, tpl, shape, dtype, ti2v, lo, hi, data_seed, rng_seed in CASES:
        case = {"name": name, "template": tpl, "shape": shape, "dtype": dtype, "ti2v": ti2v,
                "min_boundary": lo, "max_boundary": hi, "data_seed": data_seed,
                "rng_seed": rng_seed}
        x0, ff = diffsynth_inputs(case)
        sched = fm.FlowMatchScheduler(tpl)
        sched.set_timesteps(1000, training=True)
        pipe = Pipe(sched, getattr(torch, dtype))
        inputs = {"input_latents": x0, "min_timestep_boundary": lo, "max_timestep_boundary": hi}
        if ti2v:
            inputs["first_frame_latents"] = ff
        torch.manual_seed(rng_seed)
        with stable_randn_like():
            loss = loss_mod.FlowMatchSFTLoss(pipe, **inputs)
        case["loss"] = float(loss.flatten()[0])
        case["timestep"] = pipe.timesteps_seen[0]
        out["cases"].append(case)
        print(name, case["loss"], case["timestep"])
    with open("tests/golden/diffsynth_sft_loss.json", "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main(*sys.argv[1:4])
