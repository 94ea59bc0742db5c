"""What the tests of the guided loops (`qwen_image_true_cfg_loop`, `ltx_cfg_loop`,
`hunyuan_video_true_cfg_loop`, `flux_true_cfg_loop`) share: a pipeline with fmrt's scheduler,
the seeded generator, one call of the stock pipeline or of the loop with the same arguments
(the test file's RUN, prompts and negative prompts unless overridden), and the two checks every
loop passes: fp32 against the stock pipeline (decoded and latent, to 2e-5) and bf16 against
the stock pipeline's own bf16 run."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from tests.helpers import use_backend

_DEFAULT = object()


def with_fmrt_scheduler(pipe):
    from fmrt.integrations.diffusers import FlowMatchEulerDiscreteScheduler
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    return pipe


def gen(seed: int = 3) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@dataclass
class GuidedLoop:
    loop: Callable          # the fmrt loop: loop(pipe, prompt, negative_prompt=..., ...)
    run: dict               # the arguments every call shares
    out: str                # the output's field: "images" or "frames"
    factory: Callable       # a new tiny pipeline of the loop's class (fp32, stock scheduler)
    prompt: Any = field(default_factory=lambda: ["a red cat runs", "a dog jumps"])
    negative_prompt: Any = field(default_factory=lambda: ["blue dog", "green"])

    def _args(self, prompt, negative_prompt, kw):
        prompt = self.prompt if prompt is _DEFAULT else prompt
        negative = self.negative_prompt if negative_prompt is _DEFAULT else negative_prompt
        return prompt, negative, {**self.run, **kw}

    def stock(self, pipe, prompt=_DEFAULT, negative_prompt=_DEFAULT, **kw):
        prompt, negative, kw = self._args(prompt, negative_prompt, kw)
        out = pipe(prompt=prompt, negative_prompt=negative, generator=gen(), **kw)
        return getattr(out, self.out)

    def fused(self, pipe, prompt=_DEFAULT, negative_prompt=_DEFAULT, **kw):
        prompt, negative, kw = self._args(prompt, negative_prompt, kw)
        out = self.loop(pipe, prompt, negative_prompt=negative, generator=gen(), **kw)
        return getattr(out, self.out)

    def pipes(self):
        """(stock pipeline, the same pipeline with fmrt's scheduler)."""
        return self.factory(), with_fmrt_scheduler(self.factory())

    def check_fp32(self, stock, fast, backend: str, shape: tuple):
        """The loop's decoded output (`shape`) and latents equal the stock pipeline's to 2e-5
        on `backend`; returns the stock latents."""
        want = self.stock(stock, output_type="np")
        lat = self.stock(stock, output_type="latent")
        with use_backend(backend):
            got = self.fused(fast, output_type="np")
            got_lat = self.fused(fast, output_type="latent")
        assert got.shape == want.shape == shape and want.std() > 0.01
        np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)
        torch.testing.assert_close(got_lat, lat, atol=2e-5, rtol=0)
        return lat

    def check_bf16(self, stock, *, latent_dtype=torch.bfloat16, exact: bool = True):
        """The loop on a bf16 pipeline (torch path) against the stock bf16 run: latents of
        `latent_dtype`, bit for bit when `exact`, and never further from the fp32 run than 1.5x
        the stock run's error plus two bf16 ulps of its largest value. Returns the bf16 pipeline
        with fmrt's scheduler."""
        ref = self.stock(stock, output_type="latent").float()
        stock16 = self.factory().to(torch.bfloat16)
        fast16 = with_fmrt_scheduler(self.factory().to(torch.bfloat16))
        want = self.stock(stock16, output_type="latent")
        with use_backend("torch"):
            got = self.fused(fast16, output_type="latent")
        assert got.dtype == want.dtype == latent_dtype
        if exact:
            torch.testing.assert_close(got, want, atol=0, rtol=0)
        err_stock = (want.float() - ref).abs().max().item()
        err_fmrt = (got.float() - ref).abs().max().item()
        assert err_stock > 0
        assert err_fmrt <= 1.5 * err_stock + 2 * 2 ** -8 * ref.abs().max().item()
        return fast16

    def check_fmrt_attention(self, stock, fast, backend: str, accelerated: int, **kw):
        """With fmrt's attention (`accelerate(fast)` patches `accelerated` modules, restored
        after), the loop's latents equal the stock pipeline's to 2e-5 on `backend`."""
        from fmrt.integrations.diffusers import accelerate, restore
        want = self.stock(stock, output_type="latent", **kw)
        assert accelerate(fast) == accelerated
        try:
            with use_backend(backend):
                got = self.fused(fast, output_type="latent", **kw)
        finally:
            restore(fast)
        assert got.shape == want.shape and got.shape[0] == 2
        torch.testing.assert_close(got, want, atol=2e-5, rtol=0)
