"""Every README figure, re-plotted from the small result files committed in experiments/results/.

Commands (run from the repository root)
    # re-plot every figure (and its summary table) into figures/ from the committed results: seconds
    python -m experiments.figures
    # only some of them
    python -m experiments.figures --only state_collapse,passkey
    # commit a finished run's results: copy its per-(point, seed) JSONs and a manifest into
    # experiments/results/<experiment>/ (refused unless every point of its config is there)
    python -m experiments.figures --publish runs/state_collapse_quick --experiment state_collapse
    # recompute them all at the --quick level (hours on a CPU: every experiment's --quick run with
    # these seeds), publish each into experiments/results/ and re-plot
    python -m experiments.figures --recompute --seeds 0,1,2

What is committed (experiments/results/<experiment>/, small JSON only, no model weights)
    manifest.json     the run's resolved config (its "config"), the seeds, every invocation's
                      command, git commit, hardware, versions and wall time, the total wall time,
                      the point files, where and when it was published
    points/<key>.json one finished (point, seed): its params and result, exactly as the run wrote it
    (bench: results.json, bench.py's own output file, and manifest.json)
Only this command writes into figures/ (and only when asked: re-plot, or --recompute).

Reading order: EXPERIMENTS (what each experiment is made of) -> publish -> replot_all -> recompute -> main.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from experiments import (bench, fcurves_text, forgetting_curves, mqar_capacity, passkey, state_capacity, state_collapse,
                         t_forget)
from experiments.common import (REPO, BadFileError, add_flag, atomic_write_json, check_seeds, ensure_folder, git_commit,
                                read_json)
from experiments.sweep import PointStore, load_run_config, read_run_record

RESULTS_DIR = REPO / "experiments" / "results"
FIGURES_DIR = REPO / "figures"
RUNS_DIR = REPO / "runs" / "results"  # where --recompute runs the experiments (models and all; not committed)
MANIFEST = "manifest.json"
LARGE_RESULTS_BYTES = 5 * 2**20  # a results folder above this is said on stderr (committed files stay small)


@dataclass(frozen=True)
class Experiment:
    """What figures.py needs of one experiment."""

    name: str
    replot: Callable  # replot(results_dir, figures_dir): the figures and the summary from the committed files
    config_cls: type | None  # its config dataclass (None: bench, which has no points)
    points: Callable | None  # points(cfg) -> the (point, seed) list a finished run holds
    main: Callable  # its command line, for --recompute


def _replot_bench(results_dir: Path, figures_dir: Path) -> list[Path]:
    """bench.py's plot of a committed results.json (the CPU run: figures/bench_cpu.png)."""
    rows = read_json(results_dir / "results.json", "bench results file", keys=("rows",))["rows"]
    bench.plot(rows, figures_dir / "bench_cpu.png")
    return [figures_dir / "bench_cpu.png"]


EXPERIMENTS = {e.name: e for e in (
    Experiment("state_collapse", state_collapse.replot, state_collapse.DemoConfig, state_collapse.demo_points,
               state_collapse.main),
    Experiment("state_capacity", state_capacity.replot, state_capacity.CapacityConfig, state_capacity.capacity_points,
               state_capacity.main),
    Experiment("passkey", passkey.replot, passkey.PasskeyConfig, passkey.passkey_points, passkey.main),
    Experiment("forgetting_curves", forgetting_curves.replot, forgetting_curves.FCurvesConfig,
               forgetting_curves.fcurve_points, forgetting_curves.main),
    Experiment("t_forget", t_forget.replot, t_forget.TForgetConfig, t_forget.grid, t_forget.main),
    Experiment("mqar_capacity", mqar_capacity.replot, mqar_capacity.CapacityConfig, mqar_capacity.grid,
               mqar_capacity.main),
    Experiment("fcurves_text", fcurves_text.replot, fcurves_text.FCTextConfig, fcurves_text.report_points,
               fcurves_text.main),
    Experiment("bench", _replot_bench, None, None, bench.main),
)}


# ----------------------------------------------------------------------------------------------
# Publishing a finished run into experiments/results/<name>/
# ----------------------------------------------------------------------------------------------

