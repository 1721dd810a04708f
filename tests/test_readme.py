"""The README cannot drift from the code: its Python snippets run (in order, in one namespace, in a
scratch folder), the files and figures it names exist, its quick start is at most 3 commands, and it
stays short, with no clock times or workflow markers."""

import os
import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def blocks(language):
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def test_every_python_snippet_runs(tmp_path, monkeypatch):
    snippets = blocks("python")
    assert len(snippets) >= 3, "the model, the mitigations and the forgetting curve each have a snippet"
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    namespace = {"__name__": "readme"}
    for i, code in enumerate(snippets):
        try:
            exec(compile(code, f"README.md python snippet {i + 1}", "exec"), namespace)
        except Exception as e:  # the failing snippet and line are in the traceback
            raise AssertionError(f"README snippet {i + 1} failed: {type(e).__name__}: {e}\n{code}") from e
    assert (tmp_path / "out" / "curve.png").is_file() and (tmp_path / "out" / "tiny" / "config.json").is_file()


def test_quick_start_is_at_most_three_commands_and_the_readme_is_short():
    (quick,) = [b for b in blocks("bash")]
    commands = [line for line in quick.splitlines() if line.strip() and not line.startswith("#")]
    assert len(commands) <= 3 and not any("&&" in c for c in commands), commands
    assert len(README.splitlines()) <= 300
    assert not re.search(r"\b\d{1,2}:\d{2} ?UTC\b", README), "no clock times in the README"
    assert "owner:" not in README and "<!--" not in README and "{{" not in README


# Library files written for readers, at a natural width (a line cap on the file pushed code into dense,
# wide lines; a width limit does the opposite). The other modules join this list when they fit.
READABLE_WIDTH = 110
READABLE_FILES = ["minimamba.py", "checkpoints.py"]


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

