"""fmrt attention processors for diffusers' flow-matching DiTs beyond Wan, and the per-family table
that `fmrt.integrations.diffusers.accelerate` dispatches on (`FAMILIES`: model classes -> the
attention module classes patched, diffusers' processor for each, fmrt's).

Each processor has its diffusers twin's call signature, computes q/k RMSNorm + rotary in one
`fmrt.ops.qk_norm_rope` and attention with `fmrt.attention.attention`, and hands to the twin
(counted in `fallback_calls`) only what it cannot compute exactly: a mask it does not take,
context parallelism, float64 activations, norm weights of another dtype than the activations, a
rotary table of another shape, a module changed after patching. `fmrt_calls` counts the rest.

Rotary conventions, all expressed through the one interleaved-pairs op (no kernel change):
- FLUX.1 / FLUX.2 / HunyuanVideo (`FluxPosEmbed`, `Flux2PosEmbed`,
  `HunyuanVideoRotaryPosEmbed`): real cos/sin `[S, D]`, each angle repeated over the two
  members of its pair (`repeat_interleave_real=True`); diffusers' rotation reads cos[2i],
  cos[2i+1] (equal) and sin[2i], sin[2i+1] (equal), so the op's `[S, D/2]` tables are the even
  columns of cos and the odd of sin (the columns Wan's processor reads). `accelerate` checks
  that the model's rotary module is diffusers' own class, so the tables are built that way.
  FLUX: RoPE on the joint [text, image] sequence; text and image q/k have separate norm
  weights, so the op runs once per stream on its rows of the table. HunyuanVideo: RoPE on the
  image tokens only (text appended after them gets its RMSNorm alone).
- Qwen-Image (`QwenEmbedRope`): complex `[S, D/2]` tables multiplied into interleaved pairs
  viewed as complex numbers: cos = real part, sin = imaginary part, exactly; separate tables
  for text and image tokens.
- LTX-Video: RMSNorm across heads and RoPE over the flat inner dim C = H*D before the head
  split, i.e. the op on one "head" of width C; tables `[B, S, C]` per sample (op per sample).
- Wan / VACE / SkyReels-V2: `FmrtWanAttnProcessor` (fmrt/integrations/diffusers.py).
"""
from __future__ import annotations

from typing import Any, NamedTuple, Optional

import torch
from torch import Tensor

from fmrt import ops
from fmrt.attention import attention
from fmrt.integrations import diffusers as _wan

from diffusers.models.attention_processor import Attention
from diffusers.models.normalization import RMSNorm as DiffusersRMSNorm
from diffusers.models.transformers import transformer_flux as _flux
from diffusers.models.transformers import transformer_flux2 as _flux2
from diffusers.models.transformers import transformer_hunyuan_video as _hunyuan
from diffusers.models.transformers import transformer_ltx as _ltx
from diffusers.models.transformers import transformer_qwenimage as _qwen
from diffusers.models.transformers import transformer_skyreels_v2 as _sky
from diffusers.models.transformers import transformer_wan as _wanm
from diffusers.models.transformers import transformer_wan_vace as _vace

__all__ = ["FmrtFluxAttnProcessor", "FmrtFlux2AttnProcessor", "FmrtFlux2ParallelSelfAttnProcessor",
           "FmrtQwenDoubleStreamAttnProcessor", "FmrtSkyReelsV2AttnProcessor",
           "FmrtHunyuanVideoAttnProcessor", "FmrtLTXVideoAttnProcessor", "FAMILIES",
           "Family", "Patch", "family_of"]


def _plain(name: str, norm: Any) -> Optional[str]:
    """Why `norm` (a module) cannot be read as weight + eps: hooks or a replaced forward."""
    if norm._forward_hooks or norm._forward_pre_hooks or "forward" in vars(norm):
        return f"{name} has forward hooks or a replaced forward"
    return None


def _per_head_norm_problem(name: str, norm: Any, head_dim: int,
                           cls: type = torch.nn.RMSNorm) -> Optional[str]:
    """Why `norm` is not an RMSNorm of class `cls` over the head dim with an explicit eps and no
    bias, else None."""
    if type(norm) is not cls:
        return f"{name} is {type(norm).__name__}, not a {cls.__module__}.{cls.__name__}"
    shape = norm.normalized_shape if cls is torch.nn.RMSNorm else norm.dim
    if tuple(shape) != (head_dim,):
        return f"{name} normalises over {tuple(shape)}, not per head ({head_dim},)"
    if norm.eps is None:
        return f"{name} has eps=None (dtype-dependent eps)"
    if getattr(norm, "bias", None) is not None:
        return f"{name} has a bias"
    return _plain(name, norm)


def _norm_pair_problem(attn: Any, names: tuple[str, str], head_dim: int,
                       cls: type = torch.nn.RMSNorm) -> Optional[str]:
    for name in names:
        problem = _per_head_norm_problem(name, getattr(attn, name, None), head_dim, cls)
        if problem:
            return problem
    a, b = (getattr(attn, n) for n in names)
    if a.eps != b.eps:
        return f"{names[0]} eps {a.eps} != {names[1]} eps {b.eps}"
    return None


