"""The caption tokenizer: special tokens, bos/eos wrapping, saving inside a CLIPProcessor, and eos pooling in CLIP."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import TINY_TEXT, TINY_VISION
from tokenizers import Tokenizer, models
from transformers import (
    AutoProcessor,
    AutoTokenizer,
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
    CLIPProcessor,
    PreTrainedTokenizerFast,
)

from clip_trainer.tokenization import text_config_token_ids, train_caption_tokenizer

VOCAB_SIZE = 320


def _captions() -> list[str]:
    """About 50 emoji-style captions, with the casing and punctuation of CLDR names."""
    subjects = ["grinning face", "thumbs up", "man cook", "woman surfing", "flag: Japan", "red apple", "Café sign"]
    details = [
        "",
        ": medium skin tone",
        " with big eyes",
        ": dark skin tone, beard",
        ": light skin tone",
        " & friends",
    ]
    captions = [subject + detail for subject, detail in itertools.product(subjects, details)]
    return captions[:50]


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return train_caption_tokenizer(_captions(), vocab_size=VOCAB_SIZE, model_max_length=77)


def test_special_token_ids(tokenizer):
    ids = text_config_token_ids(tokenizer)
    assert ids["eos_token_id"] != 2  # 2 switches CLIPTextTransformer to legacy argmax pooling
    assert ids["pad_token_id"] == 0
    # bos and eos are the two highest ids, so argmax pooling would pick the eos too.
    assert (ids["bos_token_id"], ids["eos_token_id"]) == (len(tokenizer) - 2, len(tokenizer) - 1)
    assert ids["vocab_size"] == len(tokenizer) <= VOCAB_SIZE
    assert {tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token} == {
        "<|startoftext|>",
        "<|endoftext|>",
        "<|pad|>",
    }


def test_encodes_as_bos_text_eos(tokenizer):
    ids = tokenizer("thumbs up: medium skin tone")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.eos_token_id not in ids[1:-1] and tokenizer.pad_token_id not in ids
    # Lowercased on the way in; decoding gives the text back (after the prefix space byte-level BPE adds).
    assert tokenizer.decode(tokenizer("Flag: JAPAN")["input_ids"], skip_special_tokens=True).strip() == "flag: japan"


def test_truncation_keeps_eos_and_padding_is_right(tokenizer):
    long = tokenizer("grinning face " * 100, truncation=True)["input_ids"]
    assert len(long) == 77 and long[-1] == tokenizer.eos_token_id

    batch = tokenizer(["red apple", "woman surfing: dark skin tone, beard"], padding=True)
    short, full = batch["input_ids"]
    assert len(short) == len(full)
    n = sum(batch["attention_mask"][0])
    assert short[n - 1] == tokenizer.eos_token_id and set(short[n:]) == {tokenizer.pad_token_id}


def test_rejects_eos_id_2():
    backend = Tokenizer(models.WordLevel({"<pad>": 0, "<bos>": 1, "<eos>": 2, "a": 3}, unk_token="<pad>"))
    legacy = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")
    with pytest.raises(ValueError, match="legacy"):
        text_config_token_ids(legacy)


def test_rejects_tiny_vocab():
    with pytest.raises(ValueError, match="vocab_size"):
        train_caption_tokenizer(["a"], vocab_size=100)


def test_round_trip_through_clip_processor(tokenizer, tmp_path):
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(tmp_path)

    texts = ["grinning face with big eyes", "flag: Japan", "an unseen caption, with ünïcode 😀"]
    expected = tokenizer(texts, padding="max_length", max_length=20, truncation=True)
    processor = AutoProcessor.from_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert isinstance(processor, CLIPProcessor)
    for other in (processor.tokenizer, reloaded):
        assert other(texts, padding="max_length", max_length=20, truncation=True) == expected
        assert text_config_token_ids(other) == text_config_token_ids(tokenizer)
        assert other.model_max_length == 77


def test_clip_text_model_pools_the_eos_token(tokenizer):
    ids = text_config_token_ids(tokenizer)
    config = CLIPConfig(text_config={**TINY_TEXT, "max_position_embeddings": 77, **ids}, vision_config=TINY_VISION)
    torch.manual_seed(0)
    model = CLIPModel(config).eval()
    assert model.text_model.eos_token_id == ids["eos_token_id"]

    batch = tokenizer(["red apple", "man cook: dark skin tone, beard"], padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model.text_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    eos_positions = batch["attention_mask"].sum(dim=-1) - 1
    assert (batch["input_ids"][torch.arange(2), eos_positions] == tokenizer.eos_token_id).all()
    torch.testing.assert_close(out.pooler_output, out.last_hidden_state[torch.arange(2), eos_positions])
