"""The emoji demo dataset: the builder script on a handful of emoji, and the parquet shipped in the package."""

from __future__ import annotations

import importlib.util
import io
import json
import sys
from pathlib import Path

import datasets
import pytest
from PIL import Image

from clip_trainer.demo_data import EMOJI_DATASET_NAME, EMOJI_PARQUET, load_emoji_dataset

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "build_emoji_dataset.py"


@pytest.fixture(scope="module")
def builder():
    """The build script, imported as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location("build_emoji_dataset", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    # Registered before running it: dataclasses look their module up in sys.modules.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


@pytest.fixture(scope="module")
def renderer(builder):
    for path in (builder.DEFAULT_FONT, builder.DEFAULT_EMOJI_TEST):
        if not path.is_file():
            pytest.skip(f"{path} is absent; install fonts-noto-color-emoji and unicode-data to test the builder")
    return builder.EmojiRenderer(builder.load_font(builder.DEFAULT_FONT), size=64)


EMOJI_TEST_SNIPPET = """\
# Version: 15.0
# group: Smileys & Emotion

# subgroup: face-smiling
1F600                                                  ; fully-qualified     # 😀 E1.0 grinning face
263A FE0F                                              ; fully-qualified     # ☺️ E0.6 smiling face
263A                                                   ; unqualified         # ☺ E0.6 smiling face

# group: Symbols

# subgroup: keycap
0023 FE0F 20E3                                         ; fully-qualified     # #️⃣ E0.6 keycap: #
0023 20E3                                              ; unqualified         # #⃣ E0.6 keycap: #

# group: Flags

# subgroup: country-flag
1F1EF 1F1F5                                            ; fully-qualified     # 🇯🇵 E0.6 flag: Japan
"""


def test_parse_emoji_test(builder):
    entries, header = builder.parse_emoji_test(EMOJI_TEST_SNIPPET.splitlines())
    assert header == {"version": "15.0"}
    assert [(e.codepoints, e.name, e.group, e.subgroup) for e in entries] == [
        ("1F600", "grinning face", "Smileys & Emotion", "face-smiling"),
        ("263A FE0F", "smiling face", "Smileys & Emotion", "face-smiling"),
        ("0023 FE0F 20E3", "keycap: #", "Symbols", "keycap"),
        ("1F1EF 1F1F5", "flag: Japan", "Flags", "country-flag"),
    ]
    assert entries[3].text == "\U0001f1ef\U0001f1f5"
    everything, _ = builder.parse_emoji_test(EMOJI_TEST_SNIPPET.splitlines(), statuses=None)
    assert len(everything) == 6


def test_renderer_drops_what_the_font_cannot_draw(builder, renderer):
    assert renderer.render("\U0010fffd") == (None, "empty")  # unmapped code point: Noto's .notdef is blank
    assert renderer.render("\U0001f1ff\U0001f1ff")[1] == "missing glyph"  # flag "ZZ": Noto's unknown-flag picture
    assert renderer.render("\U0001f600\U0001f600")[1] == "several glyphs"
    image, reason = renderer.render("\U0001f44d\U0001f3fd")  # thumbs up: medium skin tone, a ligature
    assert reason is None and image.mode == "RGB" and image.size == (64, 64)


def test_builder_on_a_handful(builder, renderer):
    wanted = {"1F603", "1F44D 1F3FD", "1F1EF 1F1F5", "0023 FE0F 20E3", "1F468 200D 1F469 200D 1F467"}
    entries, _ = builder.parse_emoji_test(builder.DEFAULT_EMOJI_TEST.read_text(encoding="utf-8").splitlines())
    handful = [e for e in entries if e.codepoints in wanted]
    assert len(handful) == len(wanted)

    dropped = []
    dataset = builder.build_dataset(handful, renderer, dropped)
    assert dropped == []
    assert dataset.features == builder.FEATURES
    captions = dict(zip(dataset["codepoints"], dataset["caption"]))
    assert captions["1F603"] == "grinning face with big eyes"
    assert captions["1F44D 1F3FD"] == "thumbs up: medium skin tone"
    assert captions["1F1EF 1F1F5"] == "flag: Japan"
    images = dataset["image"]
    for image in images:
        assert image.mode == "RGB" and image.size == (64, 64)
        assert image.getextrema() != ((255, 255),) * 3  # not blank
    assert len({image.tobytes() for image in images}) == len(images)


def test_cli_writes_parquet_and_build_info(builder, renderer, tmp_path):
    output = tmp_path / "out" / "emoji.parquet"
    builder.main(["--output", str(output), "--limit", "4", "--size", "32"])
    dataset = datasets.Dataset.from_parquet(str(output))
    assert len(dataset) == 4 and dataset.features["image"] == datasets.Image()
    assert dataset[0]["image"].size == (32, 32)
    info = json.loads((output.parent / "BUILD_INFO.json").read_text())
    assert info["num_rows"] == 4 and info["image_size"] == 32 and info["emoji_test_version"]
    assert set(info["debian_packages"]) == {"fonts-noto-color-emoji", "unicode-data"}
    if builder.FONT_COPYRIGHT.is_file():
        assert "SIL OPEN FONT LICENSE Version 1.1" in (output.parent / "LICENSE-OFL.txt").read_text()


def test_shipped_dataset_loads_from_any_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert EMOJI_DATASET_NAME == "emoji" and EMOJI_PARQUET.is_absolute()
    dataset = load_emoji_dataset()

    assert len(dataset) > 3000
    assert {"image", "caption", "group", "subgroup", "codepoints", "label"} <= set(dataset.column_names)
    assert isinstance(dataset.features["image"], datasets.Image)
    assert all(caption.strip() for caption in dataset["caption"])

    label = dataset.features["label"]
    assert isinstance(label, datasets.ClassLabel) and "Flags" in label.names
    assert all(label.names[i] == group for i, group in zip(dataset["label"], dataset["group"]))

    # Decoding all 3,600 images takes seconds; a spread-out sample covers every group.
    for row in dataset.select(range(0, len(dataset), 97)):
        assert row["image"].mode == "RGB" and row["image"].size == (64, 64)


def test_shipped_images_are_png(tmp_path):
    raw = datasets.Dataset.from_parquet(str(EMOJI_PARQUET)).cast_column("image", datasets.Image(decode=False))
    first = raw[0]["image"]
    assert Image.open(io.BytesIO(first["bytes"])).format == "PNG"
