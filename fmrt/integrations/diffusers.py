"""fmrt attention for diffusers' Wan transformer (diffusers >= 0.35, `WanAttention`).

    from fmrt.integrations.diffusers import accelerate_wan, restore_wan
    n = accelerate_wan(pipe)    # or pipe.transformer; Wan2.2's transformer_2 too
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
It hands to diffusers' `WanAttnProcessor` only what it cannot compute: an attention mask,
context parallelism (self-attention), float64 activations, a rotary table that is not one
`[S, D]` table for all batch items, an I2V context of 512 tokens or fewer, a context given
together with a rotary table or to a fused self-attention module, a module it does not support.
`fmrt_calls` / `fallback_calls` on each processor count its eager calls of each kind.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from fmrt import ops
from fmrt.attention import BACKENDS, attention, backend_available

from diffusers.models.transformers.transformer_wan import (WanAttention, WanAttnProcessor,
                                                           WanTransformer3DModel)

__all__ = ["FmrtWanAttnProcessor", "accelerate_wan", "restore_wan"]

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


def _unsupported(attn: Any) -> Optional[str]:
    """What in `attn` FmrtWanAttnProcessor cannot compute exactly (a phrase), or None."""
    if not isinstance(attn, WanAttention):
        return f"is {type(attn).__name__}, not a diffusers WanAttention"
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

    def __init__(self, backend: str = "auto"):
        _check_backend(backend)
        self.backend = backend
        self.fmrt_calls = 0
        self.fallback_calls = 0
        self._fallback = WanAttnProcessor()

    unsupported = staticmethod(_unsupported)

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
        if (attention_mask is not None or hidden_states.dtype not in ops.FLOAT_DTYPES
                or _unsupported(attn) is not None
                or (is_self and self._parallel_config is not None)
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
        return self._compute(attn, hidden_states, context, image, rope)

    def _fall_back(self, *args) -> Tensor:
        if not torch.compiler.is_compiling():
            self.fallback_calls += 1
        fb = self._fallback
        fb._attention_backend, fb._parallel_config = self._attention_backend, self._parallel_config
        return fb(*args)

    def _compute(self, attn: WanAttention, x: Tensor, context: Optional[Tensor],
                 image: Optional[Tensor], rope: Optional[tuple[Tensor, Tensor]]) -> Tensor:
        """x `[B, S, C]`, context `[B, L, C]` or None (self-attention), image `[B, L_img, C]` or
        None, rope (cos, sin) `[S, D/2]` or None -> `[B, S, C]`."""
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
        out = attention(q, k, _heads(v, H), backend=self.backend).flatten(2, 3).type_as(q)
        if image is not None:
            if fused:
                k_img, v_img = attn.to_added_kv(image).chunk(2, dim=-1)
            else:
                k_img, v_img = attn.add_k_proj(image), attn.add_v_proj(image)
            k_img = _heads(attn.norm_added_k(k_img), H)
            out_img = attention(q, k_img, _heads(v_img, H), backend=self.backend)
            out = out + out_img.flatten(2, 3).type_as(q)
        return attn.to_out[1](attn.to_out[0](out))


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


def accelerate_wan(model: Any, *, backend: str = "auto") -> int:
    """Set `FmrtWanAttnProcessor(backend)` on every `WanAttention` of `model`: a diffusers
    `WanTransformer3DModel`, or a pipeline with `.transformer` (and optional `.transformer_2`).
    Every module is checked first; ValueError naming the modules and what is unsupported, with
    nothing patched, if one cannot be computed exactly. Returns how many modules were set."""
    _check_backend(backend)
    modules = _wan_attention_modules(model)
    problems = [f"{name}: {p}" for name, m in modules if (p := _unsupported(m)) is not None]
    if problems:
        raise ValueError("accelerate_wan: unsupported attention modules (nothing patched): "
                         + "; ".join(problems))
    for _, m in modules:
        _swap(m, FmrtWanAttnProcessor(backend))
    return len(modules)


def restore_wan(model: Any) -> int:
    """Put diffusers' `WanAttnProcessor` back on every `WanAttention` of `model` (as for
    `accelerate_wan`) that runs `FmrtWanAttnProcessor`; returns how many were restored."""
    n = 0
    for _, m in _wan_attention_modules(model):
        if isinstance(m.processor, FmrtWanAttnProcessor):
            _swap(m, WanAttnProcessor())
            n += 1
    return n
