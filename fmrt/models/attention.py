"""Wan-style self-attention block: fused qkv projection -> q/k RMSNorm + 3D RoPE -> global
non-causal attention -> output projection."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from fmrt import ops
from fmrt.attention import BACKENDS, attention

QK_NORMS = ("across_heads", "per_head", None)


class WanSelfAttention(nn.Module):
    """x `[B, S, dim]` + RoPE tables `[S, head_dim/2]` (`rope_3d_tables`) -> `[B, S, dim]`.

    `qkv` is one Linear(dim, 3*dim) (rows: q, then k, then v); q and k are strided views into its
    output `[B, S, 3, H, D]`, normalised and rotated by `ops.qk_norm_rope` without a copy (the
    Triton kernel reads them with their strides), v goes to `attention` as a view too.
    `qk_norm`: "across_heads" (Wan, weights `norm_q` / `norm_k` of [dim]), "per_head"
    (FLUX / SD3, [head_dim]) or None (no norm, `norm_q` / `norm_k` are None).
    `backend`: an `fmrt.attention` backend name ("auto" honours `backend_override`).
    `sequence_parallel` (set by `fmrt.parallel.enable_sequence_parallel`): x holds this rank's
    rows of the sequence, cos / sin the full tables; attention runs Ulysses over the group.
    """
    sequence_parallel = None

    def __init__(self, dim: int, num_heads: int, *, qk_norm: Optional[str] = "across_heads",
                 eps: float = 1e-6, backend: str = "auto"):
        super().__init__()
        if num_heads < 1 or dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        if (dim // num_heads) % 2:
            raise ValueError(f"head dim {dim // num_heads} must be even for the rotary")
        if qk_norm not in QK_NORMS:
            raise ValueError(f"qk_norm must be one of {QK_NORMS}, got {qk_norm!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.qk_norm, self.eps, self.backend = qk_norm, eps, backend
        self.qkv = nn.Linear(dim, 3 * dim)
        self.o = nn.Linear(dim, dim)
        wdim = {"across_heads": dim, "per_head": self.head_dim}.get(qk_norm)
        self.norm_q = nn.Parameter(torch.ones(wdim)) if wdim else None
        self.norm_k = nn.Parameter(torch.ones(wdim)) if wdim else None

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        B, S, _ = x.shape
        sp, length = self.sequence_parallel, cos.shape[0]
        if sp is not None:   # this rank's rows of the tables (padding rows: the identity)
            cos, sin = sp.shard(cos, length, 0, fill=1.0), sp.shard(sin, length, 0)
        q, k, v = self.qkv(x).view(B, S, 3, self.num_heads, self.head_dim).unbind(2)
        q, k = ops.qk_norm_rope(q, k, self.norm_q, self.norm_k, cos, sin, eps=self.eps,
                                norm=self.qk_norm)
        if sp is None:
            out = attention(q, k, v, backend=self.backend)
        else:
            out = sp.attention(q, k, v, length,
                               lambda q_, k_, v_: attention(q_, k_, v_, backend=self.backend))
        return self.o(out.reshape(B, S, self.dim))
