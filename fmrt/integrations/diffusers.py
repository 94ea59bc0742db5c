"""fmrt for diffusers users (diffusers >= 0.35): attention processors for the Wan transformer and
a fused, sync-free `FlowMatchEulerDiscreteScheduler`.

    from fmrt.integrations.diffusers import FlowMatchEulerDiscreteScheduler, accelerate_wan
    n = accelerate_wan(pipe)    # or pipe.transformer; Wan2.2's transformer_2 too
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    restore_wan(pipe)           # back to diffusers' WanAttnProcessor

`accelerate_wan` sets `FmrtWanAttnProcessor` on every `WanAttention` after checking that each one
is a configuration the processor computes exactly (q/k norms: `torch.nn.RMSNorm` over
heads*head_dim, Wan's "rms_norm_across_heads", with one explicit eps); otherwise it raises and
patches nothing. The processor computes
- self-attention with Wan's rotary table: `fmrt.ops.qk_norm_rope` (q/k RMSNorm + interleaved
  RoPE in one op), then `fmrt.attention.attention`;
- self-attention without a rotary table, and cross-attention (k/v from the text context): q/k
  through the module's own RMSNorms, then `fmrt.attention.attention`;
- the I2V image branch (`add_k_proj`): the context split as diffusers does (image tokens first,
  the last 512 text), image keys through `norm_added_k`, a second attention, summed.
Under diffusers' context parallelism (`enable_parallelism(config=ContextParallelConfig(
ulysses_degree=N))`) self-attention runs fmrt's path on the local tokens with Ulysses
all-to-alls over diffusers' Ulysses group (`fmrt.parallel`) when the config is pure Ulysses
(ring_degree 1, no ulysses_anything) and N divides the heads.
It hands to diffusers' `WanAttnProcessor` only what it cannot compute: an attention mask,
other context parallelism (Ring, USP, uneven shards), float64 activations, a rotary table that is not one
`[S, D]` table for all batch items, an I2V context of 512 tokens or fewer, a context given
together with a rotary table or to a fused self-attention module, a module it does not support.
`fmrt_calls` / `fallback_calls` on each processor count its eager calls of each kind.
"""
from __future__ import annotations

import contextlib
import functools
import numbers
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import Tensor

from fmrt import ops
from fmrt.attention import BACKENDS, attention, backend_available

from diffusers.models.transformers.transformer_wan import (WanAttention, WanAttnProcessor,
                                                           WanTransformer3DModel)
from diffusers.schedulers.scheduling_utils import SchedulerMixin as _SchedulerMixin
from diffusers.schedulers.scheduling_flow_match_euler_discrete import (
    FlowMatchEulerDiscreteScheduler as _DiffusersFlowMatchEuler,
    FlowMatchEulerDiscreteSchedulerOutput,
)

__all__ = ["FmrtWanAttnProcessor", "accelerate", "restore", "accelerate_wan", "restore_wan",
           "FlowMatchEulerDiscreteScheduler", "FlowMatchEulerDiscreteSchedulerOutput",
           "qwen_image_true_cfg_loop", "ltx_cfg_loop", "hunyuan_video_true_cfg_loop",
           "flux_true_cfg_loop"]

# diffusers' WanAttnProcessor: in an I2V context the last 512 tokens are text, the rest image.
WAN_TEXT_LEN = 512


def _norm_problem(name: str, norm: Any, inner_dim: int) -> Optional[str]:
    """Why `norm` is not an RMSNorm over `inner_dim` (heads*head_dim) with an eps, else None."""
    if type(norm) is not torch.nn.RMSNorm:
        return f"{name} is {type(norm).__name__}, not a torch.nn.RMSNorm over heads*head_dim"
    if tuple(norm.normalized_shape) != (inner_dim,):
        return (f"{name} normalises over {tuple(norm.normalized_shape)}, not across heads "
                f"({inner_dim},)")
    if norm.eps is None:
        return f"{name} has eps=None (dtype-dependent eps)"
    if norm._forward_hooks or norm._forward_pre_hooks or "forward" in vars(norm):
        return f"{name} has forward hooks or a replaced forward"
    return None


