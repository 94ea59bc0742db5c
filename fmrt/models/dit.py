"""A Wan2.1-style 3D DiT (text- or class-conditioned, optionally MeanFlow-conditioned).

Architecture (Wan2.1 `wan/modules/model.py`; diffusers `WanTransformer3DModel` is the same net):

    x [B, C, T, H, W] --Conv3d patch (1, 2, 2)--> tokens [B, L = f*h*w, dim]
    sigma [B] or [B, T] --1000*sigma--> float64 sinusoid cat[cos, sin] (freq_dim)
        --time_embedding (Linear, SiLU, Linear)--> e [B, F, dim]         (F = 1, or f per frame)
        --time_projection (SiLU, Linear)--> e0 [B, F, 6, dim]
    cond: text [B, L_txt, text_dim] --text_embedding (Linear, GELU-tanh, Linear)--> context
          or class labels [B] --class_embedding [num_classes + 1, class_tokens*dim]--> context
          or class labels [B] --class_text (fixed) [num_classes + 1, class_tokens, text_dim]
             --text_embedding--> context    (Wan's conditioning, a fixed "prompt" per class)
    each block, with (shift1, scale1, gate1, shift2, scale2, gate2) = modulation + e0:
        x = x + gate1 * self_attn(LN(x) * (1 + scale1) + shift1)    (qk RMSNorm + 3D RoPE)
        x = x + cross_attn(norm3(x), context)                       (norm3: affine LayerNorm)
        x = x + gate2 * ffn(LN(x) * (1 + scale2) + shift2)          (GELU-tanh MLP)
    head: (shift, scale) = head.modulation + e;  head(LN(x) * (1 + scale) + shift)
    unpatchify 'b (f h w) (x y z c) -> b c (f x) (h y) (w z)'

Per-frame sigma `[B, T]` (TI2V) gives every token of frame f the embedding and modulation of
sigma[:, f] (diffusers' per-token timesteps, without materialising them per token). MeanFlow
(`config.meanflow`): `dit(z, t, cond, r=r)` embeds t and h = t - r with two time MLPs and sums
them (MeanFlow's official choice); h is computed here so `torch.func.jvp` over (z, r, t) sees it.

Numerics follow Wan: LayerNorms, modulation and residual gating in fp32, time sinusoid in
float64, activations cast back to the parameter dtype for the linear layers.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.autograd import forward_ad
from torch.utils.checkpoint import checkpoint

from fmrt import reference as ref
from fmrt.attention import attention, rope_3d_tables
from fmrt.models.attention import WanSelfAttention

Time = Union[float, Tensor]


@dataclass
class DiTConfig:
    """Hyper-parameters of `DiT`. Conditioning: `text_dim` (text embeddings `[B, L, text_dim]`),
    or `num_classes` (labels `[B]`, index `num_classes` = the null class for CFG, mapped to
    `class_tokens` learned tokens), or both ("class_text": each label picks a fixed text-like
    embedding `[class_tokens, text_dim]` from the buffer `class_text`, drawn from
    `class_text_seed`, which enters through `text_embedding` and cross-attention exactly as a
    Wan prompt does; the null class's row is a fixed "negative prompt" embedding; the weights
    are then a plain Wan text-to-video DiT's), or neither (unconditional)."""
    in_channels: int = 16
    out_channels: Optional[int] = None          # None: same as in_channels
    dim: int = 1536
    num_layers: int = 30
    num_heads: int = 12
    ffn_dim: int = 8960
    freq_dim: int = 256
    text_dim: Optional[int] = 4096
    num_classes: Optional[int] = None
    class_tokens: int = 4
    class_text_seed: int = 0
    patch_size: tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6
    rope_theta: float = 10000.0
    cross_attn_norm: bool = True
    meanflow: bool = False
    gradient_checkpointing: bool = False
    attn_backend: str = "auto"

    def __post_init__(self):
        self.patch_size = tuple(int(p) for p in self.patch_size)
        if self.out_channels is None:
            self.out_channels = self.in_channels
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            raise ValueError(f"patch_size must be three positive ints, got {self.patch_size}")
        for name in ("in_channels", "out_channels", "dim", "num_layers", "num_heads", "ffn_dim",
                     "freq_dim", "class_tokens"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        hd = self.dim // self.num_heads
        if hd % 2 or hd < 6:
            raise ValueError(f"head_dim = dim / num_heads must be even and >= 6 (Wan's 3D RoPE "
                             f"split), got {hd}")
        if self.freq_dim % 2:
            raise ValueError(f"freq_dim must be even, got {self.freq_dim}")
        if self.num_classes is not None and self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        if self.text_dim is not None and self.text_dim < 1:
            raise ValueError(f"text_dim must be >= 1, got {self.text_dim}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def conditioning(self) -> Optional[str]:
        """"text", "class", "class_text" (class labels through fixed text embeddings) or None."""
        if self.text_dim is not None:
            return "text" if self.num_classes is None else "class_text"
        return "class" if self.num_classes is not None else None

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["patch_size"] = list(self.patch_size)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "DiTConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown DiTConfig field(s): {sorted(unknown)}")
        return cls(**d)

    @classmethod
    def preset(cls, name: str, **overrides) -> "DiTConfig":
        """A named configuration (`PRESETS`), with fields overridden by keyword."""
        if name not in PRESETS:
            raise ValueError(f"unknown DiT preset {name!r}; presets: {sorted(PRESETS)}")
        d = dict(PRESETS[name])
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(overrides) - names
        if unknown:
            raise ValueError(f"unknown DiTConfig field(s): {sorted(unknown)}")
        d.update(overrides)
        return cls(**d)


PRESETS: dict[str, dict] = {
    # Tests and the CPU demo: RGB pixels, class-conditional, head_dim 32 (RoPE split 12/10/10).
    "tiny": dict(in_channels=3, dim=128, num_layers=4, num_heads=4, ffn_dim=384, freq_dim=256,
                 text_dim=None, num_classes=10, class_tokens=4),
    # Wan2.1 T2V 1.3B / 14B (wan/configs/wan_t2v_1_3B.py, wan_t2v_14B.py).
    "wan2.1-1.3b": dict(in_channels=16, dim=1536, num_layers=30, num_heads=12, ffn_dim=8960,
                        freq_dim=256, text_dim=4096, eps=1e-6),
    "wan2.1-14b": dict(in_channels=16, dim=5120, num_layers=40, num_heads=40, ffn_dim=13824,
                       freq_dim=256, text_dim=4096, eps=1e-6),
}


def _layer_norm(x: Tensor, eps: float, module: Optional[nn.LayerNorm] = None) -> Tensor:
    """LayerNorm over the last dim in fp32 (Wan's WanLayerNorm); returns fp32."""
    w = b = None
    if module is not None:
        w, b = module.weight.float(), module.bias.float()
    return F.layer_norm(x.float(), (x.shape[-1],), w, b, eps)


def timestep_embedding(t: Tensor, dim: int) -> Tensor:
    """Wan's sinusoid: t (any shape, 0-1000 scale) -> `[..., dim]` float64, cat[cos, sin] with
    frequencies 10000^(-j / (dim/2))."""
    half = dim // 2
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    args = t.to(torch.float64)[..., None] * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def _forward_ad_active(*tensors: Optional[Tensor]) -> bool:
    """True inside a torch.func transform (jvp, vmap, grad) or when a tensor carries a
    forward-mode tangent: activation checkpointing cannot recompute such a forward."""
    peek = getattr(getattr(torch._C, "_functorch", None), "peek_interpreter_stack", None)
    if peek is not None and peek() is not None:
        return True
    return any(t is not None and forward_ad.unpack_dual(t).tangent is not None for t in tensors)


def class_text_table(config: DiTConfig) -> Tensor:
    """The fixed text-like embedding of every class, float32 `[num_classes + 1, class_tokens,
    text_dim]` on the CPU: N(0, 1) draws from `config.class_text_seed`, one "prompt" of
    `class_tokens` tokens per class, like a frozen text encoder's output; the last row is the
    null class's, CFG's unconditional branch: a fixed "negative prompt" embedding, drawn the
    same way (its tokens differ, as an encoded prompt's do)."""
    g = torch.Generator(device="cpu").manual_seed(int(config.class_text_seed))
    K, L, D = config.num_classes, config.class_tokens, config.text_dim
    return torch.randn((K + 1, L, D), generator=g, device="cpu")


def _time_mlp(freq_dim: int, dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))


class WanCrossAttention(nn.Module):
    """x `[B, S, dim]` attends to context `[B, L, dim]`; q and k RMS-normalised across heads
    (no RoPE). Parameters `q`, `k`, `v`, `o` (Linear) and `norm_q`, `norm_k` (`[dim]`)."""

    def __init__(self, dim: int, num_heads: int, *, eps: float = 1e-6, backend: str = "auto"):
        super().__init__()
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.eps, self.backend = eps, backend
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q = nn.Parameter(torch.ones(dim))
        self.norm_k = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        B, S, _ = x.shape
        L = context.shape[1]
        H, D = self.num_heads, self.head_dim
        q = self.q(x).view(B, S, H, D)
        k = self.k(context).view(B, L, H, D)
        v = self.v(context).view(B, L, H, D)
        q = ref.rms_norm(q, self.norm_q, "across_heads", self.eps).to(x.dtype)
        k = ref.rms_norm(k, self.norm_k, "across_heads", self.eps).to(x.dtype)
        out = attention(q, k, v, backend=self.backend)
        return self.o(out.reshape(B, S, self.dim))


def _modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """x `[B, L, D]` (fp32) * (1 + scale) + shift, with shift/scale `[B, F, 1, D]`: the L tokens
    split into F equal frame groups (F = 1: one modulation for all tokens)."""
    B, L, D = x.shape
    return (x.view(B, shift.shape[1], -1, D) * (1 + scale) + shift).view(B, L, D)


def _gated_add(x: Tensor, y: Tensor, gate: Tensor) -> Tensor:
    """x + y * gate in fp32, rounded to x's dtype; gate `[B, F, 1, D]` as in `_modulate`."""
    B, L, D = x.shape
    F_ = gate.shape[1]
    out = x.float().view(B, F_, -1, D) + y.float().view(B, F_, -1, D) * gate
    return out.view(B, L, D).to(x.dtype)


def _probes(cache) -> bool:
    """True for a step cache that decides from the tokens (first-block caching's probe)."""
    from fmrt.cache import FirstBlockCache
    return isinstance(getattr(cache, "policy", None), FirstBlockCache)


class DiTBlock(nn.Module):
    """One Wan attention block: modulated self-attention, cross-attention, modulated FFN."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        dim, eps = config.dim, config.eps
        self.eps = eps
        self.self_attn = WanSelfAttention(dim, config.num_heads, qk_norm="across_heads", eps=eps,
                                          backend=config.attn_backend)
        if config.conditioning is not None:
            self.norm3 = (nn.LayerNorm(dim, eps=eps, elementwise_affine=True)
                          if config.cross_attn_norm else None)
            self.cross_attn = WanCrossAttention(dim, config.num_heads, eps=eps,
                                                backend=config.attn_backend)
        else:
            self.norm3 = self.cross_attn = None
        self.ffn = nn.Sequential(nn.Linear(dim, config.ffn_dim), nn.GELU(approximate="tanh"),
                                 nn.Linear(config.ffn_dim, dim))
        self.modulation = nn.Parameter(torch.zeros(1, 6, dim))

    def forward(self, x: Tensor, context: Optional[Tensor], e0: Tensor, cos: Tensor,
                sin: Tensor) -> Tensor:
        """x `[B, L, dim]`, context `[B, L_ctx, dim]` or None, e0 `[B, F, 6, dim]`."""
        mod = self.modulation.float().unsqueeze(0) + e0.float()
        shift1, scale1, gate1, shift2, scale2, gate2 = mod.chunk(6, dim=2)
        h = _modulate(_layer_norm(x, self.eps), shift1, scale1).to(x.dtype)
        x = _gated_add(x, self.self_attn(h, cos, sin), gate1)
        if self.cross_attn is not None:
            h = _layer_norm(x, self.eps, self.norm3) if self.norm3 is not None else x
            x = x + self.cross_attn(h.to(x.dtype), context)
        h = _modulate(_layer_norm(x, self.eps), shift2, scale2).to(x.dtype)
        return _gated_add(x, self.ffn(h), gate2)


class Head(nn.Module):
    """Final modulated LayerNorm + Linear to `prod(patch) * out_channels` per token."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.eps = config.eps
        self.head = nn.Linear(config.dim, math.prod(config.patch_size) * config.out_channels)
        self.modulation = nn.Parameter(torch.zeros(1, 2, config.dim))

    def forward(self, x: Tensor, e: Tensor) -> Tensor:
        """x `[B, L, dim]`, e `[B, F, dim]` (the time embedding, before the projection)."""
        mod = self.modulation.float().unsqueeze(0) + e.float().unsqueeze(2)
        shift, scale = mod.chunk(2, dim=2)
        h = _modulate(_layer_norm(x, self.eps), shift, scale)
        return self.head(h.to(self.head.weight.dtype))


class DiT(nn.Module):
    """Wan-style 3D DiT. `dit(x [B, C, T, H, W], sigma, cond=None, *, r=None)` returns
    `[B, out_channels, T, H, W]` in x's dtype. State-dict keys follow Wan2.1's except the fused
    `self_attn.qkv` and the bare `norm_q`/`norm_k` parameters (see `fmrt.models.convert`).
    `sequence_parallel`: see `fmrt.parallel.enable_sequence_parallel` (blocks run on this
    rank's rows of the tokens; the output is gathered, or with `sharded_io` x and the output
    are this rank's shard `[B, C, T, H / N, W]` of the latent)."""
    sequence_parallel = None

    def __init__(self, config: DiTConfig):
        super().__init__()
        if not isinstance(config, DiTConfig):
            raise TypeError(f"config must be a DiTConfig, got {type(config).__name__}")
        self.config = config
        dim = config.dim
        self.gradient_checkpointing = bool(config.gradient_checkpointing)
        self.patch_embedding = nn.Conv3d(config.in_channels, dim, kernel_size=config.patch_size,
                                         stride=config.patch_size)
        if config.conditioning in ("text", "class_text"):
            self.text_embedding = nn.Sequential(nn.Linear(config.text_dim, dim),
                                                nn.GELU(approximate="tanh"), nn.Linear(dim, dim))
        if config.conditioning == "class_text":
            self.register_buffer("class_text", class_text_table(config))
        elif config.conditioning == "class":
            self.class_embedding = nn.Embedding(config.num_classes + 1, config.class_tokens * dim)
        self.time_embedding = _time_mlp(config.freq_dim, dim)
        if config.meanflow:
            self.time_embedding_h = _time_mlp(config.freq_dim, dim)
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.blocks = nn.ModuleList(DiTBlock(config) for _ in range(config.num_layers))
        self.head = Head(config)
        self.reset_parameters()

    # -- setup ----------------------------------------------------------------------------------
    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Wan's init (Xavier linears, N(0, 0.02) embeddings) with DiT's adaLN-Zero: the
        modulation parameters, the time projection and the head start at zero, so every block
        starts as the identity and the model outputs 0."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.patch_embedding.weight.view(self.config.dim, -1))
        nn.init.zeros_(self.patch_embedding.bias)
        embedders = [self.time_embedding, getattr(self, "time_embedding_h", None),
                     getattr(self, "text_embedding", None)]
        for seq in embedders:
            for m in (seq.modules() if seq is not None else ()):
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, std=0.02)
        if hasattr(self, "class_embedding"):
            nn.init.normal_(self.class_embedding.weight, std=0.02)
        if hasattr(self, "class_text"):
            self.class_text.copy_(class_text_table(self.config))
        for p in (self.time_projection[1].weight, self.time_projection[1].bias,
                  self.head.head.weight, self.head.head.bias, self.head.modulation):
            nn.init.zeros_(p)
        for block in self.blocks:
            nn.init.zeros_(block.modulation)
            for p in (block.self_attn.norm_q, block.self_attn.norm_k):
                if p is not None:
                    nn.init.ones_(p)
            if block.cross_attn is not None:
                nn.init.ones_(block.cross_attn.norm_q)
                nn.init.ones_(block.cross_attn.norm_k)
            if block.norm3 is not None:
                block.norm3.reset_parameters()

    def enable_gradient_checkpointing(self, enabled: bool = True) -> "DiT":
        """Recompute each block in the backward pass (torch.utils.checkpoint, non-reentrant).
        Not applied inside torch.func transforms / forward-mode AD (see forward)."""
        self.gradient_checkpointing = bool(enabled)
        return self

    # -- argument checks ------------------------------------------------------------------------
    def _check_x(self, x: Tensor) -> tuple[int, int, int]:
        cfg = self.config
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
        if x.ndim != 5:
            raise ValueError(f"x must be [B, C, T, H, W], got shape {tuple(x.shape)}")
        if x.shape[1] != cfg.in_channels:
            raise ValueError(f"x has {x.shape[1]} channels, the model expects "
                             f"in_channels={cfg.in_channels}")
        T, H, W = x.shape[2:]
        if T % cfg.patch_size[0] or H % cfg.patch_size[1] or W % cfg.patch_size[2]:
            raise ValueError(f"x's (T, H, W) = {(T, H, W)} is not divisible by the patch size "
                             f"{cfg.patch_size}")
        return T // cfg.patch_size[0], H // cfg.patch_size[1], W // cfg.patch_size[2]

    def _check_time(self, name: str, s: Time, x: Tensor) -> Tensor:
        """float, 0-d, [B] -> [B, 1]; [B, T] -> [B, T] (per frame). float32 or float64."""
        B, T = x.shape[0], x.shape[2]
        if not isinstance(s, Tensor):
            if isinstance(s, bool) or not isinstance(s, (int, float)):
                raise TypeError(f"{name} must be a float or a tensor, got {type(s).__name__}")
            return torch.full((B, 1), float(s), dtype=torch.float32, device=x.device)
        if not s.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {s.dtype}")
        if s.device != x.device:
            raise ValueError(f"{name} is on {s.device} but x is on {x.device}")
        if s.dtype != torch.float64:
            s = s.float()
        if s.ndim == 0:
            return s.expand(B).reshape(B, 1)
        if s.ndim == 1 and s.shape[0] == B:
            return s.reshape(B, 1)
        if s.ndim == 2 and tuple(s.shape) == (B, T):
            if self.config.patch_size[0] != 1:
                raise ValueError(f"per-frame {name} [B, T] needs a temporal patch size of 1, got "
                                 f"patch_size {self.config.patch_size}")
            return s
        raise ValueError(f"{name} must be a float, [B={B}] or per-frame [B={B}, T={T}], got "
                         f"shape {tuple(s.shape)}")

    def _embed_cond(self, cond: Optional[Tensor], B: int, device: torch.device) -> Optional[Tensor]:
        cfg = self.config
        kind = cfg.conditioning
        if kind is None:
            if cond is not None:
                raise ValueError("cond must be None for an unconditional DiT (no text_dim or "
                                 "num_classes in its config)")
            return None
        if kind == "class":
            if cond is None:
                cond = torch.full((B,), cfg.num_classes, dtype=torch.long, device=device)
            if not isinstance(cond, Tensor) or cond.dtype not in (torch.int32, torch.int64):
                raise TypeError("cond must be an integer tensor of class labels [B] (index "
                                f"num_classes={cfg.num_classes} is the null class), got "
                                f"{getattr(cond, 'dtype', type(cond).__name__)}")
            if tuple(cond.shape) != (B,):
                raise ValueError(f"cond (class labels) must be [B={B}], got {tuple(cond.shape)}")
            if cond.device != device:
                raise ValueError(f"cond is on {cond.device} but x is on {device}")
            return self.class_embedding(cond).view(B, cfg.class_tokens, cfg.dim)
        if kind == "class_text":
            if cond is None:
                cond = torch.full((B,), cfg.num_classes, dtype=torch.long, device=device)
            if isinstance(cond, Tensor) and cond.dtype in (torch.int32, torch.int64):
                if tuple(cond.shape) != (B,):
                    raise ValueError(f"cond (class labels) must be [B={B}], got "
                                     f"{tuple(cond.shape)}")
                if cond.device != device:
                    raise ValueError(f"cond is on {cond.device} but x is on {device}")
                cond = self.class_text[cond]
        if cond is None:
            raise ValueError("cond is required for a text-conditioned DiT: text embeddings "
                             f"[B, L, text_dim={cfg.text_dim}] (use the encoded empty or negative "
                             "prompt for the unconditional branch)")
        if not isinstance(cond, Tensor) or not cond.is_floating_point():
            raise TypeError("cond must be a floating-point tensor of text embeddings "
                            f"[B, L, {cfg.text_dim}]")
        if cond.ndim != 3 or cond.shape[0] != B or cond.shape[2] != cfg.text_dim or \
                cond.shape[1] < 1:
            raise ValueError(f"cond (text embeddings) must be [B={B}, L, text_dim={cfg.text_dim}]"
                             f", got {tuple(cond.shape)}")
        if cond.device != device:
            raise ValueError(f"cond is on {cond.device} but x is on {device}")
        w = self.text_embedding[0].weight
        return self.text_embedding(cond.to(w.dtype))

    # -- forward --------------------------------------------------------------------------------
    def embed_time(self, t: Tensor, r: Optional[Tensor] = None) -> Tensor:
        """t `[B, F]` in [0, 1] (and r, broadcastable, for MeanFlow) -> e `[B, F, dim]`."""
        cfg = self.config
        dtype = self.time_embedding[0].weight.dtype
        e = self.time_embedding(timestep_embedding(1000.0 * t, cfg.freq_dim).to(dtype))
        if cfg.meanflow:
            h = t - (t if r is None else r)
            e = e + self.time_embedding_h(timestep_embedding(1000.0 * h, cfg.freq_dim).to(dtype))
        return e

    supports_step_cache = True  # forward takes cache= (fmrt.cache.BranchCache)

    def forward(self, x: Tensor, sigma: Time, cond: Optional[Tensor] = None, *,
                r: Optional[Time] = None, cache=None) -> Tensor:
        """x `[B, C, T, H, W]`; sigma in [0, 1] (1 = noise): float, `[B]`, or `[B, T]` per frame
        (every token of frame f gets sigma[:, f]); cond: class labels `[B]` (None = null class),
        text embeddings `[B, L, text_dim]`, or None for an unconditional model; r (MeanFlow
        models only): the second time, same forms as sigma, None = sigma (h = 0).
        Returns `[B, out_channels, T, H, W]` in x's dtype (the velocity, or MeanFlow's average
        velocity u(x, r, t)). cache: a `fmrt.cache.BranchCache` (step caching: the block loop
        runs through it and may reuse the blocks' cached residual; see fmrt.cache)."""
        cfg = self.config
        f, h, w = self._check_x(x)
        B = x.shape[0]
        t = self._check_time("sigma", sigma, x)
        if r is not None:
            if not cfg.meanflow:
                raise ValueError("r is only accepted by a MeanFlow DiT (config.meanflow=True)")
            r = self._check_time("r", r, x)
        context = self._embed_cond(cond, B, x.device)

        dtype = self.patch_embedding.weight.dtype
        tokens = self.patch_embedding(x.to(dtype)).flatten(2).transpose(1, 2)   # [B, L, dim]
        e = self.embed_time(t, r)                                                 # [B, F, dim]
        e0 = self.time_projection(e).unflatten(-1, (6, cfg.dim))                  # [B, F, 6, dim]
        sp, length = self.sequence_parallel, tokens.shape[1]
        sharded = sp is not None and sp.sharded_io
        if sp is not None and cache is not None and _probes(cache):
            raise ValueError("first-block caching decides from each rank's own tokens: it does "
                             "not run sequence-parallel (MagCache does)")
        if sharded:   # x is this rank's block of token rows: tables in the group's shard order
            grid = (f, h * sp.size, w)
            cos, sin = (sp.shard_order(t, grid) for t in
                        rope_3d_tables(cfg.head_dim, grid, cfg.rope_theta, device=x.device))
        else:
            cos, sin = rope_3d_tables(cfg.head_dim, (f, h, w), cfg.rope_theta, device=x.device)
        if sp is not None and not sharded:   # this rank's rows; per-frame modulation by row
            tokens = sp.shard(tokens, length)
            e, e0 = sp.shard_frames(e, length), sp.shard_frames(e0, length)

        # Checkpointing is skipped under forward-mode AD (MeanFlow's JVP): the backward pass
        # would recompute the blocks without the tangents and fail.
        use_ckpt = (self.gradient_checkpointing and torch.is_grad_enabled()
                    and not _forward_ad_active(tokens, e0, context))
        if cache is not None:
            tokens = cache.run(self.blocks, tokens,
                               lambda block, h: block(h, context, e0, cos, sin))
        for block in (self.blocks if cache is None else ()):
            if use_ckpt:
                tokens = checkpoint(block, tokens, context, e0, cos, sin, use_reentrant=False)
            else:
                tokens = block(tokens, context, e0, cos, sin)

        out = self.head(tokens, e)
        if sp is not None and not sharded:
            out = sp.gather(out, length)
        pt, ph, pw = cfg.patch_size
        out = rearrange(out, "b (f h w) (x y z c) -> b c (f x) (h y) (w z)", f=f, h=h, w=w,
                        x=pt, y=ph, z=pw)
        return out.to(x.dtype)