def publish(run_dir: str | Path, name: str, results_root: str | Path = RESULTS_DIR) -> Path:
    """Copy a finished run's small files into results_root/name/ (replacing what was there) with a
    manifest; returns the folder. Refused unless the run holds every point its config asks for.

    Steps: 1. read and check everything (a refused publish writes nothing)
           2. write the copies and the manifest into a temporary folder beside the destination
              (removed if the writing fails)   3. swap it into place.
    """
    exp, run_dir = EXPERIMENTS[name], Path(run_dir)
    files: dict[str, Path] = {}  # name in the results folder -> the run's file
    if exp.config_cls is None:  # bench: its results.json carries its own record  # 1.
        record = read_json(run_dir / "results.json", "bench results file", keys=("meta", "rows"))["meta"]
        if not isinstance(record, dict):
            raise BadFileError(f"{run_dir / 'results.json'}: 'meta' holds a {type(record).__name__}, not bench.py's "
                               f"record (an object)")
        files["results.json"] = run_dir / "results.json"
        manifest = {"experiment": name, "config": record.get("config"), "invocations": [record],
                    "wall_s_total": record.get("wall_s")}
    else:
        record = read_run_record(run_dir)
        if "checkpoint" in record:
            raise ValueError(f"{run_dir} is a --checkpoint analysis, not a run of the {name} experiment")
        cfg = load_run_config(run_dir, exp.config_cls)
        store, keys = PointStore(run_dir), []
        for p in exp.points(cfg):
            if store.get(p) is None:
                raise FileNotFoundError(f"{run_dir}: point {p.key} is missing; finish the run before publishing it")
            files[f"points/{p.key}.json"] = store.path(p.key)
            keys.append(p.key)
        runs = record.get("invocations", [])
        manifest = {"experiment": name, "config": record["config"], "seeds": list(cfg.seeds),
                    "points": keys, "invocations": runs,
                    "wall_s_total": round(sum(i.get("wall_s", 0) for i in runs), 1)}
    manifest.update(published_from=str(run_dir), published_at_commit=git_commit(),
                    published_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    dest = ensure_folder(results_root, "--results_dir") / name
    tmp = Path(results_root) / f".{name}.tmp-{os.getpid()}"
    try:  # 2.
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "points").mkdir(parents=True)
        for target, source in files.items():
            shutil.copyfile(source, tmp / target)
        atomic_write_json(tmp / MANIFEST, manifest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    size = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file())
    if size > LARGE_RESULTS_BYTES:
        print(f"note: {name}'s results take {size / 2**20:.1f} MiB; they are meant to stay small", file=sys.stderr)
    shutil.rmtree(dest, ignore_errors=True)  # 3.
    os.replace(tmp, dest)
    return dest


# ----------------------------------------------------------------------------------------------
# Re-plotting and recomputing
# ----------------------------------------------------------------------------------------------

def replot_all(names: list[str], results_root: str | Path = RESULTS_DIR,
               figures_dir: str | Path = FIGURES_DIR) -> dict[str, str]:
    """Re-plot each named experiment from results_root/<name>/ into figures_dir; returns name -> what
    happened ("replotted" or why not)."""
    done = {}
    for name in names:
        src = Path(results_root) / name
        if not (src / MANIFEST).is_file():
            done[name] = f"skipped: no committed results in {src} (publish a finished run first)"
            continue
        ensure_folder(figures_dir, "--figures_dir")
        try:
            EXPERIMENTS[name].replot(src, Path(figures_dir))
        except (KeyError, TypeError, IndexError) as e:  # a file that parses but lacks what the plot reads
            raise BadFileError(f"{src}: the committed {name} results cannot be re-plotted ({type(e).__name__}: {e}): "
                               f"a damaged file, or one from another version? Publish the run again") from e
        done[name] = "replotted"
    return done


def recompute(names: list[str], seeds: tuple[int, ...], workers: int, runs_dir: str | Path = RUNS_DIR,
              results_root: str | Path = RESULTS_DIR) -> None:
    """Each named experiment's --quick run (finished points reused), then published."""
    for name in names:
        out = Path(runs_dir) / name
        args = ["--quick", "--out_dir", str(out)]
        if EXPERIMENTS[name].config_cls is not None:
            args += ["--seeds", ",".join(map(str, seeds)), "--workers", str(workers)]
        EXPERIMENTS[name].main(args)
        publish(out, name, results_root)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_flag(p, "only", tuple[str, ...], tuple(EXPERIMENTS), "experiments to re-plot (or recompute / publish)")
    add_flag(p, "results_dir", str, str(RESULTS_DIR.relative_to(REPO)),
             "the committed results, one folder per experiment")
    add_flag(p, "figures_dir", str, str(FIGURES_DIR.relative_to(REPO)), "where the figures and summaries are written")
    add_flag(p, "publish", str, "", "a finished run folder to publish into results_dir/<--experiment>/ "
             "(then re-plot it)")
    add_flag(p, "experiment", str, "", f"with --publish: which experiment the run is, one of "
             f"{', '.join(EXPERIMENTS)}")
    add_flag(p, "recompute", bool, False, "rerun every --only experiment at the --quick level, publish, re-plot")
    add_flag(p, "seeds", tuple[int, ...], (0, 1, 2), "with --recompute: the seeds of every experiment")
    add_flag(p, "workers", int, os.cpu_count() or 1, "with --recompute: worker processes per experiment; the default "
             "is this machine's cores")
    add_flag(p, "runs_dir", str, str(RUNS_DIR.relative_to(REPO)),
             "with --recompute: where the runs (models and all) go")
    return p


def main(argv: list[str] | None = None) -> dict[str, str]:
    args = build_parser().parse_args(argv)
    unknown = sorted(set(args.only) - set(EXPERIMENTS)) + ([args.experiment] if args.publish and
                                                             args.experiment not in EXPERIMENTS else [])
    if unknown:
        raise SystemExit(f"unknown experiment(s) {unknown}; choose from {list(EXPERIMENTS)}")
    names = list(args.only)
    if args.recompute:
        check_seeds(args.seeds)
    if args.publish:
        print(f"published {publish(args.publish, args.experiment, args.results_dir)}", file=sys.stderr)
        names = [args.experiment]
    elif args.recompute:
        recompute(names, args.seeds, args.workers, args.runs_dir, args.results_dir)
    done = replot_all(names, args.results_dir, args.figures_dir)
    for name, what in done.items():
        print(f"{name}: {what}", file=sys.stderr)
    return done


if __name__ == "__main__":
    main()
