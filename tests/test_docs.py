"""The README and the manual in docs/: the generated configuration reference matches the code, every relative link
and anchor resolves as GitHub resolves it, the README stays a front door, and no machine paths leak in."""

from __future__ import annotations

import enum
import re
import typing
from dataclasses import MISSING, fields
from pathlib import Path
from urllib.parse import unquote

import pytest

from clip_trainer import config_reference
from clip_trainer.arguments import CLIPTrainingArguments, DataArguments, ModelArguments

REPO = Path(__file__).resolve().parent.parent
CONFIGURATION = REPO / "docs" / "configuration.md"
# A page another line of work adds; until it is in this checkout, links into it cannot be checked here. Once it exists
# its links (and anchors) are checked like every other.
PAGES_ADDED_ELSEWHERE = {"docs/data.md"}


def documentation_files() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


# --------------------------------------------------------------------------------------------------------------
# Markdown as GitHub reads it: headings -> anchors, links
# --------------------------------------------------------------------------------------------------------------

FENCE = re.compile(r"^\s{0,3}(`{3,}|~{3,})")
HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)(?:\s+#+)?\s*$")
INLINE_CODE = re.compile(r"(`+)(.+?)\1")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_DEFINITION = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)")
HTML_ATTRIBUTE = re.compile(r"""<(?:a|img)\b[^>]*?\b(?:href|src)\s*=\s*["']([^"']+)["']""", re.IGNORECASE)
HTML_ANCHOR = re.compile(r"""<a\b[^>]*?\b(?:id|name)\s*=\s*["']([^"']+)["']""", re.IGNORECASE)


def prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) of the lines outside fenced code blocks."""
    lines, fence = [], None
    for number, line in enumerate(text.splitlines(), start=1):
        match = FENCE.match(line)
        if fence is None and match:
            fence = match.group(1)[0] * len(match.group(1))
        elif fence is not None and match and match.group(1).startswith(fence):
            fence = None
        elif fence is None:
            lines.append((number, line))
    return lines


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading (github-slugger): the rendered text lower-cased, every character that is not
    a letter, digit, `_`, `-` or space removed, spaces turned into hyphens."""
    text = INLINE_CODE.sub(lambda match: match.group(2), heading)
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)  # a link or image renders as its text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML tags
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every anchor a page has: its headings' slugs (a repeated slug gets -1, -2, ...) and explicit HTML anchors."""
    found: set[str] = set()
    counts: dict[str, int] = {}
    text = path.read_text(encoding="utf-8")
    for _, line in prose_lines(text):
        match = HEADING.match(line)
        if match:
            slug = github_slug(match.group(2))
            found.add(slug if slug not in counts else f"{slug}-{counts[slug]}")
            counts[slug] = counts.get(slug, 0) + 1
        found.update(HTML_ANCHOR.findall(line))
    return found


def links(text: str) -> list[tuple[int, str]]:
    """(line number, target) of every Markdown link, image, reference definition and HTML href/src outside code."""
    found = []
    for number, line in prose_lines(text):
        line = INLINE_CODE.sub("", line)
        targets = LINK.findall(line) + HTML_ATTRIBUTE.findall(line)
        match = REFERENCE_DEFINITION.match(line)
        if match:
            targets.append(match.group(1))
        found += [(number, target) for target in targets]
    return found


def broken_links(page: Path, root: Path, pending: set[str] = frozenset()) -> list[str]:
    """The relative links of `page` that point at no file under `root`, or at no anchor of a Markdown page."""
    problems = []
    for number, target in links(page.read_text(encoding="utf-8")):
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) or target.startswith("//"):
            continue  # http(s), mailto, ...: not this repository's files
        path_part, _, anchor = unquote(target).partition("#")
        destination = (page.parent / path_part).resolve() if path_part else page.resolve()
        where = f"{page.relative_to(root)}:{number}: {target}"
        try:
            relative = destination.relative_to(root.resolve()).as_posix()
        except ValueError:
            problems.append(f"{where} leaves the repository")
            continue
        if not destination.exists():
            if relative not in pending:
                problems.append(f"{where} points at a missing file")
            continue
        if anchor and destination.suffix == ".md" and anchor not in anchors(destination):
            problems.append(f"{where} names an anchor {relative} does not have")
    return problems


# --------------------------------------------------------------------------------------------------------------
# The configuration reference
# --------------------------------------------------------------------------------------------------------------


