"""Reading config files: JSON objects of option names and values, with the mistakes JSON itself lets through
(a key given twice keeps the last value without a word) refused, and the closest valid name suggested for a wrong one.

Standard library only: the command line is checked with it before torch and transformers are imported.
"""

from __future__ import annotations

import difflib
import json
import os
from pathlib import Path
from typing import Any

from .errors import ConfigError


def did_you_mean(name: str, choices: list[str] | tuple[str, ...], prefix: str = "") -> str:
    """`" Did you mean `x`?"` for the closest of `choices` to `name`, or `""` when none is close."""
    match = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" Did you mean `{prefix}{match[0]}`?" if match else ""


REPEATED_KEY_FIXES = {
    "extra_eval_sets": "give each set its own name",
    "train_mixture": "give each source once, with the weights added up",
}
_REPEATED_KEY_FIX = "keep one of them"


def _first_repeated_key(pairs: list[tuple[Any, Any]]) -> Any:
    seen = set()
    for key, _ in pairs:
        if key in seen:
            return key
        seen.add(key)
    return None


def refuse_repeated_keys(option: str) -> Any:
    """A `json.loads` `object_pairs_hook` for the JSON text of `option` (on the command line) that refuses a key given
    twice in any of its objects."""

    def hook(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
        key = _first_repeated_key(pairs)
        if key is not None:
            fix = REPEATED_KEY_FIXES.get(option, _REPEATED_KEY_FIX)
            raise ConfigError(f"`{option}` has the key {key!r} twice; {fix}.")
        return dict(pairs)

    return hook


class _RepeatedKeys(dict):
    """A JSON object of a config file in which the key `repeated` was given more than once; kept (not refused on the
    spot) so that the message can say which option holds it."""

    repeated: Any = None


def _mark_repeated_keys(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
    key = _first_repeated_key(pairs)
    if key is None:
        return dict(pairs)
    marked = _RepeatedKeys(pairs)
    marked.repeated = key
    return marked


def _find_repeated_key(value: Any, where: tuple[str, ...] = ()) -> tuple[tuple[str, ...], Any] | None:
    """`(the keys leading to the object, the key given twice)` of the first object in `value` with a repeated key."""
    if isinstance(value, _RepeatedKeys):
        return where, value.repeated
    children = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in children:
        found = _find_repeated_key(child, (*where, str(key)))
        if found is not None:
            return found
    return None


def read_config_file(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise ConfigError(f"Config file {path!r} does not exist.")
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"), object_pairs_hook=_mark_repeated_keys)
    except json.JSONDecodeError as error:
        raise ConfigError(f"Config file {path!r} is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"Config file {path!r} must hold one JSON object of option names and values.")
    found = _find_repeated_key(data)
    if found is not None:
        where, key = found
        inside = f" in `{'.'.join(where)}`" if where else ""
        fix = REPEATED_KEY_FIXES.get(where[0], _REPEATED_KEY_FIX) if where else _REPEATED_KEY_FIX
        raise ConfigError(
            f"Config file {path!r} has the key {key!r} twice{inside}; JSON would keep only the last one without a "
            f"word, so {fix}."
        )
    return data