def _weights_match(x: Tensor, *norms: Any) -> bool:
    """Norm weights (where present) in x's dtype: the fused op rounds once, as diffusers does
    then; a mixed-dtype module (fp32 weights, bf16 activations) goes to diffusers."""
    return all(n.weight is None or n.weight.dtype == x.dtype for n in norms)


class _Counted:
    """`fmrt_calls` / `fallback_calls` (eager calls only, not while torch.compile traces) and the
    fallback to diffusers' processor, carrying diffusers' backend and parallel config."""

    _attention_backend = None  # diffusers' set_attention_backend / enable_parallelism set these;
    _parallel_config = None    # both are forwarded to the fallback
    _stock: type = type(None)

    def __init__(self, backend: str = "auto"):
        _wan._check_backend(backend)
        self.backend = backend
        self.fmrt_calls = 0
        self.fallback_calls = 0
        self._fallback = self._stock()

    def _count(self) -> None:
        if not torch.compiler.is_compiling():
            self.fmrt_calls += 1

    def _fall_back(self, *args, **kwargs) -> Any:
        if not torch.compiler.is_compiling():
            self.fallback_calls += 1
        fb = self._fallback
        fb._attention_backend, fb._parallel_config = self._attention_backend, self._parallel_config
        return fb(*args, **kwargs)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, keep: Optional[Tensor] = None) -> Tensor:
        """`[B, S, H, D]` each -> `[B, S, H*D]` in q's dtype. keep: bool `[B, S_k]` key padding
        mask (True = attend), which fmrt.attention.attention does not take: with it, backend
        "triton" runs fmrt's flash attention with `key_padding_mask`, any other torch SDPA with
        the mask (diffusers' native backend)."""
        if keep is None:
            out = attention(q, k, v, backend=self.backend)
        elif self.backend == "triton":
            out = ops.flash_attention(q, k, v, key_padding_mask=keep)
        else:
            out = torch.nn.functional.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                attn_mask=keep[:, None, None, :]).transpose(1, 2)
        return out.flatten(2, 3).type_as(q)


# ---------------------------------------------------------------------------------------------
# FLUX.1: FluxAttention (double-stream blocks: text + image; single-stream: one joint sequence)
# ---------------------------------------------------------------------------------------------

def _flux_unsupported(attn: Any, cls: type = _flux.FluxAttention) -> Optional[str]:
    """What in `attn` (a FluxAttention, or FLUX.2's `cls`) the FLUX processors cannot compute
    exactly (a phrase), or None."""
    if type(attn) is not cls:
        return f"is {type(attn).__name__}, not a diffusers {cls.__name__}"
    D, H = attn.head_dim, attn.heads
    if D % 2:
        return f"head dim {D} is odd (the rotary rotates pairs)"
    if H * D != attn.inner_dim:
        return f"inner dim {attn.inner_dim} != heads {H} x head dim {D}"
    problem = _norm_pair_problem(attn, ("norm_q", "norm_k"), D)
    if problem is None and getattr(attn, "added_kv_proj_dim", None) is not None:
        problem = _norm_pair_problem(attn, ("norm_added_q", "norm_added_k"), D)
    return problem


def _pair_columns(rotary: Any, S: int, D: int) -> Optional[tuple[Tensor, Tensor]]:
    """FLUX's real (cos, sin) `[S, D]` (each angle repeated over its pair) -> the op's `[S, D/2]`
    (cos at even, sin at odd columns), or None for another shape."""
    if not isinstance(rotary, (tuple, list)) or len(rotary) != 2:
        return None
    cos, sin = rotary
    if not (isinstance(cos, Tensor) and isinstance(sin, Tensor)) or (
            tuple(cos.shape) != (S, D) or tuple(sin.shape) != (S, D)):
        return None
    return cos[:, 0::2], sin[:, 1::2]


