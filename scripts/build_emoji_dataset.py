"""Build the emoji demo dataset that ships in `clip_trainer/demo_data/`.

Each row pairs a 64x64 picture of an emoji, drawn with the Noto Color Emoji font, with its CLDR short name from
Unicode's `emoji-test.txt` ("grinning face with big eyes", "thumbs up: medium skin tone", "flag: Japan"). Both inputs
come from Debian packages, so the build is offline and reproducible from the versions recorded in `BUILD_INFO.json`:

    apt-get install fonts-noto-color-emoji unicode-data
    python scripts/build_emoji_dataset.py --output clip_trainer/demo_data/emoji.parquet

Only fully-qualified emoji are kept (the RGI set, one row per emoji), and emoji the font cannot draw are dropped: those
that render as nothing, as the font's missing-glyph picture, as its unknown-flag picture, or as several glyphs side by
side (a sequence the font has no ligature for).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import re
import shutil
import subprocess
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import datasets
import PIL
from PIL import Image, ImageChops, ImageDraw, ImageFont, features

logger = logging.getLogger("build_emoji_dataset")

DEFAULT_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
DEFAULT_EMOJI_TEST = Path("/usr/share/unicode/emoji/emoji-test.txt")
FONT_COPYRIGHT = Path("/usr/share/doc/fonts-noto-color-emoji/copyright")
UNICODE_COPYRIGHT = Path("/usr/share/doc/unicode-data/copyright")
DEBIAN_PACKAGES = ("fonts-noto-color-emoji", "unicode-data")

# Noto Color Emoji holds CBDT bitmaps with a single strike; FreeType only opens it at that strike's size.
NOTO_COLOR_EMOJI_SIZE = 109
# A code point in a private use plane that no emoji font maps, to get the font's missing-glyph ("tofu") picture.
UNMAPPED_TEXT = "\U0010fffd"
# Regional indicators Z Z: a well-formed flag sequence for no country, drawn by Noto as a flag with a question mark.
UNKNOWN_FLAG_TEXT = "\U0001f1ff\U0001f1ff"

FEATURES = datasets.Features(
    {
        "image": datasets.Image(),
        "caption": datasets.Value("string"),
        "group": datasets.Value("string"),
        "subgroup": datasets.Value("string"),
        "codepoints": datasets.Value("string"),
    }
)

# "1F44D 1F3FD ; fully-qualified # 👍🏽 E1.0 thumbs up: medium skin tone". The comment is split off at the first
# "#", which is safe because the code point field is hex; the name itself may contain "#" ("keycap: #").
_DATA_LINE = re.compile(r"^(?P<codepoints>[0-9A-Fa-f ]+);\s*(?P<status>[a-z-]+)\s*#(?P<comment>.*)$")
_COMMENT = re.compile(r"^\s*\S+\s+E\d+\.\d+\s+(?P<name>.+?)\s*$")
_HEADER = re.compile(r"^#\s*(?P<key>group|subgroup|Version|Date):\s*(?P<value>.+?)\s*$")


@dataclass(frozen=True)
class EmojiEntry:
    """One line of `emoji-test.txt`, with the group and subgroup headers it sits under."""

    codepoints: str
    """Space-separated upper-case hex code points, as in the file: `"1F600"`, `"1F44D 1F3FD"`."""
    status: str
    """`"fully-qualified"`, `"minimally-qualified"`, `"unqualified"` or `"component"`."""
    name: str
    """The CLDR short name, with the file's casing: `"flag: Japan"`."""
    group: str
    subgroup: str

    @property
    def text(self) -> str:
        """The emoji as a string."""
        return "".join(chr(int(cp, 16)) for cp in self.codepoints.split())


