"""Shared support of every experiment script: the command-line convention, the run-folder writer,
the progress bar and atomic writes.

Nothing here knows about Mamba. The experiment scripts use it as
    cfg = parse_config(MyConfig, argv, description, quick=QUICK)     # flags named after the fields
    with claim_run_folder(out_dir, "my run", dataclasses.asdict(cfg), settings, resume=...):
        ...                                                          # checked, locked, record written
        write_run_config(out_dir, dataclasses.asdict(cfg), kind="my run", wall_s=...)
    bar = ProgressBar(total, desc="train")

Reading order
    1. The command-line convention: flag() declares a config field with its --help text;
       config_parser()/parse_config() turn a frozen dataclass into flags --field_name (snake_case);
       add_flag() adds a flag that is not a config field, under the same rules.
    2. The run-folder writer: write_run_config (config.json: run kind, settings, resolved config,
       command, git commit, versions, hardware, one record per invocation), run_metadata, git_commit.
       2b. Run folders: claim_run_folder (check read-only, lock, write the record first),
       check_run_folder, RunLock, check_seeds, ensure_folder.
    3. ProgressBar, CsvLog, read_json / read_csv (every error names the file), atomic_write_* (a
       reader sees the old file or the whole new one).

The convention (tests/test_experiments.py walks every script's parser and checks it)
    - every flag is --snake_case, named after the config field it sets;
    - every flag has help text saying what it does, its unit and its default;
    - bools take true/false, and the bare flag means true (--resume == --resume true);
    - lists are comma-separated (--seeds 0,1,2);
    - --quick starts from the script's QUICK block (the CPU-sized run); flags given explicitly win;
    - the run folder is --out_dir.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import platform
import shlex
import subprocess
import sys
import time
import typing
from pathlib import Path
from typing import Any, Callable, Iterable

try:
    import fcntl  # run-folder locks (POSIX)
except ImportError:  # Windows
    fcntl = None

import numpy
import torch

from checkpoints import atomic_write

REPO = Path(__file__).resolve().parents[1]
GIT_TIMEOUT_S = 10  # a git call that takes longer is recorded as "unknown"
TRUE_WORDS, FALSE_WORDS = ("1", "true", "yes", "y"), ("0", "false", "no", "n")
LIST_SEPARATOR = ","  # --seeds 0,1,2


# ----------------------------------------------------------------------------------------------
# 1. The command-line convention
# ----------------------------------------------------------------------------------------------

def flag(default: Any, help: str) -> Any:
    """A config field that is also a flag: `seed: int = flag(0, "seed of the init and the batches")`.

    help says what the field does and its unit; the parser appends the default (and the --quick value).
    """
    if not help.strip():
        raise ValueError("every flag needs help text (what it does, its unit)")
    return dataclasses.field(default=default, metadata={"help": help})


def to_bool(text: str) -> bool:
    """'true'/'false' (also 1/0, yes/no, y/n) -> bool; anything else is an argparse error."""
    if str(text).lower() in TRUE_WORDS:
        return True
    if str(text).lower() in FALSE_WORDS:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def list_parser(item: type):
    """An argparse type: '0,1,2' -> (0, 1, 2) of `item`, with an error naming the bad item."""
    def parse(text: str) -> tuple:
        items = [t.strip() for t in str(text).split(LIST_SEPARATOR) if t.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {item.__name__}, got {text!r}")
        try:
            return tuple(item(t) for t in items)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {item.__name__}, "
                                             f"got {text!r}") from None
    parse.__name__ = f"list of {item.__name__}"
    return parse


def _shown(value: Any) -> str:
    """A default as a user would type it: (0, 1) -> '0,1', True -> 'true'."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return LIST_SEPARATOR.join(_shown(v) for v in value)
    return str(value) if value != "" else '""'


