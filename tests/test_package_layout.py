"""The package's structure: no module imports another that imports it back (directly or through others), the public
API is importable from the top, and the network errors do not swallow disk errors."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "clip_trainer"


def _runtime_nodes(tree: ast.AST):
    """Every node of a module except those under `if TYPE_CHECKING:`, whose imports never run."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and getattr(child.test, "id", None) == "TYPE_CHECKING":
                stack.extend(child.orelse)
                continue
            stack.append(child)


def package_imports() -> dict[str, set[str]]:
    """Module -> the package modules it imports at run time, at any depth of its code (function-level imports
    included, `if TYPE_CHECKING:` ones not)."""
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
        targets: set[str] = set()
        for node in _runtime_nodes(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                    name = f"{base}.{node.module}" if node.module else base
                else:
                    name = node.module or ""
                if name.startswith("clip_trainer"):
                    targets.add(name)
            elif isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names if alias.name.startswith("clip_trainer"))
        graph[module] = {target for target in targets if target != module}
    return graph


def test_no_import_cycle_in_the_package():
    graph = package_imports()
    # The package's __init__ re-exports the public API, so everything "imports" it by Python's rules; leave it out.
    graph = {
        module: {t for t in targets if t != "clip_trainer"}
        for module, targets in graph.items()
        if module != "clip_trainer"
    }
    assert "clip_trainer.trainer" in graph and "clip_trainer.data" in graph["clip_trainer.collator"]

    def cycle_from(start: str) -> list[str] | None:
        stack = [(start, [start])]
        while stack:
            node, path = stack.pop()
            for target in graph.get(node, ()):
                if target == start:
                    return [*path, start]
                if target not in path:
                    stack.append((target, [*path, target]))
        return None

    cycles = [cycle for module in graph if (cycle := cycle_from(module))]
    assert not cycles, cycles[0]


def test_the_public_api_is_importable_from_the_top():
    import clip_trainer

    for name in ("CLIPContrastiveTrainer", "CLIPTrainingArguments", "ModelArguments", "DataArguments",
                 "ImageTextCollator", "clip_loss", "contrastive_loss", "distributed_clip_loss", "load_image_text_data"):  # fmt: skip
        assert name in clip_trainer.__all__ and getattr(clip_trainer, name) is not None


def test_a_disk_error_is_no_network_error():
    from clip_trainer.hub import NETWORK_ERRORS

    assert not isinstance(PermissionError(13, "Permission denied"), NETWORK_ERRORS)
    assert not isinstance(OSError(28, "No space left on device"), NETWORK_ERRORS)
    assert isinstance(ConnectionError("refused"), NETWORK_ERRORS)


def test_every_exception_class_lives_in_errors():
    """One home for what the command prints as one line and what a library user catches."""
    import ast

    package = Path(__file__).resolve().parents[1] / "clip_trainer"
    exception_bases = {"Exception", "ValueError", "RuntimeError", "OSError", "KeyError", "TypeError"}
    elsewhere = []
    for path in package.rglob("*.py"):
        if path.name == "errors.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                bases = {ast.unparse(base).split(".")[-1] for base in node.bases}
                if bases & exception_bases or any(base.endswith("Error") for base in bases):
                    elsewhere.append(f"{path.name}: {node.name}")
    assert not elsewhere, elsewhere