class FmrtFluxAttnProcessor(_Counted):
    """Attention processor for diffusers' `FluxAttention` (same call as `FluxAttnProcessor`):
    per-head q/k RMSNorm + interleaved RoPE fused (`ops.qk_norm_rope(norm="per_head")`, once
    for the text stream with the `norm_added_*` weights and once for the image stream) and
    `fmrt.attention.attention` over the joint [text, image] sequence."""

    _stock = _flux.FluxAttnProcessor
    _attention_cls: type = _flux.FluxAttention

    @classmethod
    def unsupported(cls, attn: Any) -> Optional[str]:
        """What in `attn` this processor cannot compute exactly (a phrase), or None."""
        return _flux_unsupported(attn, cls._attention_cls)

    def __call__(self, attn: Any, hidden_states: Tensor,
                 encoder_hidden_states: Optional[Tensor] = None,
                 attention_mask: Optional[Tensor] = None,
                 image_rotary_emb: Optional[tuple[Tensor, Tensor]] = None) -> Any:
        """hidden_states `[B, S, C]` (image, or the joint sequence in single-stream blocks);
        encoder_hidden_states `[B, L, C]` (text, double-stream blocks); image_rotary_emb
        (cos, sin) `[L + S, D]` -> `(image out, text out)` or `[B, S, C]` (single-stream)."""
        args = (attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        joint = encoder_hidden_states is not None
        if (attention_mask is not None or self._parallel_config is not None
                or hidden_states.dtype not in ops.FLOAT_DTYPES
                or self.unsupported(attn) is not None
                or (joint and (attn.added_kv_proj_dim is None
                               or encoder_hidden_states.dtype != hidden_states.dtype))
                or (not joint and not self._single_ok(attn))):
            return self._fall_back(*args)
        norms = [attn.norm_q, attn.norm_k] + (
            [attn.norm_added_q, attn.norm_added_k] if joint else [])
        if not _weights_match(hidden_states, *norms):
            return self._fall_back(*args)
        L = encoder_hidden_states.shape[1] if joint else 0
        rope = None
        if image_rotary_emb is not None:
            rope = _pair_columns(image_rotary_emb, L + hidden_states.shape[1], attn.head_dim)
            if rope is None:
                return self._fall_back(*args)
        self._count()
        return self._compute(attn, hidden_states, encoder_hidden_states, rope)

    def _compute(self, attn: Any, x: Tensor, ctx: Optional[Tensor],
                 rope: Optional[tuple[Tensor, Tensor]]) -> Any:
        D = attn.head_dim
        fused = getattr(attn, "fused_projections", False)
        if fused:
            q, k, v = attn.to_qkv(x).chunk(3, dim=-1)
        else:
            q, k, v = attn.to_q(x), attn.to_k(x), attn.to_v(x)
        q, k, v = (t.unflatten(-1, (-1, D)) for t in (q, k, v))
        L = 0
        if ctx is not None:
            L = ctx.shape[1]
            if fused and hasattr(attn, "to_added_qkv"):
                eq, ek, ev = attn.to_added_qkv(ctx).chunk(3, dim=-1)
            else:
                eq, ek, ev = attn.add_q_proj(ctx), attn.add_k_proj(ctx), attn.add_v_proj(ctx)
            eq, ek, ev = (t.unflatten(-1, (-1, D)) for t in (eq, ek, ev))
            eq, ek = self._norm_rope(eq, ek, attn.norm_added_q, attn.norm_added_k, rope, 0, L)
        q, k = self._norm_rope(q, k, attn.norm_q, attn.norm_k, rope, L, L + x.shape[1])
        if ctx is not None:
            q, k, v = torch.cat([eq, q], 1), torch.cat([ek, k], 1), torch.cat([ev, v], 1)
        out = self._attend(q, k, v)
        if ctx is None:
            return self._single_out(attn, out)
        txt, img = out[:, :L], out[:, L:]
        img = attn.to_out[1](attn.to_out[0](img.contiguous()))
        return img, attn.to_add_out(txt.contiguous())

    @staticmethod
    def _single_ok(attn: Any) -> bool:
        """FLUX.1 without a text stream: only the single-stream (pre_only) modules (diffusers'
        FLUX.1 processor returns the raw attention output there)."""
        return attn.pre_only

    @staticmethod
    def _single_out(attn: Any, out: Tensor) -> Tensor:
        return out

    @staticmethod
    def _norm_rope(q: Tensor, k: Tensor, norm_q: Any, norm_k: Any,
                   rope: Optional[tuple[Tensor, Tensor]], lo: int, hi: int
                   ) -> tuple[Tensor, Tensor]:
        """Per-head RMSNorm (module weights and eps) + RoPE on table rows [lo, hi)."""
        if rope is None:
            return norm_q(q), norm_k(k)
        return ops.qk_norm_rope(q, k, norm_q.weight, norm_k.weight, rope[0][lo:hi],
                                rope[1][lo:hi], eps=float(norm_q.eps), norm="per_head")


# ---------------------------------------------------------------------------------------------
# FLUX.2: Flux2Attention (double-stream blocks) and Flux2ParallelSelfAttention (single-stream:
# fused qkv + SwiGLU MLP projection, one output linear over [attention, MLP])
# ---------------------------------------------------------------------------------------------

class FmrtFlux2AttnProcessor(FmrtFluxAttnProcessor):
    """`FmrtFluxAttnProcessor` for FLUX.2's double-stream `Flux2Attention` (same math; without a
    text stream diffusers' FLUX.2 processor applies `to_out`). The KV-cache processors of the
    Klein-KV pipeline are not replaced (`accelerate` refuses modules running them)."""

    _stock = _flux2.Flux2AttnProcessor
    _attention_cls = _flux2.Flux2Attention

    @staticmethod
    def _single_ok(attn: Any) -> bool:
        return True

    @staticmethod
    def _single_out(attn: Any, out: Tensor) -> Tensor:
        return attn.to_out[1](attn.to_out[0](out))


class FmrtFlux2ParallelSelfAttnProcessor(_Counted):
    """Processor for FLUX.2's single-stream `Flux2ParallelSelfAttention` (same call as diffusers'
    `Flux2ParallelSelfAttnProcessor`): the fused projection split into q, k, v (strided views,
    read in place by the fused per-head q/k norm + RoPE) and the MLP half, fmrt attention, the
    module's SwiGLU, one output linear over [attention, MLP]."""

    _stock = _flux2.Flux2ParallelSelfAttnProcessor

    @staticmethod
    def unsupported(attn: Any) -> Optional[str]:
        return _flux_unsupported(attn, _flux2.Flux2ParallelSelfAttention)

    def __call__(self, attn: Any, hidden_states: Tensor,
                 attention_mask: Optional[Tensor] = None,
                 image_rotary_emb: Optional[tuple[Tensor, Tensor]] = None) -> Tensor:
        """hidden_states `[B, S, C]` (the joint [text, image] sequence), image_rotary_emb
        (cos, sin) `[S, D]` -> `[B, S, C]`."""
        args = (attn, hidden_states, attention_mask, image_rotary_emb)
        if (attention_mask is not None or self._parallel_config is not None
                or hidden_states.dtype not in ops.FLOAT_DTYPES
                or self.unsupported(attn) is not None
                or not _weights_match(hidden_states, attn.norm_q, attn.norm_k)):
            return self._fall_back(*args)
        rope = None
        if image_rotary_emb is not None:
            rope = _pair_columns(image_rotary_emb, hidden_states.shape[1], attn.head_dim)
            if rope is None:
                return self._fall_back(*args)
        self._count()
        D, inner = attn.head_dim, attn.inner_dim
        h = attn.to_qkv_mlp_proj(hidden_states)
        qkv, mlp = h.split([3 * inner, h.shape[-1] - 3 * inner], dim=-1)
        q, k, v = (t.unflatten(-1, (-1, D)) for t in qkv.chunk(3, dim=-1))
        q, k = FmrtFluxAttnProcessor._norm_rope(q, k, attn.norm_q, attn.norm_k, rope, 0,
                                                hidden_states.shape[1])
        out = self._attend(q, k, v)
        return attn.to_out(torch.cat([out, attn.mlp_act_fn(mlp)], dim=-1))


# ---------------------------------------------------------------------------------------------
# Qwen-Image: Attention + QwenDoubleStreamAttnProcessor2_0 (text + image, complex RoPE)
# ---------------------------------------------------------------------------------------------

def _heads_problem(attn: Any) -> tuple[int, Optional[str]]:
    """(head dim, None) for a plain diffusers `Attention` whose q, k, v split into heads of an
    even dim (the rotary rotates pairs); (0, what is wrong) otherwise."""
    if type(attn) is not Attention:
        return 0, f"is {type(attn).__name__}, not a diffusers Attention"
    H = attn.heads
    if H <= 0 or attn.inner_dim % H:
        return 0, f"inner dim {attn.inner_dim} does not split into {H} heads"
    D = attn.inner_dim // H
    if D % 2:
        return 0, f"head dim {D} is odd (the rotary rotates pairs)"
    if attn.inner_kv_dim != attn.inner_dim:
        return 0, f"key/value inner dim {attn.inner_kv_dim} != query inner dim {attn.inner_dim}"
    return D, None


def _qwen_unsupported(attn: Any) -> Optional[str]:
    D, problem = _heads_problem(attn)
    if problem:
        return problem
    if attn.add_q_proj is None or attn.add_k_proj is None or attn.add_v_proj is None:
        return "has no add_q_proj / add_k_proj / add_v_proj (not a double-stream module)"
    for pair in (("norm_q", "norm_k"), ("norm_added_q", "norm_added_k")):
        problem = _norm_pair_problem(attn, pair, D, DiffusersRMSNorm)
        if problem:
            return problem
    if getattr(attn, "fused_projections", False):
        return "has fused projections (diffusers' Qwen processor does not read them either)"
    return None


def _complex_table(freqs: Any, S: int, D: int) -> Optional[tuple[Tensor, Tensor]]:
    """A complex `[S, D/2]` table -> (real, imag) views, or None for anything else."""
    if not isinstance(freqs, Tensor) or not freqs.is_complex() or (
            tuple(freqs.shape) != (S, D // 2)) or freqs.dtype != torch.complex64:
        return None
    ri = torch.view_as_real(freqs)
    return ri[..., 0], ri[..., 1]


class FmrtQwenDoubleStreamAttnProcessor(_Counted):
    """Attention processor for Qwen-Image's joint attention (same call as diffusers'
    `QwenDoubleStreamAttnProcessor2_0`): per-head q/k RMSNorm + RoPE fused per stream (the
    complex tables' real and imaginary parts as cos / sin), `fmrt.attention.attention` over
    [text, image]. A text mask (`encoder_hidden_states_mask`, bool `[B, L]`, any pattern; the
    model converts it to bool) is a key padding mask on the text keys, image keys all kept
    (see `_Counted._attend`); a mask of another dtype or shape goes to diffusers."""

    _stock = _qwen.QwenDoubleStreamAttnProcessor2_0
    unsupported = staticmethod(_qwen_unsupported)

    def __call__(self, attn: Any, hidden_states: Tensor,
                 encoder_hidden_states: Optional[Tensor] = None,
                 encoder_hidden_states_mask: Optional[Tensor] = None,
                 attention_mask: Optional[Tensor] = None,
                 image_rotary_emb: Optional[tuple[Tensor, Tensor]] = None) -> Any:
        """hidden_states `[B, S, C]` (image), encoder_hidden_states `[B, L, C]` (text),
        image_rotary_emb (image freqs `[S, D/2]`, text freqs `[L, D/2]`, complex64) ->
        (image out, text out)."""
        args = (attn, hidden_states, encoder_hidden_states, encoder_hidden_states_mask,
                attention_mask, image_rotary_emb)
        txt_mask = encoder_hidden_states_mask
        if (encoder_hidden_states is None or attention_mask is not None
                or (txt_mask is not None and (txt_mask.dtype != torch.bool or tuple(
                    txt_mask.shape) != tuple(encoder_hidden_states.shape[:2])))
                or self._parallel_config is not None
                or hidden_states.dtype not in ops.FLOAT_DTYPES
                or encoder_hidden_states.dtype != hidden_states.dtype
                or _qwen_unsupported(attn) is not None
                or not _weights_match(hidden_states, attn.norm_q, attn.norm_k,
                                      attn.norm_added_q, attn.norm_added_k)):
            return self._fall_back(*args)
        D = attn.inner_dim // attn.heads
        rope = None
        if image_rotary_emb is not None:
            if not isinstance(image_rotary_emb, (tuple, list)) or len(image_rotary_emb) != 2:
                return self._fall_back(*args)
            img = _complex_table(image_rotary_emb[0], hidden_states.shape[1], D)
            txt = _complex_table(image_rotary_emb[1], encoder_hidden_states.shape[1], D)
            if img is None or txt is None:
                return self._fall_back(*args)
            rope = (img, txt)
        self._count()
        keep = None
        if txt_mask is not None:
            keep = torch.cat([txt_mask, txt_mask.new_ones(hidden_states.shape[:2])], dim=1)
        return self._compute(attn, hidden_states, encoder_hidden_states, rope, D, keep)

    def _compute(self, attn: Any, x: Tensor, ctx: Tensor, rope: Any, D: int,
                 keep: Optional[Tensor]) -> Any:
        q, k, v = (p(x).unflatten(-1, (-1, D)) for p in (attn.to_q, attn.to_k, attn.to_v))
        eq, ek, ev = (p(ctx).unflatten(-1, (-1, D))
                      for p in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
        if rope is None:
            q, k = attn.norm_q(q), attn.norm_k(k)
            eq, ek = attn.norm_added_q(eq), attn.norm_added_k(ek)
        else:
            (ic, is_), (tc, ts) = rope
            q, k = ops.qk_norm_rope(q, k, attn.norm_q.weight, attn.norm_k.weight, ic, is_,
                                    eps=float(attn.norm_q.eps), norm="per_head")
            eq, ek = ops.qk_norm_rope(eq, ek, attn.norm_added_q.weight, attn.norm_added_k.weight,
                                      tc, ts, eps=float(attn.norm_added_q.eps), norm="per_head")
        L = ctx.shape[1]
        out = self._attend(torch.cat([eq, q], 1), torch.cat([ek, k], 1), torch.cat([ev, v], 1),
                           keep)
        img = attn.to_out[0](out[:, L:].contiguous())
        if len(attn.to_out) > 1:
            img = attn.to_out[1](img)
        return img, attn.to_add_out(out[:, :L].contiguous())


# ---------------------------------------------------------------------------------------------
# HunyuanVideo: Attention + HunyuanVideoAttnProcessor2_0 ([image, text]; RoPE on image tokens)
# ---------------------------------------------------------------------------------------------

def _hunyuan_unsupported(attn: Any) -> Optional[str]:
    D, problem = _heads_problem(attn)
    if problem:
        return problem
    problem = _norm_pair_problem(attn, ("norm_q", "norm_k"), D, DiffusersRMSNorm)
    if problem is None and attn.add_q_proj is not None:
        if attn.add_k_proj is None or attn.add_v_proj is None:
            return "has add_q_proj but no add_k_proj / add_v_proj"
        for name in ("norm_added_q", "norm_added_k"):  # run as modules (no RoPE on text)
            norm = getattr(attn, name, None)
            if norm is None or type(norm) is not DiffusersRMSNorm:
                return f"{name} is {type(norm).__name__}, not a diffusers RMSNorm"
    if problem is None and getattr(attn, "fused_projections", False):
        return "has fused projections (diffusers' HunyuanVideo processor does not read them)"
    return problem


def _key_padding(mask: Optional[Tensor], B: int, S: int) -> Any:
    """HunyuanVideo's bool `[B, 1, 1, S]` mask -> `[B, S]`; None -> None; anything else ->
    False (not a key padding mask fmrt takes)."""
    if mask is None:
        return None
    if mask.dtype != torch.bool or tuple(mask.shape) != (B, 1, 1, S):
        return False
    return mask[:, 0, 0, :]


class FmrtHunyuanVideoAttnProcessor(_Counted):
    """Attention processor for HunyuanVideo's `Attention` modules (same call as diffusers'
    `HunyuanVideoAttnProcessor2_0`): image tokens first, text appended. The image q/k get the
    fused per-head RMSNorm + RoPE (real cos/sin `[S_img, D]`, pairs as FLUX.1's); text q/k only
    their RMSNorm (the module's own: `norm_added_*` in double-stream blocks, `norm_q/k` on the
    text rows of single-stream blocks). The model always passes its text padding mask (`[B, 1,
    1, S]` bool, keys only): attention takes it as a key padding mask (see `_Counted._attend`)."""

    _stock = _hunyuan.HunyuanVideoAttnProcessor2_0
    unsupported = staticmethod(_hunyuan_unsupported)

    def __call__(self, attn: Any, hidden_states: Tensor,
                 encoder_hidden_states: Optional[Tensor] = None,
                 attention_mask: Optional[Tensor] = None,
                 image_rotary_emb: Optional[tuple[Tensor, Tensor]] = None) -> Any:
        """hidden_states `[B, S, C]` (video), encoder_hidden_states `[B, L, C]` (text),
        attention_mask bool `[B, 1, 1, S + L]`, image_rotary_emb (cos, sin) `[S, D]` ->
        (video out, text out)."""
        args = (attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        if (encoder_hidden_states is None or image_rotary_emb is None
                or self._parallel_config is not None
                or hidden_states.dtype not in ops.FLOAT_DTYPES
                or encoder_hidden_states.dtype != hidden_states.dtype
                or self.unsupported(attn) is not None
                or not _weights_match(hidden_states, attn.norm_q, attn.norm_k,
                                      *((attn.norm_added_q, attn.norm_added_k)
                                        if attn.add_q_proj is not None else ()))):
            return self._fall_back(*args)
        B, S, L = hidden_states.shape[0], hidden_states.shape[1], encoder_hidden_states.shape[1]
        keep = _key_padding(attention_mask, B, S + L)
        D = attn.inner_dim // attn.heads
        rope = _pair_columns(image_rotary_emb, S, D)
        if keep is False or rope is None:
            return self._fall_back(*args)
        self._count()
        single = attn.add_q_proj is None
        x = torch.cat([hidden_states, encoder_hidden_states], 1) if single else hidden_states
        q, k, v = (p(x).unflatten(2, (attn.heads, -1)) for p in (attn.to_q, attn.to_k, attn.to_v))
        qi, ki = ops.qk_norm_rope(q[:, :S], k[:, :S], attn.norm_q.weight, attn.norm_k.weight,
                                  rope[0], rope[1], eps=float(attn.norm_q.eps), norm="per_head")
        if single:
            qt, kt, vt = attn.norm_q(q[:, S:]), attn.norm_k(k[:, S:]), v[:, S:]
            v = v[:, :S]
        else:
            ctx = encoder_hidden_states
            qt, kt, vt = (p(ctx).unflatten(2, (attn.heads, -1))
                          for p in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
            qt, kt = attn.norm_added_q(qt), attn.norm_added_k(kt)
        out = self._attend(torch.cat([qi, qt], 1), torch.cat([ki, kt], 1),
                           torch.cat([v, vt], 1), keep)
        img, txt = out[:, :S], out[:, S:]
        if getattr(attn, "to_out", None) is not None:
            img = attn.to_out[1](attn.to_out[0](img))
        if getattr(attn, "to_add_out", None) is not None:
            txt = attn.to_add_out(txt)
        return img, txt


# ---------------------------------------------------------------------------------------------
# LTX-Video: LTXAttention (q/k RMSNorm across heads and RoPE over the whole inner dim, both before
# the head split; per-sample tables)
# ---------------------------------------------------------------------------------------------

def _ltx_unsupported(attn: Any) -> Optional[str]:
    if type(attn) is not _ltx.LTXAttention:
        return f"is {type(attn).__name__}, not a diffusers LTXAttention"
    C = attn.inner_dim
    if attn.inner_kv_dim != C:
        return f"key/value inner dim {attn.inner_kv_dim} != query inner dim {C} (kv_heads)"
    if C % 2:  # pairs of the flat inner dim: an odd head dim is fine (a pair may straddle heads)
        return f"inner dim {C} is odd (the rotary rotates pairs)"
    for name in ("norm_q", "norm_k"):  # across heads: the same check as Wan's
        problem = _wan._norm_problem(name, getattr(attn, name, None), C)
        if problem:
            return problem
    if attn.norm_q.eps != attn.norm_k.eps:
        return f"norm_q eps {attn.norm_q.eps} != norm_k eps {attn.norm_k.eps}"
    if getattr(attn, "fused_projections", False):
        return "has fused projections (diffusers' LTX processor does not read them)"
    return None


class FmrtLTXVideoAttnProcessor(_Counted):
    """Attention processor for LTX-Video's `LTXAttention` (same call as diffusers'
    `LTXVideoAttnProcessor`). LTX normalises q/k over the whole inner dim C = H*D and rotates
    interleaved pairs of the flat C with a `[B, S, C]` table (its three axes interleaved per
    frequency, cos = 1 / sin = 0 padding in front): that is `ops.qk_norm_rope` on q viewed as
    one head of width C (`[B, S, 1, C]`, norm over it), then the head split (so an odd head
    dim, whose pairs straddle heads, is exact too); the table differs per sample (`video_coords`), so the op runs
    once per sample. Cross-attention with the prompt mask (the pipeline always passes one)
    goes to diffusers; without a mask it runs fmrt attention."""

    _stock = _ltx.LTXVideoAttnProcessor
    unsupported = staticmethod(_ltx_unsupported)

    def __call__(self, attn: Any, hidden_states: Tensor,
                 encoder_hidden_states: Optional[Tensor] = None,
                 attention_mask: Optional[Tensor] = None,
                 image_rotary_emb: Optional[tuple[Tensor, Tensor]] = None) -> Tensor:
        """hidden_states `[B, S, C]`; encoder_hidden_states `[B, L, C_ctx]` (cross-attention);
        image_rotary_emb (cos, sin) `[B, S, C]` (self-attention) -> `[B, S, C]`."""
        args = (attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        is_self = encoder_hidden_states is None
        if (attention_mask is not None or self._parallel_config is not None
                or hidden_states.dtype not in ops.FLOAT_DTYPES
                or (not is_self and (encoder_hidden_states.dtype != hidden_states.dtype
                                     or image_rotary_emb is not None))
                or self.unsupported(attn) is not None
                or not _weights_match(hidden_states, attn.norm_q, attn.norm_k)):
            return self._fall_back(*args)
        B, S, C = hidden_states.shape[0], hidden_states.shape[1], attn.inner_dim
        rope = None
        if image_rotary_emb is not None:
            if not isinstance(image_rotary_emb, (tuple, list)) or len(image_rotary_emb) != 2 or (
                    any(not isinstance(t, Tensor) or tuple(t.shape) != (B, S, C)
                        for t in image_rotary_emb)):
                return self._fall_back(*args)
            rope = (image_rotary_emb[0][..., 0::2], image_rotary_emb[1][..., 1::2])
        self._count()
        src = hidden_states if is_self else encoder_hidden_states
        q, k, v = attn.to_q(hidden_states), attn.to_k(src), attn.to_v(src)
        if rope is None:
            q, k = attn.norm_q(q), attn.norm_k(k)
        else:
            pairs = [ops.qk_norm_rope(q[b:b + 1].unflatten(2, (1, C)),
                                      k[b:b + 1].unflatten(2, (1, C)), attn.norm_q.weight,
                                      attn.norm_k.weight, rope[0][b], rope[1][b],
                                      eps=float(attn.norm_q.eps), norm="across_heads")
                     for b in range(B)]
            q = torch.cat([p[0] for p in pairs]).flatten(2)
            k = torch.cat([p[1] for p in pairs]).flatten(2)
        H = attn.heads
        out = self._attend(q.unflatten(2, (H, -1)), k.unflatten(2, (H, -1)),
                           v.unflatten(2, (H, -1)))
        return attn.to_out[1](attn.to_out[0](out))


# ---------------------------------------------------------------------------------------------
# SkyReels-V2: a copy of Wan's attention under other class names
# ---------------------------------------------------------------------------------------------

class FmrtSkyReelsV2AttnProcessor(_wan.FmrtWanAttnProcessor):
    """`FmrtWanAttnProcessor` for `SkyReelsV2Attention` (Wan's math under another class name).
    diffusers' SkyReels processor passes the parallel config to cross- and image attention too,
    so under context parallelism every call goes to diffusers."""

    _attention_cls = _sky.SkyReelsV2Attention
    _stock = _sky.SkyReelsV2AttnProcessor

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 rotary_emb=None):
        if self._parallel_config is not None:
            return self._fall_back(attn, hidden_states, encoder_hidden_states, attention_mask,
                                   rotary_emb)
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask,
                                rotary_emb)


# ---------------------------------------------------------------------------------------------
# the families `accelerate` recognises
# ---------------------------------------------------------------------------------------------

class Patch(NamedTuple):
    """One attention module class, diffusers' processor class for it (what `restore` puts back
    and what the module must run before `accelerate`) and fmrt's processor class."""
    attention: type
    stock: type
    fmrt: type
    # diffusers' generic `Attention` also serves other parts of a model (HunyuanVideo's text
    # token refiner, with diffusers' AttnProcessor2_0): with only_stock, modules running another
    # processor than `stock` (or fmrt's) are not this family's and are left alone
    only_stock: bool = False

    def unsupported(self, module: Any) -> Optional[str]:
        return self.fmrt.unsupported(module)


class Family(NamedTuple):
    """One transformer family: its model classes, the attention modules it patches, and where
    the processors read one cos / sin per rotary pair from real tables, the model's rotary
    module (attribute, diffusers' class) that builds them so (each angle repeated over its
    pair): `accelerate` checks it is that class, unhooked."""
    name: str
    models: tuple[type, ...]
    patches: tuple[Patch, ...]
    rope: Optional[tuple[str, type]] = None

    def patch_for(self, module: Any) -> Optional[Patch]:
        for p in self.patches:
            if type(module) is p.attention and (not p.only_stock or type(
                    getattr(module, "processor", None)) in (p.stock, p.fmrt)):
                return p
        return None


FAMILIES: tuple[Family, ...] = (
    Family("Wan", (_wanm.WanTransformer3DModel, _vace.WanVACETransformer3DModel),
           (Patch(_wanm.WanAttention, _wanm.WanAttnProcessor, _wan.FmrtWanAttnProcessor),)),
    Family("SkyReels-V2", (_sky.SkyReelsV2Transformer3DModel,),
           (Patch(_sky.SkyReelsV2Attention, _sky.SkyReelsV2AttnProcessor,
                  FmrtSkyReelsV2AttnProcessor),)),
    Family("FLUX.1", (_flux.FluxTransformer2DModel,),
           (Patch(_flux.FluxAttention, _flux.FluxAttnProcessor, FmrtFluxAttnProcessor),),
           ("pos_embed", _flux.FluxPosEmbed)),
    Family("FLUX.2", (_flux2.Flux2Transformer2DModel,),
           (Patch(_flux2.Flux2Attention, _flux2.Flux2AttnProcessor, FmrtFlux2AttnProcessor),
            Patch(_flux2.Flux2ParallelSelfAttention, _flux2.Flux2ParallelSelfAttnProcessor,
                  FmrtFlux2ParallelSelfAttnProcessor)), ("pos_embed", _flux2.Flux2PosEmbed)),
    Family("HunyuanVideo", (_hunyuan.HunyuanVideoTransformer3DModel,),
           (Patch(Attention, _hunyuan.HunyuanVideoAttnProcessor2_0,
                  FmrtHunyuanVideoAttnProcessor, only_stock=True),),
           ("rope", _hunyuan.HunyuanVideoRotaryPosEmbed)),
    Family("LTX-Video", (_ltx.LTXVideoTransformer3DModel,),
           (Patch(_ltx.LTXAttention, _ltx.LTXVideoAttnProcessor, FmrtLTXVideoAttnProcessor),),
           ("rope", _ltx.LTXVideoRotaryPosEmbed)),
    Family("Qwen-Image", (_qwen.QwenImageTransformer2DModel,),
           (Patch(Attention, _qwen.QwenDoubleStreamAttnProcessor2_0,
                  FmrtQwenDoubleStreamAttnProcessor),)),
)


def family_of(model: Any) -> Optional[Family]:
    """The family whose model classes include type(model) exactly (a subclass may change the
    forward), or None."""
    for fam in FAMILIES:
        if type(model) in fam.models:
            return fam
    return None


def transformers(model: Any) -> list[tuple[str, Any, Family]]:
    """The supported transformers in `model` (itself, or a pipeline's `.transformer` and
    `.transformer_2`) with their labels and families; ValueError for anything else."""
    supported = ", ".join(c.__name__ for f in FAMILIES for c in f.models)
    if family_of(model) is not None:
        found = [("model", model)]
    elif isinstance(model, torch.nn.Module) or not hasattr(model, "transformer"):
        raise ValueError(f"expected a diffusers transformer ({supported}) or a pipeline with a "
                         f".transformer that is one, got {type(model).__name__}")
    else:
        found = [(name, getattr(model, name)) for name in ("transformer", "transformer_2")
                 if getattr(model, name, None) is not None]
        if not found:
            raise ValueError("the pipeline's .transformer and .transformer_2 are None: no "
                             "transformer to patch")
    out = []
    for label, t in found:
        fam = family_of(t)
        if fam is None:
            raise ValueError(f"{label} is {type(t).__name__}, which fmrt does not support "
                             f"(supported: {supported})")
        if fam.rope is not None:
            attr, cls = fam.rope
            mod = getattr(t, attr, None)
            if type(mod) is not cls or _plain(attr, mod) is not None:
                raise ValueError(f"{label}.{attr} is not diffusers' unhooked {cls.__name__} "
                                 f"(fmrt reads one cos / sin per rotary pair from its tables)")
        if getattr(getattr(t, "_parallel_config", None), "tensor_parallel_config", None):
            raise ValueError(f"{label} uses tensor parallelism, which fmrt's processors do not "
                             f"support")
        out.append((label, t, fam))
    return out


def attention_modules(model: Any) -> list[tuple[str, Any, Patch]]:
    """(qualified name, module, its Patch) of every attention module `accelerate` would
    patch."""
    return [(("" if label == "model" else label + ".") + name, m, fam.patch_for(m))
            for label, t, fam in transformers(model)
            for name, m in t.named_modules() if fam.patch_for(m) is not None]


def problems(modules: list[tuple[str, Any, Patch]]) -> list[str]:
    """'name: why' for every module fmrt's processor cannot compute exactly, or whose current
    processor is neither diffusers' default for it nor fmrt's (an IP-adapter or custom
    processor would be lost)."""
    out = []
    for name, m, patch in modules:
        p = patch.unsupported(m)
        if p is None and type(m.processor) not in (patch.stock, patch.fmrt):
            p = (f"runs {type(m.processor).__name__}, not diffusers' {patch.stock.__name__} "
                 f"(replacing it would drop what it does)")
        if p is not None:
            out.append(f"{name}: {p}")
    return out