def parse_emoji_test(
    lines: Iterable[str], statuses: Iterable[str] | None = ("fully-qualified",)
) -> tuple[list[EmojiEntry], dict[str, str]]:
    """
    Parse the lines of Unicode's `emoji-test.txt`.

    Args:
        lines (`Iterable[str]`):
            The file's lines.
        statuses (`Iterable[str]`, *optional*, defaults to `("fully-qualified",)`):
            Keep only entries with these statuses; `None` keeps them all.

    Returns:
        `tuple[list[EmojiEntry], dict[str, str]]`: the entries in file (CLDR) order, and the file's `Version` and
        `Date` headers (keys `"version"` and `"date"`, when present).
    """
    keep = None if statuses is None else set(statuses)
    entries: list[EmojiEntry] = []
    header: dict[str, str] = {}
    group = subgroup = ""
    for raw in lines:
        line = raw.strip()
        if not line:
            continue
        if line.startswith("#"):
            match = _HEADER.match(line)
            if match is None:
                continue
            key, value = match["key"], match["value"]
            if key == "group":
                group, subgroup = value, ""
            elif key == "subgroup":
                subgroup = value
            else:
                header.setdefault(key.lower(), value)
            continue
        match = _DATA_LINE.match(line)
        if match is None:
            raise ValueError(f"Unrecognised line in emoji-test.txt: {raw!r}")
        if keep is not None and match["status"] not in keep:
            continue
        comment = _COMMENT.match(match["comment"])
        if comment is None:
            raise ValueError(f"Unrecognised comment (expected '<emoji> E<version> <name>') in: {raw!r}")
        entries.append(
            EmojiEntry(
                codepoints=" ".join(match["codepoints"].split()).upper(),
                status=match["status"],
                name=comment["name"],
                group=group,
                subgroup=subgroup,
            )
        )
    return entries, header


def load_font(path: str | Path = DEFAULT_FONT, size: int = NOTO_COLOR_EMOJI_SIZE) -> ImageFont.FreeTypeFont:
    """Open the emoji font at its bitmap strike size, with complex text layout so ZWJ sequences and flags shape."""
    # Without raqm, Pillow lays out code points one by one: every flag and ZWJ sequence would come out as pieces.
    layout = ImageFont.Layout.RAQM if features.check("raqm") else ImageFont.Layout.BASIC
    if layout == ImageFont.Layout.BASIC:
        logger.warning(
            "Pillow has no raqm support: multi-code-point emoji will render as several glyphs and be dropped."
        )
    return ImageFont.truetype(str(path), size, layout_engine=layout)


def draw_glyph(text: str, font: ImageFont.FreeTypeFont) -> Image.Image | None:
    """
    Draw `text` in colour on white and crop to the drawn pixels.

    Returns:
        `PIL.Image.Image | None`: an RGB image at the font's native size, or `None` if nothing was drawn.
    """
    left, top, right, bottom = font.getbbox(text)
    margin = 4  # colour bitmaps can bleed a pixel past the reported box
    canvas = Image.new("RGB", (max(right - left, 1) + 2 * margin, max(bottom - top, 1) + 2 * margin), "white")
    ImageDraw.Draw(canvas).text((margin - left, margin - top), text, font=font, embedded_color=True)
    # The font's bbox includes the advance box around the bitmap; crop to the pixels that actually differ from white.
    drawn = ImageChops.difference(canvas, Image.new("RGB", canvas.size, "white")).getbbox()
    return None if drawn is None else canvas.crop(drawn)


def square_and_resize(image: Image.Image, size: int) -> Image.Image:
    """Pad `image` with white to a centred square, then downscale it to `size` x `size` with LANCZOS."""
    side = max(image.size)
    square = Image.new("RGB", (side, side), "white")
    square.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    return square.resize((size, size), Image.Resampling.LANCZOS)


def _same_image(a: Image.Image, b: Image.Image) -> bool:
    return a.size == b.size and ImageChops.difference(a, b).getbbox() is None


