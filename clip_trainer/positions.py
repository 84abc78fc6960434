"""Longer captions than a pretrained text tower was trained with: Long-CLIP's stretching of its position table.

A CLIP or SigLIP text tower adds one learned vector per position (a `nn.Embedding` of `max_position_embeddings`
rows), so it cannot read a token past its last row. Long-CLIP (Zhang et al. 2024, "Long-CLIP: Unlocking the
Long-Text Capability of CLIP") found that only the first ~20 positions of CLIP's 77 are well trained, and lengthens the
table by keeping those 20 rows as they are and stretching the rest (rows 20..76) by linear interpolation over the new
length, before fine-tuning on long captions. [`extend_text_positions`] does this once, when the model is loaded for
training, and writes the new length into the model's text config (`max_position_embeddings`) and the tokenizer
(`model_max_length`), so that whatever loads the saved folder (`from_pretrained`, the processor, the ONNX export)
reads the longer length by itself.

transformers has no such resizing: `resize_token_embeddings` resizes the vocabulary, and the vision towers'
`interpolate_pos_encoding` interpolates patch positions on the fly, on a 2-D grid, at every call; neither applies to
text positions.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModel, PretrainedConfig, PreTrainedTokenizerBase
from transformers.utils import logging

from .errors import ConfigError

logger = logging.get_logger(__name__)

# Long-CLIP keeps CLIP's first 20 positions, the ones its study found well trained, and stretches the others.
LONG_CLIP_KEPT_POSITIONS = 20
# The names transformers gives a text tower's learned absolute position table (CLIP/SigLIP: singular; BERT: plural).
_TABLE_NAMES = ("position_embedding", "position_embeddings")


def stretch_position_table(table: torch.Tensor, length: int, keep: int = LONG_CLIP_KEPT_POSITIONS) -> torch.Tensor:
    """
    Long-CLIP's knowledge-preserved stretching of a learned position table to `length` rows.

    Rows `0 .. keep-1` are copied. Row `p >= keep` of the new table is the old table read at the fractional position
    `keep + (p - keep) / s`, with the stretch `s = (length - keep) / (rows - keep)`, by linear interpolation between
    the two rows around it. The last few new rows fall past the old last row (between `rows - 1` and `rows`); they
    continue the line through the last two old rows, as Long-CLIP's own code does.

    Args:
        table (`torch.Tensor` of shape `(rows, dim)`): the learned positions.
        length (`int`): rows of the new table; more than `rows`.
        keep (`int`, *optional*, defaults to 20): leading rows kept as they are.

    Returns:
        `torch.Tensor` of shape `(length, dim)`, of `table`'s dtype and device. The arithmetic is done in float64, so
        that a bfloat16 table is rounded once, at the end.
    """
    rows = table.shape[0]
    if length <= rows:
        raise ValueError(f"`length` is {length}; stretching makes a table longer than its {rows} rows.")
    if rows < keep + 2:
        raise ValueError(f"A table of {rows} rows has fewer than two rows after the {keep} kept ones to interpolate.")
    old = table.detach().to(torch.float64)
    stretch = (length - keep) / (rows - keep)
    source = keep + (torch.arange(keep, length, dtype=torch.float64, device=old.device) - keep) / stretch
    # The segment below each source position; the tail past the last row stays on the last segment and extrapolates.
    lower = source.floor().long().clamp(max=rows - 2)
    weight = (source - lower).unsqueeze(1)
    stretched = old[lower] + weight * (old[lower + 1] - old[lower])
    return torch.cat([old[:keep], stretched]).to(table.dtype)


@dataclass
class PositionTable:
    """A text tower's learned position table and the module that holds it (with its per-position buffers)."""

    owner: nn.Module
    name: str
    embedding: nn.Embedding


def _describe(config: PretrainedConfig) -> str:
    """The text tower as the messages name it: by the family's `model_type`, and a dual encoder's by its own too."""
    if config.model_type == "vision-text-dual-encoder":
        return f"this {config.model_type!r} model's text tower ({config.text_config.model_type!r})"
    return f"this {config.model_type!r} model's text tower"


