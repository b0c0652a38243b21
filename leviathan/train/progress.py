"""Training progress on rank 0: a bar on a terminal, plain lines everywhere else.

A tqdm bar redraws itself with carriage returns; written into a file (Ray job logs, CI,
`nohup`) every redraw is kept and a run leaves thousands of frames. So the bar is drawn
only when its stream (stderr) is a terminal; otherwise one plain line every
`train.log_interval` steps, and always at the session's first and last step:

    step 50/800: loss 4.5123, 12,345 tok/s, 3.2 GFLOP/s, elapsed 0:01:02, ETA 0:15:30

An MoE run's line (and bar) also shows how well it routes: the worst layer's imbalance
(max / mean expert load; 1 is even) and the share of assignments dropped (capacity mode):

    step 50/800: loss 4.5123, imbalance 1.42, dropped 0.3%, 12,345 tok/s, ...

Messages during the loop (eval lines; Python warnings while the bar is drawn) go through
the same reporter, so they never tear a bar frame. `train.progress` (auto, bar, lines)
overrides the terminal test, e.g. for a test or a terminal multiplexer that logs.
"""

from __future__ import annotations

import sys
import time
import warnings
from collections.abc import Callable
from typing import Any, TextIO

from tqdm import tqdm

from leviathan.train import mfu


def use_bar(mode: str, stream: TextIO) -> bool:
    """Whether to draw the bar: mode `bar`, or `auto` with `stream` a terminal."""
    if mode != "auto":
        return mode == "bar"
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def clock(seconds: float) -> str:
    """0:01:02, 12:03:04: hours always shown, so lines line up in a long log."""
    s = max(0, round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def routing(record: dict[str, Any]) -> tuple[float, float] | None:
    """An MoE step's imbalance (the worst layer's max/mean load: the layer to worry about)
    and dropped fraction (over all layers' assignments: each layer routes the same
    tokens); None for a dense step."""
    layers = record.get("moe")
    if not layers:
        return None
    imbalance = max(stats["imbalance"] for stats in layers.values())
    dropped = sum(stats["dropped_frac"] for stats in layers.values()) / len(layers)
    return imbalance, dropped


def step_line(record: dict[str, Any], total: int, eta_s: float | None) -> str:
    """The plain line of one step's record (train loss, for MoE the routing, tokens/s,
    MFU or GFLOP/s)."""
    rate = (
        f"MFU {100 * record['mfu']:.1f}%"
        if "mfu" in record
        else f"{record['flops_per_s'] / 1e9:.1f} GFLOP/s"
    )
    moe = routing(record)
    parts = [
        f"loss {record['train_loss']:.4f}",
        *([f"imbalance {moe[0]:.2f}", f"dropped {100 * moe[1]:.1f}%"] if moe else []),
        f"{record['tokens_per_s']:,.0f} tok/s",
        rate,
        f"elapsed {clock(record['elapsed_s'])}",
    ]
    if eta_s is not None:
        parts.append(f"ETA {clock(eta_s)}")
    return f"step {record['step']}/{total}: " + ", ".join(parts)


class Progress:
    """Reports each step's record; `write` for any other message of the loop.

    Disabled (every call a no-op) off rank 0. In lines mode the lines go to `log` (the
    loop's, print by default) and stdout is flushed after each, so a log that is a pipe
    shows them as they happen. While the bar is drawn, Python warnings are shown above
    it (through `write`) instead of across it; plain lines leave them to Python (stderr:
    a caller's `log` may drop messages, and a warning must not vanish with them). Close
    it to print the last step (if its line is still due) and restore the warning display.
    """

    def __init__(
        self,
        total: int,
        initial: int,
        *,
        enabled: bool = True,
        mode: str = "auto",
        interval: int = 50,
        log: Callable[[str], None] = print,
        stream: TextIO | None = None,
    ):
        self.total, self.initial, self.interval = total, initial, interval
        self.enabled, self.log = enabled, log
        self.started = time.perf_counter()
        self.pending: dict[str, Any] | None = None  # the last record, until its line is out
        stream = sys.stderr if stream is None else stream
        self.bar = None
        if enabled and use_bar(mode, stream):
            self.bar = tqdm(
                total=total, initial=initial, unit="step", dynamic_ncols=True, file=stream
            )
        self.shown_warning = warnings.showwarning
        if self.bar is not None:
            warnings.showwarning = self.show_warning

    def step(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            moe = routing(record)
            self.bar.set_postfix(
                loss=f"{record['train_loss']:.3f}",
                **({"imb": f"{moe[0]:.2f}", "drop": f"{100 * moe[1]:.1f}%"} if moe else {}),
                tok_s=f"{record['tokens_per_s']:.0f}",
                **mfu.postfix(record),
            )
            self.bar.update(1)
            return
        done = record["step"]
        self.pending = record
        if done == self.initial + 1 or done % self.interval == 0 or done == self.total:
            self.print_pending()

    def print_pending(self) -> None:
        record, self.pending = self.pending, None
        steps = record["step"] - self.initial
        per_step = (time.perf_counter() - self.started) / steps
        self.say(step_line(record, self.total, per_step * (self.total - record["step"])))

    def write(self, message: str) -> None:
        """A message between steps: above the bar, or a line of the log."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(message)
        else:
            self.say(message)

    def say(self, message: str) -> None:
        self.log(message)
        sys.stdout.flush()

    def show_warning(self, message, category, filename, lineno, file=None, line=None) -> None:
        """`warnings.showwarning` while the bar is drawn: above it."""
        self.write(f"warning: {category.__name__}: {message} ({filename}:{lineno})")

    def close(self) -> None:
        if not self.enabled:
            return
        warnings.showwarning = self.shown_warning
        if self.pending is not None:
            self.print_pending()
        if self.bar is not None:
            self.bar.close()
