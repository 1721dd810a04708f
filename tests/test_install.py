"""A fresh install works beside what users commonly have installed.

1. No top-level module of the project shadows an import name of another installed distribution or of
   the standard library (a top-level kernels.py once shadowed the PyPI package `kernels`, which
   transformers requires: from the repository root transformers failed to import).
2. Without transformers, the tests that need it skip instead of failing.
"""
import importlib.metadata
import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def normalized(dist_name: str) -> str:
    return re.sub(r"[-_.]+", "-", dist_name).lower()


def project_top_level_names() -> set[str]:
    """What `pip install .` installs (pyproject's py-modules and packages) and what a run from the
    repository root can import: every top-level .py file and package folder of the repository."""
    setuptools = PYPROJECT["tool"]["setuptools"]
    names = set(setuptools.get("py-modules", [])) | {p.split(".")[0] for p in setuptools.get("packages", [])}
    names |= {p.stem for p in ROOT.glob("*.py")}
    names |= {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()}
    return names


def test_the_project_installs_its_modules():
    assert {"minimamba", "minimamba_kernels", "mitigations", "forgetting_curve"} <= project_top_level_names()


def test_no_top_level_name_shadows_another_distribution_or_the_stdlib():
    ours = normalized(PYPROJECT["project"]["name"])
    owners = importlib.metadata.packages_distributions()  # import name -> distributions providing it
    clashes = {}
    for name in sorted(project_top_level_names()):
        others = sorted({d for d in owners.get(name, []) if normalized(d) != ours})
        if others:
            clashes[name] = others
        if name in sys.stdlib_module_names:
            clashes[name] = ["the standard library"]
    assert not clashes, f"top-level names of this project that another package also provides: {clashes}"


def run_pytest_without_transformers(*args: str) -> str:
    """pytest in a fresh interpreter where `import transformers` fails; returns its summary line."""
    code = ("import sys; sys.modules['transformers'] = None\n"
            "import pytest\n"
            "sys.exit(pytest.main(sys.argv[1:]))\n")
    out = subprocess.run([sys.executable, "-c", code, "-q", "-p", "no:cacheprovider", *args], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    summary = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else out.stderr[-2000:]
    assert out.returncode == 0 and "failed" not in summary and "error" not in summary, out.stdout[-4000:]
    return summary


def test_tests_that_need_transformers_skip_without_it():
    files = [str(f.relative_to(ROOT)) for f in sorted((ROOT / "tests").glob("test_*.py"))
             if "mark.transformers" in f.read_text()]  # collecting only these keeps the test short
    summary = run_pytest_without_transformers("-m", "transformers", *files)
    assert "skipped" in summary and "passed" not in summary, summary


def test_scripts_that_use_transformers_still_show_their_help_without_it():
    run_pytest_without_transformers("tests/test_experiments.py::test_every_flag_is_snake_case_with_help_and_its_default"
                                    "[experiments.check_equivalence]")