def find_position_table(model: nn.Module, length: int, config: PretrainedConfig | None = None) -> PositionTable:
    """
    The learned absolute position table of `model`'s text tower (`model.text_model`), for the families clip-trainer
    trains: CLIP, SigLIP and SigLIP 2 (`embeddings.position_embedding`), and dual encoders whose text tower has a
    BERT-like table (`embeddings.position_embeddings`).

    Args:
        model: the model (or one built on the meta device from its config).
        length (`int`): the number of positions asked for, for the error message.
        config (*optional*): the model's config, when it is not `model.config`.

    Raises:
        [`ConfigError`]: naming the family when its text positions are not such a table (rotary or relative positions,
        fixed sinusoids, a table offset by the padding id as RoBERTa's is), or when the table has too few rows after
        the 20 Long-CLIP keeps.
    """
    config = config if config is not None else model.config
    text_config = config.text_config
    positions = text_config.max_position_embeddings
    tower = getattr(model, "text_model", None)
    what = _describe(config)
    found = []
    for module in tower.modules() if tower is not None else ():
        for name in _TABLE_NAMES:
            child = getattr(module, name, None)
            if isinstance(child, nn.Embedding) and child.num_embeddings == positions:
                found.append(PositionTable(module, name, child))
    problem = None
    other = "or train a text tower whose positions are a learned table (CLIP, SigLIP, SigLIP 2, BERT)"
    if len(found) != 1 or getattr(text_config, "sinusoidal_pos_embds", False):
        problem = (
            "has no learned table of positions to stretch (its positions are rotary, relative or fixed sinusoids)"
        )
    elif found[0].embedding.padding_idx is not None:
        problem = (
            "numbers its positions from the padding id (a RoBERTa-style table), which the stretching does not handle"
        )
    elif positions < LONG_CLIP_KEPT_POSITIONS + 2:
        problem = (
            f"has only {positions} positions, and Long-CLIP's stretching keeps the first {LONG_CLIP_KEPT_POSITIONS} "
            f"and interpolates the rest, so it needs at least {LONG_CLIP_KEPT_POSITIONS + 2}"
        )
        other = "or train a new model with more positions (`config_name`, whose text config sets them)"
    if problem is not None:
        # A RoBERTa-style table (AltCLIP's) numbers tokens after the padding id: it reads that many fewer tokens.
        padding = found[0].embedding.padding_idx if len(found) == 1 else None
        usable = positions - padding - 1 if padding is not None else positions
        raise ConfigError(
            f"`max_seq_length` is {length}, above the text model's {usable} positions, which would extend them, "
            f"but {what} {problem}; set it to {usable} or less (longer captions are truncated), {other}."
        )
    return found[0]


def check_positions_extendable(config: PretrainedConfig, length: int, readable_positions: int | None = None) -> None:
    """
    Whether `extend_text_positions` can lengthen the text tower of a model of `config` to `length` positions, checked
    on the config alone (the model is built on the meta device: no weights, no memory), before any data is read.

    Raises:
        [`ConfigError`]: naming the family and the fix, as [`find_position_table`].
    """
    readable = readable_positions if readable_positions is not None else config.text_config.max_position_embeddings
    if length <= readable:
        return
    # `from_config` writes the attention implementation into the config it is given; keep the caller's intact.
    config = copy.deepcopy(config)
    try:
        with torch.device("meta"):
            model = AutoModel.from_config(config)
    except Exception as error:  # a tower transformers cannot build from its config alone (remote code, ...)
        positions = readable
        raise ConfigError(
            f"`max_seq_length` is {length}, above the text model's {positions} positions, and {_describe(config)} "
            f"could not be inspected for a position table to extend ({type(error).__name__}: {error}); set it to "
            f"{positions} or less."
        ) from None
    find_position_table(model, length, config)


