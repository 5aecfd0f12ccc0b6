"""kiln's one way to say what a build is doing: Python `logging` under the logger "kiln".

Silent by default (INFO is below logging's default WARNING); `logging.basicConfig(level=logging.INFO)`
shows the build phases and a line per step of the long loops (calibration windows, layers quantized,
distillation steps). Steps carry `record.kiln_step = (i, n, what)` so that a front end can draw them as
one updating line (the CLI does) instead of n lines. No terminal code here.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar, cast

ROOT = "kiln"


def get(name: str) -> logging.Logger:
    """The logger of one part of kiln, `kiln.<name>`: users filter by it (`kiln.quant`, `kiln.distill`)."""
    return logging.getLogger(f"{ROOT}.{name}" if name else ROOT)


def step(logger: logging.Logger, what: str, i: int, n: int) -> None:
    """Step i of n (1-based) of a long loop; cheap when INFO is off, so loops call it every iteration."""
    if logger.isEnabledFor(logging.INFO):
        logger.info("%s %d/%d", what, i, n, extra={"kiln_step": (i, n, what)})


class _Forward(logging.Handler):
    """Hands each record's text to a `progress(msg)` callback (kiln.compile's older interface)."""

    def __init__(self, fn: Callable[[str], None]) -> None:
        super().__init__(logging.INFO)
        self.fn = fn

    def emit(self, record: logging.LogRecord) -> None:
        self.fn(record.getMessage())


@contextmanager
def forwarded(progress: Callable[[str], None] | None) -> Iterator[None]:
    """While inside, kiln's INFO records also go to `progress` (when given): the callback and logging
    are one stream, so a message is never shown by one and missed by the other."""
    if progress is None:
        yield
        return
    root = logging.getLogger(ROOT)
    handler, level, propagate, wanted = _Forward(progress), root.level, root.propagate, root.getEffectiveLevel()
    root.addHandler(handler)
    above = None
    if wanted > logging.INFO:  # open INFO for the callback, and keep the user's own handlers at their level
        root.setLevel(logging.INFO)
        if propagate:
            above = _Above(wanted)
            root.addHandler(above)
            root.propagate = False
    try:
        yield
    finally:
        root.removeHandler(handler)
        if above is not None:
            root.removeHandler(above)
        root.setLevel(level)
        root.propagate = propagate


class _Above(logging.Handler):
    """Passes on to the root logger's handlers only what they would have seen without `forwarded`."""

    def __init__(self, level: int) -> None:
        super().__init__(level)

    def emit(self, record: logging.LogRecord) -> None:
        logging.getLogger().handle(record)


F = TypeVar("F", bound=Callable[..., Any])


def takes_progress(fn: F) -> F:
    """For a function with a `progress=` keyword: run it inside `forwarded(progress)`."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kw: Any) -> Any:
        with forwarded(kw.get("progress")):
            return fn(*args, **kw)

    return cast(F, wrapper)
