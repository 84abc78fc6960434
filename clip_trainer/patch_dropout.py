"""Patch dropout (FLIP, Li et al. 2023): while training, each image keeps a random subset of its patch tokens.

The image tower then runs its layers on fewer tokens (half of them at `patch_dropout=0.5`), which is where FLIP's
speed-up comes from; evaluation and export see every patch. transformers' vision towers have no such option, so it is
added here from outside: a forward hook on the tower's embeddings module (`vision_model.embeddings`) replaces its
output, the patch tokens with their position embeddings added (and a ViT's class token in front), by the class token
and a random subset of the patch tokens. That is where open_clip drops them: after the position embeddings, before the
transformer. A hook, not a wrapper module, so that the model's parameters, their names and its config stay exactly
what `from_pretrained` loads and `save_pretrained` writes.

Nothing after the embeddings depends on the number of tokens: CLIP's pre-norm and layers run on any sequence, its
pooler takes token 0 (the class token, always kept); SigLIP's attention-pooling head attends over however many tokens
there are; a ViT's pooler takes token 0. SigLIP 2 (NaFlex) pads its patches and masks the padding in its layers and
its pooling head, with a mask computed from the unpadded input: it is refused until the mask is dropped alike.

Which patches are kept is drawn from a generator of its own, seeded from `(seed, process, optimizer step, draw)`: the
run's seed reproduces it, every process and every step draws other patches, a resumed run draws what the uninterrupted
run drew, and the global random state (dropout, augmentation) is left as it would be without patch dropout. Its
[`get_state`] / [`set_state`] let cached accumulation replay a micro-batch's draw in its second forward pass, as it
replays dropout's: the kept patches of both passes of one micro-batch must be the same, or the cached gradients are
those of another forward than the one backpropagated.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from transformers.utils import logging

from .errors import ConfigError

logger = logging.get_logger(__name__)

# Image towers patch dropout knows, by the `model_type` of their config, with the tokens in front of the patches that
# are always kept: CLIP's and ViT's class token; SigLIP pools with an attention head and has none.
PREFIX_TOKENS = {"clip_vision_model": 1, "siglip_vision_model": 0, "vit": 1}
# The whole models whose image tower is one of those.
MODEL_TOWERS = {"clip": "clip_vision_model", "siglip": "siglip_vision_model"}


def kept_patches(num_patches: int, probability: float) -> int:
    """How many of `num_patches` patch tokens an image keeps: `max(1, int(num_patches * (1 - probability)))`, rounded
    down as open_clip's `PatchDropout` rounds (at least one)."""
    return max(1, int(num_patches * (1 - probability)))


def patch_dropout_problem(config) -> str | None:
    """Why patch dropout cannot train a model of this config (one line naming the family and the fix), or `None`."""
    model_type = getattr(config, "model_type", None)
    if model_type == "siglip2":
        return (
            "`patch_dropout` is not supported for SigLIP 2 (NaFlex): its patches come padded, with a mask that its "
            "layers and pooling head read, which patch dropout would have to drop alike. Drop `patch_dropout`, or "
            "train a CLIP or SigLIP model with it."
        )
    if model_type in MODEL_TOWERS:
        return None
    vision = getattr(config, "vision_config", None)
    tower = getattr(vision, "model_type", None)
    if tower in PREFIX_TOKENS:
        return None
    family = "vision-text dual encoder" if model_type == "vision-text-dual-encoder" else repr(model_type)
    return (
        f"`patch_dropout` drops the patch tokens of a ViT image tower (CLIP, SigLIP or ViT), but this {family}'s image "
        f"tower is a {tower or 'model'!r} one, which patch dropout does not know; drop `patch_dropout`, or use a "
        f"{', '.join(sorted(PREFIX_TOKENS))} image tower."
    )