def add_flag(parser: argparse.ArgumentParser, name: str, typ: Any, default: Any, help: str,
             quick: Any = dataclasses.MISSING, given_only: bool = False, **kw) -> None:
    """Add --name under the convention. typ: int, float, str, bool or tuple[X, ...] (comma list).

    given_only: leave the flag out of the parsed namespace unless given (parse_config uses it to
    tell an explicit flag from a default); the help still shows the default.
    """
    if name != name.lower() or "-" in name or not name.isidentifier():
        raise ValueError(f"flag names are snake_case identifiers, got {name!r}")
    if not help.strip():
        raise ValueError(f"--{name} needs help text")
    text = f"{help} (default: {_shown(default)}"
    text += f"; --quick: {_shown(quick)})" if quick is not dataclasses.MISSING else ")"
    default_arg = argparse.SUPPRESS if given_only else default
    if typ is bool:
        parser.add_argument(f"--{name}", type=to_bool, nargs="?", const=True, default=default_arg,
                            metavar="true|false", help=text.replace("%", "%%"), **kw)
    elif typing.get_origin(typ) is tuple:
        parser.add_argument(f"--{name}", type=list_parser(typing.get_args(typ)[0]), default=default_arg,
                            metavar="A,B,...", help=text.replace("%", "%%"), **kw)
    elif typ in (int, float, str):
        parser.add_argument(f"--{name}", type=typ, default=default_arg, help=text.replace("%", "%%"), **kw)
    else:
        raise TypeError(f"--{name}: unsupported flag type {typ!r} (int, float, str, bool, tuple[X, ...])")


def config_parser(cls, description: str, quick: dict | None = None) -> argparse.ArgumentParser:
    """An argparse parser with one flag per field of the frozen dataclass `cls` (help from flag())."""
    parser = argparse.ArgumentParser(description=description)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if "help" not in f.metadata:
            raise TypeError(f"{cls.__name__}.{f.name} has no help text: declare it with flag(default, help)")
        add_flag(parser, f.name, hints[f.name], f.default, f.metadata["help"],
                 quick=(quick or {}).get(f.name, dataclasses.MISSING), given_only=True)
    return parser


def config_from_args(cls, args: argparse.Namespace, quick: dict | None = None):
    """The config of parsed flags: the defaults, then QUICK if --quick was given, then the flags given."""
    names = {f.name for f in dataclasses.fields(cls)}
    given = {k: v for k, v in vars(args).items() if k in names}
    values = dict(quick) if (quick and given.get("quick")) else {}
    values.update(given)
    return cls(**values)


def parse_config(cls, argv: list[str] | None, description: str, quick: dict | None = None):
    """config_parser + config_from_args in one call, for scripts whose only flags are the config's."""
    return config_from_args(cls, config_parser(cls, description, quick).parse_args(argv), quick)


def config_from_dict(cls, values: dict):
    """Rebuild a config from its json form (config.json): lists back to tuples, unknown keys refused."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"{cls.__name__} has no field(s) {unknown}: a config.json from another version?")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def resolve_device(name: str) -> torch.device:
    """--device auto -> cuda when available, else cpu; any other name as given."""
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)


# ----------------------------------------------------------------------------------------------
# 2. The run-folder writer
# ----------------------------------------------------------------------------------------------

def git_commit() -> str:
    """The repository's HEAD commit, with '+dirty' when tracked files have uncommitted changes."""
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=GIT_TIMEOUT_S)
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=GIT_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if head.returncode != 0:
        return "unknown"
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def command_line() -> str:
    """This process's command line as typed (python -m experiments.x --flag value)."""
    return shlex.join(getattr(sys, "orig_argv", sys.argv))


