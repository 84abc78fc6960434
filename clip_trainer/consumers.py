"""The files that libraries other than transformers 5 read from a model folder, written beside `save_pretrained`'s.

transformers 5 loads a saved model folder as it is; three other common consumers need a little more:

- **transformers.js** (v3) reads an image processor from `preprocessor_config.json` only, while transformers 5 saves
  a processor as one `processor_config.json` with the image processor's settings nested in it. The nested settings
  are written out again as `preprocessor_config.json` (transformers 5 reads either file).
- **transformers 4.x** has no `TokenizersBackend`, the class transformers 5 writes into `tokenizer_config.json` for a
  tokenizer that is only a `tokenizer.json` (the caption tokenizer clip-trainer trains). Its name there becomes
  `PreTrainedTokenizerFast`, which both 4.x and 5 load from `tokenizer.json`. 4.x's `PreTrainedTokenizerFast` also
  sets the pre-tokenizer's `add_prefix_space` to the config's value (default `False`): left out, the first word of
  every caption would get other token ids and the text embeddings would change silently. The config therefore says
  the pre-tokenizer's own value.
- **sentence-transformers** (v6) embeds a CLIP-style model's texts and images through `get_text_features` /
  `get_image_features`, but tokenizes texts with padding to the batch's longest. SigLIP's text tower pools at the
  last position and must see captions padded to the length it was trained with: `modules.json` and
  `sentence_bert_config.json` give sentence-transformers the model's own padding and length (its
  `processing_kwargs`), so `SentenceTransformer(folder).encode(...)` needs no arguments. These two files are what
  `SentenceTransformer.save` itself writes for such a model.
- **every tokenizer reader** takes the longest caption from `tokenizer_config.json`'s `model_max_length`. A run with
  `--max_seq_length` shorter than the tokenizer's trains on captions cut at that length, and the fast tokenizer saves
  that truncation (and SigLIP's padding) in `tokenizer.json`, but `save_pretrained` keeps the tokenizer's own
  `model_max_length`: a SigLIP model trained at 32 positions was evaluated at 64 by whatever read the folder next
  (clip-trainer's own evaluation included) and scored lower. The config says the length the model was trained at.

Each file is written from the files `save_pretrained` has just written, never from a library's objects, so the same
function serves a training run's output folder and an ONNX export folder.
"""

from __future__ import annotations

import json
import os

from transformers.utils import logging

logger = logging.get_logger(__name__)

__all__ = ["write_consumer_files"]

PROCESSOR_CONFIG = "processor_config.json"
IMAGE_PROCESSOR_CONFIG = "preprocessor_config.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
TOKENIZER_FILE = "tokenizer.json"
# The class transformers 5 saves for a tokenizer defined by `tokenizer.json` alone, unknown to transformers 4.x; and
# the name both versions load such a tokenizer by (in 5, `PreTrainedTokenizerFast` is `TokenizersBackend`).
TOKENIZERS_BACKEND = "TokenizersBackend"
PORTABLE_TOKENIZER_CLASS = "PreTrainedTokenizerFast"
SENTENCE_TRANSFORMERS_MODULE = "sentence_transformers.base.modules.transformer.Transformer"


def _read_json(path: str):
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def _write_json(path: str, content) -> str:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(content, handle, indent=2, sort_keys=True, ensure_ascii=False)
        handle.write("\n")
    return path


def _image_processor_config(folder: str) -> str | None:
    """`preprocessor_config.json`: the image processor's settings nested in `processor_config.json`, for readers
    that know only the older, separate file."""
    path = os.path.join(folder, PROCESSOR_CONFIG)
    if not os.path.isfile(path):
        return None
    nested = _read_json(path).get("image_processor")
    if not isinstance(nested, dict):
        return None
    return _write_json(os.path.join(folder, IMAGE_PROCESSOR_CONFIG), nested)


def _add_prefix_space(folder: str) -> bool | None:
    """The `add_prefix_space` of `tokenizer.json`'s pre-tokenizer (a byte-level or metaspace one), else `None`."""
    path = os.path.join(folder, TOKENIZER_FILE)
    if not os.path.isfile(path):
        return None
    pre_tokenizer = _read_json(path).get("pre_tokenizer") or {}
    value = pre_tokenizer.get("add_prefix_space")
    return value if isinstance(value, bool) else None


