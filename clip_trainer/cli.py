"""The `clip-trainer` command: `clip-trainer train|eval|export-onnx|import-open-clip|export-open-clip [options]`.

`train` is `run_clip.py`; `eval` is `run_clip.py --do_eval` (evaluate `model_name_or_path` and write
`eval_results.json`); `export-onnx`, `import-open-clip` and `export-open-clip` are the command lines of
[`clip_trainer.converters.to_onnx`], [`clip_trainer.converters.from_open_clip`] and
[`clip_trainer.converters.to_open_clip`]. `clip-trainer COMMAND --help` prints each command's options.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

PROG = "clip-trainer"


def run_command(argv: list[str] | None = None, prog: str = "run_clip.py") -> int:
    """`run_clip.py` and `clip-trainer train|eval`: the fast check of the command line (no torch), then the run."""
    from .command_line import check_command_line
    from .errors import ConfigError

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if check_command_line(argv, prog):
            return 0
        from .run import cli  # torch, transformers, datasets: seconds in which Ctrl-C lands in an import
    except ConfigError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted (Ctrl-C) while starting; nothing was written.", file=sys.stderr)
        return 130
    return cli(argv, prog=prog)


def _train(argv: list[str]) -> int:
    return run_command(argv, prog=f"{PROG} train")


def _eval(argv: list[str]) -> int:
    # Appended, not prepended: config files must lead the command line (`eval configs/x.json --flag value`).
    if not any(arg == "--do_eval" or arg.startswith("--do_eval=") for arg in argv):
        argv = [*argv, "--do_eval"]
    return run_command(argv, prog=f"{PROG} eval")


def _export_onnx(argv: list[str]) -> int:
    from .converters.to_onnx import main

    return main(argv, prog=f"{PROG} export-onnx")


def _import_open_clip(argv: list[str]) -> int:
    from .converters.from_open_clip import main

    return main(argv, prog=f"{PROG} import-open-clip")


def _export_open_clip(argv: list[str]) -> int:
    from .converters.to_open_clip import main

    return main(argv, prog=f"{PROG} export-open-clip")


COMMANDS: dict[str, tuple[Callable[[list[str]], int], str]] = {
    "train": (_train, "train or fine-tune a CLIP model (run_clip.py's options; --help lists them)"),
    "eval": (_eval, "evaluate model_name_or_path only: train's options with --do_eval"),
    "export-onnx": (_export_onnx, "export a model folder to vision_model.onnx and text_model.onnx, checked"),
    "import-open-clip": (_import_open_clip, "convert an open_clip ViT checkpoint into a CLIPModel folder"),
    "export-open-clip": (_export_open_clip, "write open_clip files beside a CLIP model folder, for local-dir: loads"),
}


def _usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = [f"usage: {PROG} {{{','.join(COMMANDS)}}} [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {summary}" for name, (_, summary) in COMMANDS.items()]
    lines += ["", f"Run `{PROG} COMMAND --help` for the options of one command."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """
    Runs one `clip-trainer` command and returns its exit status.

    Args:
        argv (`list[str]`, *optional*):
            The command line without the program name; defaults to `sys.argv[1:]`.

    Returns:
        `int`: 0 on success (and for `--help`), 2 for a usage or configuration error, 1 when a command fails.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"{PROG}: error: unknown command {name!r}; choose from {', '.join(COMMANDS)}.", file=sys.stderr)
        return 2
    try:
        return COMMANDS[name][0](rest)
    except SystemExit as exit:
        # argparse exits for --help (0) and for a malformed command line (2); report it as a status like the rest.
        return exit.code if isinstance(exit.code, int) else (0 if exit.code is None else 1)


if __name__ == "__main__":
    sys.exit(main())
