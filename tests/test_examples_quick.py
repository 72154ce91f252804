"""Every example's ``--quick`` runs to the end, in under a minute, and writes only under ``--out``.

Each example runs in a subprocess from a copy of it in a stand-in repository (a temporary
folder with ``examples/``, ``docs/`` and ``runs/``), in a working directory ``cwd/`` there, with
``--out`` outside it.  A relative default path (``runs/...``) would land in ``cwd/``, a path
built from the script's own location (``docs/figures/...``) in the stand-in's ``docs/``;
afterwards both must be empty and ``--out`` must hold what the example wrote.  (The stand-in,
rather than a snapshot of the real repository, keeps the test independent of anything else
writing into the working tree meanwhile.)
"""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted(p.name for p in (ROOT / "examples").glob("*.py"))
#: the examples whose --quick has no progress flag to turn off (their bars go to stderr)
NO_PROGRESS_FLAG = {"sampling_steps_digits.py"}
#: what --help promises on an idle 2-core machine: every example runs on one thread, so its CPU
#: time is what it takes there; the wall clock of a loaded test machine gets this much slack
QUICK_LIMIT_SECONDS = 60
SLACK = 5.0


def _child_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_every_example_has_quick_out_and_progress_flags():
    """A static check that runs in no time: the flags the slow test below relies on."""
    assert len(EXAMPLES) >= 9
    for name in EXAMPLES:
        text = (ROOT / "examples" / name).read_text()
        for flag in ('"--quick"', '"--out"'):
            assert flag in text, f"{name} lacks {flag}"
        if name not in NO_PROGRESS_FLAG:
            assert '"--progress"' in text and "BooleanOptionalAction" in text, (
                f"{name}: no --progress/--no-progress"
            )


@pytest.mark.slow
@pytest.mark.parametrize("name", EXAMPLES)
def test_example_quick_runs_and_writes_only_under_out(tmp_path, name):
    repo, out = tmp_path / "repo", tmp_path / "out"
    workdir = repo / "cwd"
    for folder in ("examples", "docs/figures", "runs", "cwd"):
        (repo / folder).mkdir(parents=True)
    script = repo / "examples" / name
    shutil.copy(ROOT / "examples" / name, script)
    command = [sys.executable, str(script), "--quick", "--out", str(out)]
    if name not in NO_PROGRESS_FLAG:
        command.append("--no-progress")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    started, cpu_before = time.perf_counter(), _child_cpu_seconds()
    result = subprocess.run(
        command, cwd=workdir, env=env, capture_output=True, text=True, timeout=QUICK_LIMIT_SECONDS * SLACK
    )
    seconds, cpu = time.perf_counter() - started, _child_cpu_seconds() - cpu_before
    assert result.returncode == 0, f"{name} --quick failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    outside = [f for f in _files(repo) if f != f"examples/{name}" and "__pycache__" not in f]
    assert not outside, f"{name} --quick wrote outside --out: {outside}"
    assert _files(out), f"{name} wrote nothing under --out"
    print(f"{name} --quick: {seconds:.1f} s wall, {cpu:.1f} s CPU (load {os.getloadavg()[0]:.1f})")
    assert cpu < QUICK_LIMIT_SECONDS, (
        f"{name} --quick took {cpu:.0f} s of CPU time; --help promises under a minute"
    )