def extend_text_positions(model: nn.Module, length: int, tokenizer: PreTrainedTokenizerBase | None = None) -> bool:
    """
    Lengthens the text tower of `model` to `length` positions by Long-CLIP's stretching
    ([`stretch_position_table`]), in place: the position table, the per-position buffers beside it (`position_ids`,
    and BERT's `token_type_ids`), the text config's `max_position_embeddings`, and the tokenizer's `model_max_length`.
    Call it once, after loading the model and before training (before the optimizer is built).

    Args:
        model: a CLIP, SigLIP, SigLIP 2 or dual-encoder model whose text tower has a learned position table.
        length (`int`): the new number of positions.
        tokenizer ([`PreTrainedTokenizerBase`], *optional*): the model's tokenizer, whose `model_max_length` becomes
            `length`, so that the saved processor tokenizes to the new length without truncating.

    Returns:
        `bool`: whether the table was lengthened (False when it already has `length` positions or more).

    Raises:
        [`ConfigError`]: when the text tower has no learned position table to stretch (see [`find_position_table`]).
    """
    text_config = model.config.text_config
    rows = text_config.max_position_embeddings
    if length <= rows:
        return False
    table = find_position_table(model, length)
    embedding = table.embedding
    with torch.no_grad():
        weight = stretch_position_table(embedding.weight, length)
    embedding.weight = nn.Parameter(weight, requires_grad=embedding.weight.requires_grad)
    embedding.num_embeddings = length
    # The per-position buffers: `position_ids` counts 0..rows-1, BERT's `token_type_ids` is all zeros; they keep
    # whether they are saved (they are not, for the families here: the model rebuilds them from the config).
    for name, buffer in list(table.owner.named_buffers(recurse=False)):
        if buffer.ndim != 2 or buffer.shape[-1] != rows:
            continue
        counting = torch.arange(rows, device=buffer.device, dtype=buffer.dtype).expand_as(buffer)
        if torch.equal(buffer, counting):
            resized = torch.arange(length, device=buffer.device, dtype=buffer.dtype).expand((1, -1))
        elif not buffer.any():
            resized = torch.zeros((1, length), device=buffer.device, dtype=buffer.dtype)
        else:
            raise ConfigError(
                f"The text tower's buffer `{name}` has one value per position that is neither a count nor zeros, so "
                f"it cannot be lengthened with the position table; set `max_seq_length` to {rows} or less."
            )
        persistent = name not in table.owner._non_persistent_buffers_set
        table.owner.register_buffer(name, resized.contiguous(), persistent=persistent)
    # One config object in transformers 5 (the tower's is the model's `text_config`), but a tower built apart keeps
    # its own: both must say the new length, the saved config.json is the model's.
    for config in {
        id(c): c for c in (text_config, getattr(model.text_model, "config", None)) if c is not None
    }.values():
        config.max_position_embeddings = length
    if tokenizer is not None:
        _set_tokenizer_length(tokenizer, length)
    logger.info(
        f"Extended the text positions from {rows} to {length} (Long-CLIP: the first {LONG_CLIP_KEPT_POSITIONS} kept, "
        "the rest stretched); fine-tune on long captions so that the stretched positions are learned."
    )
    return True


def _set_tokenizer_length(tokenizer: PreTrainedTokenizerBase, length: int) -> None:
    """The tokenizer's longest caption becomes `length` everywhere it is kept: `model_max_length`, and a fast
    tokenizer's own truncation, which transformers 5 reads back as a `max_length` that the processor then truncates at
    (a tokenizer saved with truncation at the old length would keep cutting long captions there)."""
    tokenizer.model_max_length = length
    backend = getattr(tokenizer, "_tokenizer", None)
    truncation = getattr(backend, "truncation", None)
    if truncation:
        backend.enable_truncation(
            length, stride=truncation.get("stride", 0), strategy=truncation.get("strategy", "longest_first")
        )
    if "max_length" in getattr(tokenizer, "init_kwargs", {}):
        tokenizer.init_kwargs["max_length"] = length
