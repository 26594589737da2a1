"""Ctrl-C and SIGTERM during training: finish the step, save a checkpoint, stop; a second one kills."""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from types import TracebackType


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C / SIGTERM: a checkpoint was saved (``.checkpoint``) and training stopped."""

    def __init__(self, message: str, checkpoint_path: Path | None) -> None:
        super().__init__(message)
        self.checkpoint = checkpoint_path


class StopSignals:
    """While active, SIGINT/SIGTERM only set ``requested`` (the signal's name); the loop checks it
    after each step. Signals can only be handled in the main thread: elsewhere this does nothing."""

    def __init__(self) -> None:
        self.requested: str | None = None
        self._previous: dict[signal.Signals, object] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is not threading.main_thread():
            return self
        self._previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        for s in self._previous:
            signal.signal(s, self._handle)
        return self

    def _handle(self, signum: int, frame: object) -> None:
        name = signal.Signals(signum).name
        if self.requested:  # second signal: stop now
            previous = self._previous[signal.Signals(signum)]
            signal.signal(signum, previous if callable(previous) else signal.SIG_DFL)
            raise KeyboardInterrupt
        self.requested = name
        print(f"\nhizli: {name}: finishing this step, then saving a checkpoint (again to stop at once)", flush=True)

    def __exit__(self, kind: type | None, error: BaseException | None, tb: TracebackType | None) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous = {}
        self.requested = None
