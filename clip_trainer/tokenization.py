"""A small caption tokenizer trained from scratch, for CLIP models whose text tower is trained from scratch too.

The tokenizer is a byte-level BPE (the same family as OpenAI's CLIP tokenizer) with three special tokens:

- `<|pad|>` gets id 0, so that padded batches are mostly zeros;
- `<|startoftext|>` and `<|endoftext|>` (bos and eos, named as in CLIP) get the two *highest* ids.

Why the eos token is the highest id: `CLIPTextTransformer` pools the hidden state at the eos token, which it finds in
one of two ways. If `config.eos_token_id == 2` it assumes an old checkpoint and pools at `input_ids.argmax(-1)` (the
highest id in the sequence, which is the eos in OpenAI's vocabulary); otherwise it pools at the first position whose
id equals `config.eos_token_id`. Giving eos the highest id makes both rules pick the same position, and it keeps the
id far away from 2, so a model configured with `text_config_token_ids` always takes the eos path.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast
from transformers.utils import logging

logger = logging.get_logger(__name__)

PAD_TOKEN = "<|pad|>"
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"

# `CLIPTextTransformer` treats this eos id as "legacy checkpoint" and switches to argmax pooling.
_LEGACY_CLIP_EOS_TOKEN_ID = 2


def train_caption_tokenizer(
    captions: Iterable[str],
    vocab_size: int = 4096,
    model_max_length: int = 77,
) -> PreTrainedTokenizerFast:
    """
    Train a lowercase byte-level BPE tokenizer on captions, ready to be the tokenizer of a `CLIPProcessor`.

    Every encoding is wrapped as `<|startoftext|> ... <|endoftext|>`, and truncation to `model_max_length` keeps the
    closing eos token, so the CLIP text model always finds the token it pools.

    Args:
        captions (`Iterable[str]`):
            The texts to learn merges from. A few thousand short captions are plenty; the iterable is consumed once.
        vocab_size (`int`, *optional*, defaults to 4096):
            Size of the whole vocabulary, special tokens included. It is an upper bound: a small corpus runs out of
            merges earlier, so read the real size from `len(tokenizer)` (or `text_config_token_ids`).
        model_max_length (`int`, *optional*, defaults to 77):
            Longest encoding, special tokens included; match the text model's `max_position_embeddings`.

    Returns:
        [`PreTrainedTokenizerFast`]: the tokenizer, with `bos_token`, `eos_token` and `pad_token` set. It saves and
        reloads with `save_pretrained` / `AutoTokenizer.from_pretrained`, alone or inside a `CLIPProcessor`.
    """
    # 256 byte tokens + the pad token + bos/eos must fit, or the trainer would silently drop bytes.
    min_vocab_size = 256 + 3
    if vocab_size < min_vocab_size:
        raise ValueError(f"`vocab_size` is {vocab_size} but a byte-level BPE needs at least {min_vocab_size}.")
    if model_max_length < 2:
        raise ValueError(f"`model_max_length` is {model_max_length}; it must leave room for bos and eos (>= 2).")

    tokenizer = Tokenizer(models.BPE())
    # NFC first so that composed and decomposed accents share tokens; lowercase because CLIP captions carry little
    # meaning in case and the demo vocabulary is small.
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    # add_prefix_space: a word gets the same tokens at the start of a caption as in its middle.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tokenizer.decoder = decoders.ByteLevel()

    # Only pad is a trainer special token, so it takes id 0; bos/eos are added after training so they land at the
    # top of the vocabulary (see the module docstring for why).
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 2,
        special_tokens=[PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(captions, trainer=trainer)
    tokenizer.add_special_tokens([BOS_TOKEN, EOS_TOKEN])

    bos_id = tokenizer.token_to_id(BOS_TOKEN)
    eos_id = tokenizer.token_to_id(EOS_TOKEN)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A {EOS_TOKEN}",
        pair=f"{BOS_TOKEN} $A {EOS_TOKEN} $B:1 {EOS_TOKEN}:1",
        special_tokens=[(BOS_TOKEN, bos_id), (EOS_TOKEN, eos_id)],
    )

    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=model_max_length,
        padding_side="right",
        truncation_side="right",
        # Byte-level decoding already restores the exact spacing; the cleanup heuristics would alter "flag: japan".
        clean_up_tokenization_spaces=False,
    )
    logger.info(f"Trained a caption tokenizer with {len(wrapped)} tokens (asked for at most {vocab_size}).")
    return wrapped


# SigLIP 2's special tokens, at the ids of `Siglip2Tokenizer`'s own empty vocabulary, then the 256 byte tokens its
# byte fallback spells unseen characters with.
SIGLIP2_SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>")
SIGLIP2_BYTE_TOKENS = tuple(f"<0x{byte:02X}>" for byte in range(256))


def train_siglip2_caption_tokenizer(
    captions: Iterable[str], vocab_size: int = 4096, model_max_length: int = 64
) -> PreTrainedTokenizerBase:
    """
    Train a caption tokenizer for a SigLIP 2 model built from scratch: a BPE in the form of SigLIP 2's own (Gemma's,
    lowercased: spaces written `▁`, unseen characters spelled by their bytes, no special tokens around a caption).

    Why not [`train_caption_tokenizer`]'s byte-level BPE: transformers loads the tokenizer of every `siglip2` folder
    as `Siglip2Tokenizer`, whatever `tokenizer_config.json` names, and that class rebuilds its pipeline from the
    vocabulary and merges alone. A byte-level tokenizer came back without its pre-tokenizer and without the unknown
    token it asks for, and could not encode a caption: the saved model loaded, its tokenizer did not. This tokenizer
    is built as that class builds it, so the folder loads with `AutoTokenizer`, `AutoProcessor` and `pipeline(...)`
    and tokenizes exactly as training did.

    Args:
        captions (`Iterable[str]`): the texts to learn merges from (consumed once).
        vocab_size (`int`, *optional*, defaults to 4096): the whole vocabulary's size at most, special and byte
            tokens included.
        model_max_length (`int`, *optional*, defaults to 64): the longest caption; SigLIP pads every caption to it.

    Returns:
        `Siglip2Tokenizer`: pad, eos, bos, unk and mask at ids 0-4, then the byte tokens and the merges.
    """
    from transformers.models.siglip2.tokenization_siglip2 import Siglip2Tokenizer

    specials = [*SIGLIP2_SPECIAL_TOKENS, *SIGLIP2_BYTE_TOKENS]
    if vocab_size < len(specials) + 1:
        raise ValueError(f"`vocab_size` is {vocab_size} but SigLIP 2's tokenizer needs more than {len(specials)}.")
    pad, eos, bos, unk, mask = SIGLIP2_SPECIAL_TOKENS
    tokenizer = Tokenizer(models.BPE(unk_token=unk, byte_fallback=True, fuse_unk=True))
    # As `Siglip2Tokenizer.__init__` sets them (its lowercasing included).
    tokenizer.normalizer = normalizers.Sequence([normalizers.Lowercase(), normalizers.Replace(" ", "▁")])
    tokenizer.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="merged_with_previous", invert=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False)
    tokenizer.train_from_iterator(captions, trainer=trainer)
    model = json.loads(tokenizer.to_str())["model"]
    merges = [tuple(merge) if isinstance(merge, list) else tuple(merge.split(" ")) for merge in model["merges"]]
    wrapped = Siglip2Tokenizer(
        vocab=model["vocab"],
        merges=merges,
        unk_token=unk,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        mask_token=mask,
        model_max_length=model_max_length,
        padding_side="right",
    )
    logger.info(f"Trained a SigLIP 2 caption tokenizer with {len(wrapped)} tokens (asked for at most {vocab_size}).")
    return wrapped


def text_config_token_ids(tokenizer: PreTrainedTokenizerBase) -> dict[str, int]:
    """
    The token ids and vocabulary size a `CLIPTextConfig` needs to match `tokenizer`.

    Args:
        tokenizer ([`PreTrainedTokenizerBase`]):
            A tokenizer with bos, eos and pad tokens, such as the one `train_caption_tokenizer` returns.

    Returns:
        `dict[str, int]`: `bos_token_id`, `eos_token_id`, `pad_token_id` and `vocab_size`, to pass as keyword
        arguments to `CLIPTextConfig` (or as part of `text_config` in `CLIPConfig`).

    Raises:
        `ValueError`: if a special token is missing, or if the eos id is 2, which would make `CLIPTextTransformer`
        pool at the highest token id instead of at the eos token.
    """
    ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    missing = [name for name, value in ids.items() if value is None]
    if missing:
        raise ValueError(
            f"The tokenizer has no {', '.join(missing)}; CLIP's text model needs bos, eos and pad tokens."
        )
    if ids["eos_token_id"] == _LEGACY_CLIP_EOS_TOKEN_ID:
        raise ValueError(
            f"The tokenizer's eos token {tokenizer.eos_token!r} has id {_LEGACY_CLIP_EOS_TOKEN_ID}, which "
            "`CLIPTextTransformer` reads as a legacy checkpoint and pools at `input_ids.argmax()` instead of at the "
            "eos token; give the eos token another id (`train_caption_tokenizer` puts it last)."
        )
    return {**ids, "vocab_size": len(tokenizer)}
