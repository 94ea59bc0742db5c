"""Which fp32 tile configurations of the flash-attention kernels run correctly on this GPU
(GPU only; one subprocess per kernel kind and configuration, so a faulting kernel cannot poison
the others' CUDA context).

    python benchmarks/gpu_diag_attention.py [--D 128] [--dtype float32] [--json PATH] [-j 10]

Why: on the first H200 run (2026-11-29, torch 2.11, triton 3.6) every fp32 D=128 case of
`tests/kernels/test_attention.py::test_gpu_jvp_and_grads` hit "an illegal memory access", while
bf16 / fp16 at D=128 and fp32 at D=64 passed. For each kernel kind ("fwd", "jvp", "tangent",
"dkdv", "dq") and each candidate configuration, one process launches only that kernel with that
configuration (every other kind in the process on the small, conservative "small" tiles), with
CUDA_LAUNCH_BLOCKING=1, at two shapes (S 300 unmasked; S_q 257, S_k 131 with a key padding
mask), and compares each output with a float64 reference (relative L2 error; "ok" below 1e-4,
the level of fp32 / 3xTF32 accumulation, "inaccurate" above).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KINDS = ("fwd", "jvp", "tangent", "dkdv", "dq")
# variant name -> function of the kind's current (bm, bn, w, st, prec) giving the tried one
VARIANTS = {
    "current": lambda bm, bn, w, st, prec: (bm, bn, w, st, prec),
    "stages1": lambda bm, bn, w, st, prec: (bm, bn, w, 1, prec),
    "warps4": lambda bm, bn, w, st, prec: (bm, bn, 4, st, prec),
    "ieee": lambda bm, bn, w, st, prec: (bm, bn, w, st, "ieee"),
    "tf32": lambda bm, bn, w, st, prec: (bm, bn, w, st, "tf32"),
    "small": lambda bm, bn, w, st, prec: (32, 16, 4, 1, prec),
}
OK_REL = 1e-4


def _reference(q, k, v, tq, tk, tv, do, kpm, scale):
    """float64: O, LSE (log2 units), the output tangent, and (dq, dk, dv) for cotangent do."""
    import torch

    def attn(q, k, v):
        s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
        if kpm is not None:
            s = s.masked_fill(~kpm[:, None, None, :], float("-inf"))
        return torch.einsum("bhqk,bkhd->bqhd", torch.softmax(s, -1), v), s

    q, k, v, tq, tk, tv, do = (t.double() for t in (q, k, v, tq, tk, tv, do))
    (o, s), (to, _) = torch.func.jvp(attn, (q, k, v), (tq, tk, tv))
    lse = torch.logsumexp(s, -1) / torch.log(torch.tensor(2.0, dtype=torch.float64))
    qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
    grads = torch.autograd.grad(attn(qq, kk, vv)[0], (qq, kk, vv), do)
    return o, lse, to, grads


def one(kind: str, variant: str, D: int, dtype_name: str, device: str = "cuda") -> dict:
    import torch
    sys.path.insert(0, ROOT)
    import fmrt.kernels.attention as KA
    real = KA._config

    def config(q, k_):
        bm, bn, bd, w, st, f32, prec = real(q, k_)
        name = variant if k_ == kind else "small"
        bm, bn, w, st, prec = VARIANTS[name](bm, bn, w, st, prec)
        return bm, bn, bd, w, st, f32, prec

    KA._config = config
    dtype = getattr(torch, dtype_name)
    rec = dict(kind=kind, variant=variant, D=D, dtype=dtype_name, cases=[])
    g = torch.Generator(device=device).manual_seed(0)
    for S_q, S_k, padded in ((300, 300, False), (257, 131, True)):
        B, H = 2, 3
        rnd = lambda *shape: torch.randn(*shape, generator=g, device=device).to(dtype)  # noqa
        q, tq, do = rnd(B, S_q, H, D), rnd(B, S_q, H, D), rnd(B, S_q, H, D)
        k, v, tk, tv = (rnd(B, S_k, H, D) for _ in range(4))
        kpm = None
        if padded:
            kpm = torch.ones(B, S_k, dtype=torch.bool, device=device)
            kpm[1, S_k // 2:] = False
        scale = D ** -0.5
        o_r, lse_r, to_r, g_r = _reference(q, k, v, tq, tk, tv, do, kpm, scale)
        o_in = o_r.to(dtype).contiguous()
        lse_in = lse_r.float().contiguous()
        t0 = time.time()
        if kind == "fwd":
            o, _, lse = KA.attention_fwd(q, k, v, scale, kpm)
            got, want = {"o": o, "lse": lse}, {"o": o_r, "lse": lse_r}
        elif kind == "jvp":
            o, to, _ = KA.attention_fwd(q, k, v, scale, kpm, tangents=(tq, tk, tv))
            got, want = {"o": o, "to": to}, {"o": o_r, "to": to_r}
        elif kind == "tangent":
            to = KA.attention_tangent(q, k, v, o_in, lse_in, (tq, tk, tv), scale, kpm)
            got, want = {"to": to}, {"to": to_r}
        else:
            dq, dk, dv = KA.attention_bwd(do, q, k, v, o_in, lse_in, scale, kpm)
            got = {"dq": dq} if kind == "dq" else {"dk": dk, "dv": dv}
            want = {"dq": g_r[0]} if kind == "dq" else {"dk": g_r[1], "dv": g_r[2]}
        if device == "cuda":
            torch.cuda.synchronize()
        errs = {n: ((got[n].double() - want[n]).norm() / want[n].norm()).item() for n in got}
        rec["cases"].append(dict(S_q=S_q, S_k=S_k, padded=padded, rel_err=errs,
                                 seconds=round(time.time() - t0, 1)))
    worst = max(e for c in rec["cases"] for e in c["rel_err"].values())
    rec["status"] = "ok" if worst < OK_REL else "inaccurate"
    rec["worst_rel_err"] = worst
    return rec


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--D", type=int, default=128)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--json", default=None)
    ap.add_argument("-j", type=int, default=10, help="processes at a time")
    ap.add_argument("--timeout", type=float, default=150.0, help="seconds per process")
    ap.add_argument("--device", default="cuda", help="cpu: a dry run under TRITON_INTERPRET=1")
    ap.add_argument("--one", nargs=2, metavar=("KIND", "VARIANT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        print("RESULT " + json.dumps(one(*args.one, args.D, args.dtype, args.device)), flush=True)
        return 0

    def job(kv):
        kind, variant = kv
        env = dict(os.environ, CUDA_LAUNCH_BLOCKING="1")
        cmd = [sys.executable, os.path.abspath(__file__), "--one", kind, variant,
               "--D", str(args.D), "--dtype", args.dtype, "--device", args.device]
        t0 = time.time()
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, env=env,
                               timeout=args.timeout)
        except subprocess.TimeoutExpired:
            return dict(kind=kind, variant=variant, status="timeout")
        for line in p.stdout.splitlines():
            if line.startswith("RESULT "):
                return json.loads(line[7:])
        err = (p.stderr.strip().splitlines() or ["?"])
        illegal = "illegal memory access" in p.stderr
        return dict(kind=kind, variant=variant, status="illegal" if illegal else "error",
                    error=" | ".join(err[-3:])[-400:], seconds=round(time.time() - t0, 1))

    jobs = [(k, v) for k in KINDS for v in VARIANTS]
    with ThreadPoolExecutor(args.j) as pool:
        results = []
        for r in pool.map(job, jobs):
            results.append(r)
            print(f"{r['kind']:8} {r['variant']:8} {r['status']:10} "
                  f"{r.get('worst_rel_err', r.get('error', ''))}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(D=args.D, dtype=args.dtype, results=results), f, indent=1)
    print("\n| kind | " + " | ".join(VARIANTS) + " |\n|---|" + "---|" * len(VARIANTS))
    for k in KINDS:
        row = {r["variant"]: r for r in results if r["kind"] == k}
        cells = [row[v]["status"] + (f" {row[v]['worst_rel_err']:.1e}" if "worst_rel_err"
                                     in row[v] else "") for v in VARIANTS]
        print(f"| {k} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
