"""A model folder that needs its own code (`auto_map` in its config.json), whose code leaves a mark if it ever runs,
and a stand-in for the terminal prompt transformers shows when `trust_remote_code` is left unset."""

from __future__ import annotations

import io
import json
from pathlib import Path

CODE = "from pathlib import Path\nPath(__file__).with_name('RAN').write_text('the custom code ran')\n"


def custom_code_model(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(
        json.dumps(
            {
                "model_type": "my-own-clip",
                "auto_map": {"AutoConfig": "configuration_mine.MyConfig", "AutoModel": "modeling_mine.MyModel"},
            }
        )
    )
    for name in ("configuration_mine.py", "modeling_mine.py"):
        (folder / name).write_text(CODE)
    return folder


def record_prompts(monkeypatch) -> list[str]:
    """stdin closed (at its end), as in a script or a job; every `input()` prompt is recorded and answered with an
    end of file, as a closed stdin answers it."""
    asked: list[str] = []

    def ask(prompt: str = "") -> str:
        asked.append(prompt)
        raise EOFError

    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    monkeypatch.setattr("builtins.input", ask)
    return asked
