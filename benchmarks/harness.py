"""What the benchmarks share: fresh worker processes, paired ratios, the machine's load,
a free port, peak-memory readings, tables and the JSON they write.

Benchmarks run as modules from the repository root (``python -m benchmarks.NAME``), and
so do their workers (``in_fresh_process``): no ``sys.path`` edits anywhere.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
CONFIGS = ROOT / "leviathan" / "configs"

# --- fresh processes -------------------------------------------------------------------

RESULT_TAG = "BENCHMARK_RESULT "


class WorkerFailed(RuntimeError):
    """A worker process timed out, exited non-zero or printed no result.

    ``reason``: one line (``over N s``, or the last line of its stderr); ``output``: the
    tail of what it printed (stderr, else stdout)."""

    def __init__(self, reason: str, output: str = ""):
        super().__init__(reason)
        self.reason, self.output = reason, output


def emit(result: Any) -> None:
    """A worker's answer: one tagged JSON line on stdout, which ``in_fresh_process`` reads
    (anything else the worker prints is left alone)."""
    print(RESULT_TAG + json.dumps(result), flush=True)


def run_command(
    cmd: Sequence[str],
    *,
    env: dict[str, str] | None = None,
    timeout: float | None = None,
    cwd: Path = ROOT,
) -> subprocess.CompletedProcess:
    """Run ``cmd`` to its end, output captured; raise WorkerFailed if it times out or
    exits non-zero."""
    try:
        done = subprocess.run(
            [str(c) for c in cmd], capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout
        )
    except subprocess.TimeoutExpired as err:
        raise WorkerFailed(
            f"over {timeout:.0f} s", _text(err.stderr) or _text(err.stdout)
        ) from None
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
        raise WorkerFailed(last, (done.stderr or done.stdout)[-6000:])
    return done


def _text(out: str | bytes | None) -> str:
    return out.decode(errors="replace") if isinstance(out, bytes) else out or ""


def in_fresh_process(
    module: str,
    *args: object,
    env: dict[str, str] | None = None,
    timeout: float | None = None,
) -> Any:
    """``python -m module args`` in a new interpreter, from the repository root; the value
    its ``emit`` printed (the last one). Raises WorkerFailed."""
    done = run_command([sys.executable, "-m", module, *map(str, args)], env=env, timeout=timeout)
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG) :])
    raise WorkerFailed("no result printed", (done.stderr or done.stdout)[-6000:])


def returning_frees(threshold: int = 64 * 1024, env: dict[str, str] | None = None) -> dict:
    """An environment in which glibc serves every allocation of ``threshold`` bytes or more
    by mmap and returns it to the OS when freed: the resident set then follows the bytes
    live, not what the heap keeps cached (for peak-memory workers)."""
    return dict(os.environ if env is None else env, MALLOC_MMAP_THRESHOLD_=str(threshold))


# --- ratios ----------------------------------------------------------------------------


def rotated(items: Sequence, round_: int) -> list:
    """The order of round ``round_``: ``items`` rotated by one more place each round, so
    load from elsewhere falls on every item alike."""
    k = round_ % len(items)
    return [*items[k:], *items[:k]]


def paired_ratio(a: Sequence[float], b: Sequence[float], digits: int = 3) -> dict:
    """a over b, paired by round: the median and range of a[i] / b[i] (drift between rounds
    cancels within a round), and ``of_medians``, the ratio of the two medians."""
    ratios = [x / y for x, y in zip(a, b, strict=True)]
    return {
        "median": round(statistics.median(ratios), digits),
        "range": [round(min(ratios), digits), round(max(ratios), digits)],
        "of_medians": round(statistics.median(a) / statistics.median(b), digits),
    }


# --- the machine -----------------------------------------------------------------------


def _cpu_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies over all CPUs since boot."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # guest time is already counted in user
    return total - idle, total


def _own_jiffies() -> int:
    """CPU time of this process and of its finished (waited-for) children: the
    benchmark's worker processes count as its own."""
    stat = Path("/proc/self/stat").read_text()
    rest = stat[stat.rindex(")") + 2 :].split()
    return sum(int(v) for v in rest[11:15])  # utime, stime, cutime, cstime (fields 14-17)


class LoadMeter:
    """CPU time other processes use while this one runs, in cores on average (this
    benchmark's own worker processes count as this one)."""

    def __init__(self) -> None:
        self.loadavg_before = os.getloadavg()
        self.busy0, self.total0 = _cpu_jiffies()
        self.own0 = _own_jiffies()

    def report(self) -> dict:
        busy, total = _cpu_jiffies()
        mine = _own_jiffies() - self.own0
        ncpu = os.cpu_count() or 1
        dt = max(total - self.total0, 1)
        return {
            "cpus": ncpu,
            "loadavg_before": [round(v, 2) for v in self.loadavg_before],
            "loadavg_after": [round(v, 2) for v in os.getloadavg()],
            "this_process_cores": round(mine / dt * ncpu, 2),
            "other_processes_cores": round(max(busy - self.busy0 - mine, 0) / dt * ncpu, 2),
        }


def free_port() -> int:
    """A TCP port on 127.0.0.1 free now (the training code's own finder)."""
    from leviathan.parallel.world import free_port as find

    return find()


def proc_status_kib(field: str) -> int:
    """A field of /proc/self/status in KiB (VmRSS, VmHWM, ...)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def reset_peak_rss() -> None:
    """Reset this process's high-water resident set (VmHWM) to the current one."""
    Path("/proc/self/clear_refs").write_text("5")


# --- output ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Col:
    """A table column: its title and the format spec of its values (``"<16"``,
    ``">9.1f"``); the spec's width and alignment apply to the title and to text cells."""

    title: str
    spec: str

    @property
    def align(self) -> str:
        return self.spec[0] if self.spec[:1] in ("<", ">", "^") else ">"

    @property
    def width(self) -> int:
        found = re.match(r"[<>^]?(\d+)", self.spec)
        return int(found.group(1)) if found else len(self.title)

    def cell(self, value: object, missing: str) -> str:
        if value is None:
            value = missing
        if isinstance(value, str):
            return f"{value:{self.align}{self.width}}"
        return format(value, self.spec)


class Table:
    """A plain-text table printed a row at a time (rows can come as they are measured):
    numbers formatted by their column's spec, text aligned to it, None as ``missing``."""

    def __init__(self, *cols: Col, sep: str = " ", missing: str = "-"):
        self.cols, self.sep, self.missing = cols, sep, missing

    def header(self, extra: str = "") -> str:
        titles = self.sep.join(f"{c.title:{c.align}{c.width}}" for c in self.cols) + extra
        return titles + "\n" + "-" * len(titles)

    def row(self, *cells: object, extra: str = "") -> str:
        return (
            self.sep.join(c.cell(v, self.missing) for c, v in zip(self.cols, cells, strict=True))
            + extra
        )


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table (for pasting into README.md), cells as given."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_json(path: Path | str, data: Any, indent: int = 2) -> Path:
    """Write ``data`` as JSON (folders made, a final newline) and say where."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=indent) + "\n", encoding="utf-8")
    print(f"wrote {path}")
    return path