def test_the_configuration_reference_is_up_to_date():
    assert CONFIGURATION.is_file(), f"docs/configuration.md is missing: run `{config_reference.REGENERATE_COMMAND}`."
    assert config_reference.render_configuration_reference() == CONFIGURATION.read_text(encoding="utf-8"), (
        f"docs/configuration.md differs from the argument dataclasses: regenerate it with "
        f"`{config_reference.REGENERATE_COMMAND}`."
    )


def _rows(text: str) -> dict[str, list[str]]:
    """Table rows by their key: `| `name` | a | b | c |` -> {"name": [a, b, c]} (escaped pipes kept in cells)."""
    rows = {}
    for line in text.splitlines():
        match = re.match(r"^\| `([\w@]+)` \|(.*)\|$", line)
        if match:
            rows[match.group(1)] = [cell.strip() for cell in re.split(r"(?<!\\)\|", match.group(2))]
    return rows


def _default(item):
    if item.default is not MISSING:
        return item.default
    return item.default_factory() if item.default_factory is not MISSING else MISSING


def test_the_reference_lists_every_option_and_only_the_changed_inherited_ones():
    from transformers import TrainingArguments

    text = config_reference.render_configuration_reference()
    rows = _rows(text)
    parent = {item.name: item for item in fields(TrainingArguments)}
    for cls in (ModelArguments, DataArguments):
        for item in fields(cls):
            assert item.name in rows, f"{cls.__name__}.{item.name} is missing from the reference"
            assert len(rows[item.name]) == 3  # type, default, meaning
            if item.metadata.get("help"):
                assert rows[item.name][2], item.name
    added = [item for item in fields(CLIPTrainingArguments) if item.name not in parent]
    assert added and all(item.name in rows for item in added)
    # An inherited option is listed exactly when clip-trainer changes its default or adds choices to it (`optim`
    # gains `adam`), both read here from the two dataclasses.
    for item in fields(CLIPTrainingArguments):
        base = parent.get(item.name)
        if base is None:
            continue
        base_choices = {
            str(option.value)
            for member in typing.get_args(base.type) or (base.type,)
            if isinstance(member, type) and issubclass(member, enum.Enum)
            for option in member
        } | {str(choice) for choice in base.metadata.get("choices") or []}
        changed = _default(item) != _default(base) or bool(set(item.metadata.get("choices", [])) - base_choices)
        assert (item.name in rows) == changed, (item.name, _default(item), _default(base))
    assert "optim" in rows and "`adam`" in rows["optim"][2]
    assert rows["lr_scheduler_type"][:2] == ["`linear`", "`cosine`"] and "`step`" in rows["lr_scheduler_type"][2]
    assert rows["weight_decay"][:2] == ["`0`", "`0.2`"]
    assert rows["lora_target_modules"][1] == '`["q_proj", "k_proj", "v_proj", "out_proj"]`'
    assert rows["model_name_or_path"][:2] == ["`str \\| None`", "–"]
    assert "One of: `skip`, `error`." in rows["on_bad_rows"][2]
    assert "learning_rate" not in rows and "per_device_train_batch_size" not in rows


def test_the_regeneration_command_writes_and_checks(tmp_path, capsys):
    target = tmp_path / "configuration.md"
    assert config_reference.main(["--output", str(target), "--check"]) == 1  # missing
    assert config_reference.REGENERATE_COMMAND in capsys.readouterr().err
    assert config_reference.main(["--output", str(target)]) == 0
    assert target.read_text(encoding="utf-8") == config_reference.render_configuration_reference()
    assert config_reference.main(["--output", str(target), "--check"]) == 0
    target.write_text(target.read_text(encoding="utf-8").replace("`cosine`", "`linear`"), encoding="utf-8")
    assert config_reference.main(["--output", str(target), "--check"]) == 1
    assert config_reference.default_output_path() == CONFIGURATION


# --------------------------------------------------------------------------------------------------------------
# Links and anchors
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "heading, slug",
    [  # as GitHub renders them
        ("What you get in `output_dir`", "what-you-get-in-output_dir"),
        ("Coming from the seed project (Lightning + Hydra)", "coming-from-the-seed-project-lightning--hydra"),
        ("Data at web scale: shards, folders, mixtures", "data-at-web-scale-shards-folders-mixtures"),
        ("Reference sets: `extra_eval_sets`", "reference-sets-extra_eval_sets"),
        ("Model (`ModelArguments`)", "model-modelarguments"),
        (
            "In and out: loading, pipelines, the Hub, ONNX, open_clip",
            "in-and-out-loading-pipelines-the-hub-onnx-open_clip",
        ),
        ("[Links](x.md) and **bold**", "links-and-bold"),
    ],
)
def test_github_slugs(heading, slug):
    assert github_slug(heading) == slug


