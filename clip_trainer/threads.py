"""The CPU thread policy of every entry point: `run_clip.py`, `clip-trainer train|eval`, and the library.

torch's CPU build runs its intra-op parallelism on libgomp (GNU OpenMP). Its threads spin while they wait for the next
parallel region, and on a machine with few cores that collapses a training step as soon as anything else wants one of
their cores: a DataLoader worker decoding the next batch, or another process (docs/performance.md, "CPU threads",
has the measurements). libgomp reads `OMP_WAIT_POLICY` and `GOMP_SPINCOUNT` once, when the library is loaded, that is
when `import torch` runs; setting them later changes nothing (checked: a process that sets `OMP_WAIT_POLICY=PASSIVE`
after `import torch` keeps spinning), and libgomp has no call to change them afterwards.

So the policy has two halves:

- [`set_openmp_environment`], before torch is imported: sets [`OPENMP_ENVIRONMENT`] where the user has not chosen.
  `import clip_trainer` calls it (when torch is not imported yet), so `run_clip.py`, the `clip-trainer` command and a
  script that imports clip_trainer before torch all get it.
- [`check_thread_policy`], when a `CLIPContrastiveTrainer` is built: in a process where torch was imported first
  without the variables, the wait policy can no longer be set; the trainer then logs one warning that says how to get
  it (set the variables before the script starts, or import clip_trainer first).

The user's choice wins: a process started with any of `OMP_WAIT_POLICY`, `GOMP_SPINCOUNT` is left as it is, and
`CLIP_TRAINER_THREADS=off` turns the policy off altogether (libgomp's defaults).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import MutableMapping

logger = logging.getLogger(__name__)

# Measured on a shared 2-core machine, quiet and loaded (docs/performance.md, "CPU threads"): threads that sleep at
# once when idle keep every epoch within a few percent of the median; spinning ones stall whole epochs.
OPENMP_ENVIRONMENT: dict[str, str] = {"OMP_WAIT_POLICY": "PASSIVE"}
# Any of these set by the user means the user chose how OpenMP threads wait.
WAIT_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
# `CLIP_TRAINER_THREADS=off`: leave OpenMP's defaults (spinning), whatever the entry point.
SWITCH = "CLIP_TRAINER_THREADS"

# Set by `set_openmp_environment`: whether the variables were in place before torch (and libgomp) was loaded.
_applied_before_torch: bool | None = None
_warned = False  # the warning of `check_thread_policy` is given once per process


def policy_disabled(environ: MutableMapping[str, str] | None = None) -> bool:
    """Whether the user turned the policy off (`CLIP_TRAINER_THREADS=off`, `0`, `false` or `no`)."""
    environ = os.environ if environ is None else environ
    return environ.get(SWITCH, "").strip().lower() in ("off", "0", "false", "no")


def user_chose_wait_policy(environ: MutableMapping[str, str] | None = None) -> bool:
    """Whether the environment already says how OpenMP threads wait (any of `WAIT_VARIABLES` set)."""
    environ = os.environ if environ is None else environ
    return any(name in environ for name in WAIT_VARIABLES)


def set_openmp_environment(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """
    Sets the OpenMP variables of clip-trainer's thread policy that the user has not set. Call it before torch is
    imported: libgomp reads them when it is loaded.

    Args:
        environ (`MutableMapping[str, str]`, *optional*):
            The environment to update; defaults to `os.environ`.

    Returns:
        `dict[str, str]`: the variables it set (empty when the user chose a wait policy or turned the policy off).
    """
    global _applied_before_torch
    environ = os.environ if environ is None else environ
    if policy_disabled(environ) or user_chose_wait_policy(environ):
        return {}
    added = {name: value for name, value in OPENMP_ENVIRONMENT.items() if name not in environ}
    environ.update(added)
    if environ is os.environ and _applied_before_torch is None:
        _applied_before_torch = "torch" not in sys.modules
    return added


def check_thread_policy() -> bool:
    """
    Called when a trainer is built on the CPU: whether OpenMP runs under a chosen wait policy (clip-trainer's or the
    user's). When torch was loaded before the policy's variables were set (a script that imports torch first), it can
    no longer be set; one warning says how to get it.

    Returns:
        `bool`: `True` when the wait policy is in effect (or the user turned the policy off), `False` when the
        warning was logged.
    """
    if policy_disabled() or _applied_before_torch:
        return True
    if user_chose_wait_policy() and _applied_before_torch is None:
        return True  # the user's own variables, set before Python started (or before clip_trainer was imported)
    global _warned
    if _warned:
        return False
    _warned = True
    logger.warning(
        "torch was imported before clip_trainer, so its OpenMP threads spin while they wait, which can make CPU "
        "training several times slower when the DataLoader workers or other processes want a core. Import "
        "clip_trainer before torch, or start Python with OMP_WAIT_POLICY=PASSIVE (CLIP_TRAINER_THREADS=off hides "
        "this message)."
    )
    return False