def run_metadata() -> dict[str, str]:
    """Versions and hardware, for the config.json every run folder carries."""
    return {"python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__,
            "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": str(os.cpu_count()), "torch_threads": str(torch.get_num_threads()),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
            "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def write_run_config(out_dir: str | os.PathLike, config: dict, *, kind: str | None = None,
                     settings: dict | None = None, wall_s: float | None = None, record: dict | None = None,
                     **extra: Any) -> dict:
    """config.json of a run folder (the one writer every script uses); returns what it wrote.

    {"run_kind": what made the folder (e.g. "experiments.train run"), "settings": what the run's
     results depend on (compared when it is continued), "config": the resolved config, **extra
     (derived facts: parameter counts, state size ...), "invocations": one record per call that passed
     wall_s: command, git commit, versions and hardware, wall time, and `record` (e.g. the points
     computed)}.
    Earlier invocations are kept, so a resumed or re-plotted run keeps its history; kind and settings
    are kept when not given. It refuses to replace a config.json that is not a run record (a saved
    model's) or that records another kind of run.
    """
    path = Path(out_dir) / RUN_RECORD
    old = read_json(path, "run record") if path.is_file() else {}
    if path.is_file() and not is_run_record(old):
        raise RunFolderError(f"{path} is not a run record (no 'config' and 'invocations'): {out_dir} holds a saved "
                             f"model or another program's files; write the run into another --out_dir")
    if old.get("run_kind") is not None and old["run_kind"] != kind:
        raise RunFolderError(f"{path} records a {old.get('run_kind')}, not a {kind or 'run of this script'}: "
                             f"write the run into another --out_dir")
    runs = old.get("invocations", [])
    if wall_s is not None:
        runs = runs + [{"command": command_line(), "git_commit": git_commit(), "wall_s": round(wall_s, 1),
                        **(record or {}), **run_metadata()}]
    head = {"run_kind": kind, "settings": settings if settings is not None else old.get("settings")}
    data = {**{k: v for k, v in head.items() if v is not None}, "config": config, **extra, "invocations": runs}
    atomic_write_json(path, data)
    return data


# ----------------------------------------------------------------------------------------------
# 2b. Run folders: one record written first, checked before anything is written, one lock
# ----------------------------------------------------------------------------------------------
#
# A run folder belongs to one kind of run (a train.py run, a sweep of one experiment), made with
# one set of settings. claim_run_folder is the one way in:
#   1. check (read only): the folder is new or empty, or it is a run folder of this kind whose
#      record holds the same settings and the caller is continuing it (--resume; sweeps always
#      continue). Anything else is refused here, so a refused command writes nothing.
#   2. lock: <folder>/.lock (fcntl.flock, the holder's pid inside); a second process is refused with
#      that pid. The OS drops the lock when the holder dies, so a killed run leaves no stale lock.
#   3. check again under the lock (another process may have written in between), then write the
#      record (config.json) before any other file.

RUN_RECORD = "config.json"
LOCK_FILE = ".lock"
MAX_SEED = 2**32 - 1  # seeds are 32-bit: numpy's seed range, well inside torch.manual_seed's


class RunFolderError(ValueError):
    """A run folder this command may not use (another kind of run, other settings, in use, not a
    folder); nothing was written."""


def is_run_record(record: Any) -> bool:
    """Whether a parsed config.json is a run record (rather than, e.g., a saved model's config)."""
    return isinstance(record, dict) and "config" in record and "invocations" in record


def check_seeds(seeds: Iterable[int], name: str = "--seeds") -> None:
    """Seeds are distinct integers in [0, 2**32 - 1] (checked before anything is created)."""
    seeds = list(seeds)
    bad = [s for s in seeds if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s <= MAX_SEED]
    if bad:
        raise ValueError(f"{name} must be integers from 0 to 2**32 - 1 = {MAX_SEED}, got {bad}")
    if len(set(seeds)) != len(seeds):  # a repeated seed would be one run counted twice in k of N
        raise ValueError(f"{name} must not repeat a seed, got {tuple(seeds)}")


def _not_a_folder(path: Path) -> Path | None:
    """The first of path and its parents that exists but is not a folder (None if there is none)."""
    for p in (path, *path.parents):
        if p.exists():
            return None if p.is_dir() else p
    return None


def ensure_folder(path: str | os.PathLike, what: str = "--out_dir") -> Path:
    """Create a folder (and its parents); an error names the path and what is in its way."""
    path = Path(path)
    blocker = _not_a_folder(path)
    if blocker is not None:
        raise RunFolderError(f"{what} {path}: {blocker} is a file, not a folder; choose another path")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunFolderError(f"{what} {path}: cannot create the folder: {e.strerror or e}") from None
    return path


