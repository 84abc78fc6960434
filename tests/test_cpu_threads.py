"""run_clip.py waits passively for OpenMP work unless the user chose otherwise (spinning threads slow a CPU step 8x
when a DataLoader worker wants a core: README, "CPU runs")."""

from __future__ import annotations

import os
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


@pytest.mark.parametrize("given, expected", [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_run_clip_sets_a_passive_openmp_wait_policy_unless_one_is_given(given, expected):
    env = {key: value for key, value in os.environ.items() if key != "OMP_WAIT_POLICY"}
    if given is not None:
        env["OMP_WAIT_POLICY"] = given
    env["PYTHONPATH"] = str(REPO)
    result = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[-1] == expected
