"""Publishing a finished sweep: its small result files into experiments/results/<name>/, from a clean tree only.

Why this exists
    A number in the README must come from code at a commit anyone can check out. A run folder records
    the commit of every invocation (common.write_run_config); publishing refuses a working tree with
    uncommitted changes and a run that any invocation made from one, copies the per-point JSON and
    the run's record, writes a manifest (the run's commits, the preregistration's commit, the
    publishing commit) and rebuilds the summary and figures there from the copied points.

Reading order: check_clean_tree -> prereg_commit -> run_record / run_commits -> publish_run
"""
from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Iterable

from experiments.common import REPO, atomic_write_json, git_commit
from experiments.sweep import Point, load_run_config

FIGURES = REPO / "figures"
PREREGISTRATION = "PREREGISTRATION.md"


def check_clean_tree() -> str:
    """HEAD's commit; refuses a working tree with uncommitted changes to tracked files."""
    commit = git_commit()
    if commit.endswith("+dirty") or commit == "unknown":
        raise SystemExit(f"refusing to publish from a dirty tree ({commit}): commit your changes first")
    return commit


def prereg_commit() -> str:
    """The commit that last changed PREREGISTRATION.md (every result records it)."""
    try:
        out = subprocess.run(["git", "-C", str(REPO), "log", "-1", "--format=%H", "--", PREREGISTRATION],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "none"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_record(run_dir: Path) -> dict:
    """The run's config.json (a run folder) or manifest.json (a published results folder); {} if neither."""
    for name in ("config.json", "manifest.json"):
        if (Path(run_dir) / name).is_file():
            return json.loads((Path(run_dir) / name).read_text())
    return {}


def run_commits(record: dict) -> list[str]:
    """The commits the run's invocations ran at (a manifest lists them as run_commits)."""
    if "run_commits" in record:
        return list(record["run_commits"])
    return sorted({str(i.get("git_commit", "unknown")) for i in record.get("invocations", [])})


def publish_run(run_dir: str | Path, results: Path, name: str, cls: type, points: Callable[[Any], list[Point]],
                replot: Callable[[Path], object], figures: Iterable[str] = ()) -> Path:
    """Copy a finished run into `results`, rebuild its summary there, and copy its figures into figures/.

    Steps: 1. refuse a dirty tree, then a run any of whose invocations came from one (before anything
    else is read)  2. the run's config (a `cls`) and its points; refuse if any is missing
    3. copy the points and config.json, write manifest.json  4. replot(results): the summary and figures
    from the copied files  5. copy `figures` into figures/.

    Args:
        run_dir: the run folder.  results: experiments/results/<name>/ (replaced).  name: the experiment.
        cls: its config dataclass.  points: points(cfg) -> every point of the run.
        replot: the experiment's replot(folder), which writes the summary and figures into that folder.
        figures: file names that replot writes and the README shows.
    """
    commit = check_clean_tree()
    run_dir = Path(run_dir)
    record = json.loads((run_dir / "config.json").read_text())
    commits = run_commits(record)
    if any(c.endswith("+dirty") or c == "unknown" for c in commits) or not commits:
        raise SystemExit(f"{run_dir} was (partly) computed from a dirty or unknown tree ({commits}): rerun it from "
                         "a clean commit")
    cfg = load_run_config(run_dir, cls)
    pts = points(cfg)
    missing = [p.key for p in pts if not (run_dir / "points" / f"{p.key}.json").is_file()]
    if missing:
        raise SystemExit(f"{run_dir} is unfinished: {len(missing)} point(s) missing, e.g. {missing[0]}")
    shutil.rmtree(results, ignore_errors=True)
    (results / "points").mkdir(parents=True)
    for p in pts:
        shutil.copyfile(run_dir / "points" / f"{p.key}.json", results / "points" / f"{p.key}.json")
    shutil.copyfile(run_dir / "config.json", results / "config.json")
    atomic_write_json(results / "manifest.json", {
        "experiment": name, "config": record["config"], "seeds": list(cfg.seeds), "run_commits": commits,
        "prereg_commit": record.get("prereg_commit"), "invocations": record.get("invocations", []),
        "published_at_commit": commit, "published_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    replot(results)
    FIGURES.mkdir(exist_ok=True)
    for f in figures:
        shutil.copyfile(results / f, FIGURES / f)
    return results
