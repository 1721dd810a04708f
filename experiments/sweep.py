"""Sweeps, seeds and statistics: the machinery every paper-question script shares.

Used by experiments/state_collapse.py, state_capacity.py, passkey.py and forgetting_curves.py.

Papers
    Stuffed Mamba (arXiv 2410.07145), section "State capacity": the two scaling laws fitted here,
        T_forget = a * N_S + b                  (linear; paper: a = 5.172, b = -4.469, K tokens vs M elements)
        T_recall = a * (b^N_S - 1) + c          (exponential; paper: a = 4.756, b = 1.365, c = -0.742)

Reading order
    1. Points and seeds   Point (one (grid point, seed) pair), PointStore (one JSON per point, written
                          atomically; a rerun reuses it), run_points (the missing points, in --workers
                          processes that end with the sweep: a killed sweep loses only the points in
                          flight), run_sweep (a sweep's run: claim the folder - refused before anything
                          is written under other settings - the points, the invocation's record),
                          stored_results
    2. Statistics         mean_ci (mean and 95% t interval over seeds), proportion (k/N with a
                          Wilson 95% interval), linear_fit (least squares with the slope's 95% t
                          interval), exp_fit, r_squared
    3. Training a point   point_train_config, train_point_model (experiments/train.py, resumable;
                          a model made with other settings is refused, never reused)
    4. Run folders        recipe (what a point depends on), read_run_record, load_run_config, parse_states

Statistics (formulas, with the hand-computed values tests/test_sweeps.py checks)
    mean_ci:    m = mean(x), s = sd(x) (n - 1), half = t_{0.975, n-1} s / sqrt(n)
                e.g. x = 1, 2, 3: m = 2, s = 1, t = 4.3027, interval 2 -+ 2.4841
    proportion: Wilson score interval, z = 1.95996:
                center = (k + z^2/2) / (n + z^2), half = z / (n + z^2) sqrt(k (n - k) / n + z^2 / 4)
                e.g. 8/10: [0.4902, 0.9433]
    linear_fit: slope a = Sxy / Sxx, se(a) = sqrt(SSE / (n - 2) / Sxx), interval a -+ t_{0.975, n-2} se(a)

Glossary
    N_S   state size in elements ([SC] section 1.2, mitigations.state_size)
    T     a training length in tokens; k/N  k of N seeds (or models) with a verdict
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import math
import multiprocessing
import os
import re
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch

import forgetting_curve as fc
from experiments.common import (BadFileError, ProgressBar, atomic_write_json, check_seeds, claim_run_folder,
                                config_from_dict, ensure_folder, flag, read_csv, read_json, refuse_other_settings,
                                write_run_config)
from experiments.train import TrainConfig, latest_checkpoint, train

POINTS_DIR = "points"  # run_dir/points/<key>.json: one finished (point, seed) each
KEY_SAFE = re.compile(r"[^A-Za-z0-9_.=-]")  # characters allowed in a point's file name
CI_LEVEL = 0.95  # every interval reported by the sweeps
T_QUANTILE_ITERATIONS = 200  # bisection steps of t_quantile (the bracket shrinks 2^200-fold)
EXP_FIT_GRID = 400  # log-spaced candidate growth rates tried by exp_fit before refining
EXP_FIT_REFINE = 60  # golden-section iterations of exp_fit around the best grid point
EXP_FIT_K_RANGE = (1e-4, 30.0)  # range of k = ln(b) * max|x| searched by exp_fit (b^max|x| up to e^30)
MACHINE_FIELDS = ("out_dir", "workers", "device", "quick", "seeds", "replot")  # never part of a point's params
WARMUP_FRACTION, MAX_WARMUP = 10, 100  # a point's warmup: min(MAX_WARMUP, steps / WARMUP_FRACTION) steps
MAX_CHUNK = 64  # a point's SSD chunk: min(MAX_CHUNK, T_train)
POINT_CHECKPOINTS = 4  # checkpoints per point's training (a killed point resumes from the last)
POINT_LOG_ROWS = 50  # metrics.csv rows per point's training

# [SC] section "State capacity" (T in K tokens, N_S in M elements)
PAPER_FORGET_SLOPE = 5.172  # T_forget = 5.172 N_S - 4.469
PAPER_FORGET_INTERCEPT = -4.469
PAPER_RECALL = (4.756, 1.365, -0.742)  # T_recall = a (b^N_S - 1) + c


# ----------------------------------------------------------------------------------------------
# 1. Points, seeds, workers
# ----------------------------------------------------------------------------------------------

def point_key(**params: Any) -> str:
    """A file-name-safe key from point parameters, in sorted order: point_key(d_state=64, T=16) ->
    'T=16_d_state=64'."""
    if not params:
        raise ValueError("a point needs at least one parameter")
    return KEY_SAFE.sub("-", "_".join(f"{k}={params[k]}" for k in sorted(params)))


@dataclass(frozen=True)
class Point:
    """One unit of work of a sweep: a grid point with one seed."""

    key: str  # its file name (point_key of coords and seed)
    coords: dict  # the grid coordinates and the seed, e.g. {"d_state": 64, "t_train": 16, "seed": 0}
    params: dict  # everything its result depends on (coords + the recipe); checked when reused


def grid_points(grid: Iterable[dict], seeds: Iterable[int], recipe_params: dict) -> list[Point]:
    """One Point per (grid coordinates, seed), seeds innermost."""
    return [Point(point_key(**c, seed=s), {**c, "seed": s}, {**recipe_params, **c, "seed": s})
            for c in grid for s in seeds]


class PointStore:
    """Finished points of one run folder, one JSON file each: {"params", "result", "seconds", "threads"}.

        store = PointStore("runs/capacity_quick")
        store.get(point)  # the stored result, or None; a stored point with other params is an error

    A point is written atomically (a temporary file, then a rename) when it finishes, so a sweep
    killed mid-point loses only that point (and its model resumes from its checkpoint).
    """

    def __init__(self, run_dir: str | Path):
        self.dir = Path(run_dir) / POINTS_DIR  # created by the first put (reading writes nothing)

    def path(self, key: str) -> Path:
        return self.dir / f"{key}.json"

    def read(self, path: Path) -> dict:
        """A stored point file, checked for its shape; an error names the file."""
        stored = read_json(path, "point file", keys=("params", "result"),
                           hint="delete it to compute the point again")
        if not isinstance(stored["params"], dict) or not isinstance(stored["result"], dict):
            raise BadFileError(f"{path}: a point file holds a JSON object under 'params' and under 'result', got "
                               f"{type(stored['params']).__name__} and {type(stored['result']).__name__}; delete "
                               f"it to compute the point again")
        return stored

    def get(self, point: Point) -> dict | None:
        p = self.path(point.key)
        if not p.is_file():
            return None
        stored = self.read(p)
        if stored["params"] != json.loads(json.dumps(point.params)):
            changed = sorted(k for k in set(stored["params"]) | set(point.params)
                             if stored["params"].get(k) != json.loads(json.dumps(point.params.get(k))))
            raise ValueError(f"{p} holds a point with other settings ({', '.join(changed)}): the sweep settings "
                             f"changed; use a new --out_dir (or the old settings)")
        return stored["result"]

    def put(self, point: Point, result: dict, seconds: float) -> None:
        atomic_write_json(self.path(point.key), {"params": point.params, "result": result,
                                                 "seconds": round(seconds, 2), "threads": torch.get_num_threads()})

    def all(self) -> dict[str, dict]:
        """key -> stored record, for every finished point on disk."""
        return {p.stem: self.read(p) for p in sorted(self.dir.glob("*.json"))}


def workers_flag() -> int:
    """The --workers field of every sweep config (default: this machine's cores)."""
    return flag(os.cpu_count() or 1, "worker processes for the (point, seed) pairs, each with cores / workers torch "
                                     "threads; the default is this machine's cores")


def check_seeds_and_workers(cfg) -> None:
    """The __post_init__ check every sweep config shares."""
    if not cfg.seeds or cfg.workers < 1:
        raise ValueError(f"need at least one seed and --workers >= 1, got --seeds {cfg.seeds}, --workers {cfg.workers}")
    check_seeds(cfg.seeds)


def threads_per_worker(workers: int) -> int:
    """Torch threads for each of `workers` processes: the cores shared out, at least 1."""
    return max(1, (os.cpu_count() or 1) // workers)


PARENT_POLL_S = 0.5  # how often a worker checks that the sweep that started it is still alive


def _watch_parent(parent_pid: int) -> None:
    """Worker side: end this process as soon as its parent (the sweep) is gone. When a process
    dies its children are handed to another parent, so os.getppid() changes; a daemon thread polls
    it (portable to every POSIX system, and it needs no pipe: a SIGKILLed sweep runs no clean-up).
    Without it, a killed sweep left its workers waiting for work forever."""
    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(PARENT_POLL_S)
        os._exit(1)  # no clean-up to run: the point in flight is lost, its model resumes from a checkpoint

    if os.getppid() != parent_pid:  # already gone before this worker started
        os._exit(1)
    threading.Thread(target=watch, name="watch-parent", daemon=True).start()


def _start_worker(threads: int, parent_pid: int) -> None:
    """Initializer of each worker process: its torch threads, and the watch on its parent."""
    torch.set_num_threads(threads)
    _watch_parent(parent_pid)


def _compute_and_store(compute: Callable, cfg, point: Point, run_dir: str) -> dict:
    """Worker body: compute one point and store it (so a killed parent keeps what finished)."""
    t0 = time.perf_counter()
    result = compute(cfg, point)
    PointStore(run_dir).put(point, result, time.perf_counter() - t0)
    return result


def run_points(run_dir: str | Path, points: list[Point], compute: Callable, cfg, workers: int,
               desc: str = "points") -> tuple[dict[str, dict], list[str]]:
    """Results of every point: stored ones are read, the rest computed; returns (key -> result,
    keys computed now).

    compute(cfg, point) -> a JSON-ready dict; it must be a module-level function (worker processes
    import it by name). workers > 1: the missing points run in that many spawned processes, each with
    threads_per_worker(workers) torch threads, each ending when this process dies (_watch_parent);
    workers = 1 runs them here, in order.
    """
    store = PointStore(run_dir)
    results = stored_points(run_dir, points)
    todo = [p for p in points if p.key not in results]
    n_proc = min(workers, len(todo))
    torch.set_num_threads(threads_per_worker(max(1, n_proc)))
    bar = ProgressBar(len(points), desc=desc, initial=len(results))
    if n_proc <= 1:
        for p in todo:
            print(f"[{desc}] {p.key}", file=sys.stderr)
            results[p.key] = _compute_and_store(compute, cfg, p, str(run_dir))
            bar.update(1, done=p.key)
    else:
        ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked OpenMP/torch state
        with concurrent.futures.ProcessPoolExecutor(n_proc, mp_context=ctx, initializer=_start_worker,
                                                    initargs=(threads_per_worker(n_proc), os.getpid())) as pool:
            futures = {pool.submit(_compute_and_store, compute, cfg, p, str(run_dir)): p for p in todo}
            try:
                for f in concurrent.futures.as_completed(futures):
                    results[futures[f].key] = f.result()
                    bar.update(1, done=futures[f].key)
            except BaseException:
                pool.shutdown(wait=False, cancel_futures=True)
                raise
    bar.close()
    return {p.key: results[p.key] for p in points}, [p.key for p in todo]


def stored_points(run_dir: str | Path, points: list[Point]) -> dict[str, dict]:
    """key -> result of the points already stored in run_dir (read only; one stored with other params
    is an error, PointStore.get)."""
    store = PointStore(run_dir)
    return {p.key: r for p in points if (r := store.get(p)) is not None}


def sweep_settings(points: list[Point]) -> dict:
    """What every point of a sweep depends on besides its own coordinates (the recipe grid_points put
    into each point's params): what a sweep folder records and compares when it is continued. The
    grid axes and the seeds are not in it, so a sweep can be widened in the same folder."""
    if not points:
        raise ValueError("a sweep needs at least one point")
    return {k: v for k, v in points[0].params.items() if k not in points[0].coords}


def run_sweep(cfg, points: list[Point], compute: Callable, desc: str, **facts: Any) -> dict[str, dict]:
    """What every sweep's run() does: claim cfg.out_dir as a '<desc> sweep' folder, run_points with
    cfg.workers, then the invocation's record (wall time, points computed). Returns key -> result.

    The claim (common.claim_run_folder) refuses, before anything is written, a folder that holds
    another kind of run, a sweep made with other settings (sweep_settings) or points stored with
    other ones; it holds the folder's lock while the sweep runs (a second sweep there is refused).
    """
    t0 = time.perf_counter()
    out, kind, settings = Path(cfg.out_dir), f"{desc} sweep", sweep_settings(points)

    def check(record: dict) -> None:
        refuse_other_settings(out, record, settings)
        stored_points(out, points)

    with claim_run_folder(out, kind, dataclasses.asdict(cfg), settings, resume=True, check=check, **facts):
        results, computed = run_points(out, points, compute, cfg, cfg.workers, desc)
        write_run_config(out, dataclasses.asdict(cfg), kind=kind, wall_s=time.perf_counter() - t0,
                         record={"points_computed": computed}, **facts)
    return results


def finished_run(run_dir: str | Path, out: str | Path | None, cls,
                 points: Callable) -> tuple[Any, dict[str, dict], Path]:
    """What every --replot starts from: (the run's config as a `cls`, every point's stored result,
    the output folder: out, created, or run_dir). points(cfg) lists the run's points."""
    cfg = load_run_config(run_dir, cls)
    results = stored_results(run_dir, points(cfg))
    return cfg, results, ensure_folder(out or run_dir, "the output folder")


def stored_results(run_dir: str | Path, points: list[Point]) -> dict[str, dict]:
    """Every point's stored result (for --replot); a missing point is an error naming it."""
    store = PointStore(run_dir)
    results = {p.key: store.get(p) for p in points}
    missing = [k for k, r in results.items() if r is None]
    if missing:
        raise FileNotFoundError(f"{run_dir}: points {missing} are missing; run the experiment (without --replot) "
                                f"to compute them")
    return results


# ----------------------------------------------------------------------------------------------
# 2. Statistics over seeds
# ----------------------------------------------------------------------------------------------

def t_quantile(p: float, df: int) -> float:
    """The p-quantile of Student's t with df degrees of freedom (p > 0.5), by bisection on
    P(T > t) = I_{df / (df + t^2)}(df / 2, 1 / 2) / 2 (forgetting_curve's incomplete beta)."""
    if not 0.5 < p < 1 or df < 1:
        raise ValueError(f"t_quantile needs 0.5 < p < 1 and df >= 1, got p={p}, df={df}")
    lo, hi = 0.0, 1.0
    while 0.5 * fc.regularized_incomplete_beta(df / 2, 0.5, df / (df + hi * hi)) > 1 - p:
        hi *= 2
    for _ in range(T_QUANTILE_ITERATIONS):
        mid = (lo + hi) / 2
        if 0.5 * fc.regularized_incomplete_beta(df / 2, 0.5, df / (df + mid * mid)) > 1 - p:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def mean_ci(values: Iterable[float], level: float = CI_LEVEL) -> dict:
    """Mean over seeds with its t interval: {"mean", "low", "high", "sd", "n"} (low/high None for n < 2)."""
    x = np.asarray([float(v) for v in values], float)
    if x.size == 0:
        return {"mean": None, "low": None, "high": None, "sd": None, "n": 0}
    m = float(x.mean())
    if x.size < 2:
        return {"mean": m, "low": None, "high": None, "sd": None, "n": 1}
    sd = float(x.std(ddof=1))
    half = t_quantile(0.5 + level / 2, x.size - 1) * sd / math.sqrt(x.size)
    return {"mean": m, "low": m - half, "high": m + half, "sd": sd, "n": int(x.size)}


def proportion(k: int, n: int, level: float = CI_LEVEL) -> dict:
    """k of n with the Wilson score interval: {"k", "n", "share", "low", "high"} (None when n = 0)."""
    if not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return {"k": 0, "n": 0, "share": None, "low": None, "high": None}
    z = statistics.NormalDist().inv_cdf(0.5 + level / 2)
    center = (k + z * z / 2) / (n + z * z)
    half = z / (n + z * z) * math.sqrt(k * (n - k) / n + z * z / 4)
    return {"k": k, "n": n, "share": k / n, "low": max(0.0, center - half), "high": min(1.0, center + half)}


def fmt_ci(s: dict, digits: int = 3) -> str:
    """'2.00 [-0.48, 4.48] (n=3)' from mean_ci, or '8/10 [0.49, 0.94]' from proportion."""
    if "k" in s:
        return f"{s['k']}/{s['n']}" + (f" [{s['low']:.2f}, {s['high']:.2f}]" if s["n"] else "")
    if s["mean"] is None:
        return "-"
    text = f"{s['mean']:.{digits}g}"
    interval = f" [{s['low']:.{digits}g}, {s['high']:.{digits}g}]" if s["low"] is not None else ""
    return f"{text}{interval} (n={s['n']})"


def r_squared(y: np.ndarray, y_hat: np.ndarray) -> float:
    """R^2 = 1 - SS_res / SS_tot (nan when all y are equal)."""
    y, y_hat = np.asarray(y, float), np.asarray(y_hat, float)
    ss_tot = float(((y - y.mean()) ** 2).sum())
    ss_res = float(((y - y_hat) ** 2).sum())
    return 1.0 - ss_res / ss_tot if ss_tot > 0 else float("nan")


@dataclass(frozen=True)
class LinearFit:
    slope: float  # a in y = a x + b
    intercept: float  # b
    r2: float
    n: int  # points fitted
    slope_low: float | None  # the slope's t interval at CI_LEVEL (None for n < 3: no residual dof)
    slope_high: float | None

    def __call__(self, x):
        return self.slope * np.asarray(x, float) + self.intercept


def linear_fit(x: Iterable[float], y: Iterable[float], level: float = CI_LEVEL) -> LinearFit:
    """Least-squares line y = a x + b with the slope's t interval. Needs >= 2 distinct x (with
    exactly 2 points R^2 = 1 and there is no interval)."""
    x, y = np.asarray(list(x), float), np.asarray(list(y), float)
    if x.shape != y.shape or x.size < 2 or np.unique(x).size < 2:
        raise ValueError(f"linear_fit needs >= 2 points with distinct x, got x={x.tolist()}, y={y.tolist()}")
    sxx = float(((x - x.mean()) ** 2).sum())
    a = float(((x - x.mean()) * (y - y.mean())).sum()) / sxx
    b = float(y.mean() - a * x.mean())
    low = high = None
    if x.size > 2:
        sse = float(((y - a * x - b) ** 2).sum())
        half = t_quantile(0.5 + level / 2, x.size - 2) * math.sqrt(sse / (x.size - 2) / sxx)
        low, high = a - half, a + half
    return LinearFit(a, b, r_squared(y, a * x + b), int(x.size), low, high)


@dataclass(frozen=True)
class ExpFit:
    a: float  # y = a (b^x - 1) + c
    b: float
    c: float
    r2: float
    n: int

    def __call__(self, x):
        return self.a * (np.power(self.b, np.asarray(x, float)) - 1.0) + self.c


def exp_fit(x: Iterable[float], y: Iterable[float]) -> ExpFit:
    """Least-squares fit of [SC]'s passkey law y = a (b^x - 1) + c with b > 1.

    For a fixed growth rate b the model is linear in (a, c), so:
      1. scale x by s = max|x| and search k = ln(b) * s on a log grid (EXP_FIT_K_RANGE), solving
         (a, c) by linear least squares at each k and keeping the smallest residual;
      2. refine k by golden-section search between the best grid point's neighbours.
    Needs >= 4 points with >= 3 distinct x (3 parameters; with 3 points the fit is exact, R^2 = 1).
    """
    x, y = np.asarray(list(x), float), np.asarray(list(y), float)
    if x.shape != y.shape or x.size < 3 or np.unique(x).size < 3:
        raise ValueError(f"exp_fit needs >= 3 points with >= 3 distinct x, got x={x.tolist()}")
    s = float(np.abs(x).max())
    u = x / s

    def solve(k: float) -> tuple[float, float, float]:
        f = np.expm1(k * u)  # b^x - 1 with b = exp(k / s)
        M = np.stack([f, np.ones_like(f)], 1)
        coef, *_ = np.linalg.lstsq(M, y, rcond=None)
        return float(((M @ coef - y) ** 2).sum()), float(coef[0]), float(coef[1])

    ks = np.geomspace(*EXP_FIT_K_RANGE, EXP_FIT_GRID)
    sse = np.array([solve(k)[0] for k in ks])
    i = int(np.argmin(sse))
    lo, hi = ks[max(i - 1, 0)], ks[min(i + 1, ks.size - 1)]
    g = (math.sqrt(5) - 1) / 2
    for _ in range(EXP_FIT_REFINE):  # golden section on [lo, hi]
        m1, m2 = hi - g * (hi - lo), lo + g * (hi - lo)
        if solve(m1)[0] < solve(m2)[0]:
            hi = m2
        else:
            lo = m1
    k = (lo + hi) / 2
    _, a, c = solve(k)
    b = math.exp(k / s)
    fit = ExpFit(a, b, c, 0.0, int(x.size))
    return ExpFit(a, b, c, r_squared(y, fit(x)), int(x.size))


# ----------------------------------------------------------------------------------------------
# 3. Training a point with experiments/train.py (checkpoints and exact resume inside a point)
# ----------------------------------------------------------------------------------------------

def point_train_config(out_dir: str | Path, *, t_train: int, tokens_per_step: int, steps: int, seed: int,
                       device: str, **fields: Any) -> TrainConfig:
    """The train.py config of one sweep point: batch rows = tokens_per_step / T_train, so every T_train
    sees the same number of tokens; warmup min(100, steps / 10); chunk min(64, T_train); a few
    checkpoints (a killed point resumes); `fields` are the model and recipe (d_model, lr, task ...)."""
    if tokens_per_step % t_train:
        raise ValueError(f"tokens_per_step={tokens_per_step} must be a multiple of T_train={t_train}")
    if fields.get("arch", "mamba2") == "mamba2":
        fields.setdefault("chunk_size", min(MAX_CHUNK, t_train))
    return TrainConfig(seq_len=t_train, batch_size=tokens_per_step // t_train, steps=steps, seed=seed,
                       warmup_steps=min(MAX_WARMUP, max(1, steps // WARMUP_FRACTION)), out_dir=str(out_dir),
                       log_every=max(1, steps // POINT_LOG_ROWS), eval_every=0,
                       ckpt_every=max(1, steps // POINT_CHECKPOINTS), resume=True, device=device,
                       progress=False, **fields)


def train_point_model(tcfg: TrainConfig, batch_fn=None) -> Path:
    """Train a point's model, resume a killed one from its last checkpoint, or reuse a finished one;
    returns the model folder of its last checkpoint. Always through train() (tcfg.resume is set), so
    a model folder made with other settings or data is refused, never reused."""
    train(tcfg, batch_fn)
    return latest_checkpoint(tcfg.out_dir) / "model"


def final_train_loss(out_dir: str | Path, last: int = 5) -> float:
    """Mean of the last `last` logged training losses in a train.py metrics.csv (nan if none)."""
    p = Path(out_dir) / "metrics.csv"
    if not p.is_file():
        return float("nan")
    vals = [r["loss"] for r in read_csv(p, {"loss": float}, "metrics log") if r["loss"] is not None]
    return float(np.mean(vals[-last:])) if vals else float("nan")


# ----------------------------------------------------------------------------------------------
# 4. Run folders
# ----------------------------------------------------------------------------------------------

def recipe(cfg, grid_fields: Iterable[str] = ()) -> dict:
    """What every point of a sweep depends on: the config without the machine fields (run folder,
    workers, device, seeds) and without the grid axes (each point carries its own coordinates), so a
    sweep can be widened in the same run folder."""
    skip = set(MACHINE_FIELDS) | set(grid_fields)
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in skip}


RUN_RECORDS = ("config.json", "manifest.json")  # a run folder's record; a committed results folder's


def run_record_path(run_dir: str | Path) -> Path:
    """The record file of a run folder (config.json) or of a committed results folder (manifest.json)."""
    for name in RUN_RECORDS:
        if (Path(run_dir) / name).is_file():
            return Path(run_dir) / name
    raise FileNotFoundError(f"{run_dir} holds neither {' nor '.join(RUN_RECORDS)}: --replot needs a finished run "
                            f"folder or a results folder")


def read_run_record(run_dir: str | Path) -> dict:
    """The record of a run folder or of a committed results folder: both hold the resolved config
    under "config"."""
    record = read_json(run_record_path(run_dir), "run record", keys=("config",))
    if not isinstance(record["config"], dict):
        raise BadFileError(f"{run_record_path(run_dir)}: 'config' holds a {type(record['config']).__name__}, not the "
                           f"resolved config (an object)")
    return record


def load_run_config(run_dir: str | Path, cls):
    """The resolved config a run folder (or a results folder) records, as a `cls` (for --replot)."""
    try:
        return config_from_dict(cls, read_run_record(run_dir)["config"])
    except (TypeError, ValueError) as e:
        if isinstance(e, BadFileError):
            raise
        raise BadFileError(f"{run_record_path(run_dir)}: its config is not a valid {cls.__name__}: {e}") from None


def parse_states(states: Iterable[str]) -> list[tuple[int, int]]:
    """('64x16', '256x32') -> [(d_state, headdim), ...]: the per-head state is headdim x d_state."""
    out = []
    for item in states:
        try:
            n, p = str(item).lower().split("x")
            out.append((int(n), int(p)))
        except ValueError:
            raise ValueError(f"--states items must look like DSTATExHEADDIM (e.g. 64x16), got {item!r}") from None
    return out
