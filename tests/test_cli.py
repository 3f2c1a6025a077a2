"""The command line a new user meets: `cbir --help`, `--version`, a mistyped command, and
`--help` of every subcommand and script answered without a traceback."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import PROJECT

from cbir import __version__
from cbir.cli import COMMANDS

SCRIPTS = sorted(p for p in (PROJECT / "experiments").glob("*.py") if p.name not in ("__init__.py", "common.py"))


def call(*args: str, cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg", "PYTHONPATH": str(PROJECT)}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, env=env, cwd=cwd)


def test_help_lists_every_command_with_one_line():
    proc = call("-m", "cbir.cli", "--help")
    assert proc.returncode == 0
    for name, (_, text) in COMMANDS.items():
        assert f"  {name}" in proc.stdout and text in proc.stdout
    assert "Powered by Hydra" not in proc.stdout


def test_version_is_cbirs():
    proc = call("-m", "cbir.cli", "--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"cbir {__version__}"


def test_unknown_command_is_one_clear_line():
    proc = call("-m", "cbir.cli", "bogus")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"cbir: unknown command 'bogus'; commands: {', '.join(COMMANDS)} (cbir --help)"
    ]


@pytest.mark.slow
@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_subcommand_answers_help(command, tmp_path):
    proc = call("-m", "cbir.cli", command, "--help", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "== Config ==" in proc.stdout
    if command == "run":
        assert "usage: cbir [run]" in proc.stdout and "cbir --help" in proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS + [PROJECT / "scripts" / "dashboard_screenshots.py"], ids=lambda p: p.name)
def test_every_script_answers_help(script, tmp_path):
    proc = call(str(script), "--help", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert "usage" in proc.stdout.lower() or "== Config ==" in proc.stdout  # own usage, or Hydra's (benchmark.py)
    assert not list(tmp_path.iterdir())  # --help runs nothing


def test_script_with_a_mistyped_override_says_so_in_one_line(tmp_path):
    proc = call(str(PROJECT / "experiments" / "saturation.py"), "fraction=", "smoke=[", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "--help lists the settings" in proc.stderr