def _leftover(name: str) -> bool:
    """Files that do not make a folder non-empty: its lock, and temporary files of killed atomic writes."""
    return name == LOCK_FILE or (name.startswith(".") and name.endswith(".tmp"))


def check_run_folder(out_dir: str | os.PathLike, kind: str, *, resume: bool) -> dict | None:
    """Whether a run of `kind` may use out_dir (read only: nothing is written).

    Returns None for a new run (no folder, or an empty one) and the folder's record when the run
    continues it (a run folder of the same kind, and resume). Raises RunFolderError otherwise: the
    path is below a file; the folder holds files but no run record (a saved model, a results
    folder, anything else); it holds another kind of run; it holds this kind and resume is not set.
    The caller compares the record's settings with its own.
    """
    out = Path(out_dir)
    blocker = _not_a_folder(out)
    if blocker is not None:
        raise RunFolderError(f"--out_dir {out}: {blocker} is a file, not a folder; choose another --out_dir")
    if not out.is_dir() or all(_leftover(p.name) for p in out.iterdir()):
        return None
    path = out / RUN_RECORD
    if not path.is_file():
        shown = sorted(p.name for p in out.iterdir() if not _leftover(p.name))
        raise RunFolderError(f"--out_dir {out} is not empty ({', '.join(shown[:5])}{' ...' if len(shown) > 5 else ''})"
                             f" and holds no run record ({RUN_RECORD}): it is not a run folder, and this run would "
                             f"mix its files with those; choose a new or empty --out_dir")
    record = read_json(path, "run record")
    if not is_run_record(record):
        raise RunFolderError(f"{path} is not a run record (no 'config' and 'invocations'): {out} holds a saved model "
                             f"or another program's files, which this run would overwrite; choose a new --out_dir")
    if "run_kind" not in record:
        raise RunFolderError(f"{path} was written before run folders recorded their kind and settings, so whether "
                             f"this run may continue it cannot be checked; continue it with the commit that made it "
                             f"(git_commit in its invocations) or choose a new --out_dir")
    if record["run_kind"] != kind:
        raise RunFolderError(f"{out} holds a {record['run_kind']} (see {path}), not a {kind}; choose another "
                             f"--out_dir")
    if not resume:
        raise RunFolderError(f"{out} already holds a {kind} (see {path}): pass --resume to continue it, or choose a "
                             f"new --out_dir (or delete this one) to start over")
    return record


def settings_differences(recorded: dict, now: dict, label: str = "recorded") -> list[str]:
    """'name: <recorded> (recorded) vs <now> (now)' for every setting that differs (as JSON: a tuple
    equals its list); a setting one side lacks shows as <absent>."""
    now = json.loads(json.dumps(now, default=str))
    absent = "<absent>"
    return [f"{k}: {recorded.get(k, absent)!r} ({label}) vs {now.get(k, absent)!r} (now)"
            for k in sorted(set(recorded) | set(now)) if recorded.get(k, absent) != now.get(k, absent)]


def refuse_other_settings(out_dir: str | os.PathLike, record: dict, settings: dict) -> None:
    """RunFolderError naming every setting that differs from the ones the run folder recorded."""
    changed = settings_differences(record.get("settings") or {}, settings)
    if changed:
        raise RunFolderError(f"{out_dir} was made with other settings (see {Path(out_dir) / RUN_RECORD}); continuing "
                             f"it would mix results of both:\n  " + "\n  ".join(changed) + "\nGive the recorded "
                             f"values, or choose a new --out_dir for the new ones.")


