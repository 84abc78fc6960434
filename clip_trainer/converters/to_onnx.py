"""Exporting a trained CLIP model to ONNX: one graph per tower, checked against PyTorch with ONNX Runtime.

optimum's exporter (`optimum-onnx`) is the usual tool for this and will replace this module once it supports
transformers 5: its only release, 0.1.0, requires `transformers<4.58`. Until then this module writes what optimum's
"split" CLIP-family export writes (the layout of its MetaCLIP 2 config), so that serving code written for one reads
the other:

- `vision_model.onnx`: `pixel_values` `(batch_size, 3, height, width)` -> `image_embeds` `(batch_size, projection_dim)`
- `text_model.onnx`: `input_ids`, `attention_mask` `(text_batch_size, sequence_length)` -> `text_embeds`
  `(text_batch_size, projection_dim)`

The embeddings are those of `CLIPModel.get_image_features` / `get_text_features`: projected, not L2-normalised.
Batch size is dynamic in both graphs and sequence length in the text graph (up to the model's positions); the image
size is fixed by the model's position embeddings. The config and the processor files are copied beside the graphs, so
the folder is all a server needs; with `preprocessor_config.json` and a tokenizer class that transformers 4.x knows
(`consumers.write_consumer_files`), transformers.js loads the graphs too (`CLIPTextModelWithProjection` /
`SiglipTextModel` read `text_model.onnx`, the vision classes `vision_model.onnx`, from the `onnx/` folder of a
training run's `output_dir`).

Graphs are written by PyTorch's own exporter, `torch.onnx.export(..., dynamo=True)` (torch.export-based, the default
since torch 2.9; it needs `onnxscript`). With torch 2.13 and transformers 5.24 it exports CLIP with the default SDPA
attention and with eager attention alike; the TorchScript exporter (`dynamo=False`) works too but is deprecated.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModel, CLIPModel
from transformers.utils import logging

from ..arguments import describe_load_error
from ..checkpoints import check_writable_folder
from ..consumers import write_consumer_files
from ..errors import ConfigError, ONNXExportError
from ..modeling import FAMILIES, max_text_positions

logger = logging.get_logger(__name__)

__all__ = ["ONNXExportError", "VISION_MODEL_FILENAME", "TEXT_MODEL_FILENAME", "export_onnx", "main"]

# Families whose towers take `pixel_values` of one size and `input_ids` + `attention_mask`.
EXPORTABLE_MODEL_TYPES = tuple(model_type for model_type, family in FAMILIES.items() if family.fixed_image_size)
VISION_MODEL_FILENAME = "vision_model.onnx"
TEXT_MODEL_FILENAME = "text_model.onnx"
INSTALL_HINT = 'pip install "clip-trainer[onnx]"'

# What `from_pretrained` of a config, tokenizer or processor reads; weights, checkpoints and run logs stay behind.
SERVING_FILES = (
    "config.json",
    "processor_config.json",
    "preprocessor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
)


class _ImageEmbedder(nn.Module):
    def __init__(self, model: CLIPModel):
        super().__init__()
        self.model = model
        self.eval()  # a new module trains; torch's exporter would warn that the graph is exported in training mode

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.get_image_features(pixel_values=pixel_values).pooler_output


class _TextEmbedder(nn.Module):
    def __init__(self, model: CLIPModel):
        super().__init__()
        self.model = model
        self.eval()  # a new module trains; torch's exporter would warn that the graph is exported in training mode

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output


def _require(module: str, why: str):
    try:
        return __import__(module)
    except ImportError:
        raise ImportError(f"{why} needs {module}; install it with `{INSTALL_HINT}`.") from None


def _image_inputs(model: CLIPModel, batch_size: int, seed: int) -> dict[str, torch.Tensor]:
    config = model.config.vision_config
    generator = torch.Generator().manual_seed(seed)
    shape = (batch_size, config.num_channels, config.image_size, config.image_size)
    return {"pixel_values": torch.randn(shape, generator=generator)}


def _text_inputs(model: CLIPModel, batch_size: int, length: int, seed: int) -> dict[str, torch.Tensor]:
    """Random captions ending with the end token, every second one shorter and padded, like a tokenizer's batch."""
    config = model.config.text_config
    generator = torch.Generator().manual_seed(seed)
    eos = config.eos_token_id
    input_ids = torch.randint(0, config.vocab_size, (batch_size, length), generator=generator)
    # A random id equal to eos would move the pooled position; keep eos only where a caption ends.
    if eos is not None:  # towers that pool at the first token (BERT's) have none
        input_ids[input_ids == eos] = (eos + 1) % config.vocab_size
    attention_mask = torch.ones_like(input_ids)
    for row in range(batch_size):
        end = length - 1 if row % 2 == 0 else max(1, length // 2)
        if eos is not None:
            input_ids[row, end] = eos
        if end + 1 < length:
            input_ids[row, end + 1 :] = config.pad_token_id if config.pad_token_id is not None else eos
            attention_mask[row, end + 1 :] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


# A protobuf message cannot exceed 2 GiB; larger graphs keep their weights in a `<name>.onnx.data` file beside them.
_MAX_INLINE_BYTES = 2**31 - 2**26


def _export(
    module: nn.Module, inputs: dict[str, torch.Tensor], dims: dict, output: str, path: str, opset
) -> list[str]:
    """Writes one graph; returns the files written (the graph, and its external weights when it needs them)."""
    _require("onnxscript", "torch.onnx's exporter")
    external_data = sum(parameter.numel() * parameter.element_size() for parameter in module.parameters())
    external_data = external_data > _MAX_INLINE_BYTES
    try:
        torch.onnx.export(
            module,
            tuple(inputs.values()),
            path,
            input_names=list(inputs),
            output_names=[output],
            dynamic_shapes=dims,
            opset_version=opset,
            dynamo=True,
            external_data=external_data,
            verbose=False,
        )
    except Exception as error:  # torch.export raises many types; all mean the same thing to the caller
        raise ONNXExportError(f"torch.onnx.export could not export {os.path.basename(path)}: {error}") from error
    return [path, *([path + ".data"] if os.path.isfile(path + ".data") else [])]


def _max_difference(session, inputs: dict[str, torch.Tensor], expected: torch.Tensor) -> float:
    (actual,) = session.run(None, {name: value.numpy() for name, value in inputs.items()})
    if actual.shape != tuple(expected.shape):
        return float("inf")
    return float(abs(torch.from_numpy(actual) - expected).max())


def check_onnx(
    model: CLIPModel, output_dir: str, atol: float = 1e-4, batch_sizes: tuple[int, ...] = (1, 3)
) -> dict[str, float]:
    """
    Runs both graphs in ONNX Runtime and compares their embeddings with the PyTorch model's.

    Each graph is run at every batch size in `batch_sizes`; the text graph also at two sequence lengths (the model's
    full length and a shorter one), with some captions padded, so that the dynamic axes are exercised.

    Args:
        model ([`CLIPModel`]): the model the graphs were exported from.
        output_dir (`str`): folder holding `vision_model.onnx` and `text_model.onnx`.
        atol (`float`, *optional*, defaults to 1e-4): largest accepted absolute difference of any embedding component.
        batch_sizes (`tuple[int, ...]`, *optional*, defaults to `(1, 3)`): batch sizes to run.

    Returns:
        `dict[str, float]`: the largest absolute difference seen, as `image_embeds` and `text_embeds`.

    Raises:
        [`ONNXExportError`]: naming the graph, the batch shape and the difference, when a difference exceeds `atol`.
    """
    onnxruntime = _require("onnxruntime", "Checking the exported graphs")
    model.eval()
    vision = onnxruntime.InferenceSession(
        os.path.join(output_dir, VISION_MODEL_FILENAME), providers=["CPUExecutionProvider"]
    )
    text = onnxruntime.InferenceSession(
        os.path.join(output_dir, TEXT_MODEL_FILENAME), providers=["CPUExecutionProvider"]
    )
    positions = max_text_positions(model.config)
    worst = {"image_embeds": 0.0, "text_embeds": 0.0}
    failures = []
    with torch.no_grad():
        for seed, batch_size in enumerate(batch_sizes):
            inputs = _image_inputs(model, batch_size, seed)
            difference = _max_difference(vision, inputs, model.get_image_features(**inputs).pooler_output)
            worst["image_embeds"] = max(worst["image_embeds"], difference)
            if not difference <= atol:
                failures.append(f"{VISION_MODEL_FILENAME} at batch size {batch_size}: {difference:.3g}")
            for length in dict.fromkeys((positions, max(2, positions // 2))):
                inputs = _text_inputs(model, batch_size, length, seed)
                difference = _max_difference(text, inputs, model.get_text_features(**inputs).pooler_output)
                worst["text_embeds"] = max(worst["text_embeds"], difference)
                if not difference <= atol:
                    failures.append(f"{TEXT_MODEL_FILENAME} at batch {batch_size} x {length} tokens: {difference:.3g}")
    if failures:
        raise ONNXExportError(
            f"The ONNX graphs in {output_dir} do not reproduce the PyTorch embeddings within atol={atol}; largest "
            f"absolute differences: {'; '.join(failures)}."
        )
    return worst


def export_onnx(
    model_dir_or_model: str | os.PathLike | nn.Module,
    output_dir: str | os.PathLike,
    opset: int | None = None,
    check: bool = True,
    atol: float = 1e-4,
    processor=None,
) -> dict:
    """
    Exports a CLIP model (or a model of another family with fixed-size images, `EXPORTABLE_MODEL_TYPES`) to
    `vision_model.onnx` and `text_model.onnx` (see the module docstring for their inputs and outputs), copies its
    config and processor files beside them, and checks both graphs with ONNX Runtime.

    Args:
        model_dir_or_model (`str`, `os.PathLike` or [`CLIPModel`]):
            A folder that `CLIPModel.from_pretrained` loads (a training run's `output_dir`), or a model.
        output_dir (`str` or `os.PathLike`):
            Folder to write into; created if missing.
        opset (`int`, *optional*):
            ONNX opset version; defaults to the exporter's.
        check (`bool`, *optional*, defaults to `True`):
            Run both graphs in ONNX Runtime at two batch sizes and compare with PyTorch before reporting success.
        atol (`float`, *optional*, defaults to 1e-4):
            Largest absolute difference of any embedding component that the check accepts.
        processor (*optional*):
            For a model object: its processor (or tokenizer), saved beside the graphs. A folder's own processor files
            are copied instead.

    Returns:
        `dict`: `vision_model` and `text_model` (the graph paths), `files` (every file written), `opset`, and with
        `check`, `max_abs_diff` (`{"image_embeds": float, "text_embeds": float}`).

    Raises:
        [`ONNXExportError`]: if the export fails or the graphs do not reproduce the model within `atol`.
        [`ConfigError`]: if `output_dir` cannot be written, or the model needs its own code.
        `ImportError`: if `onnxscript` (export) or `onnxruntime` (check) is missing.
    """
    if isinstance(model_dir_or_model, nn.Module):
        model, source_dir = model_dir_or_model, None
    else:
        source_dir = Path(model_dir_or_model)
        if not (source_dir / "config.json").is_file():
            raise FileNotFoundError(f"{source_dir} has no config.json; pass a folder written by save_pretrained.")
        try:
            # trust_remote_code=False: a model that needs its own code is refused, never run, and never asked about
            # (left unset, transformers asks on the terminal, which a script cannot answer).
            model = AutoModel.from_pretrained(source_dir, trust_remote_code=False)
        except ValueError as error:
            raise ConfigError(f"Cannot load {str(source_dir)!r}: {describe_load_error(error)}") from None
    if model.config.model_type not in EXPORTABLE_MODEL_TYPES:
        raise ONNXExportError(
            f"Exporting a {model.config.model_type!r} model is not supported: the two graphs take fixed-size images "
            f"and token ids, which fits {', '.join(EXPORTABLE_MODEL_TYPES)} models (SigLIP 2's NaFlex inputs do not)."
        )
    onnx = _require("onnx", "Exporting to ONNX")
    output_dir = str(output_dir)
    check_writable_folder(output_dir)  # before the export's minutes, as training checks its output_dir
    # The graphs are float32 CPU graphs in inference mode, whatever the model was trained in.
    was_training = model.training
    model.eval()
    original = {"device": model.device, "dtype": model.dtype}
    model.to(device="cpu", dtype=torch.float32)
    try:
        vision_path = os.path.join(output_dir, VISION_MODEL_FILENAME)
        text_path = os.path.join(output_dir, TEXT_MODEL_FILENAME)
        positions = max_text_positions(model.config)
        batch = torch.export.Dim("batch_size")
        text_batch = torch.export.Dim("text_batch_size")
        sequence = torch.export.Dim("sequence_length", max=positions)
        with torch.no_grad():
            files = _export(
                _ImageEmbedder(model),
                _image_inputs(model, 2, seed=0),
                {"pixel_values": {0: batch}},
                "image_embeds",
                vision_path,
                opset,
            )
            files += _export(
                _TextEmbedder(model),
                _text_inputs(model, 2, min(positions, 8), seed=0),
                {"input_ids": {0: text_batch, 1: sequence}, "attention_mask": {0: text_batch, 1: sequence}},
                "text_embeds",
                text_path,
                opset,
            )
        if source_dir is not None:
            for name in SERVING_FILES:
                if (source_dir / name).is_file():
                    files.append(shutil.copy2(source_dir / name, os.path.join(output_dir, name)))
        else:
            model.config.save_pretrained(output_dir)
            files.append(os.path.join(output_dir, "config.json"))
            if processor is not None:
                before = set(os.listdir(output_dir))
                processor.save_pretrained(output_dir)
                files += [os.path.join(output_dir, name) for name in sorted(set(os.listdir(output_dir)) - before)]
        # transformers.js reads `preprocessor_config.json` and transformers 4.x a tokenizer class it knows; both
        # are written from the processor files just saved or copied (see consumers.py).
        files += [path for path in write_consumer_files(output_dir) if path not in files]
        opsets = onnx.load(vision_path, load_external_data=False).opset_import
        result = {
            "vision_model": vision_path,
            "text_model": text_path,
            "files": [str(file) for file in files],
            "opset": next(entry.version for entry in opsets if entry.domain in ("", "ai.onnx")),
        }
        if check:
            result["max_abs_diff"] = check_onnx(model, output_dir, atol=atol)
            logger.info(f"ONNX graphs match PyTorch within atol={atol}: {result['max_abs_diff']}.")
        return result
    finally:
        model.to(**original)
        model.train(was_training)


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=f"Export a CLIP model folder to {VISION_MODEL_FILENAME} (pixel_values -> image_embeds) and "
        f"{TEXT_MODEL_FILENAME} (input_ids, attention_mask -> text_embeds), with its processor files, and check "
        "both graphs against PyTorch with ONNX Runtime.",
    )
    parser.add_argument("model_dir", help="folder with a CLIPModel saved by save_pretrained (a run's output_dir).")
    parser.add_argument("--output_dir", required=True, help="folder to write the graphs and processor files into.")
    parser.add_argument("--opset", type=int, default=None, help="ONNX opset version (default: the exporter's).")
    parser.add_argument("--atol", type=float, default=1e-4, help="largest accepted embedding difference.")
    parser.add_argument("--no_check", action="store_true", help="skip the ONNX Runtime comparison.")
    return parser


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Command line: `clip-trainer export-onnx MODEL_DIR --output_dir DIR`."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    try:
        result = export_onnx(
            args.model_dir, args.output_dir, opset=args.opset, check=not args.no_check, atol=args.atol
        )
    except (ONNXExportError, ConfigError, ImportError, FileNotFoundError, OSError) as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2 if isinstance(error, ConfigError | ImportError | FileNotFoundError) else 1
    checked = f", max abs difference {result['max_abs_diff']}" if "max_abs_diff" in result else ""
    print(f"Wrote {result['vision_model']} and {result['text_model']} (opset {result['opset']}){checked}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
