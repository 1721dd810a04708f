"""The README cannot drift from the code: its Python snippets run (in order, in one namespace, in a
scratch folder), the files and figures it names exist, its quick start is two commands, and it
stays short, with no clock times or workflow markers."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def blocks(language):
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def test_every_python_snippet_runs(tmp_path):
    assert len(blocks("python")) >= 3, "the model, the mitigations and the forgetting curve each have a snippet"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, str(ROOT / "tests" / "readme_snippets.py"), str(ROOT / "README.md")],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    assert (tmp_path / "out" / "curve.png").is_file() and (tmp_path / "out" / "tiny" / "config.json").is_file()


def quick_start_commands() -> list[str]:
    (quick,) = [b for b in blocks("bash")]
    return [line for line in quick.splitlines() if line.strip() and not line.startswith("#")]


def test_quick_start_is_two_commands_demo_then_tests_and_the_readme_is_short():
    """Each command sets up from a fresh clone and runs: the demo, then the tests (.ci/run runs the second)."""
    demo, tests = quick_start_commands()
    for command in (demo, tests):
        assert command.startswith("python -m venv .venv && . .venv/bin/activate && pip install torch=="), command
    assert demo.endswith("python -m experiments.state_collapse --quick") and tests.endswith("python -m pytest -q")
    assert "'.[test]'" in tests
    assert len(README.splitlines()) <= 300
    assert not re.search(r"\b\d{1,2}:\d{2} ?UTC\b", README), "no clock times in the README"
    assert "owner:" not in README and "<!--" not in README and "{{" not in README


# Library files written for readers, at a natural width (a line cap on the file pushed code into dense,
# wide lines; a width limit does the opposite). Every top-level library module is on the list.
READABLE_WIDTH = 110
READABLE_FILES = ["minimamba.py", "checkpoints.py", "minimamba_kernels.py", "mitigations.py",
                  "forgetting_curve.py"]


def test_named_files_exist_and_library_lines_fit_the_width():
    for name in set(re.findall(r"`((?:figures|docs|experiments|tests)/[\w./-]+\.(?:png|md|py|json))`", README)):
        assert (ROOT / name).is_file(), f"README names {name}, which is not in the repository"
    for name in re.findall(r"\((figures/[\w./-]+\.png)\)", README):
        assert (ROOT / name).is_file(), f"README shows {name}, which is not in the repository"
    for name in READABLE_FILES:
        lines = (ROOT / name).read_text().splitlines()
        wide = [i + 1 for i, line in enumerate(lines) if len(line) > READABLE_WIDTH]
        assert not wide, f"{name}: lines {wide[:10]} are wider than {READABLE_WIDTH} characters"
    assert (ROOT / "LICENSE").is_file() and "MIT" in (ROOT / "LICENSE").read_text()


@pytest.mark.parametrize("script", ["state_collapse", "state_capacity", "passkey", "forgetting_curves", "figures",
                                    "bench"])
def test_every_command_in_the_results_table_parses(script):
    """The results table's commands name real scripts and flags (argparse rejects unknown flags)."""
    import importlib
    parser = importlib.import_module(f"experiments.{script}").build_parser()
    for cmd in re.findall(rf"`python -m experiments\.{script}( [^`]*)?`", README):
        args = [a for a in cmd.split() if a]
        parser.parse_args(args)

