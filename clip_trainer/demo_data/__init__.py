"""The bundled demo dataset: 3,655 emoji drawn with Noto Color Emoji, captioned with their Unicode CLDR names.

It is small enough to ship in the wheel and to train a tiny CLIP on a CPU in minutes, and its `group` column
("Smileys & Emotion", "Animals & Nature", "Flags", ...) doubles as a zero-shot classification target. The parquet is
built by `scripts/build_emoji_dataset.py`; `BUILD_INFO.json` next to it records the font and Unicode versions, and
`LICENSE-OFL.txt` / `LICENSE-UNICODE.txt` the licences of the font and of the names.
"""

from __future__ import annotations

from pathlib import Path

import datasets

EMOJI_DATASET_NAME = "emoji"
# Next to this module rather than in the cwd, so that it is found from anywhere after `pip install`.
EMOJI_PARQUET: Path = Path(__file__).resolve().parent / "emoji.parquet"

__all__ = ["EMOJI_DATASET_NAME", "EMOJI_PARQUET", "load_emoji_dataset"]


def load_emoji_dataset() -> datasets.Dataset:
    """
    Load the bundled emoji image-caption dataset.

    Returns:
        `datasets.Dataset`: one row per emoji, with columns

        - `image` ([`datasets.Image`]): a 64x64 RGB picture of the emoji on white, decoded to a `PIL.Image.Image`;
        - `caption` (`str`): its CLDR short name, e.g. `"thumbs up: medium skin tone"` or `"flag: Japan"`;
        - `group` and `subgroup` (`str`): its place in Unicode's emoji ordering, e.g. `"People & Body"` and
          `"hand-fingers-closed"`;
        - `codepoints` (`str`): space-separated hex code points, e.g. `"1F44D 1F3FD"`;
        - `label` ([`datasets.ClassLabel`]): the index of `group`, with the group names as class names in Unicode's
          order, for zero-shot classification (`dataset.features["label"].names`).

    Example:

    ```python
    >>> from clip_trainer.demo_data import load_emoji_dataset
    >>> dataset = load_emoji_dataset()
    >>> dataset[0]["caption"], dataset.features["label"].names[dataset[0]["label"]]
    ('grinning face', 'Smileys & Emotion')
    ```
    """
    if not EMOJI_PARQUET.is_file():
        raise FileNotFoundError(
            f"{EMOJI_PARQUET} is missing; reinstall clip-trainer, or rebuild it with "
            "`python scripts/build_emoji_dataset.py --output clip_trainer/demo_data/emoji.parquet`."
        )
    dataset = datasets.load_dataset("parquet", data_files=str(EMOJI_PARQUET), split="train")
    # The parquet already carries the Image feature in its metadata; casting states the contract (RGB PIL images)
    # rather than relying on it.
    dataset = dataset.cast_column("image", datasets.Image(mode="RGB"))

    groups = dataset["group"]
    # Order of first appearance is Unicode's (CLDR) group order, which reads better in reports than sorting by name.
    names = list(dict.fromkeys(groups))
    index = {name: i for i, name in enumerate(names)}
    return dataset.add_column("label", [index[group] for group in groups], feature=datasets.ClassLabel(names=names))
