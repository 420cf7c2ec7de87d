"""Training-free feature caching in the denoising loop: DeepCache (Ma, Fang and Wang, CVPR 2024).

Reference: X. Ma, G. Fang, X. Wang, "DeepCache: Accelerating Diffusion Models for Free", CVPR 2024
(arXiv 2312.00858). Adjacent denoising steps produce nearly the same *deep* UNet features, so a full
pass every N steps refreshes them and the N-1 steps in between recompute only the shallowest skip
branch ("branch 0", the paper's setting for Stable Diffusion):

    full step:    conv_in -> every down block -> mid -> every up block -> conv_out     (features stored)
    cached step:  conv_in ------------------------------------------> last up layer -> conv_out
                         (skip from conv_in)   + stored input of the last up layer

On a cached step every down block, the mid block, every up block but the last, and every layer of the
last up block but its final (resnet, attention) pair return what they returned on the last full step.
The final pair then runs on that stored feature and the fresh conv_in skip. On SD1.5 a cached step
costs about a tenth of a full one.

Why hand-written: the DeepCache package (0.1.1, 2023) wraps forwards by timestep index, which breaks on
PNDM's repeated timestep, and knows nothing of delayed subject conditioning. diffusers' own cache
hooks (FasterCache, FirstBlockCache, ...) target transformer models, not the UNet. So this is a small
set of diffusers `ModelHook`s, attached for one pipeline call and removed after it.

FastComposer needs one rule more than DeepCache: the conditional embedding changes at the delayed-
conditioning switch (text only -> subject-augmented), and features stored before the switch were
computed with the text-only embedding. So a full pass runs at the first iteration, at the first
subject-conditioned iteration, and every N-th iteration counted from the last of those two
(`is_full_pass`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.utils.torch_utils import unwrap_module

logger = logging.getLogger(__name__)

HOOK_NAME = "fastcomposer_deepcache"


def is_full_pass(i: int, interval: int, first_subject_step: int | None) -> bool:
    """Whether loop iteration `i` runs the whole UNet.

    Args:
        i: the loop index (0-based).
        interval: N; 1 means every pass is full (no caching).
        first_subject_step: the first iteration that sees the subject-augmented embedding (None when
            no iteration does, e.g. alpha = 0).
    """
    if interval <= 1:
        return True
    start = first_subject_step if first_subject_step is not None and i >= first_subject_step else 0
    return (i - start) % interval == 0


class _State:
    """Shared by every hook of one UNet: is this a full pass, and what each module returned on the last one."""

    def __init__(self) -> None:
        self.full = True
        self.outputs: dict[str, Any] = {}
        self.full_passes = 0  # counted at the first hooked module; for tests and logs
        self.cached_passes = 0


class _CacheHook(ModelHook):
    """Runs its module on full passes (storing the output) and returns the stored output otherwise."""

    def __init__(self, name: str, state: _State, counts: bool = False):
        super().__init__()
        self.name, self.state, self.counts = name, state, counts

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        state = self.state
        if self.counts:
            if state.full:
                state.full_passes += 1
            else:
                state.cached_passes += 1
        if state.full or self.name not in state.outputs:
            output = self.fn_ref.original_forward(*args, **kwargs)
            state.outputs[self.name] = output
            return output
        return state.outputs[self.name]


def cached_modules(unet: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The modules whose outputs a cached step reuses (DeepCache's branch 0), by qualified name."""
    unet = unwrap_module(unet)
    modules: dict[str, torch.nn.Module] = {}
    for k, block in enumerate(unet.down_blocks):
        modules[f"down_blocks.{k}"] = block
    if unet.mid_block is not None:
        modules["mid_block"] = unet.mid_block
    *upper, last = list(unet.up_blocks)
    for k, block in enumerate(upper):
        modules[f"up_blocks.{k}"] = block
    # Inside the last up block only the final (resnet, attention) pair runs on a cached step.
    n = len(unet.up_blocks) - 1
    for k, resnet in enumerate(last.resnets[:-1]):
        modules[f"up_blocks.{n}.resnets.{k}"] = resnet
    for k, attention in enumerate((getattr(last, "attentions", None) or [])[:-1]):
        modules[f"up_blocks.{n}.attentions.{k}"] = attention
    return modules


class FeatureCache:
    """DeepCache on one UNet for one pipeline call; use `attach` as a context manager.

        with FeatureCache.attach(unet, interval=3) as cache:
            for i, t in enumerate(timesteps):
                cache.full = is_full_pass(i, 3, first_subject_step)
                noise = unet(...)
    """

    def __init__(self, unet: torch.nn.Module, interval: int):
        if interval < 1:
            raise ValueError(f"`cache_interval` must be >= 1 but is {interval}")
        self.interval = interval
        self.state = _State()
        self._registries: list[HookRegistry] = []
        for k, (name, module) in enumerate(cached_modules(unet).items()):
            registry = HookRegistry.check_if_exists_or_initialize(module)
            registry.register_hook(_CacheHook(name, self.state, counts=k == 0), HOOK_NAME)
            self._registries.append(registry)

    @property
    def full(self) -> bool:
        return self.state.full

    @full.setter
    def full(self, value: bool) -> None:
        self.state.full = bool(value)

    def remove(self) -> None:
        """Detach every hook and drop the stored features."""
        for registry in self._registries:
            registry.remove_hook(HOOK_NAME, recurse=False)
        self._registries.clear()
        self.state.outputs.clear()

    @classmethod
    @contextmanager
    def attach(cls, unet: torch.nn.Module, interval: int) -> Iterator[FeatureCache]:
        cache = cls(unet, interval)
        try:
            yield cache
        finally:
            logger.debug("feature cache: %d full, %d cached UNet passes",
                         cache.state.full_passes, cache.state.cached_passes)
            cache.remove()
