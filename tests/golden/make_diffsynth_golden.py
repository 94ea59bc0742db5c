"""Regenerate `diffsynth_flow_match.json`, the DiffSynth-Studio golden values of
tests/test_schedule.py. Not run by CI (CI has no DiffSynth). Usage:

    git --git-dir=<DiffSynth.git> show <commit>:diffsynth/diffusion/flow_match.py > /tmp/ds.py
    python tests/golden/make_diffsynth_golden.py /tmp/ds.py <commit>

It imports DiffSynth's own scheduler module (torch, math, numpy only) and records its grids,
training tables and the bf16 timestep-lookup quirk of its FlowMatchSFTLoss
(`timestep.to(torch.bfloat16)` before `add_noise` / `training_weight`).
"""
import importlib.util
import json
import os
import sys

import torch

CASES = [  # (template, N, denoising_strength, training, template kwargs)
    ("Wan", 50, 1.0, False, {}),
    ("Wan", 50, 0.7, False, {}),
    ("Wan", 30, 1.0, False, {"shift": 3.0}),
    ("Wan", 4, 0.35, False, {"shift": 8}),
    ("Wan", 1, 1.0, False, {}),
    ("Wan", 1000, 1.0, True, {}),
    ("Wan", 50, 1.0, True, {}),
    ("Wan", 7, 0.6, True, {"shift": 1.0}),
    ("FLUX.1", 28, 1.0, False, {}),
    ("FLUX.1", 50, 0.7, False, {"shift": 1.5}),
    ("FLUX.1", 1, 0.8, False, {}),
    ("FLUX.1", 1000, 1.0, True, {}),
    ("FLUX.1", 20, 1.0, True, {}),
    ("Qwen-Image", 50, 1.0, False, {}),
    ("Qwen-Image", 30, 0.8, False, {"exponential_shift_mu": 0.3}),
    ("Qwen-Image", 50, 1.0, False, {"dynamic_shift_len": 4096}),
    ("Qwen-Image", 20, 1.0, False, {"dynamic_shift_len": 256}),
    ("Qwen-Image", 1000, 1.0, True, {}),
    ("FLUX.2", 50, 1.0, False, {}),
    ("FLUX.2", 28, 1.0, False, {"dynamic_shift_len": 4096}),
    ("FLUX.2", 50, 0.6, False, {"dynamic_shift_len": 8000}),
    ("FLUX.2", 1000, 1.0, True, {}),
]


def pick(n):
    """Indices recorded: all of a short grid, a sample of a long one."""
    if n <= 64:
        return list(range(n))
    return sorted(set(range(0, n, 17)) | {1, 2, 3, n - 3, n - 2, n - 1})


def main(path, commit):
    spec = importlib.util.spec_from_file_location("ds_flow_match", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = {"diffsynth_commit": commit, "cases": []}
    for tpl, n, strength, training, kw in CASES:
        s = mod.FlowMatchScheduler(tpl)
        s.set_timesteps(n, strength, training=training, **kw)
        idx = pick(len(s.sigmas))
        case = {"template": tpl, "n": n, "strength": strength, "training": training,
                "kwargs": kw, "len": len(s.sigmas), "index": idx,
                "sigmas": [float(s.sigmas[i]) for i in idx],
                "timesteps": [float(s.timesteps[i]) for i in idx]}
        if training:
            w = s.linear_timesteps_weights
            case.update(weights=[float(w[i]) for i in idx], weight_sum=float(w.sum()),
                        weight_argmax=int(w.argmax()), weight_max=float(w.max()))
        out["cases"].append(case)
    # The SFT-loss quirk: timesteps[id].to(bf16), then DiffSynth's argmin lookup.
    quirk = {}
    for tpl in ("Wan", "FLUX.1"):
        s = mod.FlowMatchScheduler(tpl)
        s.set_timesteps(1000, training=True)
        ids = []
        for i in range(1000):
            t = s.timesteps[i:i + 1].to(torch.bfloat16)
            ids.append(int(torch.argmin((s.timesteps - t).abs())))
        quirk[tpl] = ids
    out["bf16_lookup_index"] = quirk
    # Python-float timesteps exactly halfway between two grid entries (in float64): DiffSynth's
    # `timesteps - timestep` runs in the grid's float32; the sigma its add_noise picks.
    halfway = []
    for tpl, n, t in (("Wan", 2, 916.6666564941406), ("Wan", 4, 729.1666564941406),
                      ("Wan", 7, 946.8338928222656)):
        s = mod.FlowMatchScheduler(tpl)
        s.set_timesteps(n)
        sigma = s.add_noise(torch.zeros(1), torch.ones(1), t)
        halfway.append({"template": tpl, "n": n, "timestep": t, "sigma": float(sigma[0])})
    out["halfway_lookup"] = halfway
    # training_weight's shape for a 0-d and a [1] timestep (a [B > 1] one fails there)
    s = mod.FlowMatchScheduler("Wan")
    s.set_timesteps(1000, training=True)
    out["training_weight_shape"] = {
        "0-d": list(s.training_weight(torch.tensor(500.0)).shape),
        "[1]": list(s.training_weight(torch.tensor([500.0])).shape)}
    dst = os.path.join(os.path.dirname(os.path.abspath(__file__)), "diffsynth_flow_match.json")
    with open(dst, "w") as f:
        json.dump(out, f, separators=(",", ":"))
    print("wrote", dst)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