def _portable_tokenizer_config(folder: str) -> str | None:
    """Renames a `TokenizersBackend` tokenizer class to `PreTrainedTokenizerFast`, with the pre-tokenizer's
    `add_prefix_space`, so that transformers 4.x loads the same tokenizer; other classes are left as they are."""
    path = os.path.join(folder, TOKENIZER_CONFIG)
    if not os.path.isfile(path):
        return None
    config = _read_json(path)
    if config.get("tokenizer_class") != TOKENIZERS_BACKEND:
        return None
    config["tokenizer_class"] = PORTABLE_TOKENIZER_CLASS
    add_prefix_space = _add_prefix_space(folder)
    if add_prefix_space is not None:
        config["add_prefix_space"] = add_prefix_space
    return _write_json(path, config)


def _sentence_transformers_config(folder: str, text_padding: str, max_length: int) -> list[str]:
    """`modules.json`, `sentence_bert_config.json` and `config_sentence_transformers.json`: one sentence-transformers
    `Transformer` module over the folder that embeds texts and images with the model's projections, and tokenizes
    texts as clip-trainer does (the family's padding, truncated at the training's caption length)."""
    text = {"max_length": max_length}
    if text_padding == "max_length":
        text["padding"] = "max_length"
    module = {
        "transformer_task": "feature-extraction",
        "modality_config": {
            "text": {"method": "get_text_features", "method_output_name": "pooler_output"},
            "image": {"method": "get_image_features", "method_output_name": "pooler_output"},
        },
        "module_output_name": "sentence_embedding",
        "processing_kwargs": {"text": text},
    }
    modules = [{"idx": 0, "name": "0", "path": "", "type": SENTENCE_TRANSFORMERS_MODULE}]
    # The embeddings are not normalised (as `get_text_features` returns them); the family ranks by cosine.
    model = {"model_type": "SentenceTransformer", "similarity_fn_name": "cosine"}
    return [
        _write_json(os.path.join(folder, "modules.json"), modules),
        _write_json(os.path.join(folder, "sentence_bert_config.json"), module),
        _write_json(os.path.join(folder, "config_sentence_transformers.json"), model),
    ]


def _tokenizer_length(folder: str, max_length: int) -> str | None:
    """Sets `tokenizer_config.json`'s `model_max_length` to the caption length the model was trained at."""
    path = os.path.join(folder, TOKENIZER_CONFIG)
    if not os.path.isfile(path):
        return None
    config = _read_json(path)
    if config.get("model_max_length") == max_length:
        return None
    config["model_max_length"] = max_length
    return _write_json(path, config)


def write_consumer_files(
    folder: str | os.PathLike, *, text_padding: str | None = None, max_length: int | None = None
) -> list[str]:
    """
    Writes what transformers.js, transformers 4.x and sentence-transformers read from a model folder, from the files
    `save_pretrained` wrote there (see the module docstring): `preprocessor_config.json`, a `tokenizer_config.json`
    that transformers 4.x loads, and, with `text_padding` and `max_length`, sentence-transformers' config files.

    Args:
        folder (`str` or `os.PathLike`):
            A folder where a model's processor (or tokenizer) has just been saved with `save_pretrained`.
        text_padding (`str`, *optional*):
            How the model's captions are padded, `"longest"` or `"max_length"` (SigLIP); with `max_length`, also
            writes sentence-transformers' `modules.json`, `sentence_bert_config.json` and
            `config_sentence_transformers.json` (leave it unset for a folder without PyTorch weights).
        max_length (`int`, *optional*):
            The longest caption in tokens, as the model was trained (SigLIP's one padded length); becomes
            `tokenizer_config.json`'s `model_max_length`.

    Returns:
        `list[str]`: the files written or rewritten.
    """
    folder = str(folder)
    written = [_image_processor_config(folder), _portable_tokenizer_config(folder)]
    if max_length is not None:
        written.append(_tokenizer_length(folder, max_length))
    if text_padding is not None and max_length is not None:
        written += _sentence_transformers_config(folder, text_padding, max_length)
    written = [path for path in written if path is not None]
    logger.debug(f"Files for other libraries in {folder}: {', '.join(os.path.basename(path) for path in written)}.")
    return written