def _unsupported(attn: Any, cls: type = WanAttention) -> Optional[str]:
    """What in `attn` FmrtWanAttnProcessor cannot compute exactly (a phrase), or None. cls: the
    attention class (WanAttention, or SkyReels-V2's copy of it)."""
    if not isinstance(attn, cls):
        return f"is {type(attn).__name__}, not a diffusers {cls.__name__}"
    inner = attn.inner_dim
    if attn.heads <= 0 or inner % attn.heads:
        return f"inner dim {inner} does not split into {attn.heads} heads"
    if attn.kv_inner_dim != inner:
        return f"key/value inner dim {attn.kv_inner_dim} != query inner dim {inner}"
    if not attn.is_cross_attention and (inner // attn.heads) % 2:
        return f"head dim {inner // attn.heads} is odd (the rotary rotates pairs)"
    for name in ("norm_q", "norm_k"):
        problem = _norm_problem(name, getattr(attn, name, None), inner)
        if problem:
            return problem
    if attn.norm_q.eps != attn.norm_k.eps:
        return f"norm_q eps {attn.norm_q.eps} != norm_k eps {attn.norm_k.eps}"
    if attn.add_k_proj is not None and (attn.add_v_proj is None
                                        or getattr(attn, "norm_added_k", None) is None):
        return "has add_k_proj but no add_v_proj / norm_added_k"
    return None


def _check_backend(backend: Any) -> None:
    """ValueError unless `backend` is an fmrt attention backend that can run here."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if not backend_available(backend):
        raise ValueError(f"attention backend {backend!r} is not installed here (see "
                         f"fmrt.attention); use backend='auto'")


def _rotary_table(rotary_emb: tuple[Tensor, Tensor], S: int, D: int
                  ) -> Optional[tuple[Tensor, Tensor]]:
    """diffusers' (cos, sin) `[1, S, 1, D]` -> the `[S, D/2]` columns its rotation reads (cos at
    even, sin at odd positions), or None when the table has another shape."""
    freqs_cos, freqs_sin = rotary_emb
    if tuple(freqs_cos.shape) != (1, S, 1, D) or tuple(freqs_sin.shape) != (1, S, 1, D):
        return None
    return freqs_cos[0, :, 0, 0::2], freqs_sin[0, :, 0, 1::2]


def _heads(x: Tensor, heads: int) -> Tensor:
    """`[B, S, H*D]` -> `[B, S, H, D]`."""
    return x.unflatten(2, (heads, -1))


class FmrtWanAttnProcessor:
    """Attention processor for diffusers' `WanAttention` (same call as `WanAttnProcessor`):
    fmrt's fused q/k RMSNorm + RoPE and `fmrt.attention.attention(backend=backend)`.

    `fmrt_calls` / `fallback_calls` count eager calls that ran fmrt's path / diffusers'
    `WanAttnProcessor` (not counted while torch.compile traces)."""

    _attention_backend = None  # diffusers' set_attention_backend / enable_parallelism set these;
    _parallel_config = None    # both are forwarded to the fallback
    _attention_cls: type = WanAttention  # the module class and diffusers' processor for it
    _stock: type = WanAttnProcessor      # (SkyReels-V2's subclass sets its copies)

    def __init__(self, backend: str = "auto"):
        _check_backend(backend)
        self.backend = backend
        self.fmrt_calls = 0
        self.fallback_calls = 0
        self._fallback = self._stock()

    @classmethod
    def unsupported(cls, attn: Any) -> Optional[str]:
        """What in `attn` this processor cannot compute exactly (a phrase), or None."""
        return _unsupported(attn, cls._attention_cls)

    def __call__(self, attn: WanAttention, hidden_states: Tensor,
                 encoder_hidden_states: Optional[Tensor] = None,
                 attention_mask: Optional[Tensor] = None,
                 rotary_emb: Optional[tuple[Tensor, Tensor]] = None) -> Tensor:
        """hidden_states `[B, S, C]`; encoder_hidden_states `[B, L, C]` (cross-attention; I2V:
        image tokens then 512 text tokens); rotary_emb (cos, sin) `[1, S, 1, D]` as
        `WanRotaryPosEmbed` returns them -> `[B, S, C]`."""
        args = (attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        is_self = encoder_hidden_states is None
        fused = getattr(attn, "fused_projections", False)
        sp = _ulysses(self._parallel_config, attn.heads) if is_self else None
        if (attention_mask is not None or hidden_states.dtype not in ops.FLOAT_DTYPES
                or self.unsupported(attn) is not None
                or (is_self and self._parallel_config is not None and sp is None)
                or (not is_self and (rotary_emb is not None
                                     or (fused and not attn.is_cross_attention)))):
            return self._fall_back(*args)
        rope = None
        if rotary_emb is not None:
            rope = _rotary_table(rotary_emb, hidden_states.shape[1], attn.inner_dim // attn.heads)
            if rope is None:
                return self._fall_back(*args)
        context, image = encoder_hidden_states, None
        if attn.add_k_proj is not None:
            if context is None or context.shape[1] <= WAN_TEXT_LEN:
                return self._fall_back(*args)
            n_img = context.shape[1] - WAN_TEXT_LEN
            image, context = context[:, :n_img], context[:, n_img:]
        if not torch.compiler.is_compiling():
            self.fmrt_calls += 1
        return self._compute(attn, hidden_states, context, image, rope, sp)

    def _fall_back(self, *args) -> Tensor:
        if not torch.compiler.is_compiling():
            self.fallback_calls += 1
        fb = self._fallback
        fb._attention_backend, fb._parallel_config = self._attention_backend, self._parallel_config
        return fb(*args)

    def _compute(self, attn: WanAttention, x: Tensor, context: Optional[Tensor],
                 image: Optional[Tensor], rope: Optional[tuple[Tensor, Tensor]],
                 sp=None) -> Tensor:
        """x `[B, S, C]`, context `[B, L, C]` or None (self-attention), image `[B, L_img, C]` or
        None, rope (cos, sin) `[S, D/2]` or None -> `[B, S, C]`. sp: a
        `fmrt.parallel.SequenceParallel` (x, rope: this rank's equal share of the tokens)."""
        H = attn.heads
        fused = getattr(attn, "fused_projections", False)
        if fused and not attn.is_cross_attention:  # (the caller sends no context here)
            q, k, v = attn.to_qkv(x).chunk(3, dim=-1)
        else:
            src = x if context is None else context
            q = attn.to_q(x)
            k, v = attn.to_kv(src).chunk(2, dim=-1) if fused else (attn.to_k(src), attn.to_v(src))
        if rope is not None:
            q, k = ops.qk_norm_rope(_heads(q, H), _heads(k, H), attn.norm_q.weight,
                                    attn.norm_k.weight, rope[0], rope[1],
                                    eps=float(attn.norm_q.eps), norm="across_heads")
        else:
            q, k = _heads(attn.norm_q(q), H), _heads(attn.norm_k(k), H)
        if sp is None:
            out = attention(q, k, _heads(v, H), backend=self.backend)
        else:
            out = sp.attention(q, k, _heads(v, H), sp.size * x.shape[1],
                               functools.partial(attention, backend=self.backend))
        out = out.flatten(2, 3).type_as(q)
        if image is not None:
            if fused:
                k_img, v_img = attn.to_added_kv(image).chunk(2, dim=-1)
            else:
                k_img, v_img = attn.add_k_proj(image), attn.add_v_proj(image)
            k_img = _heads(attn.norm_added_k(k_img), H)
            out_img = attention(q, k_img, _heads(v_img, H), backend=self.backend)
            out = out + out_img.flatten(2, 3).type_as(q)
        return attn.to_out[1](attn.to_out[0](out))


def _ulysses(config: Any, heads: int):
    """A `fmrt.parallel.SequenceParallel` over diffusers' Ulysses group when `config` (a
    diffusers ParallelConfig) is pure Ulysses with equal shards and a degree dividing `heads`;
    None otherwise (diffusers' processor then runs the call)."""
    cp = getattr(config, "context_parallel_config", None)
    mesh = getattr(cp, "_ulysses_mesh", None)
    if (mesh is None or getattr(cp, "ring_degree", None) != 1
            or getattr(cp, "ulysses_anything", True) or not cp.ulysses_degree > 1
            or heads % cp.ulysses_degree):
        return None
    from fmrt.parallel import SequenceParallel
    return SequenceParallel.of(mesh.get_group())


def _transformers(model: Any) -> list[tuple[str, WanTransformer3DModel]]:
    """The Wan transformers in `model` (itself, or a pipeline's `.transformer` and
    `.transformer_2`) with their names; ValueError for anything else."""
    if isinstance(model, WanTransformer3DModel):
        found = [("", model)]
    elif isinstance(model, torch.nn.Module) or not hasattr(model, "transformer"):
        raise ValueError(f"expected a diffusers WanTransformer3DModel or a pipeline with a "
                         f".transformer that is one, got {type(model).__name__}")
    else:
        found = [(name + ".", getattr(model, name)) for name in ("transformer", "transformer_2")
                 if getattr(model, name, None) is not None]
        if not found:
            raise ValueError("the pipeline's .transformer and .transformer_2 are None: no "
                             "WanTransformer3DModel to patch")
    for name, t in found:
        label = name[:-1] or "model"
        if not isinstance(t, WanTransformer3DModel):
            raise ValueError(f"{label} is {type(t).__name__}, not a diffusers "
                             f"WanTransformer3DModel (only Wan transformers are supported)")
        tp = getattr(getattr(t, "_parallel_config", None), "tensor_parallel_config", None)
        if tp is not None:
            raise ValueError(f"{label} uses tensor parallelism, which accelerate_wan does not "
                             f"support")
    return found


def _wan_attention_modules(model: Any) -> list[tuple[str, WanAttention]]:
    return [(prefix + name, m) for prefix, t in _transformers(model)
            for name, m in t.named_modules() if isinstance(m, WanAttention)]


def _swap(module: WanAttention, processor: Any) -> None:
    """Set `processor`, carrying over diffusers' attention backend and parallel config."""
    old = module.processor
    processor._attention_backend = getattr(old, "_attention_backend", None)
    processor._parallel_config = getattr(old, "_parallel_config", None)
    module.set_processor(processor)


def accelerate_wan(model: Any, *, backend: str = "auto", guidance_reuse=None,
                   guidance_interval: Optional[tuple[float, float]] = None, cache=None,
                   attention: bool = True) -> int:
    """Set `FmrtWanAttnProcessor(backend)` on every `WanAttention` of `model`: a diffusers
    `WanTransformer3DModel`, or a pipeline with `.transformer` (and optional `.transformer_2`).
    Every module is checked first; ValueError naming the modules and what is unsupported, with
    nothing patched, if one cannot be computed exactly. Returns how many modules were set.

    Fewer evaluations (a pipeline that calls its transformer under `cache_context("cond")` then
    `("uncond")` per step, as `WanPipeline` does), see `WanStepRunner`:
    guidance_reuse (`fmrt.guidance.GuidanceReuse` / `AdaptiveGuidanceReuse`): the "uncond" call
    runs only on refresh steps; guidance_interval=(lo, hi): no "uncond" call where sigma lies
    outside [lo, hi]; cache (`fmrt.cache.FirstBlockCache` / `MagCache`): step caching of the
    transformer blocks with separate cond / uncond state. attention=False keeps diffusers'
    attention processors (only the evaluation policies are installed)."""
    _check_backend(backend)
    modules = _wan_attention_modules(model)
    problems = [f"{name}: {p}" for name, m in modules if (p := _unsupported(m)) is not None]
    if problems:
        raise ValueError("accelerate_wan: unsupported attention modules (nothing patched): "
                         + "; ".join(problems))
    policies = guidance_reuse is not None or guidance_interval is not None or cache is not None
    if policies:
        runner = WanStepRunner(model, guidance_reuse=guidance_reuse,
                               guidance_interval=guidance_interval, cache=cache)
    if not attention:
        modules = []
    for _, m in modules:
        _swap(m, FmrtWanAttnProcessor(backend))
    if policies:
        runner.install()
    return len(modules)


def restore_wan(model: Any) -> int:
    """Put diffusers' `WanAttnProcessor` back on every `WanAttention` of `model` (as for
    `accelerate_wan`) that runs `FmrtWanAttnProcessor`, and remove the evaluation policies of
    `accelerate_wan(..., guidance_reuse=, guidance_interval=, cache=)`; returns how many
    attention modules were restored."""
    for _, t in _transformers(model):
        runner = t.__dict__.get("_fmrt_runner")
        if runner is not None:
            runner.uninstall()
    n = 0
    for _, m in _wan_attention_modules(model):
        if isinstance(m.processor, FmrtWanAttnProcessor):
            _swap(m, WanAttnProcessor())
            n += 1
    return n


def accelerate(model: Any, *, backend: str = "auto") -> int:
    """fmrt's attention processor (`backend` for attention) on every attention module of
    `model`: a supported diffusers transformer or a pipeline with `.transformer` (and optional
    `.transformer_2`). Supported: Wan (WanTransformer3DModel, WanVACETransformer3DModel),
    SkyReelsV2Transformer3DModel, FluxTransformer2DModel, Flux2Transformer2DModel,
    QwenImageTransformer2DModel, HunyuanVideoTransformer3DModel, LTXVideoTransformer3DModel
    (the processors and the table of families are in `fmrt.integrations.diffusers_models`).
    Every module is checked first; ValueError naming the modules and what cannot be computed
    exactly, with nothing patched. Returns how many modules were set."""
    from fmrt.integrations import diffusers_models as M
    _check_backend(backend)
    modules = M.attention_modules(model)
    problems = M.problems(modules)
    if problems:
        raise ValueError("accelerate: unsupported attention modules (nothing patched): "
                         + "; ".join(problems))
    for _, m, patch in modules:
        _swap(m, patch.fmrt(backend))
    return len(modules)


def restore(model: Any) -> int:
    """diffusers' processor back on every module of `model` (as for `accelerate`) that runs
    fmrt's; returns how many were restored."""
    from fmrt.integrations import diffusers_models as M
    n = 0
    for _, m, patch in M.attention_modules(model):
        if isinstance(m.processor, patch.fmrt):
            _swap(m, patch.stock())
            n += 1
    return n


# ---------------------------------------------------------------------------------------------
# fewer evaluations for WanPipeline: guidance reuse, guidance interval, step caching
# ---------------------------------------------------------------------------------------------

class WanStepRunner:
    """Evaluation policies for a pipeline that calls its Wan transformer(s) twice per step,
    under `cache_context("cond", step_index=i, ...)` then `cache_context("uncond", ...)`, and
    combines `uncond + s * (cond - uncond)` (diffusers' `WanPipeline` as it is).

    Installed by `accelerate_wan`: each transformer's `cache_context` and `forward` are wrapped
    (instance attributes; `uninstall` / `restore_wan` remove them). At step 0 of a run the plan
    is made (`fmrt.sampling.make_plan`, with the pipeline scheduler's sigmas when an interval is
    given). An "uncond" call the plan does not run returns, without running the transformer,
    `c - d` (reuse: d = the last measured cond - uncond, so the pipeline's combine gives
    `c + (s - 1) d`) or `c` (outside the interval: the combine gives c). Adaptive reuse
    refreshes when `||c - c_ref|| / ||c_ref||` or the last refresh's `||d - d_prev|| / ||d||`
    exceeds the tolerance (one scalar read per step), or after `max_reuse` reuses.
    Step caching runs the block list through a `fmrt.cache.BranchCache` per context name:
    block 0's forward runs the whole stack (cached or not), the other blocks pass through.
    `calls` counts the transformer forwards that really ran, per context name."""

    def __init__(self, model: Any, *, guidance_reuse=None, guidance_interval=None, cache=None):
        from fmrt.cache import check_policy
        from fmrt.guidance import AdaptiveGuidanceReuse, GuidanceReuse, check_interval
        if guidance_reuse is not None and not isinstance(
                guidance_reuse, (GuidanceReuse, AdaptiveGuidanceReuse)):
            raise TypeError(f"guidance_reuse must be None, GuidanceReuse or "
                            f"AdaptiveGuidanceReuse, got {type(guidance_reuse).__name__}")
        self.interval = check_interval(guidance_interval)
        check_policy(cache)
        self.transformers = [t for _, t in _transformers(model)]
        for t in self.transformers:
            if "_fmrt_runner" in t.__dict__:
                raise ValueError("accelerate_wan: evaluation policies are already installed "
                                 "(restore_wan first)")
        self.scheduler = getattr(model, "scheduler", None)
        if self.interval is not None and self.scheduler is None:
            raise ValueError("guidance_interval needs the pipeline (its scheduler's sigmas), "
                             "not a bare transformer")
        self.reuse, self.cache = guidance_reuse, cache
        self.plan = None
        self.calls: dict[str, int] = {}
        self._ctx: Optional[tuple[str, dict]] = None
        self._reset()

    def _reset(self) -> None:
        self.d = self.d_moved = self.c = self.c_ref = self.owner = None
        self.reused = 0
        self.states: dict = {}

    # -- install ---------------------------------------------------------------------------
    def install(self) -> None:
        for t in self.transformers:
            t._fmrt_runner = self
            t.cache_context = functools.partial(self._cache_context, t,
                                                type(t).cache_context.__get__(t))
            t.forward = functools.partial(self._forward, t, type(t).forward.__get__(t))
            if self.cache is not None:
                blocks = list(t.blocks)
                blocks[0].forward = functools.partial(self._run_blocks, t, blocks)
                for b in blocks[1:]:
                    b.forward = _pass_through

    def uninstall(self) -> None:
        for t in self.transformers:
            for name in ("_fmrt_runner", "cache_context", "forward"):
                t.__dict__.pop(name, None)
            for b in t.blocks:
                b.__dict__.pop("forward", None)

    # -- the wrapped methods ----------------------------------------------------------------
    @contextlib.contextmanager
    def _cache_context(self, t, orig, name: str, **kwargs):
        self._ctx = (name, kwargs)
        try:
            with orig(name, **kwargs):
                yield
        finally:
            self._ctx = None

    def _step(self, name: str, kwargs: dict, t) -> int:
        i = kwargs.get("step_index")
        if i is None:
            raise ValueError("accelerate_wan's evaluation policies need cache_context(name, "
                             "step_index=i, ...) around every transformer call (WanPipeline)")
        if name == "cond" and i == 0:
            self._start(kwargs, t)
        if self.plan is None:
            raise ValueError("accelerate_wan: a run must start with the 'cond' call of step 0")
        if i >= len(self.plan):
            raise ValueError(f"step_index {i} past the plan's {len(self.plan)} steps")
        return i

    def _start(self, kwargs: dict, t) -> None:
        from fmrt.sampling import make_plan
        n = kwargs.get("num_inference_steps")
        if n is None:
            raise ValueError("cache_context needs num_inference_steps")
        sig = None
        if self.interval is not None:
            sig = [float(s) for s in self.scheduler.sigmas[:n]]   # one host read per run
        self.plan = make_plan(int(n), sig, guidance_interval=self.interval,
                              guidance_reuse=self.reuse, cache=self.cache)
        self._reset()
        self.calls = {}

    def _run_real(self, t, orig, name, args, kwargs):
        self.calls[name] = self.calls.get(name, 0) + 1
        return orig(*args, **kwargs)

    def _forward(self, t, orig, *args, **kwargs):
        if self._ctx is None:
            if self.cache is not None:
                raise ValueError("accelerate_wan(cache=...): call the transformer under "
                                 "cache_context(name, step_index=...)")
            return orig(*args, **kwargs)
        name, ctx = self._ctx
        i = self._step(name, ctx, t)
        branch = self.plan.branches[i]
        self._mode = self.plan.blocks[i][0 if name != "uncond" else 1]
        if name != "uncond":
            out = self._run_real(t, orig, name, args, kwargs)
            self.c = out[0] if isinstance(out, tuple) else out.sample
            return out
        if self.c is None:
            raise ValueError("accelerate_wan: the 'uncond' call must follow the 'cond' call")
        c = self.c
        if branch == "cond":
            fake = c
        elif self._refresh(branch, c, t):
            out = self._run_real(t, orig, name, args, kwargs)
            u = out[0] if isinstance(out, tuple) else out.sample
            d = c.float() - u.float()
            if self.d is not None and self.owner is t and isinstance(
                    self.reuse, _adaptive_type()):
                rel = (d - self.d).norm() / d.norm().clamp_min(1e-12)
                self.d_moved = float(rel) > self.reuse.tol   # one scalar read
            else:
                self.d_moved = True
            self.d, self.c_ref, self.owner, self.reused = d, c, t, 0
            return out
        else:
            self.reused += 1
            fake = (c.float() - self.d).to(c.dtype)
        if kwargs.get("return_dict", True):
            from diffusers.models.modeling_outputs import Transformer2DModelOutput
            return Transformer2DModelOutput(sample=fake)
        return (fake,)

    def _refresh(self, branch: str, c: Tensor, t) -> bool:
        """Run the uncond forward at this step?"""
        if branch == "cfg" or self.d is None or self.owner is not t:
            return True
        if branch == "reuse":
            return False
        if self.reused >= self.reuse.max_reuse or self.d_moved:
            return True
        rel = (c.float() - self.c_ref.float()).norm() / self.c_ref.float().norm().clamp_min(1e-12)
        return float(rel) > self.reuse.tol   # one scalar read per adaptive step

    def _run_blocks(self, t, blocks, hidden_states, *args, **kwargs):
        from fmrt.cache import BranchCache
        name = self._ctx[0] if self._ctx is not None else None
        if name is None:
            raise ValueError("accelerate_wan(cache=...): call the transformer under "
                             "cache_context(name, step_index=...)")
        st = self.states.get(name)
        if st is None:
            st = self.states[name] = BranchCache(self.cache)
        st.mode, st.step = self._mode, self._ctx[1].get("step_index")
        return st.run(blocks, hidden_states,
                      lambda b, h: type(b).forward(b, h, *args, **kwargs))


def _pass_through(hidden_states, *args, **kwargs):
    """A later block while block 0 runs the whole (cached) stack."""
    return hidden_states


def _adaptive_type():
    from fmrt.guidance import AdaptiveGuidanceReuse
    return AdaptiveGuidanceReuse


# ---------------------------------------------------------------------------------------------
# FlowMatchEulerDiscreteScheduler: diffusers' scheduler with a fused, sync-free step
# ---------------------------------------------------------------------------------------------

_INTEGER_TIMESTEP_MSG = (
    "Passing integer indices (e.g. from `enumerate(timesteps)`) as timesteps to"
    " `FlowMatchEulerDiscreteScheduler.step()` is not supported. Make sure to pass"
    " one of the `scheduler.timesteps` as a timestep.")


# Folders saved before fmrt recorded "diffusers" name this module as the scheduler's library:
# diffusers then needs `SchedulerMixin` here to find the loading method (in a process that has
# imported this module), and loads fmrt's scheduler from them.
SchedulerMixin = _SchedulerMixin


def _check_scheduler_config(config) -> None:
    """Reject the diffusers options fmrt's fused step cannot reproduce."""
    if config.stochastic_sampling:
        raise ValueError(
            "fmrt's FlowMatchEulerDiscreteScheduler does not support stochastic_sampling=True "
            "(diffusers re-noises x0 with torch-generator noise inside step); use diffusers' "
            "own scheduler for it, or fmrt.ops.sde_step for seeded in-kernel noise")


class FlowMatchEulerDiscreteScheduler(_DiffusersFlowMatchEuler):
    """diffusers' `FlowMatchEulerDiscreteScheduler` with a fused step and no host sync.

        from fmrt.integrations.diffusers import FlowMatchEulerDiscreteScheduler
        pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)

    Everything but the stepping is diffusers' own (inherited): `from_config`, `config`,
    `save_config`, `set_timesteps` (shift, dynamic shifting with `mu`, `sigmas=`,
    `timesteps=`, shift_terminal, karras / exponential / beta sigmas, invert_sigmas,
    time_shift_type), `timesteps`, `sigmas`, `order`, `set_begin_index`.

    `step` and `scale_noise` give diffusers' results without reading a tensor back to the
    host: the first step's timestep -> index lookup (diffusers: `nonzero()` + `.item()`) is a
    nearest-timestep argmin on the device kept as a 0-d index tensor (of repeated timesteps the
    second, as diffusers does), `sigma` and `sigma_next` are gathered on the device, and the
    step is one kernel (`fmrt.ops.euler_step`; `step_cfg`: `fmrt.ops.guided_euler_step`).
    `begin_index` (set by img2img pipelines) skips the lookup. Reading `step_index` after a
    device-side lookup syncs once. Tables are copied once per `set_timesteps` to the sample's
    device when `set_timesteps` put them elsewhere (the copy is keyed on the `sigmas` and
    `timesteps` tensors themselves, so a new schedule is picked up whichever way it is set).

    Numerics: `step` is diffusers' arithmetic bit for bit (`sample.float() + dt *
    model_output` with torch's promotion: dt and the product rounded to the model dtype, the
    sum to `model_output`'s dtype; `ops.euler_step(..., eager_rounding=True)`). `step_cfg` with
    a float scale and no rescale is the pipeline's eager combine + `step` bit for bit.
    `scale_noise` is diffusers' rounding too (bit for bit, in diffusers' result dtype).
    `step` with `per_token_timesteps` (LTXConditionPipeline) is diffusers' per-token step, on
    the device. A looked-up timestep that is not on the schedule raises where that needs no
    sync (see `_check_on_schedule`); a `shift_terminal` schedule that diffusers turns into NaN
    raises in set_timesteps. Saved in a pipeline, this scheduler is recorded as diffusers' own
    (`SAVED_LIBRARY`): the folder loads with stock diffusers.
    Unsupported (ValueError): `stochastic_sampling=True`, more than one timestep per step.
    """

    # What a pipeline's `model_index.json` records for this component. diffusers reads the
    # component's `__module__` (`pipeline_loading_utils._fetch_class_library_tuple`): a class
    # outside diffusers / transformers is recorded under its full module path, and loading then
    # looks the base classes (`SchedulerMixin`, ...) up as attributes of that module and refuses
    # a module the process has not imported itself. An instance naming "diffusers" is saved as
    # diffusers' own `FlowMatchEulerDiscreteScheduler`: the same config, the same steps, a
    # folder that stock diffusers loads anywhere.
    SAVED_LIBRARY = "diffusers"

    @functools.wraps(_DiffusersFlowMatchEuler.__init__)
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _check_scheduler_config(self.config)
        self._tables: Optional[tuple] = None
        self.__module__ = self.SAVED_LIBRARY   # the instance's, for save_pretrained (above)

    def stretch_shift_to_terminal(self, t):
        """diffusers' stretch to `shift_terminal`, refusing a schedule it turns into NaN (a last
        sigma of 1, e.g. one step): diffusers' first step then raises (its timestep lookup
        finds no NaN), or, from a begin_index, returns NaN latents. Checked on the host array
        set_timesteps builds (no sync)."""
        with np.errstate(divide="ignore", invalid="ignore"):
            out = super().stretch_shift_to_terminal(t)
        if isinstance(out, np.ndarray) and not np.isfinite(out).all():
            raise ValueError(
                f"shift_terminal={self.config.shift_terminal} stretches this schedule to NaN: "
                f"its last sigma before the stretch is {float(t[-1])!r} (1 - sigma is the "
                f"divisor); use more inference steps or sigmas ending below 1")
        return out

    # --- step index: an int, or a 0-d int64 device tensor after a device-side lookup ----------

    @property
    def step_index(self) -> Optional[int]:
        """The index of the next step (diffusers' semantics); one sync if it is still on the
        device (then cached as an int)."""
        if isinstance(self._step_index, Tensor):
            self._step_index = int(self._step_index)
        return self._step_index

    def _device_tables(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """(sigmas, timesteps) as float32 on `device`, copied once per set_timesteps."""
        cached = self._tables
        if (cached is not None and cached[0] is self.sigmas and cached[1] is self.timesteps
                and cached[2] == device):
            return cached[3], cached[4]
        sig = self.sigmas.to(device=device, dtype=torch.float32)
        ts = self.timesteps.to(device=device, dtype=torch.float32)
        self._tables = (self.sigmas, self.timesteps, device, sig, ts)
        return sig, ts

    def _lookup(self, timestep: Union[float, Tensor], device: torch.device) -> Tensor:
        """Grid index of each element of `timestep` (int64, its shape, on `device`): the nearest
        schedule timestep (argmin on the device), the second one where it is repeated (as
        diffusers' `index_for_timestep`)."""
        _, ts = self._device_tables(device)
        if isinstance(timestep, Tensor):
            t = timestep.to(device=device, dtype=torch.float32, non_blocking=True)
        else:
            t = torch.full((), float(timestep), dtype=torch.float32, device=device)
        dist = (ts - t.unsqueeze(-1)).abs()
        nearest = dist == dist.amin(-1, keepdim=True)
        want = nearest.sum(-1, keepdim=True).clamp(max=2)
        return (nearest.cumsum(-1) >= want).to(torch.int32).argmax(-1)

    def _check_on_schedule(self, timestep: Union[float, Tensor]) -> None:
        """diffusers raises (an IndexError from its empty `nonzero()` match) when a looked-up
        timestep is not one of `timesteps`; fmrt raises a ValueError where the check reads no
        device memory: a float or a CPU tensor against `timesteps` on the CPU, compared as
        diffusers compares them (in float32). Pipelines pass elements of `timesteps` itself;
        a timestep or a schedule on an accelerator is looked up unchecked (the nearest
        entry): checking would read it back to the host."""
        ts = self.timesteps
        if ts.device.type != "cpu" or (isinstance(timestep, Tensor)
                                       and timestep.device.type != "cpu"):
            return
        if isinstance(timestep, Tensor):
            values = timestep.detach().to(torch.float32).reshape(-1).numpy()
        else:
            values = np.float32([timestep])
        grid = ts.detach().to(torch.float32).numpy()
        missing = [float(v) for v in values if not (grid == v).any()]
        if missing:
            raise ValueError(f"timestep {missing[0]!r} is not one of scheduler.timesteps: pass "
                             f"an element of scheduler.timesteps, or set_begin_index first")

    def _first_index(self, timestep: Union[float, Tensor], device: torch.device):
        """The first step's index: begin_index, else the device-side lookup (0-d tensor)."""
        if self.begin_index is None:
            self._check_on_schedule(timestep)
            return self._lookup(timestep, device).reshape(())
        return self._begin_index

    def _init_step_index(self, timestep: Union[float, Tensor],
                         device: Optional[torch.device] = None) -> None:
        self._step_index = self._first_index(
            timestep, device if device is not None else self.timesteps.device)

    def _step_sigmas(self, timestep, sample: Tensor):
        """(sigma, sigma_next, index) of this step: 0-d float32 tensors on sample's device and
        the step index (int or 0-d device tensor); `_finish` advances it once the step ran."""
        if isinstance(timestep, numbers.Integral) or (
                isinstance(timestep, Tensor) and not timestep.is_floating_point()):
            raise ValueError(_INTEGER_TIMESTEP_MSG)
        if not isinstance(timestep, (numbers.Real, Tensor)):
            raise TypeError(f"timestep must be a float or a floating-point tensor, got "
                            f"{type(timestep).__name__}")
        if isinstance(timestep, Tensor) and timestep.numel() != 1:
            raise ValueError(f"timestep must be one of scheduler.timesteps (one value per step), "
                             f"got a tensor of shape {tuple(timestep.shape)}")
        if self.config.stochastic_sampling:
            _check_scheduler_config(self.config)
        sigmas, _ = self._device_tables(sample.device)
        idx = self._step_index
        if idx is None:
            idx = self._first_index(timestep, sample.device)
        if isinstance(idx, Tensor):
            pair = sigmas.take(torch.stack((idx, idx + 1)))
            return pair[0], pair[1], idx
        if not 0 <= idx < sigmas.shape[0] - 1:
            raise IndexError(f"step index {idx} is past the end of the {sigmas.shape[0] - 1}-step "
                             f"schedule: call set_timesteps before a new loop")
        return sigmas[idx], sigmas[idx + 1], idx

    def _finish(self, prev_sample: Tensor, index, return_dict: bool):
        self._step_index = index + 1
        if not return_dict:
            return (prev_sample,)
        return FlowMatchEulerDiscreteSchedulerOutput(prev_sample=prev_sample)

    # --- diffusers API ------------------------------------------------------------------------

    def step(self, model_output: Tensor, timestep: Union[float, Tensor], sample: Tensor,
             s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = float("inf"),
             s_noise: float = 1.0, generator: Optional[torch.Generator] = None,
             per_token_timesteps: Optional[Tensor] = None, return_dict: bool = True
             ) -> Union[FlowMatchEulerDiscreteSchedulerOutput, tuple]:
        """`sample + (sigma_next - sigma) * model_output` in model_output's dtype, rounded as
        diffusers rounds it, one fused kernel. model_output, sample: `[B, ...]` of one shape
        (dtypes may differ); timestep: one of `timesteps` (float or 1-element float tensor).
        s_churn, s_tmin, s_tmax, s_noise and generator are ignored, as in diffusers without
        stochastic sampling.

        per_token_timesteps (`[B, L]` for a `[B, L, C]` sample, LTXConditionPipeline): each
        token steps from its own sigma `t / num_train_timesteps` to the largest schedule sigma
        below it (by more than 1e-6; 0 where none), as diffusers does: `sample.float() + (sigma
        - sigma_next) * model_output` (note the sign: the pipeline passes `-v`), fp32, not cast
        back. The lookup runs on the device (torch ops, no host sync, not the fused kernel)."""
        ops.check_float_tensor("sample", sample)
        ops.check_float_tensor("model_output", model_output)
        ops.check_same("model_output", model_output, "sample", sample, dtype=False)
        if per_token_timesteps is not None:
            return self._per_token_step(model_output, timestep, sample, per_token_timesteps,
                                        return_dict)
        sigma, sigma_next, idx = self._step_sigmas(timestep, sample)
        prev = ops.euler_step(sample, model_output, sigma, sigma_next,
                              out_dtype=model_output.dtype, eager_rounding=True)
        return self._finish(prev, idx, return_dict)

    def _per_token_step(self, model_output: Tensor, timestep, sample: Tensor,
                        per_token_timesteps: Tensor, return_dict: bool):
        ops.check_float_tensor("per_token_timesteps", per_token_timesteps)
        if sample.ndim < 2 or tuple(per_token_timesteps.shape) != tuple(sample.shape[:-1]):
            raise ValueError(f"per_token_timesteps must have the sample's shape without its last "
                             f"dim {tuple(sample.shape[:-1])}, got "
                             f"{tuple(per_token_timesteps.shape)}")
        if per_token_timesteps.device != sample.device:
            raise ValueError(f"per_token_timesteps is on {per_token_timesteps.device} but sample "
                             f"is on {sample.device}")
        _, _, idx = self._step_sigmas(timestep, sample)   # the step index, as diffusers keeps it
        sigmas, _ = self._device_tables(sample.device)
        sigma = per_token_timesteps / self.config.num_train_timesteps
        grid = sigmas.view(-1, *([1] * sigma.ndim))
        sigma_next = torch.where(grid < sigma - 1e-6, grid, 0.0).amax(0)
        dt = (sigma - sigma_next).unsqueeze(-1)
        prev = sample.to(torch.float32) + dt * model_output
        return self._finish(prev, idx, return_dict)

    def step_cfg(self, v_cond: Tensor, v_uncond: Tensor, guidance_scale: Union[float, Tensor],
                 timestep: Union[float, Tensor], sample: Tensor, *, rescale: str = "none",
                 norm_dim: Optional[int] = None, return_dict: bool = True
                 ) -> Union[FlowMatchEulerDiscreteSchedulerOutput, tuple]:
        """Classifier-free guidance and the step in one kernel (`fmrt.ops.guided_euler_step`):
        `step(v_uncond + guidance_scale * (v_cond - v_uncond), timestep, sample)`. v_cond,
        v_uncond: the model's outputs (one dtype, the result's).

        With a float guidance_scale and no rescale this is a pipeline's eager loop bit for bit
        (the combine rounded op by op to the model dtype, as `v_uncond + s * (v_cond -
        v_uncond)` is in WanPipeline, then `step`; `eager_rounding=True`). A `[B]`
        guidance_scale, or rescale="norm" (true CFG `v *= ||v_cond|| / ||v||` per sample,
        norm_dim=None, or per token, norm_dim=-1 on packed `[B, L, C]`), keep the guided
        velocity in fp32 instead."""
        ops.check_float_tensor("sample", sample)
        ops.check_float_tensor("v_cond", v_cond)
        ops.check_same("v_cond", v_cond, "sample", sample, dtype=False)
        sigma, sigma_next, idx = self._step_sigmas(timestep, sample)
        eager = rescale == "none" and not isinstance(guidance_scale, Tensor)
        prev = ops.guided_euler_step(sample, v_cond, v_uncond, guidance_scale, sigma, sigma_next,
                                     rescale=rescale, norm_dim=norm_dim, out_dtype=v_cond.dtype,
                                     eager_rounding=eager)
        return self._finish(prev, idx, return_dict)

    def scale_noise(self, sample: Tensor, timestep: Union[float, Tensor],
                    noise: Optional[Tensor] = None) -> Tensor:
        """The forward process `sigma * noise + (1 - sigma) * sample` at the timestep's sigma
        (diffusers' index rules: the lookup without begin_index, else step_index or
        begin_index), rounded as diffusers rounds it (sigma in the sample's dtype, each torch op
        rounded: `ops.noised_sample(..., eager_rounding=True)`), so bit for bit diffusers'
        result, in its dtype: the promotion of sample's and noise's dtypes (a bf16 sample with
        fp32 noise gives fp32). timestep: 0-d, `[1]` or `[B]`; noise: sample's shape."""
        ops.check_float_tensor("sample", sample)
        ops.check_float_tensor("noise", noise)
        ops.check_same("noise", noise, "sample", sample, dtype=False)
        batch = sample.shape[0] if sample.ndim else 1
        if isinstance(timestep, Tensor) and timestep.ndim > 0 and (
                timestep.ndim > 1 or timestep.shape[0] not in (1, batch)):
            raise ValueError(f"timestep must be 0-d, [1] or [B={batch}], got shape "
                             f"{tuple(timestep.shape)}")
        sigmas, _ = self._device_tables(sample.device)
        if self.begin_index is None:
            self._check_on_schedule(timestep)
            idx = self._lookup(timestep, sample.device)
        elif self._step_index is not None:
            idx = self._step_index
        else:
            idx = self.begin_index
        sigma = sigmas.take(idx) if isinstance(idx, Tensor) else sigmas[idx]
        return ops.noised_sample(sample, sigma, noise, None, return_target=False,
                                 eager_rounding=True)[0]


# ---------------------------------------------------------------------------------------------
# Guided loops: a pipeline's CFG combine and Euler step as one fused step_cfg. Each is a loop of
# its own: the pipelines compute the combine between their transformer calls and
# scheduler.step, where neither the scheduler nor a wrapped transformer sees (cond, uncond, s).
# ---------------------------------------------------------------------------------------------

def _check_loop_pipe(pipe: Any, cls: type) -> None:
    """A guided loop's pipeline: exactly `cls` (ValueError; a subclass may change the loop) with
    fmrt's scheduler (TypeError)."""
    if type(pipe) is not cls:
        raise ValueError(f"pipe must be a diffusers {cls.__name__}, got {type(pipe).__name__}")
    if not isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler):
        raise TypeError(f"pipe.scheduler must be fmrt's FlowMatchEulerDiscreteScheduler "
                        f"(FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)), "
                        f"got {type(pipe.scheduler).__name__}")


def _refuse_pipeline_options(cls: type, fn: str, given: dict) -> None:
    """ValueError naming the first of `given` (keyword arguments of `cls.__call__` that `fn` does
    not take) set to anything but the pipeline's default; TypeError for a name the pipeline does
    not take either."""
    import inspect
    params = inspect.signature(cls.__call__).parameters
    for name, value in given.items():
        if name not in params or name == "self":
            raise TypeError(f"{fn}() got an unexpected keyword argument {name!r}")
        default = params[name].default
        if default is None:
            same = value is None
        else:
            try:
                same = not isinstance(value, Tensor) and bool(value == default)
            except (TypeError, ValueError, RuntimeError):   # an array: not the default
                same = False
        if not same:
            raise ValueError(f"{fn} does not support {name}= (call the pipeline for it)")


def _check_guidance(name: str, scale: Any, what: str, negative_prompt: Any = "") -> None:
    """ValueError unless `scale` is a number > 1 and (for true CFG) a negative prompt is given:
    otherwise the pipeline runs no guidance for the loop to fuse."""
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not scale > 1:
        raise ValueError(f"{name} must be a number > 1 ({what}), got {scale!r}: without it call "
                         f"the pipeline")
    if negative_prompt is None:
        raise ValueError("negative_prompt is None: without one the pipeline runs no true CFG")


def _shifted_timesteps(pipe: Any, calculate_shift, retrieve_timesteps, seq_len: int,
                       num_inference_steps: int, device, sigmas: Any = "linear"):
    """The timesteps of the FLUX-family pipelines: `sigmas` ("linear": 1 .. 1/n; None: the
    scheduler's own) with the dynamic shift mu from the packed latent length, set on the
    scheduler."""
    cfg = pipe.scheduler.config
    if isinstance(sigmas, str):
        sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
    mu = calculate_shift(seq_len, cfg.get("base_image_seq_len", 256),
                         cfg.get("max_image_seq_len", 4096), cfg.get("base_shift", 0.5),
                         cfg.get("max_shift", 1.15))
    return retrieve_timesteps(pipe.scheduler, num_inference_steps, device, sigmas=sigmas,
                              mu=mu)[0]


def _guided_steps(pipe: Any, timesteps: Tensor, latents: Tensor, scale: float, velocities,
                  **step_kw) -> Tensor:
    """The denoising loop every guided loop shares: for each t, `velocities(t, latents)` gives
    (cond, uncond) from the pipeline's transformer call(s), and one fused
    `pipe.scheduler.step_cfg(cond, uncond, scale, t, latents, **step_kw)` replaces the
    pipeline's combine and step; the pipeline's progress bar and step state as it keeps them."""
    pipe._num_timesteps = len(timesteps)
    pipe.scheduler.set_begin_index(0)
    with pipe.progress_bar(total=len(timesteps)) as bar:
        for t in timesteps:
            pipe._current_timestep = t
            cond, uncond = velocities(t, latents)
            latents = pipe.scheduler.step_cfg(cond, uncond, float(scale), t, latents,
                                              return_dict=False, **step_kw)[0]
            bar.update()
    pipe._current_timestep = None
    return latents


# Qwen-Image's true CFG (with its per-token norm rescale)

@torch.no_grad()
def qwen_image_true_cfg_loop(pipe: Any, prompt: Union[str, list], *,
                             negative_prompt: Union[str, list] = " ",
                             true_cfg_scale: float = 4.0, height: Optional[int] = None,
                             width: Optional[int] = None, num_inference_steps: int = 50,
                             num_images_per_prompt: int = 1, generator=None,
                             output_type: str = "pil", max_sequence_length: int = 512):
    """diffusers' `QwenImagePipeline.__call__` (text-to-image with true CFG; diffusers 0.42's
    loop) with each step's guidance, norm rescale and Euler step as one
    `pipe.scheduler.step_cfg(cond, neg, true_cfg_scale, t, latents, rescale="norm",
    norm_dim=-1)` of fmrt's `FlowMatchEulerDiscreteScheduler`, where the pipeline computes
    `comb = neg + s (cond - neg)`, `comb * ||cond|| / ||comb||` per token and `scheduler.step`
    op by op between its two transformer calls and the step. Prompt encoding, latents,
    timesteps (dynamic shift), the two transformer calls (under `cache_context("cond")` /
    `("uncond")`) and decoding are the pipeline's own methods and arithmetic. Returns
    `QwenImagePipelineOutput` as the pipeline does. Same images as `pipe(prompt,
    negative_prompt=..., true_cfg_scale=..., ...)`: fp32 to 2e-5; in bf16 the guided velocity
    stays fp32 where the pipeline rounds each op, within bf16 error.

    ValueError: not exactly a `QwenImagePipeline` (a subclass may change the loop), a
    guidance-distilled transformer, true_cfg_scale <= 1 or no negative prompt (no true CFG:
    call the pipeline); TypeError: `pipe.scheduler` is not fmrt's scheduler."""
    from diffusers import QwenImagePipeline
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import (calculate_shift,
                                                                  retrieve_timesteps)
    from diffusers.pipelines.qwenimage.pipeline_output import QwenImagePipelineOutput
    _check_loop_pipe(pipe, QwenImagePipeline)
    if pipe.transformer.config.guidance_embeds:
        raise ValueError("a guidance-distilled Qwen-Image transformer (guidance_embeds): call "
                         "the pipeline")
    _check_guidance("true_cfg_scale", true_cfg_scale, "true CFG", negative_prompt)
    height = height or pipe.default_sample_size * pipe.vae_scale_factor
    width = width or pipe.default_sample_size * pipe.vae_scale_factor
    pipe.check_inputs(prompt, height, width, negative_prompt=negative_prompt,
                      max_sequence_length=max_sequence_length)
    batch = 1 if isinstance(prompt, str) else len(prompt)
    device = pipe._execution_device
    pipe._attention_kwargs, pipe._current_timestep, pipe._interrupt = {}, None, False
    pipe._guidance_scale = None
    enc = dict(device=device, num_images_per_prompt=num_images_per_prompt,
               max_sequence_length=max_sequence_length)
    cond_emb, cond_mask = pipe.encode_prompt(prompt=prompt, **enc)
    neg_emb, neg_mask = pipe.encode_prompt(prompt=negative_prompt, **enc)
    latents = pipe.prepare_latents(batch * num_images_per_prompt,
                                   pipe.transformer.config.in_channels // 4, height, width,
                                   cond_emb.dtype, device, generator, None)
    f = pipe.vae_scale_factor * 2
    img_shapes = [[(1, height // f, width // f)]] * batch
    timesteps = _shifted_timesteps(pipe, calculate_shift, retrieve_timesteps, latents.shape[1],
                                   num_inference_steps, device)
    branches = (("cond", cond_emb, cond_mask), ("uncond", neg_emb, neg_mask))

    def velocities(t, latents):
        timestep = t.expand(latents.shape[0]).to(latents.dtype) / 1000
        v = []
        for name, emb, mask in branches:
            with pipe.transformer.cache_context(name):
                v.append(pipe.transformer(
                    hidden_states=latents, timestep=timestep, guidance=None,
                    encoder_hidden_states_mask=mask, encoder_hidden_states=emb,
                    img_shapes=img_shapes, attention_kwargs={}, return_dict=False)[0])
        return v

    latents = _guided_steps(pipe, timesteps, latents, true_cfg_scale, velocities,
                            rescale="norm", norm_dim=-1)
    if output_type == "latent":
        image = latents
    else:
        image = _qwen_image_decode(pipe, latents, height, width, output_type)
    pipe.maybe_free_model_hooks()
    return QwenImagePipelineOutput(images=image)


def _qwen_image_decode(pipe: Any, latents: Tensor, height: int, width: int, output_type: str):
    """Packed latents -> images as `QwenImagePipeline.__call__` decodes them (unpack, the VAE's
    latents mean / std, decode, postprocess)."""
    vae = pipe.vae
    z = pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor).to(vae.dtype)
    shape = (1, vae.config.z_dim, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean).view(shape).to(z.device, z.dtype)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(shape).to(z.device, z.dtype)
    z = z / inv_std + mean
    image = vae.decode(z, return_dict=False)[0][:, :, 0]
    return pipe.image_processor.postprocess(image, output_type=output_type)


# LTX-Video's batched CFG

@torch.no_grad()
def ltx_cfg_loop(pipe: Any, prompt: Union[str, list], *,
                 negative_prompt: Optional[Union[str, list]] = None, guidance_scale: float = 3.0,
                 guidance_rescale: float = 0.0, height: int = 512, width: int = 704,
                 num_frames: int = 161, frame_rate: int = 25, num_inference_steps: int = 50,
                 num_videos_per_prompt: int = 1, generator=None,
                 decode_timestep: Union[float, list] = 0.0,
                 decode_noise_scale: Optional[Union[float, list]] = None,
                 output_type: str = "pil", max_sequence_length: int = 128, **pipeline_options):
    """diffusers' `LTXPipeline.__call__` (text-to-video with CFG on; diffusers 0.42's loop) with
    each step's guidance and Euler step as one `pipe.scheduler.step_cfg(text, uncond,
    guidance_scale, t, latents)` of fmrt's `FlowMatchEulerDiscreteScheduler` on the batched
    transformer call's `noise_pred.float().chunk(2)`, where the pipeline computes `uncond + g
    (text - uncond)` in fp32 and then `scheduler.step`. Prompt encoding (negative first),
    latents (fp32, packed), timesteps (dynamic shift `mu` from the latent video length), the
    one transformer call per step on `[uncond; cond]` (under `cache_context("cond_uncond")`,
    with `rope_interpolation_scale` from frame_rate) and decoding (unpack, denormalize, the
    VAE's timestep conditioning with decode_timestep / decode_noise_scale) are the pipeline's
    own methods and arithmetic. Returns `LTXPipelineOutput` as the pipeline does. Same frames
    as `pipe(prompt, negative_prompt=..., guidance_scale=..., ...)` to 2e-5 in fp32; in bf16
    too, since the pipeline combines and steps in fp32 whatever the model dtype.

    ValueError: not exactly an `LTXPipeline` (a subclass may change the loop), guidance_scale
    <= 1 (no CFG: call the pipeline), guidance_rescale > 0 (its std rescale is not fused), any
    other `LTXPipeline.__call__` argument set (precomputed latents or embeddings, timesteps,
    callbacks, attention_kwargs, return_dict=False); TypeError: `pipe.scheduler` is not fmrt's
    scheduler."""
    from diffusers import LTXPipeline
    from diffusers.pipelines.ltx.pipeline_ltx import calculate_shift, retrieve_timesteps
    from diffusers.pipelines.ltx.pipeline_output import LTXPipelineOutput
    _check_loop_pipe(pipe, LTXPipeline)
    _check_guidance("guidance_scale", guidance_scale, "CFG on")
    if not guidance_rescale == 0:
        raise ValueError(f"guidance_rescale={guidance_rescale!r}: the std rescale of the guided "
                         f"velocity is not fused (call the pipeline)")
    _refuse_pipeline_options(LTXPipeline, "ltx_cfg_loop", pipeline_options)
    pipe.check_inputs(prompt=prompt, height=height, width=width)
    batch = 1 if isinstance(prompt, str) else len(prompt)
    device = pipe._execution_device
    pipe._guidance_scale, pipe._guidance_rescale = guidance_scale, 0.0
    pipe._attention_kwargs, pipe._current_timestep, pipe._interrupt = None, None, False
    cond, cond_mask, neg, neg_mask = pipe.encode_prompt(
        prompt=prompt, negative_prompt=negative_prompt, do_classifier_free_guidance=True,
        num_videos_per_prompt=num_videos_per_prompt, max_sequence_length=max_sequence_length,
        device=device)
    emb, mask = torch.cat([neg, cond]), torch.cat([neg_mask, cond_mask])
    latents = pipe.prepare_latents(batch * num_videos_per_prompt,
                                   pipe.transformer.config.in_channels, height, width,
                                   num_frames, torch.float32, device, generator, None)
    spatial, temporal = pipe.vae_spatial_compression_ratio, pipe.vae_temporal_compression_ratio
    grid = ((num_frames - 1) // temporal + 1, height // spatial, width // spatial)  # F, H, W
    timesteps = _shifted_timesteps(pipe, calculate_shift, retrieve_timesteps,
                                   grid[0] * grid[1] * grid[2], num_inference_steps, device)
    rope_interpolation_scale = (temporal / frame_rate, spatial, spatial)

    def velocities(t, latents):
        x = torch.cat([latents] * 2).to(emb.dtype)
        with pipe.transformer.cache_context("cond_uncond"):
            v = pipe.transformer(
                hidden_states=x, encoder_hidden_states=emb, timestep=t.expand(x.shape[0]),
                encoder_attention_mask=mask, num_frames=grid[0], height=grid[1],
                width=grid[2], rope_interpolation_scale=rope_interpolation_scale,
                attention_kwargs=None, return_dict=False)[0]
        uncond, text = v.float().chunk(2)
        return text, uncond

    latents = _guided_steps(pipe, timesteps, latents, guidance_scale, velocities)
    if output_type == "latent":
        video = latents
    else:
        video = _ltx_decode(pipe, latents, grid, emb.dtype, batch, generator, decode_timestep,
                            decode_noise_scale, output_type)
    pipe.maybe_free_model_hooks()
    return LTXPipelineOutput(frames=video)


def _ltx_decode(pipe: Any, latents: Tensor, grid: tuple, dtype: torch.dtype, batch: int,
                generator, decode_timestep, decode_noise_scale, output_type: str):
    """Packed latents -> video as `LTXPipeline.__call__` decodes them: unpack, denormalize, cast
    to the text embeddings' dtype; with a timestep-conditioned VAE, noise (from `generator`,
    after the initial latents) mixed in by decode_noise_scale (default decode_timestep), one
    value per prompt, and decode_timestep handed to the decoder; postprocess."""
    from diffusers.utils.torch_utils import randn_tensor
    vae = pipe.vae
    z = pipe._unpack_latents(latents, *grid, pipe.transformer_spatial_patch_size,
                             pipe.transformer_temporal_patch_size)
    z = pipe._denormalize_latents(z, vae.latents_mean, vae.latents_std,
                                  vae.config.scaling_factor).to(dtype)
    timestep = None
    if vae.config.timestep_conditioning:
        noise = randn_tensor(z.shape, generator=generator, device=z.device, dtype=z.dtype)
        if not isinstance(decode_timestep, list):
            decode_timestep = [decode_timestep] * batch
        if decode_noise_scale is None:
            decode_noise_scale = decode_timestep
        elif not isinstance(decode_noise_scale, list):
            decode_noise_scale = [decode_noise_scale] * batch
        timestep = torch.tensor(decode_timestep, device=z.device, dtype=z.dtype)
        scale = torch.tensor(decode_noise_scale, device=z.device,
                             dtype=z.dtype)[:, None, None, None, None]
        z = (1 - scale) * z + scale * noise
    video = vae.decode(z.to(vae.dtype), timestep, return_dict=False)[0]
    return pipe.video_processor.postprocess_video(video, output_type=output_type)


# HunyuanVideo's optional true CFG

@torch.no_grad()
def hunyuan_video_true_cfg_loop(pipe: Any, prompt: Union[str, list], *,
                                negative_prompt: Optional[Union[str, list]] = None,
                                true_cfg_scale: float, prompt_2: Optional[Union[str, list]] = None,
                                negative_prompt_2: Optional[Union[str, list]] = None,
                                guidance_scale: float = 6.0, height: int = 720, width: int = 1280,
                                num_frames: int = 129, num_inference_steps: int = 50,
                                sigmas: Optional[list] = None, num_videos_per_prompt: int = 1,
                                generator=None, output_type: str = "pil",
                                prompt_template: Optional[dict] = None,
                                max_sequence_length: int = 256, **pipeline_options):
    """diffusers' `HunyuanVideoPipeline.__call__` with its optional true CFG on (`true_cfg_scale
    > 1` and a negative prompt; diffusers 0.42's loop) and each step's `neg + s (cond - neg)`
    and Euler step as one `pipe.scheduler.step_cfg(cond, neg, true_cfg_scale, t, latents)` of
    fmrt's `FlowMatchEulerDiscreteScheduler`. Both transformer calls (under
    `cache_context("cond")` / `("uncond")`) keep the distilled guidance embedding
    (`guidance_scale * 1000`), as the pipeline's do. Prompt encoding (Llama + CLIP; the negative
    prompt through the same `encode_prompt`), timesteps (`sigmas`, default linear), latents
    (fp32 noise; after the first step in the model's dtype, as `step` returns them), the
    timestep in the latents' dtype and decoding (`/ scaling_factor`, decode, postprocess) are
    the pipeline's own methods and arithmetic. The combine is rounded op by op in the model's
    dtype as the pipeline's eager ops round it, so the frames are the pipeline's in fp32 (to
    2e-5) and bf16 alike. Returns `HunyuanVideoPipelineOutput`. prompt_template: None for the
    pipeline's default.

    ValueError: not exactly a `HunyuanVideoPipeline`, true_cfg_scale <= 1 or negative_prompt
    None (no true CFG: call the pipeline), any other `HunyuanVideoPipeline.__call__` argument
    set (precomputed latents or embeddings, callbacks, attention_kwargs, return_dict=False);
    TypeError: `pipe.scheduler` is not fmrt's scheduler."""
    from diffusers import HunyuanVideoPipeline
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import (
        DEFAULT_PROMPT_TEMPLATE, retrieve_timesteps)
    from diffusers.pipelines.hunyuan_video.pipeline_output import HunyuanVideoPipelineOutput
    _check_loop_pipe(pipe, HunyuanVideoPipeline)
    _check_guidance("true_cfg_scale", true_cfg_scale, "true CFG", negative_prompt)
    _refuse_pipeline_options(HunyuanVideoPipeline, "hunyuan_video_true_cfg_loop",
                             pipeline_options)
    template = DEFAULT_PROMPT_TEMPLATE if prompt_template is None else prompt_template
    pipe.check_inputs(prompt, prompt_2, height, width, prompt_template=template)
    batch = 1 if isinstance(prompt, str) else len(prompt)
    device = pipe._execution_device
    pipe._guidance_scale, pipe._attention_kwargs = guidance_scale, None
    pipe._current_timestep, pipe._interrupt = None, False
    dtype = pipe.transformer.dtype
    branches = []   # (name, embeddings, pooled, mask) in the model dtype
    for name, text, text_2 in (("cond", prompt, prompt_2),
                               ("uncond", negative_prompt, negative_prompt_2)):
        emb, pooled, mask = pipe.encode_prompt(
            prompt=text, prompt_2=text_2, prompt_template=template,
            num_videos_per_prompt=num_videos_per_prompt, device=device,
            max_sequence_length=max_sequence_length)
        branches.append((name, emb.to(dtype), pooled.to(dtype), mask.to(dtype)))
    if sigmas is None:
        sigmas = np.linspace(1.0, 0.0, num_inference_steps + 1)[:-1]
    timesteps, _ = retrieve_timesteps(pipe.scheduler, num_inference_steps, device,
                                      sigmas=sigmas)
    latents = pipe.prepare_latents(batch * num_videos_per_prompt,
                                   pipe.transformer.config.in_channels, height, width,
                                   num_frames, torch.float32, device, generator, None)
    guidance = torch.tensor([guidance_scale] * latents.shape[0], dtype=dtype,
                            device=device) * 1000.0

    def velocities(t, latents):
        x = latents.to(dtype)
        timestep = t.expand(latents.shape[0]).to(latents.dtype)
        v = []
        for name, emb, pooled, mask in branches:
            with pipe.transformer.cache_context(name):
                v.append(pipe.transformer(
                    hidden_states=x, timestep=timestep, encoder_hidden_states=emb,
                    encoder_attention_mask=mask, pooled_projections=pooled,
                    guidance=guidance, attention_kwargs=None, return_dict=False)[0])
        return v

    latents = _guided_steps(pipe, timesteps, latents, true_cfg_scale, velocities)
    if output_type == "latent":
        video = latents
    else:
        z = latents.to(pipe.vae.dtype) / pipe.vae.config.scaling_factor
        video = pipe.vae.decode(z, return_dict=False)[0]
        video = pipe.video_processor.postprocess_video(video, output_type=output_type)
    pipe.maybe_free_model_hooks()
    return HunyuanVideoPipelineOutput(frames=video)


# FLUX.1's optional true CFG

@torch.no_grad()
def flux_true_cfg_loop(pipe: Any, prompt: Union[str, list], *,
                       negative_prompt: Optional[Union[str, list]] = None, true_cfg_scale: float,
                       prompt_2: Optional[Union[str, list]] = None,
                       negative_prompt_2: Optional[Union[str, list]] = None,
                       height: Optional[int] = None, width: Optional[int] = None,
                       num_inference_steps: int = 28, sigmas: Optional[list] = None,
                       guidance_scale: float = 3.5, num_images_per_prompt: int = 1,
                       generator=None, output_type: str = "pil",
                       max_sequence_length: int = 512, **pipeline_options):
    """diffusers' `FluxPipeline.__call__` (text-to-image) with its optional true CFG on
    (`true_cfg_scale > 1` and a negative prompt; diffusers 0.42's loop) and each step's `neg +
    s (cond - neg)` and Euler step as one `pipe.scheduler.step_cfg(cond, neg, true_cfg_scale,
    t, latents)` of fmrt's `FlowMatchEulerDiscreteScheduler`. Both transformer calls (under
    `cache_context("cond")` / `("uncond")`) keep FLUX.1-dev's distilled guidance embedding
    (`guidance_scale`, fp32), as the pipeline's do. Prompt encoding (CLIP + T5; the negative
    prompt through the same `encode_prompt`), latents (packed, in the text embeddings' dtype),
    timesteps (`sigmas`, default linear; dynamic shift from the packed length), `timestep /
    1000` and decoding (unpack, `/ scaling_factor + shift_factor`, decode, postprocess) are the
    pipeline's own methods and arithmetic. The combine is rounded op by op in the model's dtype
    as the pipeline's eager ops round it, so the images are the pipeline's in fp32 (to 2e-5)
    and bf16 alike. Returns `FluxPipelineOutput`.

    ValueError: not exactly a `FluxPipeline`, true_cfg_scale <= 1 or negative_prompt None (no
    true CFG: call the pipeline), any other `FluxPipeline.__call__` argument set (precomputed
    latents or embeddings, IP-Adapter images, callbacks, joint_attention_kwargs,
    return_dict=False); TypeError: `pipe.scheduler` is not fmrt's scheduler."""
    from diffusers import FluxPipeline
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps
    from diffusers.pipelines.flux.pipeline_output import FluxPipelineOutput
    from diffusers.utils.torch_utils import get_module_execution_device
    _check_loop_pipe(pipe, FluxPipeline)
    _check_guidance("true_cfg_scale", true_cfg_scale, "true CFG", negative_prompt)
    _refuse_pipeline_options(FluxPipeline, "flux_true_cfg_loop", pipeline_options)
    height = height or pipe.default_sample_size * pipe.vae_scale_factor
    width = width or pipe.default_sample_size * pipe.vae_scale_factor
    pipe.check_inputs(prompt, prompt_2, height, width, negative_prompt=negative_prompt,
                      negative_prompt_2=negative_prompt_2,
                      max_sequence_length=max_sequence_length)
    batch = 1 if isinstance(prompt, str) else len(prompt)
    device = pipe._execution_device
    pipe._guidance_scale, pipe._joint_attention_kwargs = guidance_scale, {}
    pipe._current_timestep, pipe._interrupt = None, False
    branches = []   # (name, embeddings, pooled, text ids)
    for name, text, text_2 in (("cond", prompt, prompt_2),
                               ("uncond", negative_prompt, negative_prompt_2)):
        branches.append((name, *pipe.encode_prompt(
            prompt=text, prompt_2=text_2, device=device,
            num_images_per_prompt=num_images_per_prompt,
            max_sequence_length=max_sequence_length)))
    latents, image_ids = pipe.prepare_latents(batch * num_images_per_prompt,
                                              pipe.transformer.config.in_channels // 4, height,
                                              width, branches[0][1].dtype, device, generator)
    if sigmas is None:
        sigmas = "linear"
    if getattr(pipe.scheduler.config, "use_flow_sigmas", False):
        sigmas = None   # as FluxPipeline: the scheduler's flow sigmas
    timesteps = _shifted_timesteps(pipe, calculate_shift, retrieve_timesteps, latents.shape[1],
                                   num_inference_steps, device, sigmas)
    guidance = None
    if pipe.transformer.config.guidance_embeds:
        guidance = torch.full([1], guidance_scale, device=device,
                              dtype=torch.float32).expand(latents.shape[0])

    def velocities(t, latents):
        timestep = t.expand(latents.shape[0]).to(latents.dtype)
        v = []
        for name, emb, pooled, text_ids in branches:
            with pipe.transformer.cache_context(name):
                v.append(pipe.transformer(
                    hidden_states=latents, timestep=timestep / 1000, guidance=guidance,
                    pooled_projections=pooled, encoder_hidden_states=emb, txt_ids=text_ids,
                    img_ids=image_ids, joint_attention_kwargs={}, return_dict=False)[0])
        return v

    latents = _guided_steps(pipe, timesteps, latents, true_cfg_scale, velocities)
    if output_type == "latent":
        image = latents
    else:
        z = pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)
        z = z / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
        image = pipe.vae.decode(z.to(get_module_execution_device(pipe.vae)),
                                return_dict=False)[0]
        image = pipe.image_processor.postprocess(image, output_type=output_type)
    pipe.maybe_free_model_hooks()
    return FluxPipelineOutput(images=image)