def vision_embeddings(model: nn.Module) -> tuple[nn.Module, int]:
    """The embeddings module of `model`'s image tower (the module whose output patch dropout thins) and the number of
    tokens in front of its patches (the class token).

    Raises:
        [`ConfigError`]: for a model whose image tower is not one patch dropout knows.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a peft (LoRA) model
    problem = patch_dropout_problem(getattr(base, "config", None))
    if problem is not None:
        raise ConfigError(problem)
    tower = base.vision_model
    # A whole CLIP / SigLIP model holds the transformer itself; a dual encoder holds a `*VisionModel` or a `ViTModel`
    # around it.
    inner = getattr(tower, "vision_model", tower)
    model_type = getattr(getattr(tower, "config", None), "model_type", None) or MODEL_TOWERS[base.config.model_type]
    return inner.embeddings, PREFIX_TOKENS[model_type]


class PatchDropout:
    """Keeps a random subset of each training image's patch tokens, by a forward hook on the image tower's embeddings.

    Args:
        probability (`float`): the share of patch tokens dropped, in [0, 1); each image keeps
            [`kept_patches`]`(patches, probability)` of them, and always its class token.
        seed (`int`): the run's seed.
        process_index (`int`): this process's rank, so that every process draws other patches.
        off_after_steps (`int`, *optional*): from this optimizer step on (0-based, as `global_step` counts the steps
            done), every patch is kept: FLIP's last, unmasked phase.
        step (`Callable[[], int]`, *optional*): the optimizer step being taken (the trainer's `state.global_step`);
            without it every draw counts as one of step 0.

    The hook thins the tokens only while the embeddings module is in training mode and [`enabled`] is true: after
    `model.eval()` (evaluation, export) it returns the embeddings as they are.
    """

    def __init__(
        self,
        probability: float,
        seed: int = 0,
        process_index: int = 0,
        off_after_steps: int | None = None,
        step: Callable[[], int] | None = None,
    ) -> None:
        if not 0 <= probability < 1:
            raise ConfigError(f"`patch_dropout` is {probability}; it must be in [0, 1) (e.g. 0.5).")
        self.probability = probability
        self.seed = seed
        self.process_index = process_index
        self.off_after_steps = off_after_steps
        self.step = step
        self.enabled = True
        self.prefix_tokens = 0
        self.num_patches: int | None = None
        self._step = 0
        self._draws = 0
        self._handle = None
        self._generators: dict[torch.device, torch.Generator] = {}

    # --- attaching --------------------------------------------------------------------------------------------------
    def attach(self, model: nn.Module) -> PatchDropout:
        """Hooks the image tower of `model` (once; attaching again moves the hook to `model`). Returns `self`.

        Raises:
            [`ConfigError`]: for a model whose image tower is not one patch dropout knows.
        """
        embeddings, self.prefix_tokens = vision_embeddings(model)
        # The patches of the configured image size (CLIP and SigLIP keep the count; a ViT its patch embedding).
        self.num_patches = getattr(embeddings, "num_patches", None) or getattr(
            getattr(embeddings, "patch_embeddings", None), "num_patches", None
        )
        self.detach()
        self._handle = embeddings.register_forward_hook(self._hook)
        return self

    def detach(self) -> None:
        """Removes the hook: the model is again exactly the model it was."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    @property
    def attached(self) -> bool:
        return self._handle is not None

    def active(self, step: int | None = None) -> bool:
        """Whether training at optimizer step `step` (default: the current one) drops patches."""
        if not self.enabled or self.probability == 0:
            return False
        step = self._current_step() if step is None else step
        return self.off_after_steps is None or step < self.off_after_steps

    # --- the random state, for cached accumulation's replay --------------------------------------------------------
    def get_state(self) -> tuple[int, int]:
        """Where the draws stand: `(optimizer step, draws made in it)`. Restoring it with [`set_state`] makes the next
        forward keep the patches that the forward after the capture kept (as `torch.Generator`'s pair does)."""
        return (self._step, self._draws)

    def set_state(self, state: tuple[int, int]) -> None:
        self._step, self._draws = state

    # --- the hook ---------------------------------------------------------------------------------------------------
    def _current_step(self) -> int:
        return int(self.step()) if self.step is not None else 0

    def _hook(self, module: nn.Module, args, output):
        if not module.training or not self.active():
            return None  # the embeddings as they are
        return self.drop(output)

    def drop(self, tokens: torch.Tensor) -> torch.Tensor:
        """`tokens` `(batch, prefix + patches, dim)` with each row's prefix (class) tokens and a random subset of its
        patch tokens, in their original order: `(batch, prefix + kept, dim)`."""
        prefix = self.prefix_tokens
        patches = tokens.shape[1] - prefix
        keep = kept_patches(patches, self.probability)
        if self.probability == 0 or keep >= patches:
            return tokens
        indices = self.kept_indices(tokens.shape[0], patches, keep, tokens.device) + prefix
        if prefix:
            front = torch.arange(prefix, device=tokens.device).expand(tokens.shape[0], prefix)
            indices = torch.cat([front, indices], dim=1)
        return tokens.gather(1, indices.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))

    # Kept out of a compiled graph: the seed is computed on the host from plain integers.
    @torch.compiler.disable
    def kept_indices(self, batch: int, patches: int, keep: int, device: torch.device) -> torch.Tensor:
        """The patch positions each of `batch` images keeps, `(batch, keep)`, ascending; the next draw of this run.

        Each image ranks its patches by uniform noise and keeps the `keep` highest (open_clip's draw), so that every
        subset of that size is equally likely and the images of a batch draw independently.
        """
        step = self._current_step()
        if step != self._step:
            self._step, self._draws = step, 0
        # SeedSequence mixes the four integers into a well-spread seed: neighbouring steps or processes do not get
        # neighbouring generator states.
        entropy = [self.seed, self.process_index, self._step, self._draws]
        seed = int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0])
        self._draws += 1
        generator = self._generators.get(device)
        if generator is None:
            # On the tokens' device, so that the draw needs no copy from the host (and no wait for the device).
            generator = self._generators[device] = torch.Generator(device=device)
        generator.manual_seed(seed)
        noise = torch.rand(batch, patches, device=device, generator=generator)
        return noise.topk(keep, dim=1).indices.sort(dim=1).values


def attach_patch_dropout(model: nn.Module, args) -> PatchDropout | None:
    """The patch dropout of training arguments `args` (`patch_dropout`, `patch_dropout_off_after_steps`, `seed`,
    `process_index`) attached to `model`, or `None` when `patch_dropout` is 0. The trainer sets its `step`."""
    probability = getattr(args, "patch_dropout", 0.0) or 0.0
    if probability == 0:
        return None
    dropout = PatchDropout(
        probability,
        seed=args.seed,
        process_index=args.process_index,
        off_after_steps=getattr(args, "patch_dropout_off_after_steps", None),
    )
    dropout.attach(model)
    if dropout.num_patches is not None:
        patches = dropout.num_patches
        logger.info(
            f"Patch dropout {probability}: each training image keeps {kept_patches(patches, probability)} of its "
            f"{patches} patches" + (" and its class token." if dropout.prefix_tokens else ".")
        )
    return dropout
