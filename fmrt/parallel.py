"""Sequence parallelism (Ulysses) for fmrt's DiT over torch.distributed.

A sequence-parallel group of N ranks runs one sample together. Outside attention every rank
holds 1/N of the tokens (the token sequence padded at its end to a multiple of N, rank j holding
rows [j Lp, (j+1) Lp) with Lp = ceil(L / N)); around self-attention one all-to-all trades the
sequence shards for head shards (`[B, Lp, H, D]` -> `[B, N Lp, H/N, D]`), the padding rows are
cut off, every rank runs exact global attention over all L tokens for its H/N heads, and a
second all-to-all trades back. Cross-attention needs no communication (local queries, full
text keys). RoPE rows, per-frame (TI2V) modulation and the fused q/k RMSNorm + RoPE follow the
shard: the norm over all heads runs before the all-to-all, where each token has all its heads.

What each rank computes (`DiT.forward` with `model.sequence_parallel` set):

    tokens = patch_embedding(x)                    full [B, L, dim], then this rank's rows
    blocks on the local rows (all-to-all twice per self-attention)
    out = head(tokens); all-gather -> full [B, L, ...] on every rank; unpatchify

The output is the full model output on every rank of the group, so losses and samplers run
unchanged (every rank of a group must get the same inputs: same batch, same seeds). Its
backward takes this rank's rows of the (replicated) output gradient; each rank's parameter
gradients then hold the contribution of its own tokens, and `reduce_gradients` sums them over
the group. Every collective here is an autograd Function with a backward and a forward-mode
(jvp) rule, so `torch.func.jvp` (MeanFlow) runs through it, gradients through the tangent too.

    mesh = make_mesh(sp=2)                     # (dp, sp) DeviceMesh over the world
    enable_sequence_parallel(model, mesh["sp"].get_group())
    loss = sft_loss(model, x0, ...); loss.backward()
    reduce_gradients(model.parameters(), model.sequence_parallel)   # then dp averaging

Sharded sampling (`enable_sequence_parallel(model, group, sharded_io=True)`): the latent itself
stays split through the sampling loop. Rank j holds the block of token rows
`x[:, :, :, j H/N : (j+1) H/N]` (`shard_latent`; H / patch_h must be divisible by N): every
frame and every W row of its tokens, so a shard is itself a latent `[B, C, T, H/N, W]`. The
model patch-embeds the shard, runs its tokens (RoPE tables reordered to the group's shard
order, no padding) and returns its shard of the output with no gather; the fused guided steps
run on the shard with no communication; `fmrt.sampling.sample(..., sequence_parallel=sp)`
shards the noise and gathers only the final latent. Options needing whole-sample statistics
(rescale="norm" per sample, CFG-Zero*, diagnostics) or per-rank host decisions (adaptive
guidance reuse, first-block caching) and the SDE solver are refused there.

    sp = enable_sequence_parallel(model, group, sharded_io=True)
    x = sample(model, noise, cond=..., uncond=..., sequence_parallel=sp)   # full x, every rank
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn


def ulysses_degrees(num_heads: int) -> list[int]:
    """The sequence-parallel degrees Ulysses can run with `num_heads` heads: its divisors."""
    return [d for d in range(1, num_heads + 1) if num_heads % d == 0]


def check_degree(sp: int, num_heads: int) -> None:
    """ValueError unless the Ulysses degree `sp` divides the head count."""
    if num_heads % sp:
        raise ValueError(f"sequence-parallel degree {sp} does not divide the model's {num_heads} "
                         f"attention heads (Ulysses gives each rank num_heads / sp heads); "
                         f"degrees that work: {ulysses_degrees(num_heads)}")


def make_mesh(sp: int, device_type: str = "cpu"):
    """A `(dp, sp)` DeviceMesh over the whole (initialised) world: ranks r and r + 1 ... share a
    sample (`sp` consecutive ranks form a sequence-parallel group, so on one node they share
    NVLink); dp = world / sp. ValueError for a degree < 1, larger than the world, or not
    dividing it."""
    if isinstance(sp, bool) or not isinstance(sp, int):
        raise TypeError(f"sp must be an int, got {type(sp).__name__}")
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("sequence parallelism needs torch.distributed initialised (launch with "
                         "torchrun)")
    world = dist.get_world_size()
    if sp < 1:
        raise ValueError(f"sp must be >= 1, got {sp}")
    if sp > world:
        raise ValueError(f"sequence-parallel degree {sp} is larger than the world of {world} "
                         f"processes (launch with torchrun --nproc-per-node {sp} or more)")
    if world % sp:
        raise ValueError(f"sequence-parallel degree {sp} does not divide the world of {world} "
                         f"processes (dp x sp must equal the number of processes)")
    from torch.distributed.device_mesh import init_device_mesh
    return init_device_mesh(device_type, (world // sp, sp), mesh_dim_names=("dp", "sp"))


# ---------------------------------------------------------------------------------------------
# collectives as autograd Functions (backward and forward-mode rules)
# ---------------------------------------------------------------------------------------------

def _all_to_all(x: Tensor, group, scatter_dim: int, gather_dim: int) -> Tensor:
    """Split x in N chunks along scatter_dim, send chunk j to rank j; concatenate the chunks
    received (in rank order) along gather_dim. (all_to_all_single: gloo has no list form.)"""
    n = dist.get_world_size(group)
    send = torch.stack(x.chunk(n, dim=scatter_dim)).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return torch.cat(recv.unbind(0), dim=gather_dim)


class _AllToAll(torch.autograd.Function):
    """y = all_to_all(x); backward: the inverse all-to-all; jvp: the same all-to-all."""

    @staticmethod
    def forward(x, group, scatter_dim, gather_dim):
        return _all_to_all(x, group, scatter_dim, gather_dim)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.group, ctx.scatter_dim, ctx.gather_dim = inputs[1:]

    @staticmethod
    def backward(ctx, grad):
        return _AllToAll.apply(grad, ctx.group, ctx.gather_dim, ctx.scatter_dim), None, None, None

    @staticmethod
    def jvp(ctx, tangent, *_):
        return _AllToAll.apply(tangent, ctx.group, ctx.scatter_dim, ctx.gather_dim)


def _all_gather(x: Tensor, group, dim: int) -> Tensor:
    n = dist.get_world_size(group)
    parts = [torch.empty_like(x) for _ in range(n)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


class _GatherReplicated(torch.autograd.Function):
    """y = all_gather(x) along dim. The group then computes one loss from y, replicated, so y's
    gradient is the same on every rank: backward returns this rank's slice of it (no
    reduction). jvp: the all-gather of the tangents."""

    @staticmethod
    def forward(x, group, dim):
        return _all_gather(x, group, dim)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.group, ctx.dim = inputs[1:]
        ctx.size = inputs[0].shape[inputs[2]]

    @staticmethod
    def backward(ctx, grad):
        rank = dist.get_rank(ctx.group)
        return grad.narrow(ctx.dim, rank * ctx.size, ctx.size), None, None

    @staticmethod
    def jvp(ctx, tangent, *_):
        return _GatherReplicated.apply(tangent, ctx.group, ctx.dim)


def all_to_all(x: Tensor, group, scatter_dim: int, gather_dim: int) -> Tensor:
    """Differentiable (reverse and forward mode) all-to-all over `group`."""
    return _AllToAll.apply(x, group, scatter_dim, gather_dim)


def gather_replicated(x: Tensor, group, dim: int) -> Tensor:
    """Differentiable all-gather whose result feeds a loss replicated over the group."""
    return _GatherReplicated.apply(x, group, dim)


# ---------------------------------------------------------------------------------------------
# the sequence-parallel group a model runs on
# ---------------------------------------------------------------------------------------------

@dataclass
class SequenceParallel:
    """One Ulysses group: `group` (a ProcessGroup, None = the world), its `size` and this
    process's `rank` in it."""
    group: Optional[object]
    size: int
    rank: int
    sharded_io: bool = False                      # the model takes and returns latent shards
    patch: tuple[int, int, int] = (1, 1, 1)        # the DiT's patch size (for the shards)

    @classmethod
    def of(cls, group=None) -> "SequenceParallel":
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError("sequence parallelism needs torch.distributed initialised")
        return cls(group, dist.get_world_size(group), dist.get_rank(group))

    def local_len(self, length: int) -> int:
        """Rows per rank: ceil(length / size) (the sequence padded to size * local_len)."""
        return -(-length // self.size)

    def shard(self, x: Tensor, length: int, dim: int = 1, fill: float = 0.0) -> Tensor:
        """This rank's rows of x (`length` rows along dim), the end padded with `fill`."""
        lp = self.local_len(length)
        pad = lp * self.size - length
        if pad:
            spec = [0, 0] * (x.ndim - 1 - dim % x.ndim) + [0, pad]
            x = F.pad(x, spec, value=fill)
        return x.narrow(dim, self.rank * lp, lp)

    def shard_frames(self, e: Tensor, length: int) -> Tensor:
        """A per-frame table `[B, F, ...]` (F = 1: shared by all tokens, returned as is) ->
        `[B, Lp, ...]`: the row of each local token's frame (L / F tokens per frame)."""
        frames = e.shape[1]
        if frames == 1:
            return e
        lp = self.local_len(length)
        idx = torch.arange(self.rank * lp, (self.rank + 1) * lp, device=e.device)
        return e.index_select(1, idx.clamp(max=length - 1) // (length // frames))

    def gather(self, x: Tensor, length: int, dim: int = 1) -> Tensor:
        """The local rows of every rank, concatenated, the padding cut: `length` rows."""
        return gather_replicated(x, self.group, dim).narrow(dim, 0, length)

    # -- sharded sampling (sharded_io): the latent stays split by token rows -------------------
    def shard_latent(self, x: Tensor) -> Tensor:
        """This rank's block of token rows of a latent `[B, C, T, H, W]`:
        `[B, C, T, H / size, W]` (rows [rank H / size, (rank + 1) H / size)); H / patch_h (the
        token rows) must be divisible by the degree. Every W row and every frame of a token
        row stays on one rank, so a shard is itself a latent (per-frame sigmas, first-frame
        pinning and per-row norms work on it unchanged)."""
        if x.ndim != 5:
            raise ValueError(f"sharded sampling needs a latent [B, C, T, H, W], got shape "
                             f"{tuple(x.shape)}")
        H, ph = x.shape[3], self.patch[1]
        if H % ph:
            raise ValueError(f"the latent's height {H} is not divisible by the patch height {ph}")
        rows = H // ph
        if rows % self.size:
            ok = [d for d in range(1, rows + 1) if rows % d == 0]
            raise ValueError(f"sharded sampling splits the latent's {rows} token rows (height "
                             f"{H} / patch {ph}) over the {self.size} ranks of the group: the "
                             f"degree must divide them (degrees that do: {ok}; from Python, "
                             f"sharded_io=False samples any size, every rank stepping the full "
                             f"latent)")
        n = H // self.size
        return x.narrow(3, self.rank * n, n).contiguous()

    def gather_latent(self, x: Tensor) -> Tensor:
        """The inverse of `shard_latent` on every rank: the shards concatenated along H."""
        return _all_gather(x, self.group, 3)

    def shard_order(self, table: Tensor, grid: tuple[int, int, int]) -> Tensor:
        """Rows of a per-token table over the full (f, h, w) token grid, reordered to the
        order the group's shards hold them: rank-major, then (f, h / size, w). The contiguous
        split of this order (`shard`) gives each rank the rows of its own tokens."""
        f, h, w = grid
        rest = table.shape[1:]
        return table.reshape(f, self.size, h // self.size, w, *rest).transpose(0, 1) \
            .reshape(table.shape)

    def attention(self, q: Tensor, k: Tensor, v: Tensor, length: int, attend) -> Tensor:
        """Global attention over `length` tokens from the local rows q, k, v `[B, Lp, H, D]`:
        all-to-all to `[B, size * Lp, H / size, D]`, padding rows cut, `attend(q, k, v)`,
        padded again, all-to-all back. Returns `[B, Lp, H, D_v]`."""
        H = q.shape[2]
        check_degree(self.size, H)
        q, k, v = (all_to_all(t, self.group, 2, 1).narrow(1, 0, length) for t in (q, k, v))
        out = attend(q, k, v)
        pad = self.local_len(length) * self.size - length
        if pad:
            out = F.pad(out, (0, 0, 0, 0, 0, pad))
        return all_to_all(out, self.group, 1, 2)


def enable_sequence_parallel(model: nn.Module, group=None, *,
                             sharded_io: bool = False) -> SequenceParallel:
    """Run `model` (an `fmrt.models.DiT`, possibly wrapped: LoRA, FSDP2) sequence-parallel over
    `group` (None = the world): sets `sequence_parallel` on the DiT and its self-attention
    modules. Checks the degree against the head count and that the group's ranks hold the same
    weights (ValueError otherwise: broadcast or seed them the same first).

    sharded_io=False: the model takes the full latent and returns the full output on every
    rank (training, any sampler). sharded_io=True (sampling): the model takes this rank's shard
    of the latent and returns its shard of the output (`SequenceParallel.shard_latent`: a
    block of token rows, `[B, C, T, H / N, W]`), with no gather; pass the returned object to
    `fmrt.sampling.sample(..., sequence_parallel=sp)`, which shards the noise, steps on the
    shards and gathers only the final latent."""
    from fmrt.models.attention import WanSelfAttention
    from fmrt.models.dit import DiT
    sp = SequenceParallel.of(group)
    dits = [m for m in model.modules() if isinstance(m, DiT)]
    if len(dits) != 1:
        raise ValueError(f"enable_sequence_parallel needs a model holding one fmrt DiT, found "
                         f"{len(dits)}")
    if not isinstance(sharded_io, bool):
        raise TypeError(f"sharded_io must be a bool, got {type(sharded_io).__name__}")
    sp.sharded_io, sp.patch = sharded_io, tuple(dits[0].config.patch_size)
    check_degree(sp.size, dits[0].config.num_heads)
    if sp.size > 1:
        _check_same_weights(model, sp)
    for m in model.modules():
        if isinstance(m, (DiT, WanSelfAttention)):
            m.sequence_parallel = sp if (sp.size > 1 or sharded_io) else None
    return sp


def disable_sequence_parallel(model: nn.Module) -> None:
    from fmrt.models.attention import WanSelfAttention
    from fmrt.models.dit import DiT
    for m in model.modules():
        if isinstance(m, (DiT, WanSelfAttention)):
            m.sequence_parallel = None


def _check_same_weights(model: nn.Module, sp: SequenceParallel) -> None:
    """One float64 checksum of the local parameter tensors, compared over the group (on the
    device the group's backend communicates from: CUDA for NCCL)."""
    dev = (torch.device("cuda", torch.cuda.current_device())
           if dist.get_backend(sp.group) == "nccl" else torch.device("cpu"))
    with torch.no_grad():
        s = torch.zeros(2, dtype=torch.float64, device=dev)
        for p in model.parameters():
            t = p.to_local() if hasattr(p, "to_local") else p
            t = t.detach().to(dev, torch.float64)
            s += torch.stack([t.sum(), (t * t).sum()])
        lo, hi = s.clone(), s.clone()
        dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=sp.group)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=sp.group)
    if not torch.equal(lo, hi):
        raise ValueError("the ranks of the sequence-parallel group hold different weights: load "
                         "or initialise the model identically on every rank (same seed), or "
                         "broadcast it, before enable_sequence_parallel")


def reduce_gradients(params: Iterable[Tensor], sp: Optional[SequenceParallel]) -> None:
    """Sum the parameter gradients over the sequence-parallel group (each rank's gradients hold
    its tokens' contribution only). One flat all-reduce per dtype; FSDP2 / DTensor gradients
    are reduced shard by shard (the group's ranks hold the same shards)."""
    if sp is None or sp.size == 1:
        return
    by_dtype: dict = {}
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        g = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
        by_dtype.setdefault(g.dtype, []).append(g)
    for grads in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=sp.group)
        for g, part in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(part.view_as(g))