class EmojiRenderer:
    """
    Draws emoji as small square RGB images and tells apart those the font cannot draw.

    Args:
        font (`ImageFont.FreeTypeFont`):
            The emoji font, from `load_font`.
        size (`int`, *optional*, defaults to 64):
            Side of the output images, in pixels.
    """

    def __init__(self, font: ImageFont.FreeTypeFont, size: int = 64):
        self.font = font
        self.size = size
        # One emoji glyph's advance; a wider string is several glyphs laid side by side (no ligature in the font).
        self.glyph_advance = font.getlength("\U0001f600")
        # What the font draws for text it has no glyph for. Noto's .notdef is blank (-> None), but other builds or
        # fonts draw a box, so compare with whatever it is.
        self.missing_glyphs = [g for g in (draw_glyph(t, font) for t in (UNMAPPED_TEXT, UNKNOWN_FLAG_TEXT)) if g]

    def render(self, text: str) -> tuple[Image.Image | None, str | None]:
        """
        Draw one emoji.

        Returns:
            `tuple[PIL.Image.Image | None, str | None]`: the `size` x `size` RGB image and `None`, or `None` and the
            reason the emoji was dropped (`"empty"`, `"missing glyph"` or `"several glyphs"`).
        """
        if self.font.getlength(text) > 1.5 * self.glyph_advance:
            return None, "several glyphs"
        glyph = draw_glyph(text, self.font)
        if glyph is None:
            return None, "empty"
        if any(_same_image(glyph, missing) for missing in self.missing_glyphs):
            return None, "missing glyph"
        return square_and_resize(glyph, self.size), None


