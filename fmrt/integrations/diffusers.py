"""Drop-in fmrt attention for diffusers' Wan transformer (diffusers >= 0.35, `WanAttention`).

    from fmrt.integrations.diffusers import enable_fmrt, disable_fmrt
    n = enable_fmrt(pipe.transformer)   # self-attention: fused q/k RMSNorm + RoPE, fmrt attention
    disable_fmrt(pipe.transformer)      # back to diffusers' WanAttnProcessor

`FmrtWanAttnProcessor` takes the same call as diffusers' `WanAttnProcessor`. It runs its own path
only for what it computes exactly as diffusers does: self-attention with a rotary embedding, no
attention mask, `norm_q` / `norm_k` a `torch.nn.RMSNorm` over heads*dim (Wan's
"rms_norm_across_heads") with a set eps, no context parallelism. Anything else (cross-attention,
the I2V image branch, a mask, another norm, no rotary) goes to diffusers' own `WanAttnProcessor`.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fmrt import ops
from fmrt.attention import attention

from diffusers.models.transformers.transformer_wan import WanAttention, WanAttnProcessor

__all__ = ["FmrtWanAttnProcessor", "enable_fmrt", "disable_fmrt"]


def _is_across_heads_rms(norm: torch.nn.Module, inner_dim: int) -> bool:
    return (isinstance(norm, torch.nn.RMSNorm) and tuple(norm.normalized_shape) == (inner_dim,)
            and norm.eps is not None)


class FmrtWanAttnProcessor:
    """Attention processor for `WanAttention` self-attention: `fmrt.ops.qk_norm_rope` (q/k
    RMSNorm across heads + interleaved RoPE in one op) then `fmrt.attention.attention`
    (`backend`, default "auto"). Unsupported calls fall back to diffusers' `WanAttnProcessor`."""

    _attention_backend = None  # set by diffusers' set_attention_backend; forwarded on fallback
    _parallel_config = None

    def __init__(self, backend: str = "auto"):
        self.backend = backend
        self._fallback = WanAttnProcessor()

    @staticmethod
    def supports(attn: torch.nn.Module) -> bool:
        """Whether `attn` is a module whose self-attention this processor computes itself."""
        return (isinstance(attn, WanAttention) and not attn.is_cross_attention
                and attn.add_k_proj is None
                and _is_across_heads_rms(attn.norm_q, attn.inner_dim)
                and _is_across_heads_rms(attn.norm_k, attn.inner_dim)
                and attn.norm_q.eps == attn.norm_k.eps)

    def __call__(self, attn: WanAttention, hidden_states: Tensor,
                 encoder_hidden_states: Optional[Tensor] = None,
                 attention_mask: Optional[Tensor] = None,
                 rotary_emb: Optional[tuple[Tensor, Tensor]] = None) -> Tensor:
        """hidden_states `[B, S, C]`; rotary_emb (cos, sin) as `WanRotaryPosEmbed` returns them,
        `[1, S, 1, D]` with each frequency repeated twice -> `[B, S, C]`."""
        if (encoder_hidden_states is not None or attention_mask is not None or rotary_emb is None
                or self._parallel_config is not None or not self.supports(attn)):
            fb = self._fallback
            fb._attention_backend, fb._parallel_config = self._attention_backend, self._parallel_config
            return fb(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)

        if getattr(attn, "fused_projections", False):
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query = attn.to_q(hidden_states)
            key = attn.to_k(hidden_states)
            value = attn.to_v(hidden_states)
        query = query.unflatten(2, (attn.heads, -1))
        key = key.unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))

        # diffusers rotates pair (2i, 2i+1) by cos[..., 2i] and sin[..., 2i + 1]: take those columns.
        freqs_cos, freqs_sin = rotary_emb
        S, D = query.shape[1], query.shape[-1]
        cos = freqs_cos.reshape(-1, freqs_cos.shape[-1])[:, 0::2]
        sin = freqs_sin.reshape(-1, freqs_sin.shape[-1])[:, 1::2]
        if cos.shape != (S, D // 2) or sin.shape != (S, D // 2):
            fb = self._fallback  # a batch-dependent or otherwise shaped table: diffusers handles it
            fb._attention_backend, fb._parallel_config = self._attention_backend, self._parallel_config
            return fb(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)

        query, key = ops.qk_norm_rope(query, key, attn.norm_q.weight, attn.norm_k.weight,
                                      cos, sin, eps=float(attn.norm_q.eps), norm="across_heads")
        hidden_states = attention(query, key, value, backend=self.backend)
        hidden_states = hidden_states.flatten(2, 3).type_as(query)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        return hidden_states


def enable_fmrt(transformer: torch.nn.Module, *, backend: str = "auto") -> int:
    """Set `FmrtWanAttnProcessor(backend)` on every supported `WanAttention` (self-attention
    with an across-heads RMSNorm) in `transformer` (e.g. a `WanTransformer3DModel`); returns how
    many modules got it. Other attention modules keep their processor."""
    n = 0
    for module in transformer.modules():
        if FmrtWanAttnProcessor.supports(module):
            module.set_processor(FmrtWanAttnProcessor(backend))
            n += 1
    return n


def disable_fmrt(transformer: torch.nn.Module) -> int:
    """Put diffusers' `WanAttnProcessor` back on every module running `FmrtWanAttnProcessor`;
    returns how many were restored."""
    n = 0
    for module in transformer.modules():
        if isinstance(getattr(module, "processor", None), FmrtWanAttnProcessor):
            module.set_processor(WanAttnProcessor())
            n += 1
    return n
