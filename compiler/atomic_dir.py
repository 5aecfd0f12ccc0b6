"""Putting a finished directory at a path atomically and durably: a crash at any point leaves either the
old directory or the new one there, never neither, and leftovers of killed writes are removed later.

The write goes to `.kiln-tmp-<pid>-<random>` beside the target. Each file and directory is fsynced, then
the temporary directory and the target are exchanged in one step (Linux `renameat2(RENAME_EXCHANGE)`): the
target path names the old tree until that instant and the new tree after it; the old tree, now under
the temporary name, is removed. Where the exchange is not supported (other systems, some filesystems) the
fallback is two renames (target -> `<name>.old-<pid>`, temporary -> target); a crash between them leaves
the old tree at `<name>.old-<pid>`, which the next write or `recover` puts back. Leftover temporary and
`.old-` directories of processes that no longer run are removed by the next write beside them.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable

TMP_PREFIX = ".kiln-tmp-"
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
STALE_NO_PID_S = 3600.0  # leftovers from writers that recorded no pid: removed once this old


def step(name: str) -> None:
    """A named point between the steps of a write; tests replace it to inject a crash there."""


def fsync_tree(root: str) -> None:
    """fsync every file and directory under `root`, the directories after their contents."""
    for d, _, names in os.walk(root, topdown=False):
        for n in names:
            p = os.path.join(d, n)
            if os.path.isfile(p) and not os.path.islink(p):
                fd = os.open(p, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        fsync_dir(d)


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on a directory; the data files were synced
        pass
    finally:
        os.close(fd)


def _exchange(a: str, b: str) -> bool:
    """Swap paths a and b atomically; False where the system cannot."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    if fn(_AT_FDCWD, a.encode(), _AT_FDCWD, b.encode(), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: not supported here
        return False
    raise OSError(err, f"cannot exchange {a} and {b}: {os.strerror(err)}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _leftover_pid(name: str, target: str | None) -> int | None | bool:
    """The writer pid a leftover name records; None when it records none; False when not a leftover."""
    if name.startswith(TMP_PREFIX):
        m = re.match(re.escape(TMP_PREFIX) + r"(\d+)-", name)
        return int(m.group(1)) if m else None
    if target is not None:
        m = re.fullmatch(re.escape(target) + r"\.old-(\d+)", name)
        if m:
            return int(m.group(1))
    return False


def clean_leftovers(parent: str, target: str | None = None) -> list[str]:
    """Remove `.kiln-tmp-*` directories (and `<target>.old-*`) in `parent` whose writer no longer runs.
    An `.old-` directory is removed only when `target` itself exists (else `recover` needs it)."""
    removed: list[str] = []
    try:
        names = os.listdir(parent)
    except OSError:
        return removed
    for n in names:
        pid = _leftover_pid(n, target)
        if pid is False:
            continue
        p = os.path.join(parent, n)
        if not os.path.isdir(p) or os.path.islink(p):
            continue
        if pid is None:
            stale = time.time() - os.path.getmtime(p) > STALE_NO_PID_S
        else:
            stale = pid != os.getpid() and not _alive(int(pid))
        if not n.startswith(TMP_PREFIX) and not os.path.exists(os.path.join(parent, str(target))):
            stale = False  # the only copy of the artifact: recover() puts it back
        if stale:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(n)
    return removed


def recover(path: str) -> str | None:
    """Put back the old tree of a write that crashed between the fallback's two renames: when `path` is
    missing and `<path>.old-<pid>` exists, rename the newest such back. Returns what it restored."""
    if os.path.lexists(path):
        return None
    parent, name = os.path.split(os.path.abspath(path))
    olds = [n for n in os.listdir(parent) if re.fullmatch(re.escape(name) + r"\.old-\d+", n)]
    if not olds:
        return None
    best = max(olds, key=lambda n: os.path.getmtime(os.path.join(parent, n)))
    os.rename(os.path.join(parent, best), path)
    return best


def new_tmp(parent: str) -> str:
    """A fresh temporary directory beside the target, named with this process's pid."""
    return tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{os.getpid()}-", dir=parent)


def publish(tmp: str, path: str) -> None:
    """Make the complete tree `tmp` appear at `path` atomically (see the module docstring)."""
    parent = os.path.dirname(path)
    fsync_tree(tmp)
    step("synced")
    if os.path.lexists(path):
        if _exchange(tmp, path):
            step("exchanged")
            fsync_dir(parent)
            shutil.rmtree(tmp, ignore_errors=True)  # the old tree, now under the temporary name
            return
        old = f"{path}.old-{os.getpid()}"
        os.rename(path, old)
        step("moved-old")
        os.rename(tmp, path)
        fsync_dir(parent)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, path)
        fsync_dir(parent)


def write_dir(path: str, fill: Callable[[str], None]) -> None:
    """Build a directory with `fill(tmp)` and publish it at `path`; a failure removes the temporary."""
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    recover(path)
    clean_leftovers(parent, os.path.basename(path))
    tmp = new_tmp(parent)
    try:
        fill(tmp)
        step("filled")
        os.chmod(tmp, 0o755)
        publish(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