def test_the_link_check_finds_broken_links(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "page.md").write_text("# A page\n\n## Same\n\n## Same\n", encoding="utf-8")
    (tmp_path / "README.md").write_text(
        "[ok](docs/page.md#a-page) [ok](docs/page.md#same-1) [ok](#top) ![img](docs/page.md)\n"
        "[missing file](docs/nope.md) [missing anchor](docs/page.md#nope) [outside](../x.md)\n"
        "`[in code](docs/gone.md)` [pending](docs/later.md#anything)\n\n"
        "```\n[in a fence](docs/gone.md)\n```\n\n# Top\n",
        encoding="utf-8",
    )
    problems = broken_links(tmp_path / "README.md", tmp_path, pending={"docs/later.md"})
    assert [problem.split(": ", 1)[1] for problem in problems] == [
        "docs/nope.md points at a missing file",
        "docs/page.md#nope names an anchor docs/page.md does not have",
        "../x.md leaves the repository",
    ]


@pytest.mark.parametrize("page", documentation_files(), ids=lambda path: path.relative_to(REPO).as_posix())
def test_every_relative_link_resolves(page):
    assert broken_links(page, REPO, pending=PAGES_ADDED_ELSEWHERE) == []


# --------------------------------------------------------------------------------------------------------------
# The README as the front door, and nothing of this machine in the docs
# --------------------------------------------------------------------------------------------------------------


def test_the_readme_is_a_front_door():
    lines = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    assert 150 <= len(lines) <= 250, (
        f"README.md has {len(lines)} lines; keep it to 150-250 and move reference to docs/"
    )
    text = "\n".join(lines)
    for section in ("## Install", "## The two commands", "make demo", "make test", "## The manual"):
        assert section in text


@pytest.mark.parametrize("page", documentation_files(), ids=lambda path: path.relative_to(REPO).as_posix())
def test_no_machine_paths_or_issue_numbers(page):
    text = page.read_text(encoding="utf-8")
    machine_paths = re.findall(r"(?<![\w.~-])/(?:work|tmp)/\S*", text)
    assert not machine_paths, (
        f"{page.name} names paths of one machine: {machine_paths}; use paths relative to the clone"
    )
    issues = re.findall(r"\bissues?\s+#?\d+|(?<![\w&/])#\d+\b", text, flags=re.IGNORECASE)
    assert not issues, f"{page.name} cites issue numbers: {issues}"


def _python_block_after(text: str, heading: str) -> str:
    section = text.split(heading, 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


@pytest.mark.slow
def test_the_readme_library_example_trains_with_the_thread_policy(tmp_path, tiny_clip_dir, shapes_csv):
    """The README's "As a library" code, with a local model and the user's CSV where it names the Hub and
    data/pairs.csv, run as a user's script: it trains and saves, and it imports clip_trainer before torch (else its
    threads spin, several times slower on a shared CPU, and the trainer warns)."""
    import os
    import shutil
    import subprocess
    import sys

    code = _python_block_after((REPO / "README.md").read_text(), "## As a library")
    assert "openai/clip-vit-base-patch32" in code and "data/pairs.csv" in code
    code = code.replace("openai/clip-vit-base-patch32", str(tiny_clip_dir)).replace(
        "num_train_epochs=5", "max_steps=2"
    )
    code = code.replace(
        "per_device_train_batch_size=64", "per_device_train_batch_size=8, use_cpu=True, report_to='none'"
    )
    shutil.copytree(shapes_csv.parent, tmp_path / "data")
    (tmp_path / "data" / shapes_csv.name).rename(tmp_path / "data" / "pairs.csv")
    (tmp_path / "example.py").write_text(code)
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    for name in ("CLIP_TRAINER_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT"):  # a user's fresh shell has none
        env.pop(name, None)
    done = subprocess.run(
        [sys.executable, "example.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "torch was imported before clip_trainer" not in done.stderr
    assert (tmp_path / "outputs" / "my-clip" / "model.safetensors").is_file()