class RunLock:
    """An exclusive lock on a run folder: fcntl.flock on <folder>/.lock, which holds the holder's pid.

    Released by release() (or `with`), and by the OS when the holding process ends, however it ends.
    Deviation: where fcntl does not exist (Windows) there is no lock.
    """

    def __init__(self, folder: str | os.PathLike):
        self.path = Path(folder) / LOCK_FILE
        self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        if fcntl is None:
            return
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(self._fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(self._fd)
            self._fd = None
            raise RunFolderError(f"{folder} is in use by process {holder} (it holds {self.path}): two runs in one "
                                 f"folder would overwrite each other's files; wait for it to finish, stop it, or "
                                 f"choose another --out_dir") from None
        os.ftruncate(self._fd, 0)
        os.write(self._fd, f"{os.getpid()}\n".encode())

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def claim_run_folder(out_dir: str | os.PathLike, kind: str, config: dict, settings: dict, *, resume: bool,
                     check: Callable[[dict], None] | None = None, **extra: Any) -> RunLock:
    """The one way into a run folder (steps 1-3 above); returns the held lock (release it when done).

    settings: what the run's results depend on, recorded and compared when the folder is continued;
    check(record): the caller's own comparison of a continued folder's record (default: every
    setting must be equal, refuse_other_settings). config and extra go into the record as well.
    """
    out = Path(out_dir)
    check = check or (lambda record: refuse_other_settings(out, record, settings))
    record = check_run_folder(out, kind, resume=resume)  # 1.
    if record is not None:
        check(record)
    lock = RunLock(ensure_folder(out))  # 2.
    try:
        now = check_run_folder(out, kind, resume=resume)  # 3. (check again only what changed meanwhile)
        if now is not None and now != record:
            check(now)
        write_run_config(out, config, kind=kind, settings=settings, **extra)
    except BaseException:
        lock.release()
        raise
    return lock


# ----------------------------------------------------------------------------------------------
# 3. Progress bar, CSV log, atomic writes
# ----------------------------------------------------------------------------------------------

PROGRESS_MIN_INTERVAL_S = 0.25  # redraw the bar at most this often on a terminal
PROGRESS_LOG_EVERY_FRACTION = 0.1  # without a terminal, print a line every 10% of the work
PROGRESS_BAR_WIDTH = 24  # characters in the bar itself


class ProgressBar:
    """A dependency-free progress bar on stderr: `[#####-----] 50/100 loss=1.234 tok/s=5.1e3 eta 12s`.

    On a terminal it redraws one line; in a log file it prints a line every 10% so logs stay short.

        bar = ProgressBar(total=100, desc="train")
        for step in range(100):
            bar.update(1, loss=0.5)
        bar.close()
    """

    def __init__(self, total: int, desc: str = "", initial: int = 0, stream=None, enabled: bool = True):
        if total < 0:
            raise ValueError(f"total must be >= 0, got {total}")
        self.total, self.desc, self.n = total, desc, initial
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.t0 = time.perf_counter()
        self.n0 = initial
        self._last_draw = 0.0
        self._last_logged_fraction = -1.0
        self.fields: dict[str, Any] = {}

    def _line(self) -> str:
        frac = self.n / self.total if self.total else 1.0
        filled = int(round(PROGRESS_BAR_WIDTH * frac))
        elapsed = time.perf_counter() - self.t0
        rate = (self.n - self.n0) / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.n) / rate if rate > 0 else float("nan")
        fields = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in self.fields.items())
        return (f"{self.desc} [{'#' * filled}{'-' * (PROGRESS_BAR_WIDTH - filled)}] {self.n}/{self.total} "
                f"{fields} elapsed {elapsed:.0f}s eta {eta:.0f}s")

    def update(self, n: int = 1, **fields: Any) -> None:
        """Advance by n and show the given fields (e.g. loss=..., tok_s=...)."""
        self.n += n
        self.fields.update(fields)
        if not self.enabled:
            return
        now = time.perf_counter()
        if self.tty:
            if now - self._last_draw >= PROGRESS_MIN_INTERVAL_S or self.n >= self.total:
                self.stream.write("\r" + self._line())
                self.stream.flush()
                self._last_draw = now
        else:
            frac = self.n / self.total if self.total else 1.0
            if frac - self._last_logged_fraction >= PROGRESS_LOG_EVERY_FRACTION or self.n >= self.total:
                self.stream.write(self._line() + "\n")
                self.stream.flush()
                self._last_logged_fraction = frac

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()


