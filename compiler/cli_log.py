"""How the command line shows kiln's log (kiln/log.py): elapsed time and message on stderr; the steps of
a long loop as one line redrawn in place on a terminal, and as occasional plain lines when stderr is a
file or a pipe (a CI log should not hold 200 lines per pass)."""

from __future__ import annotations

import logging
import sys
import time
from typing import TextIO

# plain-line output of steps: the first, the last, and one every this many seconds in between
STEP_EVERY_S = 5.0


class StepHandler(logging.Handler):
    """Formats `[  12.3s] message`; records with `kiln_step` overwrite each other on a TTY."""

    def __init__(self, stream: TextIO | None = None, tty: bool | None = None) -> None:
        super().__init__()
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.t0 = time.perf_counter()
        self.open_line = False  # a step line is on screen without its newline
        self.last_step = 0.0

    def emit(self, record: logging.LogRecord) -> None:
        try:
            now = time.perf_counter()
            text = f"[{now - self.t0:6.1f}s] {record.getMessage()}"
            if record.levelno >= logging.WARNING:
                text = f"[{now - self.t0:6.1f}s] {record.levelname.lower()}: {record.getMessage()}"
            st = getattr(record, "kiln_step", None)
            if st is not None and self.tty:
                self.stream.write("\r\033[K" + text)  # back to column 0, clear the line, redraw
                self.open_line = True
            elif st is not None:
                i, n = st[0], st[1]
                if i in (1, n) or now - self.last_step >= STEP_EVERY_S:
                    self.last_step = now
                    self.stream.write(text + "\n")
            else:
                self.end_line()
                self.stream.write(text + "\n")
            self.stream.flush()
        except Exception:  # logging must never take the build down (a closed stderr, for one)
            self.handleError(record)

    def end_line(self) -> None:
        """Keep the last step line on screen and move below it."""
        if self.open_line:
            self.stream.write("\n")
            self.open_line = False

    def close(self) -> None:
        self.end_line()
        super().close()


def setup(verbose: int, quiet: bool, stream: TextIO | None = None) -> StepHandler:
    """-q: errors only; default: INFO (phases and steps); -v: DEBUG. Installs one handler on "kiln"
    (replacing one installed before, so that main() can run twice in one process)."""
    root = logging.getLogger("kiln")
    for h in list(root.handlers):
        if isinstance(h, StepHandler):
            root.removeHandler(h)
    h = StepHandler(stream)
    root.addHandler(h)
    root.setLevel(logging.ERROR if quiet else logging.DEBUG if verbose else logging.INFO)
    root.propagate = False  # the CLI owns the terminal: no second copy through the root logger
    return h
