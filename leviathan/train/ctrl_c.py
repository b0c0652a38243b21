"""Ctrl-C in a one-process run: stop after the current step with a checkpoint."""

from __future__ import annotations

import signal
import sys
import threading


class CtrlC:
    """While active, Ctrl-C (SIGINT) asks the loop to stop after the current step with a
    checkpoint; a second Ctrl-C interrupts at once. Only one process in its main thread
    (a rank cannot stop alone, and signals reach only the main thread)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.requested = False
        self.previous = None

    def __enter__(self) -> CtrlC:
        if self.enabled:
            self.previous = signal.signal(signal.SIGINT, self.handle)
        return self

    def handle(self, signum: int, frame: object) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(
            "\nCtrl-C: stopping after this step with a checkpoint (again to abort)",
            file=sys.stderr,
        )

    def __exit__(self, *exc) -> None:
        if self.enabled:
            signal.signal(signal.SIGINT, self.previous)
