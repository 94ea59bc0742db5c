"""What the tests of the guided loops (`qwen_image_true_cfg_loop`, `ltx_cfg_loop`,
`hunyuan_video_true_cfg_loop`, `flux_true_cfg_loop`) share: a pipeline with fmrt's scheduler,
the seeded generator, and one call of the stock pipeline or of the loop with the same
arguments (the test file's RUN, prompts and negative prompts unless overridden)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

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