def to_png(image: Image.Image) -> bytes:
    """Encode as PNG, the smallest lossless format for these flat-colour pictures."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def iter_rows(
    entries: Iterable[EmojiEntry], renderer: EmojiRenderer, dropped: list[tuple[EmojiEntry, str]] | None = None
) -> Iterator[dict[str, object]]:
    """
    Render entries into dataset rows (`image` as `{"bytes", "path"}`, `caption`, `group`, `subgroup`, `codepoints`).

    Entries the font cannot draw are skipped, and appended with the reason to `dropped` when it is given.
    """
    for entry in entries:
        image, reason = renderer.render(entry.text)
        if image is None:
            if dropped is not None:
                dropped.append((entry, reason or "unknown"))
            continue
        yield {
            "image": {"bytes": to_png(image), "path": None},
            "caption": entry.name,
            "group": entry.group,
            "subgroup": entry.subgroup,
            "codepoints": entry.codepoints,
        }


def build_dataset(
    entries: Iterable[EmojiEntry], renderer: EmojiRenderer, dropped: list[tuple[EmojiEntry, str]] | None = None
) -> datasets.Dataset:
    """Render entries into a `datasets.Dataset` with the `FEATURES` schema (see `iter_rows`)."""
    rows = list(iter_rows(entries, renderer, dropped))
    columns = {name: [row[name] for row in rows] for name in FEATURES}
    return datasets.Dataset.from_dict(columns, features=FEATURES)


def debian_package_version(package: str) -> str | None:
    """The installed version of a Debian package, or `None` when dpkg is absent or the package is not installed."""
    try:
        result = subprocess.run(
            ["dpkg-query", "--show", "--showformat=${Version}", package], capture_output=True, text=True, check=False
        )
    except FileNotFoundError:
        return None
    if result.returncode != 0:
        return None
    return result.stdout.strip() or None


def _debian_license_text(copyright_text: str, license_name: str) -> str:
    """The text of a standalone `License:` stanza in a machine-readable Debian copyright file, as plain text."""
    # `License: NAME` also appears, without text, inside `Files:` stanzas; the full text follows the one that has
    # indented continuation lines.
    lines = copyright_text.splitlines()
    for start, line in enumerate(lines):
        if not (line.startswith("License:") and line.split(":", 1)[1].strip() == license_name):
            continue
        body = []
        for continuation in lines[start + 1 :]:
            if not continuation.startswith((" ", "\t")):
                break
            # Debian indents continuation lines by one space and writes blank lines as " .".
            body.append("" if continuation.strip() == "." else continuation[1:])
        if body:
            return "\n".join(body).rstrip() + "\n"
    raise ValueError(f"No `License: {license_name}` stanza with text in the copyright file.")


def write_licenses(output_dir: Path) -> None:
    """Write the font's OFL and the Unicode data licence next to the dataset, from the Debian copyright files."""
    font_copyright = FONT_COPYRIGHT.read_text(encoding="utf-8")
    # The stanza that names the font files and their copyright holders, verbatim, then the licence it points to.
    paragraphs = font_copyright.split("\n\n")
    fonts_stanza = next((p for p in paragraphs if p.startswith("Files:") and "fonts/" in p.splitlines()[0]), "")
    ofl = _debian_license_text(font_copyright, "SIL-1.1")
    (output_dir / "LICENSE-OFL.txt").write_text(
        "The images in emoji.parquet are drawn with the Noto Color Emoji font\n"
        "(https://github.com/googlefonts/noto-emoji, Debian package fonts-noto-color-emoji).\n"
        f"From {FONT_COPYRIGHT}:\n\n{fonts_stanza.strip()}\n\n{ofl}",
        encoding="utf-8",
    )
    shutil.copyfile(UNICODE_COPYRIGHT, output_dir / "LICENSE-UNICODE.txt")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--output", type=Path, required=True, help="Parquet file to write (e.g. clip_trainer/demo_data/emoji.parquet)."
    )
    parser.add_argument("--size", type=int, default=64, help="Side of the square images, in pixels.")
    parser.add_argument("--limit", type=int, default=None, help="Render only the first N fully-qualified emoji.")
    parser.add_argument("--font", type=Path, default=DEFAULT_FONT, help="Path to NotoColorEmoji.ttf.")
    parser.add_argument("--emoji-test", type=Path, default=DEFAULT_EMOJI_TEST, help="Path to emoji-test.txt.")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    for path in (args.font, args.emoji_test):
        if not path.is_file():
            sys.exit(f"{path} not found; install it with `apt-get install {' '.join(DEBIAN_PACKAGES)}`.")

    entries, header = parse_emoji_test(args.emoji_test.read_text(encoding="utf-8").splitlines())
    if args.limit is not None:
        entries = entries[: args.limit]
    renderer = EmojiRenderer(load_font(args.font), size=args.size)
    dropped: list[tuple[EmojiEntry, str]] = []
    dataset = build_dataset(entries, renderer, dropped)
    for entry, reason in dropped:
        logger.info(f"dropped {entry.codepoints} ({entry.name}): {reason}")
    logger.info(f"{len(dataset)} emoji rendered, {len(dropped)} dropped")

    output_dir = args.output.parent
    output_dir.mkdir(parents=True, exist_ok=True)
    dataset.to_parquet(str(args.output))

    build_info = {
        "num_rows": len(dataset),
        "num_dropped": len(dropped),
        "dropped": [{"codepoints": e.codepoints, "name": e.name, "reason": r} for e, r in dropped],
        "image_size": args.size,
        "limit": args.limit,
        "emoji_test_version": header.get("version"),
        "emoji_test_date": header.get("date"),
        "debian_packages": {package: debian_package_version(package) for package in DEBIAN_PACKAGES},
        "pillow": PIL.__version__,
        "raqm": features.version("raqm"),
        "datasets": datasets.__version__,
    }
    (output_dir / "BUILD_INFO.json").write_text(
        json.dumps(build_info, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    if FONT_COPYRIGHT.is_file() and UNICODE_COPYRIGHT.is_file():
        write_licenses(output_dir)
    else:
        logger.warning("Debian copyright files not found; LICENSE-OFL.txt and LICENSE-UNICODE.txt were not written.")
    logger.info(f"wrote {args.output} ({args.output.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
