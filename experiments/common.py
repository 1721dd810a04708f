"""Small shared helpers for the experiment scripts: a progress bar, atomic writes, run metadata.

Nothing here knows about Mamba. Other experiment scripts may import these:
    from experiments.common import ProgressBar, atomic_write_text, CsvLog, run_metadata

Reading order: ProgressBar -> atomic_write_* -> CsvLog -> run_metadata.
"""
from __future__ import annotations

import csv
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Iterable

from checkpoints import atomic_write

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
            with open(self.path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= keep_until]
        if keep_until is None or not self.path.exists():
            rows = []
        buf = [",".join(self.fields)] + [",".join(str(r.get(k, "")) for k in self.fields) for r in rows]
        atomic_write_text(self.path, "\n".join(buf) + "\n")
        self._f = open(self.path, "a", newline="")
        self._w = csv.DictWriter(self._f, fieldnames=self.fields)

    def write(self, row: dict[str, Any]) -> None:
        self._w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def run_metadata() -> dict[str, str]:
    """Versions and hardware, for the config.json every run folder carries."""
    import numpy
    import torch
    meta = {"python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__,
            "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": str(os.cpu_count()), "torch_threads": str(torch.get_num_threads()),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
            "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    return meta
