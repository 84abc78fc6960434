"""One CPU thread policy for every entry point (clip_trainer/threads.py): OpenMP threads wait passively unless the
user chose otherwise (spinning threads stall CPU training when a DataLoader worker or another process wants a core:
docs/performance.md, "CPU threads").

libgomp reads its wait policy once, when torch loads it; `OMP_DISPLAY_ENV=VERBOSE` makes it print what it read (the
spin count: 0 passive, 300000 spinning by default), which the tests below check in fresh processes."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# run_clip.py run as a module (not __main__, so it does not train), with `clip_trainer.cli` stood in by a module
# that notes the policy at the moment run_clip.py imports from it, that is before torch would load OpenMP.
PROBE = """
import os, runpy, sys, types
seen = {}
class Run(types.ModuleType):
    def __getattr__(self, name):
        seen[name] = os.environ.get("OMP_WAIT_POLICY")
        return lambda: 0
sys.modules["clip_trainer.cli"] = Run("clip_trainer.cli")
runpy.run_path("run_clip.py", run_name="probe")
print(seen["run_command"])
"""
USER_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "CLIP_TRAINER_THREADS", "OMP_DISPLAY_ENV")


def clean_env(**given: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in USER_VARIABLES}
    env.update(PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", **given)
    return env


def run_python(code: str, **given: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=clean_env(**given), capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result


def libgomp_spin_count(stderr: str) -> int:
    """The spin count libgomp loaded with, from what `OMP_DISPLAY_ENV=VERBOSE` prints."""
    match = re.search(r"GOMP_SPINCOUNT = '(\d+)'", stderr)
    assert match, stderr[-2000:]
    return int(match.group(1))


@pytest.mark.parametrize("given, expected", [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_run_clip_sets_a_passive_openmp_wait_policy_unless_one_is_given(given, expected):
    env = clean_env() if given is None else clean_env(OMP_WAIT_POLICY=given)
    result = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[-1] == expected


@pytest.mark.slow  # a fresh Python that imports torch: seconds on 2 busy cores
@pytest.mark.parametrize(
    "given, spin_count",
    [
        ({}, 0),  # the policy: passive, libgomp does not spin at all
        ({"OMP_WAIT_POLICY": "ACTIVE"}, None),  # the user's choice wins (libgomp spins without bound)
        ({"GOMP_SPINCOUNT": "20000"}, 20000),  # a bounded spin chosen by the user wins too
        ({"CLIP_TRAINER_THREADS": "off"}, 300000),  # policy off: libgomp's default
    ],
)
def test_the_clip_trainer_command_loads_openmp_with_the_policy_unless_the_user_chose(given, spin_count):
    # What `clip-trainer train|eval` runs first: its module, then (inside the command) torch.
    code = "import clip_trainer.cli, sys; assert 'torch' not in sys.modules; import torch; torch.ones(2).sum()"
    result = run_python(code, OMP_DISPLAY_ENV="VERBOSE", **given)
    if spin_count is None:
        assert "OMP_WAIT_POLICY = 'ACTIVE'" in result.stderr
    else:
        assert libgomp_spin_count(result.stderr) == spin_count


@pytest.mark.slow  # a fresh Python that imports torch: seconds on 2 busy cores
def test_a_script_that_imports_clip_trainer_first_gets_the_policy_silently():
    code = (
        "import clip_trainer, torch\n"
        "from clip_trainer.threads import check_thread_policy\n"
        "print(check_thread_policy())\n"
    )
    result = run_python(code, OMP_DISPLAY_ENV="VERBOSE")
    assert libgomp_spin_count(result.stderr) == 0
    assert result.stdout.split()[-1] == "True"
    assert "imported before clip_trainer" not in result.stderr


@pytest.mark.slow  # a fresh Python that imports torch: seconds on 2 busy cores
def test_a_script_that_imports_torch_first_is_told_once_how_to_get_the_policy(tmp_path, tiny_clip_dir):
    # The library used from a script, as a user writes it: torch first, then the trainer (twice: one warning).
    code = f"""
import torch
from transformers import CLIPModel, CLIPProcessor
from clip_trainer import CLIPContrastiveTrainer, CLIPTrainingArguments
model = CLIPModel.from_pretrained({str(tiny_clip_dir)!r})
processor = CLIPProcessor.from_pretrained({str(tiny_clip_dir)!r})
args = CLIPTrainingArguments(output_dir={str(tmp_path / "out")!r}, use_cpu=True, report_to="none", eval_strategy="no")
for _ in range(2):
    CLIPContrastiveTrainer(model=model, args=args, processing_class=processor)
"""
    result = run_python(code, OMP_DISPLAY_ENV="VERBOSE")
    assert libgomp_spin_count(result.stderr) == 300000  # too late: libgomp loaded with its default
    assert result.stderr.count("torch was imported before clip_trainer") == 1
    assert "OMP_WAIT_POLICY=PASSIVE" in result.stderr


@pytest.mark.slow  # a fresh Python that imports torch: seconds on 2 busy cores
def test_the_user_can_silence_the_policy_and_its_warning():
    code = "import torch, clip_trainer\nfrom clip_trainer.threads import check_thread_policy\nprint(check_thread_policy())"
    result = run_python(code, CLIP_TRAINER_THREADS="off")
    assert result.stdout.split()[-1] == "True"
    assert "imported before clip_trainer" not in result.stderr


@pytest.mark.parametrize("given, expected", [({}, "PASSIVE"), ({"GOMP_SPINCOUNT": "1000"}, None)])
def test_the_clip_trainer_command_sets_the_policy_before_torch_is_imported(given, expected):
    code = "import os, sys, clip_trainer.cli; print('torch' in sys.modules, os.environ.get('OMP_WAIT_POLICY'))"
    assert run_python(code, **given).stdout.split() == ["False", str(expected)]


def test_set_openmp_environment_only_fills_what_the_user_left_unset():
    from clip_trainer.threads import OPENMP_ENVIRONMENT, set_openmp_environment

    environ: dict[str, str] = {}
    assert set_openmp_environment(environ) == OPENMP_ENVIRONMENT
    assert environ == OPENMP_ENVIRONMENT
    for chosen in ({"OMP_WAIT_POLICY": "ACTIVE"}, {"GOMP_SPINCOUNT": "1000"}, {"CLIP_TRAINER_THREADS": "off"}):
        environ = dict(chosen)
        assert set_openmp_environment(environ) == {}
        assert environ == chosen