# ----------------------------------------------------------------------------------------------
# Reading result files: every error names the file
# ----------------------------------------------------------------------------------------------

class BadFileError(ValueError):
    """A result or record file that cannot be used (unreadable, truncated, not the expected shape);
    the message names the file."""


def read_json(path: str | os.PathLike, what: str = "file", keys: Iterable[str] = (), hint: str = "") -> Any:
    """The JSON value in `path`, for every reader of the run folders' JSON files (records, points,
    results). keys: top-level keys it must hold (it must then be an object). A missing file is a
    FileNotFoundError, anything else a BadFileError; both name the file, `what` it is and the `hint`."""
    path, hint = Path(path), f"; {hint}" if hint else ""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such {what}{hint}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise BadFileError(f"cannot read the {what} {path}: {e}{hint}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise BadFileError(f"{path} is not valid JSON ({e.msg}, line {e.lineno} column {e.colno}): a truncated or "
                           f"damaged {what}?{hint}") from None
    keys = list(keys)
    missing = [k for k in keys if k not in data] if isinstance(data, dict) else keys
    if missing:
        found = f"its keys are {sorted(data)}" if isinstance(data, dict) else f"it holds a JSON {type(data).__name__}"
        raise BadFileError(f"{path}: a {what} is a JSON object with the keys {keys}, but {found}{hint}")
    return data


def read_csv(path: str | os.PathLike, parse: dict[str, Callable[[str], Any]] | None = None,
             what: str = "CSV file") -> list[dict[str, Any]]:
    """The rows of a CSV file with a header line, as dicts, with the columns in `parse` converted
    (an empty or missing cell becomes None). Every error names the file (and the line)."""
    path, parse = Path(path), parse or {}
    rows = []
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            absent = [c for c in parse if c not in (reader.fieldnames or [])]
            if absent:
                raise BadFileError(f"{path}: a {what} with the columns {list(parse)}, but its header "
                                   f"{reader.fieldnames} lacks {absent}")
            for row in reader:
                for col, convert in parse.items():
                    cell = row.get(col)
                    try:
                        row[col] = convert(cell) if cell not in (None, "") else None
                    except ValueError:
                        raise BadFileError(f"{path}, line {reader.line_num}: column {col!r} holds {cell!r}, not "
                                           f"a {getattr(convert, '__name__', 'value')}: a truncated or damaged "
                                           f"{what}?") from None
                rows.append(row)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such {what}") from None
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise BadFileError(f"cannot read the {what} {path}: {e}") from None
    return rows


# ----------------------------------------------------------------------------------------------
# Atomic writes: write to a temporary name in the same folder, fsync, then os.replace
# ----------------------------------------------------------------------------------------------

def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` so that a reader sees either the old file or the whole new one
    (checkpoints.atomic_write: a temporary file, then a rename; the folder is created if needed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a directory entry (so a rename inside it survives a crash); a no-op where unsupported."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class CsvLog:
    """Append rows to a CSV file, flushing each row (a killed run keeps every row written so far).

    `keep_until` drops rows whose `step` is greater than it (used on resume so that the file holds
    exactly one row per step).
    """

    def __init__(self, path: str | os.PathLike, fields: Iterable[str], keep_until: int | None = None):
        self.path, self.fields = Path(path), list(fields)
        rows = []
        if self.path.exists() and keep_until is not None:
            rows = [r for r in read_csv(self.path, {"step": int}, "metrics log")
                    if r["step"] is not None and r["step"] <= keep_until]
        buf = [",".join(self.fields)] + [",".join("" if r.get(k) is None else str(r[k]) for k in self.fields)
                                         for r in rows]
        atomic_write_text(self.path, "\n".join(buf) + "\n")
        self._f = open(self.path, "a", newline="")
        self._w = csv.DictWriter(self._f, fieldnames=self.fields)

    def write(self, row: dict[str, Any]) -> None:
        self._w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
        self._f.flush()

    def close(self) -> None:
        self._f.close()
