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
import functools
import numbers
from typing import Union

from diffusers.schedulers.scheduling_flow_match_euler_discrete import (
    FlowMatchEulerDiscreteScheduler as _DiffusersFlowMatchEuler,
    FlowMatchEulerDiscreteSchedulerOutput,
)

__all__ = ["FmrtWanAttnProcessor", "enable_fmrt", "disable_fmrt", "FlowMatchEulerDiscreteScheduler", "FlowMatchEulerDiscreteSchedulerOutput"]


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

    Numerics: diffusers computes `sample.float() + dt * model_output` and returns
    `model_output`'s dtype, but its `dt * model_output` is rounded to the model dtype first;
    fmrt keeps fp32 throughout (bf16 results agree within a bf16 ulp or two of the terms'
    magnitude `|sample| + |dt model_output|`; fp32 results to fp32 rounding).
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
        """`sample + (sigma_next - sigma) * model_output` in model_output's dtype (fp32 math),
        one fused kernel. model_output, sample: `[B, ...]` of one shape (dtypes may differ);
        timestep: one of `timesteps` (float or 1-element float tensor). s_churn, s_tmin,
        s_tmax, s_noise and generator are ignored, as in diffusers without stochastic
        sampling; per_token_timesteps is not supported (ValueError)."""
        if per_token_timesteps is not None:
            raise ValueError("per_token_timesteps is not supported by fmrt's fused step; use "
                             "diffusers' FlowMatchEulerDiscreteScheduler for it")
        ops.check_float_tensor("sample", sample)
        ops.check_float_tensor("model_output", model_output)
        ops.check_same("model_output", model_output, "sample", sample, dtype=False)
        sigma, sigma_next, idx = self._step_sigmas(timestep, sample)
        prev = ops.euler_step(sample, model_output, sigma, sigma_next,
                              out_dtype=model_output.dtype)
        return self._finish(prev, idx, return_dict)

    def step_cfg(self, v_cond: Tensor, v_uncond: Tensor, guidance_scale: Union[float, Tensor],
                 timestep: Union[float, Tensor], sample: Tensor, *, rescale: str = "none",
                 norm_dim: Optional[int] = None, return_dict: bool = True
                 ) -> Union[FlowMatchEulerDiscreteSchedulerOutput, tuple]:
        """Classifier-free guidance and the step in one kernel (`fmrt.ops.guided_euler_step`):
        `step(v_uncond + guidance_scale * (v_cond - v_uncond), timestep, sample)`, the guided
        velocity kept in fp32. rescale="norm": true-CFG `v *= ||v_cond|| / ||v||` per sample
        (norm_dim=None) or per token (norm_dim=-1, packed `[B, L, C]`). v_cond, v_uncond:
        the model's outputs (one dtype, the result's); guidance_scale: float or `[B]`."""
        ops.check_float_tensor("sample", sample)
        ops.check_float_tensor("v_cond", v_cond)
        ops.check_same("v_cond", v_cond, "sample", sample, dtype=False)
        sigma, sigma_next, idx = self._step_sigmas(timestep, sample)
        prev = ops.guided_euler_step(sample, v_cond, v_uncond, guidance_scale, sigma, sigma_next,
                                     rescale=rescale, norm_dim=norm_dim, out_dtype=v_cond.dtype)
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
