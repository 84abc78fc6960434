"""The one table of weight names between open_clip's ViT `CLIP` and `transformers.CLIPModel`, used in both directions.

[`clip_weight_pairs`] lists, for a model of a given depth, which open_clip tensor holds which `CLIPModel` tensors and
how the layouts differ; [`open_clip_to_clip`] and [`clip_to_open_clip`] apply it to a state dict one way or the other.
Only torch is needed here: open_clip itself is imported by the code that builds or checks its models.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

__all__ = ["WeightPair", "clip_to_open_clip", "clip_weight_pairs", "open_clip_to_clip"]


@dataclass(frozen=True)
class WeightPair:
    """
    One open_clip tensor and the `CLIPModel` tensor(s) it holds.

    Args:
        open_clip (`str`):
            The name in open_clip's state dict.
        clip (`tuple[str, ...]`):
            The names in `CLIPModel`'s state dict; several when open_clip stacks them along the first dimension (the
            query, key and value projections of one attention layer, in that order).
        transpose (`bool`, *optional*, defaults to `False`):
            open_clip keeps the matrix `P` of `x @ P`, `nn.Linear` the matrix `W` of `x @ W.T`.
        scalar (`bool`, *optional*, defaults to `False`):
            A 0-dimensional tensor in `CLIPModel`; open_clip may keep it with shape `[1]` (`nonscalar_logit_scale`).
    """

    open_clip: str
    clip: tuple[str, ...]
    transpose: bool = False
    scalar: bool = False


def _linear(open_clip: str, clip: str) -> list[WeightPair]:
    return [WeightPair(f"{open_clip}.{part}", (f"{clip}.{part}",)) for part in ("weight", "bias")]


def _encoder_pairs(open_clip: str, clip: str, num_layers: int) -> list[WeightPair]:
    pairs = []
    for index in range(num_layers):
        block, layer = f"{open_clip}.resblocks.{index}", f"{clip}.encoder.layers.{index}"
        attention = tuple(f"{layer}.self_attn.{name}_proj" for name in ("q", "k", "v"))
        # open_clip keeps q, k and v stacked in one in-projection (nn.MultiheadAttention's layout).
        pairs.append(WeightPair(f"{block}.attn.in_proj_weight", tuple(f"{name}.weight" for name in attention)))
        pairs.append(WeightPair(f"{block}.attn.in_proj_bias", tuple(f"{name}.bias" for name in attention)))
        for source, target in (
            ("attn.out_proj", "self_attn.out_proj"),
            ("ln_1", "layer_norm1"),
            ("ln_2", "layer_norm2"),
            ("mlp.c_fc", "mlp.fc1"),
            ("mlp.c_proj", "mlp.fc2"),
        ):
            pairs += _linear(f"{block}.{source}", f"{layer}.{target}")
    return pairs


def clip_weight_pairs(
    vision_layers: int, text_layers: int, text_prefix: str = "", linear_text_projection: bool = False
) -> list[WeightPair]:
    """
    Every weight of an open_clip ViT `CLIP` and where it is in `CLIPModel`.

    Args:
        vision_layers (`int`):
            Transformer blocks of the image tower.
        text_layers (`int`):
            Transformer blocks of the text tower.
        text_prefix (`str`, *optional*, defaults to `""`):
            Where open_clip keeps the text tower: `""` in `CLIP`, `"text."` in `CustomTextCLIP`.
        linear_text_projection (`bool`, *optional*, defaults to `False`):
            Whether the text projection is an `nn.Linear` (`CustomTextCLIP` with `proj_type="linear"` and a bias
            option) rather than a matrix.

    Returns:
        `list[WeightPair]`: the pairs, in `CLIPModel`'s order of the towers.
    """
    text = text_prefix
    projection = (
        WeightPair(f"{text}text_projection.weight", ("text_projection.weight",))
        if linear_text_projection
        else WeightPair(f"{text}text_projection", ("text_projection.weight",), transpose=True)
    )
    return [
        WeightPair("visual.conv1.weight", ("vision_model.embeddings.patch_embedding.weight",)),
        WeightPair("visual.class_embedding", ("vision_model.embeddings.class_embedding",)),
        WeightPair("visual.positional_embedding", ("vision_model.embeddings.position_embedding.weight",)),
        *_linear("visual.ln_pre", "vision_model.pre_layrnorm"),
        *_encoder_pairs("visual.transformer", "vision_model", vision_layers),
        # open_clip applies ln_post to every token, then takes the class token; per-token norms commute with that.
        *_linear("visual.ln_post", "vision_model.post_layernorm"),
        WeightPair("visual.proj", ("visual_projection.weight",), transpose=True),
        WeightPair(f"{text}token_embedding.weight", ("text_model.embeddings.token_embedding.weight",)),
        WeightPair(f"{text}positional_embedding", ("text_model.embeddings.position_embedding.weight",)),
        *_encoder_pairs(f"{text}transformer", "text_model", text_layers),
        *_linear(f"{text}ln_final", "text_model.final_layer_norm"),
        projection,
        WeightPair("logit_scale", ("logit_scale",), scalar=True),
    ]


def open_clip_to_clip(state: Mapping[str, torch.Tensor], pairs: Sequence[WeightPair]) -> dict[str, torch.Tensor]:
    """open_clip's tensors under `CLIPModel`'s names (views where the layout allows; copy them to keep)."""
    converted = {}
    for pair in pairs:
        tensor = state[pair.open_clip]
        if pair.scalar:
            tensor = tensor.reshape(())
        if pair.transpose:
            tensor = tensor.T
        parts = tensor.chunk(len(pair.clip)) if len(pair.clip) > 1 else (tensor,)
        converted.update(zip(pair.clip, parts, strict=True))
    return converted


def clip_to_open_clip(state: Mapping[str, torch.Tensor], pairs: Sequence[WeightPair]) -> dict[str, torch.Tensor]:
    """`CLIPModel`'s tensors under open_clip's names, contiguous (as safetensors needs them)."""
    converted = {}
    for pair in pairs:
        parts = [state[name] for name in pair.clip]
        tensor = parts[0] if len(parts) == 1 else torch.cat(parts)
        if pair.transpose:
            tensor = tensor.T
        converted[pair.open_clip] = tensor.contiguous()
    return converted
