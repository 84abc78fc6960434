"""Under CI (`CI=true`), which builds every environment the tests need, a skipped test fails instead of passing
silently; only the open_clip tests may skip, in the main environment (they run again in their own)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent

SKIPPING = """
import pytest

def test_needs_a_missing_environment():
    pytest.skip("the environment is missing")
"""
SKIPPING_MODULE = """
import pytest

pytest.skip("the environment is missing", allow_module_level=True)
"""


def run_pytest(folder: Path, name: str, body: str, **environ: str) -> subprocess.CompletedProcess:
    """pytest on one test file in `folder`, with the project's conftest hooks and `environ` on top of this one's."""
    (folder / "conftest.py").write_text(
        f"import importlib.util, sys\nsys.path.insert(0, {str(TESTS)!r})\n"
        f"spec = importlib.util.spec_from_file_location('project_conftest', {str(TESTS / 'conftest.py')!r})\n"
        "project = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(project)\n"
        "pytest_make_collect_report = project.pytest_make_collect_report\n"
        "pytest_runtest_makereport = project.pytest_runtest_makereport\n"
    )
    (folder / name).write_text(body)
    env = {key: value for key, value in os.environ.items() if key not in ("CI", "CLIP_TRAINER_OPEN_CLIP_STEP")}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", name], cwd=folder,
                          capture_output=True, text=True, timeout=300, env={**env, **environ})  # fmt: skip


@pytest.mark.slow  # pytest in subprocesses, each loading the project's conftest (torch)
def test_a_skip_fails_in_ci_and_only_there(tmp_path):
    local = run_pytest(tmp_path, "test_other.py", SKIPPING)
    assert local.returncode == 0 and "1 skipped" in local.stdout
    ci = run_pytest(tmp_path, "test_other.py", SKIPPING, CI="true")
    assert ci.returncode == 1 and "1 failed" in ci.stdout
    assert "skipped in CI, which builds what this test needs (test_other.py): the environment is missing" in ci.stdout
    module = run_pytest(tmp_path, "test_other_module.py", SKIPPING_MODULE, CI="true")
    assert module.returncode != 0 and "skipped in CI" in module.stdout


@pytest.mark.slow
def test_the_open_clip_tests_may_skip_in_the_main_environment_only(tmp_path):
    main_environment = run_pytest(tmp_path, "test_open_clip_import.py", SKIPPING_MODULE, CI="true")
    # 5: pytest's "no tests ran", this file's only test being skipped (among the suite's others it is 0)
    assert main_environment.returncode == 5 and "1 skipped" in main_environment.stdout
    own_environment = run_pytest(
        tmp_path, "test_open_clip_import.py", SKIPPING_MODULE, CI="true", CLIP_TRAINER_OPEN_CLIP_STEP="1"
    )
    assert own_environment.returncode != 0 and "skipped in CI" in own_environment.stdout
