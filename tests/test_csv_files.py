"""CSV files as users produce them, read the same loaded and streamed.

A streamed CSV is read by clip-trainer's own reader (records split by Python's `csv` module, blocks of them read by
pandas), a loaded one by `datasets` (pandas): a file pandas reads gives the same rows both ways (Mac line endings, a
quoted caption over two lines, a field longer than the `csv` module's default limit, a line of spaces), and a file
that cannot be read as meant is one line naming the file and line, both ways, before any training: a quote left
open (loaded), a glob whose files have other columns, rows that end with a separator, another encoding, Excel's
`sep=` line. A stream with no row is an error, not a run of no step.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import write_shapes_csv

from clip_trainer import run
from clip_trainer.arguments import ConfigError, DataArguments
from clip_trainer.data import load_image_text_data


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> tuple[Path, list[tuple[str, str]]]:
    """A folder of the shapes images, and (image path, caption) pairs of them."""
    folder = tmp_path_factory.mktemp("csv-files")
    source = write_shapes_csv(folder, repeats=1)
    rows = [line.split(",") for line in source.read_text().splitlines()[1:]]
    return folder, [(image, caption) for image, caption, _ in rows]


def rows_read(path: Path, validation: Path, streaming: bool) -> list[tuple[str, str]]:
    data = load_image_text_data(
        DataArguments(train_file=str(path), streaming=streaming, validation_file=str(validation)), 1
    )
    return [(Path(row["image"]).name, row["caption"]) for row in (data.one_pass if streaming else data.train)]


def write(folder: Path, name: str, text: str | bytes) -> Path:
    path = folder / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def well_formed_variants(pairs: list[tuple[str, str]]) -> dict[str, tuple[str, list[str]]]:
    """File text and the captions pandas reads from it, for files that pandas reads as meant."""
    lines = [f"{image},{caption}" for image, caption in pairs]
    captions = [caption for _, caption in pairs]
    long_caption = "a very long caption " * 8000  # 160,000 characters: past the `csv` module's default 131,072
    two_lines = ["line one\nline two 5", 'quoted, with a comma and a 5" screen']
    return {
        # Excel for Mac's "CSV (Macintosh)": lines end with a bare carriage return.
        "mac.csv": ("image,caption\r" + "\r".join(lines) + "\r", captions),
        # A caption over two lines, in a row that leaves its last (empty) field out; a quote inside an unquoted field.
        "two-lines.csv": (
            "image,caption,note\n"
            + f'{pairs[0][0]},"line one\nline two 5"\n'
            + f'{pairs[1][0]},"quoted, with a comma and a 5"" screen",a 5" screen\n'
            + "\n".join(f"{line}," for line in lines[2:])
            + "\n",
            two_lines + captions[2:],
        ),
        "long.csv": (
            "image,caption\n" + f"{pairs[0][0]},{long_caption}\n" + "\n".join(lines[1:]) + "\n",
            [long_caption, *captions[1:]],
        ),  # fmt: skip
        # A line of spaces, which pandas skips as blank.
        "spaces.csv": ("image,caption\n" + "\n".join(lines[:3]) + "\n   \n" + "\n".join(lines[3:]) + "\n", captions),
    }


@pytest.mark.parametrize("name", ["mac.csv", "two-lines.csv", "long.csv", "spaces.csv"])
def test_a_file_pandas_reads_gives_the_same_rows_loaded_and_streamed(pairs, name, caplog):
    folder, rows = pairs
    text, captions = well_formed_variants(rows)[name]
    path = write(folder, name, text)
    validation = write(folder, "validation.csv", "image,caption\n" + "\n".join(f"{i},{c}" for i, c in rows[:4]))
    loaded = rows_read(path, validation, streaming=False)
    streamed = rows_read(path, validation, streaming=True)
    assert [caption for _, caption in loaded] == captions
    assert streamed == loaded
    assert "Leaving out" not in caplog.text


def test_a_loaded_csv_with_a_quote_left_open_names_the_file_and_line(pairs):
    # pandas says "EOF inside string starting at row 5" of a file it does not name; in a glob, `datasets` named the
    # first (good) file.
    folder, rows = pairs
    (folder / "glob").mkdir()
    lines = [f"{image},{caption}" for image, caption in rows]
    write(folder / "glob", "a.csv", "image,caption\n" + "\n".join(lines[:4]) + "\n")
    damaged = write(folder / "glob", "b.csv", "image,caption\n" + "\n".join(lines[4:8]) + '\nx.png,"cut short\n')
    validation = write(folder, "validation.csv", "image,caption\n" + "\n".join(lines[:4]))
    said = f"`train_file` '{damaged}': line 6 cannot be read: a quote opened there is never closed"
    with pytest.raises(ConfigError, match=re.escape(said)):
        rows_read(folder / "glob" / "*.csv", validation, streaming=False)


@pytest.mark.parametrize("streaming", [False, True], ids=["loaded", "streamed"])
def test_files_that_cannot_be_read_as_meant_are_one_line_both_ways(pairs, streaming):
    folder, rows = pairs
    lines = [f"{image},{caption}" for image, caption in rows]
    validation = write(folder, "validation.csv", "image,caption\n" + "\n".join(lines[:4]))
    (folder / "other-columns").mkdir(exist_ok=True)
    write(folder / "other-columns", "a.csv", "image,caption\n" + "\n".join(lines[:4]) + "\n")
    other = write(
        folder / "other-columns", "b.csv", "image,caption,label\n" + "\n".join(f"{line},x" for line in lines)
    )
    cases = {
        other.parent / "*.csv": f"{other} has the columns ['image', 'caption', 'label'], but",
        write(folder, "trailing.csv", "image,caption\n" + "\n".join(f"{line}," for line in lines)): (
            "its rows end with a separator (line 2 has 3 fields, the last one empty, where the header has 2)"
        ),
        write(
            folder,
            "cp1252.csv",
            ("image,caption\r\n" + "\r\n".join(f"{i},café {c}" for i, c in rows)).encode("cp1252"),
        ): f"is not UTF-8 text (invalid continuation byte at byte {len('image,caption,caf') + len(rows[0][0]) + 2}, "
        "line 2); save it as UTF-8 (e.g. `iconv -f cp1252 -t utf-8 in.csv > out.csv`",  # the é after "caf"
        write(folder, "unicode.csv", ("image,caption\n" + "\n".join(lines)).encode("utf-16")): (
            'is UTF-16 text (Excel\'s "Unicode Text"); save it as UTF-8'
        ),
        write(folder, "excel.csv", "sep=,\nimage,caption\n" + "\n".join(lines)): (
            "starts with Excel's separator line 'sep=,', which pandas would read as the header: delete that first line"
        ),
    }
    for path, said in cases.items():
        with pytest.raises(ConfigError, match=re.escape(said)):
            rows_read(path, validation, streaming)


def test_a_stream_without_a_row_is_an_error_not_a_run_of_no_step(base_args, shapes_csv, tmp_path):
    header_only = write(tmp_path, "header-only.csv", "image,caption\n")
    argv = list(base_args)
    argv[argv.index("--train_file") + 1] = str(header_only)
    with pytest.raises(ConfigError, match=r"The training stream has no rows \(a header only, or every row left out"):
        run.main([*argv, "--streaming", "true", "--max_steps", "2", "--validation_file", str(shapes_csv)])
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_an_image_path_with_spaces_around_it_says_so(pairs, caplog):
    # "a.png , caption": the space is part of the path pandas reads, and a message would not show it.
    folder, rows = pairs
    lines = [f"{image},{caption}" for image, caption in rows]
    path = write(folder, "spaced.csv", "image,caption\n" + f"{rows[0][0]} ,{rows[0][1]}\n" + "\n".join(lines[1:]))
    validation = write(folder, "validation.csv", "image,caption\n" + "\n".join(lines[:4]))
    assert len(rows_read(path, validation, streaming=False)) == len(rows) - 1
    name = Path(rows[0][0]).name
    assert f"(the name '{name} ' has spaces around it, part of the name; without them: " in caplog.text
    assert f"{name}', and that file exists)" in caplog.text


def test_a_csv_written_by_datasets_to_csv_from_an_image_column_says_so(pairs, caplog):
    # `Dataset.to_csv` writes each Image value as the text of its dict, its bytes included: no file name.
    import datasets

    folder, rows = pairs
    images = [str(folder / image) for image, _ in rows]
    data = datasets.Dataset.from_dict({"image": images, "caption": [caption for _, caption in rows]})
    data = data.cast_column("image", datasets.Image())
    data.to_csv(str(folder / "exported.csv"), index=False)  # {'bytes': None, 'path': '/.../x.png'}
    as_bytes = [{"bytes": Path(image).read_bytes(), "path": None} for image in images]
    embedded = datasets.Dataset.from_dict({"image": as_bytes, "caption": data["caption"]}, features=data.features)
    embedded.to_csv(str(folder / "embedded.csv"), index=False)  # {'bytes': b'\x89PNG...', 'path': None}
    validation = write(folder, "validation.csv", "image,caption\n" + "\n".join(f"{i},{c}" for i, c in rows[:4]))
    for name in ("exported.csv", "embedded.csv"):
        with pytest.raises(ConfigError, match="No training pairs"):
            rows_read(folder / name, validation, streaming=False)
    assert "the image is the text of a {'bytes': ..., 'path': ...} dict, as `datasets`' `to_csv` writes" in caplog.text
    assert "export the dataset with `to_parquet` or `save_to_disk` instead" in caplog.text
    assert "\\x89PNG" not in caplog.text and "File name too long" not in caplog.text  # no bytes in the log


def test_coco_and_flickr30k_convert_as_the_docs_show_and_the_coco_file_itself_says_so(pairs, tmp_path, monkeypatch):
    folder, rows = pairs
    monkeypatch.chdir(tmp_path)
    for subfolder in ("train2017", "flickr30k_images"):
        (tmp_path / subfolder).mkdir()
        for image, _ in rows[:4]:
            (tmp_path / subfolder / Path(image).name).write_bytes((folder / image).read_bytes())
    names = [Path(image).name for image, _ in rows[:4]]
    coco = {"info": {}, "licenses": [], "images": [{"id": i, "file_name": name} for i, name in enumerate(names)],
            "annotations": [{"id": 10 * i + k, "image_id": i, "caption": f" {rows[i][1]}, take {k} "}
                            for i in range(4) for k in range(5)]}  # fmt: skip
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "captions_train2017.json").write_text(json.dumps(coco))
    flickr = ["image_name| comment_number| comment"]
    flickr += [f"{name}| {k}| {rows[i][1]}, take {k}" for i, name in enumerate(names) for k in range(5)]
    (tmp_path / "flickr30k_images" / "results.csv").write_text("\n".join(flickr) + "\n")

    with pytest.raises(
        ConfigError, match=r"is COCO's captions file \(one JSON object with `images` and `annotations`"
    ):
        load_image_text_data(DataArguments(train_file="annotations/captions_train2017.json"), 1)
    docs = (Path(__file__).resolve().parent.parent / "docs" / "data-formats.md").read_text()
    section = docs.split("### COCO and Flickr30k", 1)[1]
    exec(re.search(r"```python\n(.*?)```", section, flags=re.DOTALL).group(1), {})
    for converted in ("train2017/coco-train.jsonl", "flickr30k_images/flickr-train.jsonl"):
        data = load_image_text_data(DataArguments(train_file=converted, validation_file=converted), 1)
        assert data.validation.num_rows == 20  # every caption of the 4 images scored
        assert sorted(set(data.validation["caption"])) == sorted(f"{rows[i][1]}, take {k}" for i in range(4)
                                                                 for k in range(5))  # fmt: skip
