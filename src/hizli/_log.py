"""User-facing messages: one logger, and warnings that are said once per process."""

from __future__ import annotations

import logging
import os
import sys

logger = logging.getLogger("hizli")
_said: set[str] = set()


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (tests and tools may swap it)."""

    @property  # type: ignore[override]
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def first_rank() -> bool:
    """True unless a launcher (torchrun) started this process as another rank than 0: the others
    show no progress bars and say only warnings."""
    return (os.environ.get("RANK", "0") or "0") == "0"


def setup(level: int = logging.INFO) -> None:
    """Print hizli's messages as ``hizli: ...`` lines on stderr (idempotent). Of several ranks
    (torchrun sets ``RANK``), the others say only warnings and errors, named with their rank."""
    rank = os.environ.get("RANK", "0") or "0"
    if rank != "0":
        level = max(level, logging.WARNING)
    if not any(getattr(h, "_hizli", False) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("hizli: " + (f"rank {rank}: " if rank != "0" else "") + "%(message)s"))
        handler._hizli = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(level)


def info(message: str) -> None:
    setup_default()
    logger.info(message)


def debug(message: str) -> None:
    """For whoever investigates (``logging.getLogger("hizli").setLevel(logging.DEBUG)``)."""
    setup_default()
    logger.debug(message)


def warn_once(key: str, message: str) -> None:
    """Warn the first time ``key`` is seen in this process, stay silent afterwards."""
    if key in _said:
        return
    _said.add(key)
    setup_default()
    logger.warning(message)


def setup_default() -> None:
    if not logger.handlers:
        setup()
