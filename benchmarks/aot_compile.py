"""Compile every Triton kernel launch the fused ops make, for an H100 (sm_90), without a GPU.

    python benchmarks/aot_compile.py [--arch 90] [--json PATH] [-k SUBSTRING]

The ops run on small CPU tensors under `fmrt.use_backend("triton")` with the interpreter off;
`JITFunction.run` is replaced by a recorder, and each distinct launch (kernel, argument types,
constexprs, num_warps / num_stages) is compiled with `triton.compile` for `GPUTarget("cuda",
arch)`, the way the launch would specialise on a GPU (16-byte aligned pointers, integers equal
to 1 or divisible by 16). The kernel modules are told to pick their GPU tile configurations.
For each compiled kernel the bundled `cuobjdump -res-usage` reports registers, stack and local
memory (spills); Triton's metadata the shared memory. Exit status 1 if any launch fails to
compile or needs more shared memory than the architecture has.

What this catches before a GPU session: kernels that the installed Triton (e.g. the GPU image's
3.6) cannot lower, register spills of the GPU tile configurations, shared memory over the
limit. What it cannot: anything about speed or numerics on the device.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # what the GPU runs use by default

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

PTR = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16",
       torch.int64: "*i64", torch.int32: "*i32", torch.uint8: "*u8", torch.int8: "*i8",
       torch.bool: "*i1"}
MAX_SHARED = {90: 232448, 100: 232448, 80: 166912}  # opt-in shared memory per block, bytes
SM_COUNT = 132                                       # H100 SXM and H200
LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg", "enable_fp_fusion")


def record_launches(fn) -> list[tuple]:
    """Run `fn()` with every JIT kernel launch recorded instead of run: [(kernel, args, kw)]."""
    calls = []
    real = JITFunction.run

    def fake_run(self, *args, grid, warmup, **kwargs):
        calls.append((self, args, kwargs))

    JITFunction.run = fake_run
    try:
        fn()
    finally:
        JITFunction.run = real
    return calls


def source(kernel: JITFunction, args: tuple, kwargs: dict):
    """(ASTSource, options, key) of one recorded launch, specialised as on a GPU."""
    names = kernel.arg_names
    bound = dict(zip(names, args))
    bound.update({k: v for k, v in kwargs.items() if k not in LAUNCH_OPTIONS})
    const_params = {p.name for p in kernel.params if p.is_constexpr}
    sig, const, attrs = {}, {}, {}
    for i, n in enumerate(names):
        v = bound.get(n)
        if n in const_params:
            sig[n], const[n] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            sig[n] = PTR[v.dtype]
            if v.data_ptr() % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, bool):
            sig[n] = "i1"
        elif isinstance(v, int):
            if v == 1:
                sig[n], const[n] = "constexpr", 1
            else:
                sig[n] = "i32" if -2**31 <= v < 2**31 else "i64"
                if v % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, float):
            sig[n] = "fp32"
        elif v is None:
            sig[n], const[n] = "constexpr", None
        else:
            raise TypeError(f"{kernel.__name__}: argument {n} of type {type(v).__name__}")
    opts = {k: kwargs[k] for k in LAUNCH_OPTIONS if k in kwargs}
    key = (kernel.__name__, tuple(sorted(sig.items())), tuple(sorted((k, repr(v)) for k, v in
                                                                      const.items())),
           tuple(sorted(attrs)), tuple(sorted(opts.items())))
    return ASTSource(fn=kernel, signature=sig, constexprs=const, attrs=attrs), opts, key


def cubin_usage(cubin: bytes) -> dict:
    """Registers, stack and local memory (register spills) of the kernel, from the bundled
    `cuobjdump -res-usage`."""
    import triton.backends.nvidia as nv
    tool = os.path.join(os.path.dirname(nv.__file__), "bin", "cuobjdump")
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "k.cubin")
        with open(p, "wb") as f:
            f.write(cubin)
        text = subprocess.run([tool, "-res-usage", p], capture_output=True, text=True).stdout

    def num(key):
        m = re.search(rf"\b{key}:(\d+)", text)
        return int(m.group(1)) if m else None
    return dict(registers=num("REG"), stack=num("STACK"), local=num("LOCAL"))


def _dtype_scenarios(dt: torch.dtype, run) -> list:
    from fmrt import ops
    d = str(dt).replace("torch.", "")
    x = torch.randn(2, 16, 3, 8, 16).to(dt)
    s = torch.tensor([0.3, 0.7])
    sn = torch.tensor([0.2, 0.6])
    v, u = torch.randn_like(x), torch.randn_like(x)
    tok = torch.randn(2, 64, 64).to(dt)
    frame_sigma = s.view(2, 1, 1, 1, 1) * torch.tensor([0.0, 1, 1]).view(1, 1, 3, 1, 1)
    mask = torch.ones(2, 1, 3, 1, 1)

    def loss(**kw):
        ops.flow_matching_loss(v.detach().requires_grad_(), x, seed=1, **kw).backward()

    def loss_b8():  # the finishing kernel's widest tile (8 x 512 partials): Wan-sized latents
        x8 = torch.zeros(8, 512 * 4 * 1024, dtype=dt)
        ops.flow_matching_loss(x8.requires_grad_(), x8.detach(), seed=1).backward()

    out = [
        (f"add_noise/{d}", run(lambda: ops.add_noise(x, s, seed=1))),
        (f"add_noise_frames/{d}", run(lambda: ops.add_noise(x, frame_sigma, seed=1))),
        (f"scale_noise_eager/{d}", run(lambda: ops.noised_sample(   # diffusers' scale_noise
            x, s, v.float(), None, return_target=False, eager_rounding=True))),
        (f"fm_loss/{d}", run(lambda: loss(weight=s))),
        (f"fm_loss_mask/{d}", run(lambda: loss(mask=mask))),
        (f"fm_loss_b8/{d}", run(loss_b8)),
        (f"euler_step/{d}", run(lambda: ops.euler_step(x, v, s, sn))),
        (f"euler_step_fp32_sample/{d}", run(lambda: ops.euler_step(   # diffusers' scheduler
            x.float(), v, s[0], sn[0], out_dtype=dt, eager_rounding=True))),
        (f"guided_step_fp32_sample/{d}", run(lambda: ops.guided_euler_step(
            x.float(), v, u, 5.0, s[0], sn[0], out_dtype=dt, eager_rounding=True))),
        (f"guided_step/{d}", run(lambda: ops.guided_euler_step(x, v, u, 5.0, s, sn))),
        (f"guided_step_norm/{d}", run(lambda: ops.guided_euler_step(
            x, v, u, 5.0, s, sn, rescale="norm"))),
        (f"guided_step_token_norm/{d}", run(lambda: ops.guided_euler_step(
            tok, tok, tok, 5.0, s, sn, rescale="norm", norm_dim=-1))),
        (f"guided_step_stats/{d}", run(lambda: ops.guided_euler_step(
            x, v, u, 5.0, s, sn, stats={}))),
        (f"cfg_combine/{d}", run(lambda: ops.cfg_combine(v, u, 5.0))),
        (f"sde_step_logp/{d}", run(lambda: ops.sde_step(x, v, s, sn, eta=0.7, seed=3,
                                                        return_log_prob=True))),
    ]
    for H, D in ((12, 128), (40, 128), (2, 64)):
        out.append((f"qk_norm_rope/H{H}xD{D}/{d}", run(_rope(dt, H, D))))
    for D in (64, 128):
        fwd_bwd, jvp, func_jvp = _flash(dt, D)
        out += [(f"flash_attention_fwd_bwd/D{D}/{d}", run(fwd_bwd)),
                (f"flash_attention_jvp/D{D}/{d}", run(jvp)),
                (f"flash_attention_func_jvp/D{D}/{d}", run(func_jvp))]
    return out


# Rows per tensor of the q/k-norm + RoPE scenarios: enough that every backward program loops
# over many rows (an integer argument equal to 1 would be specialised to a constant and the
# row loop compiled away, which is how its register cost went unseen before).
ROPE_S = 2048


def _rope(dt, H, D):
    from fmrt import ops
    q = torch.randn(1, ROPE_S, H, D).to(dt).requires_grad_()
    k = torch.randn(1, ROPE_S, H, D).to(dt).requires_grad_()
    wq, wk = torch.ones(H * D, requires_grad=True), torch.ones(H * D, requires_grad=True)
    cos, sin = torch.ones(ROPE_S, D // 2), torch.zeros(ROPE_S, D // 2)

    def f():
        a, b = ops.qk_norm_rope(q, k, wq, wk, cos, sin, norm="across_heads")
        (a.float().sum() + b.float().sum()).backward()
    return f


def _flash(dt, D):
    from fmrt import ops
    q, k, v = (torch.randn(1, 80, 2, D).to(dt).requires_grad_() for _ in range(3))
    tq, tk, tv = (torch.randn(1, 80, 2, D).to(dt) for _ in range(3))

    def fwd_bwd():
        ops.flash_attention(q, k, v).float().sum().backward()

    def jvp():
        ops.flash_attention_jvp(q.detach(), k.detach(), v.detach(), tq, tk, tv)

    def func_jvp():  # MeanFlow's path: the primal forward, then the tangent kernel from its LSE
        torch.func.jvp(lambda a, b, c: ops.flash_attention(a, b, c),
                       (q.detach(), k.detach(), v.detach()), (tq, tk, tv))
    return fwd_bwd, jvp, func_jvp


def scenarios():
    """(name, fn) pairs: each fn calls fmrt ops at the inner dimensions and dtypes of the
    benchmarks (small outer sizes: the tile choice depends on the inner ones)."""
    from fmrt import use_backend

    def run(f):
        def go():
            with use_backend("triton"):
                f()
        return go
    return [sc for dt in (torch.bfloat16, torch.float32) for sc in _dtype_scenarios(dt, run)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--json", default=None)
    ap.add_argument("-k", default="", help="only scenarios whose name contains this")
    args = ap.parse_args(argv)
    import fmrt.kernels.attention as KA
    import fmrt.kernels.loss as KL
    import fmrt.kernels.noise as KN
    import fmrt.kernels.rope as KR
    import fmrt.kernels.step as KS
    import fmrt._dispatch as dispatch
    dispatch.interpreter_enabled = lambda: True  # let the ops launch kernels on CPU tensors
    KA._interpreted = lambda t: False         # GPU tile configurations
    KR._sm_count = lambda index: SM_COUNT     # the q/k-norm backward's grid, as on an H100 / H200
    real_programs = KR._backward_programs
    KR._backward_programs = lambda n, dev, nw: real_programs(n, torch.device("cuda", 0), nw)
    for m in (KN, KL, KS):                     # fast hardware math, as on a GPU
        if hasattr(m, "fast_math"):
            m.fast_math = lambda t: True
    if hasattr(KL, "N"):
        KL.N.fast_math = lambda t: True
    target = GPUTarget("cuda", args.arch, 32)
    results, seen, failed = [], {}, 0
    for name, fn in scenarios():
        if args.k not in name:
            continue
        try:
            calls = record_launches(fn)
        except Exception as e:  # the op itself failed before or between launches
            results.append(dict(scenario=name, kernel="-", ok=False, error=f"op: {e!r}"[:500]))
            failed += 1
            print(f"FAILED {name:40} (the op, before compiling): {e!r}"[:600], flush=True)
            continue
        for kernel, a, kw in calls:
            src, opts, key = source(kernel, a, kw)
            if key in seen:
                continue
            t0 = time.time()
            try:
                ck = triton.compile(src, target=target, options=opts)
                rec = dict(ok=True, shared=ck.metadata.shared, **cubin_usage(ck.asm["cubin"]),
                           fma=len(re.findall(r"\bfma\.rn\.f32\b", ck.asm["ptx"])))
                if rec["shared"] > MAX_SHARED.get(args.arch, rec["shared"]):
                    rec.update(ok=False, error=f"needs {rec['shared']} bytes of shared memory, "
                                               f"sm_{args.arch} has {MAX_SHARED[args.arch]}")
                    failed += 1
            except Exception as e:
                rec = dict(ok=False, error=repr(e)[-800:])
                failed += 1
            rec.update(scenario=name, kernel=kernel.__name__, options=opts,
                       seconds=round(time.time() - t0, 1))
            seen[key] = rec
            results.append(rec)
            status = "ok" if rec["ok"] else "FAILED"
            print(f"{status:6} {name:36} {kernel.__name__:24} regs={rec.get('registers')} "
                  f"stack={rec.get('stack')} local={rec.get('local')} shared={rec.get('shared')} "
                  f"{opts} {rec['seconds']}s"
                  + ("" if rec["ok"] else f"\n       {rec['error']}"), flush=True)
    summary = dict(triton=triton.__version__, torch=torch.__version__, arch=args.arch,
                   compiled=len(seen), failed=failed,
                   spilling=sum(1 for r in results if (r.get("local") or r.get("stack") or 0) > 0))
    print(json.dumps(summary))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(summary, results=results), f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
