"""Durable, atomic writes: the one way the package replaces a file or publishes a directory; where it caches; the
checksum it keeps of a file; and the lock that keeps a second process out of a directory being written.

A crash or a power loss at any moment leaves the old content or the new, never a mix. Data goes to a
temporary name in the target's directory, is fsync'ed, is renamed over the target, and then the
directory itself is fsync'ed, because a rename lives in the directory and is lost with it otherwise.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import math
import os
import shutil
import socket
import time
from pathlib import Path

from gpt2_scale.errors import UserError

CACHE_ENV = "GPT2_SCALE_CACHE"


def cache_dir() -> Path:
    """Where prepared and downloaded files are kept between runs (the default corpus, HellaSwag):
    ``$GPT2_SCALE_CACHE``, else ``~/.cache/gpt2_scale``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "gpt2_scale")


def nearest_existing(path: Path) -> Path:
    """``path`` if it exists, else its nearest ancestor that does: where it would be made, or what is in the way."""
    return next(p for p in (path, *path.parents) if p.exists())


def make_dirs(path: Path, flag: str | None = None) -> Path:
    """Directory ``path`` and its parents, created where missing. A file in the way is one line naming where the
    path came from: ``flag`` (an --out), else the cache (``$GPT2_SCALE_CACHE``, which may name a file by mistake)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = nearest_existing(path)
        where = f"{flag} {path}" if flag else f"the cache directory {path}" + (f" (from ${CACHE_ENV})" if os.environ.get(CACHE_ENV) else "")
        fix = f"pass a directory to {flag}" if flag else f"set {CACHE_ENV} to a directory" if os.environ.get(CACHE_ENV) else "move it out of the way"
        raise UserError(f"{where} cannot be made: {blocker} is a file; {fix}") from None
    return path


def sha256(path: str | os.PathLike, chunk: int = 16 << 20) -> str:
    """The hex SHA-256 of a file's bytes, as ``sha256sum`` prints it, read a chunk at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def fsync_dir(path: str | os.PathLike) -> None:
    """Make the entries of a directory (creations, renames) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: str | os.PathLike) -> None:
    """fsync every file and directory under ``path`` (a directory written by a library that does not)."""
    for root, _, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(root)


def write_atomic(path: str | os.PathLike, data: bytes | str) -> None:
    """Replace ``path`` with ``data`` (str is written as UTF-8) all at once and durably."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def publish_dir(tmp: str | os.PathLike, final: str | os.PathLike, replace: bool = False) -> None:
    """Move a fully written directory ``tmp`` to ``final`` durably: its contents are synced first, so
    ``final`` never names incomplete data. With ``replace`` an existing ``final`` is swapped out (moved
    aside, then deleted once the new one is in place), so at every moment ``final`` is complete or absent
    only between two renames."""
    tmp, final = Path(tmp), Path(final)
    fsync_tree(tmp)
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if replace and final.exists():
        os.rename(final, old)
    try:
        os.rename(tmp, final)
    except OSError:
        if old.exists():
            os.rename(old, final)  # put the previous one back
        raise
    fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)


LOCK = ".lock"  # in a directory being written (a run's, a data preparation's): lock_exclusive holds it


def is_locked(path: Path) -> bool:
    """Whether a process holds ``path`` with lock_exclusive now (a run training in its directory, say)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # none there: nobody holds it
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except OSError as e:
        return e.errno in (errno.EAGAIN, errno.EACCES)
    finally:
        os.close(fd)


def lock_exclusive(path: Path, wait_s: float, user: str) -> tuple[int | None, str | None]:
    """(fd holding an exclusive flock on ``path``, None), or (None, who holds it) after ``wait_s`` seconds; the
    holder writes its pid, host and start time into the file for the next one to name. ``user`` names what
    holds it ("run", "preparation"), for the lines printed while waiting or where nothing can be locked.

    The kernel releases the lock when its process ends, however it ends. A file removed or replaced while this
    waited (its holder removing it on the way out) is a stale lock: the wait starts over on the file now at ``path``."""
    deadline, told = time.monotonic() + wait_s, False
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "its process did not say which"
            os.close(fd)
            if e.errno not in (errno.EAGAIN, errno.EACCES):  # no locks here (ENOLCK, EOPNOTSUPP ...)
                print(f"warning: cannot lock {path} ({e.strerror}); nothing stops a second {user} in {path.parent} "
                      "at the same time", flush=True)
                return None, None
            if time.monotonic() >= deadline:
                return None, holder
            if not told:
                limit = f" up to {wait_s:.0f} s" if math.isfinite(wait_s) else ""
                print(f"{path.parent} is in use by another {user} ({holder}); waiting{limit} for it to end", flush=True)
                told = True
            time.sleep(0.5)
            continue
        if path.exists() and os.stat(path).st_ino == os.fstat(fd).st_ino:
            since = time.strftime("%Y-%m-%d %H:%M:%S")
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {since}\n".encode(), 0)
            return fd, None
        os.close(fd)
