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
It hands to diffusers' `WanAttnProcessor` only what it cannot compute: an attention mask,
context parallelism (self-attention), float64 activations, a rotary table that is not one
`[S, D]` table for all batch items, an I2V context of 512 tokens or fewer, a context given
together with a rotary table or to a fused self-attention module, a module it does not support.
`fmrt_calls` / `fallback_calls` on each processor count its eager calls of each kind.
"""
from __future__ import annotations

import functools
import numbers
from typing import Any, Optional, Union

import torch
from torch import Tensor

from fmrt import ops
from fmrt.attention import BACKENDS, attention, backend_available

from diffusers.models.transformers.transformer_wan import (WanAttention, WanAttnProcessor,
                                                           WanTransformer3DModel)
from diffusers.schedulers.scheduling_flow_match_euler_discrete import (
    FlowMatchEulerDiscreteScheduler as _DiffusersFlowMatchEuler,
    FlowMatchEulerDiscreteSchedulerOutput,
)

__all__ = ["FmrtWanAttnProcessor", "accelerate", "restore", "accelerate_wan", "restore_wan",
           "FlowMatchEulerDiscreteScheduler", "FlowMatchEulerDiscreteSchedulerOutput"]

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
        if (attention_mask is not None or hidden_states.dtype not in ops.FLOAT_DTYPES
                or self.unsupported(attn) is not None
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
# FlowMatchEulerDiscreteScheduler: diffusers' scheduler with a fused, sync-free step
# ---------------------------------------------------------------------------------------------

_INTEGER_TIMESTEP_MSG = (
    "Passing integer indices (e.g. from `enumerate(timesteps)`) as timesteps to"
    " `FlowMatchEulerDiscreteScheduler.step()` is not supported. Make sure to pass"
    " one of the `scheduler.timesteps` as a timestep.")


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
    Unsupported (ValueError): `stochastic_sampling=True`, `per_token_timesteps`, more than one
    timestep per step.
    """

    @functools.wraps(_DiffusersFlowMatchEuler.__init__)
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _check_scheduler_config(self.config)
        self._tables: Optional[tuple] = None

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

    def _first_index(self, timestep: Union[float, Tensor], device: torch.device):
        """The first step's index: begin_index, else the device-side lookup (0-d tensor)."""
        if self.begin_index is None:
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
        stochastic sampling; per_token_timesteps is not supported (ValueError)."""
        if per_token_timesteps is not None:
            raise ValueError("per_token_timesteps is not supported by fmrt's fused step; use "
                             "diffusers' FlowMatchEulerDiscreteScheduler for it")
        ops.check_float_tensor("sample", sample)
        ops.check_float_tensor("model_output", model_output)
        ops.check_same("model_output", model_output, "sample", sample, dtype=False)
        sigma, sigma_next, idx = self._step_sigmas(timestep, sample)
        prev = ops.euler_step(sample, model_output, sigma, sigma_next,
                              out_dtype=model_output.dtype, eager_rounding=True)
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
        begin_index), fp32 math, sample's dtype. timestep: 0-d, `[1]` or `[B]`; noise: sample's
        shape."""
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
            idx = self._lookup(timestep, sample.device)
        elif self._step_index is not None:
            idx = self._step_index
        else:
            idx = self.begin_index
        sigma = sigmas.take(idx) if isinstance(idx, Tensor) else sigmas[idx]
        return ops.noised_sample(sample, sigma, noise, None, return_target=False)[0]
