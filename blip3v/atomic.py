"""Atomic replacement of output folders (engines, calibrated engines, checkpoints).

    from blip3v.atomic import atomic_dir
    with atomic_dir(Path("engines/demo")) as tmp:     # tmp: a fresh, empty sibling folder
        write_everything_into(tmp)
    # on success tmp is at engines/demo; on any exception it is gone and engines/demo is untouched

Writers fill a temporary sibling `.NAME.tmp-<pid>-<random>` and only a complete folder is put at
NAME. On Linux an existing NAME is swapped with the new folder in one `renameat2(RENAME_EXCHANGE)`
call (Linux >= 3.15, glibc >= 2.28 or the raw syscall), so a reader always finds either the old or
the new folder at NAME, never neither; the old content, now under the temporary name, is deleted
afterwards. Where the exchange is unavailable (another OS, a file system without it such as NFS) the
documented fallback is three steps: rename NAME aside to `.NAME.old-<pid>-<random>`, rename the new
folder in, delete the old one; between the first two renames NAME is briefly absent.

A killed run leaves its temporary folder behind. Each live writer holds an exclusive `flock` on its
temporary folder for as long as it writes (the kernel drops it when the process dies, however it
dies), so the next write to the same NAME deletes every `.NAME.tmp-*` it can lock and every
`.NAME.old-*` (and `.NAME.old`, the aside name of earlier versions). On platforms without `fcntl`
(Windows) nothing is locked and leftovers are not cleaned automatically.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import platform
import secrets
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

TMP_TAG = "tmp"
OLD_TAG = "old"
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
# renameat2's syscall number where glibc lacks the wrapper (< 2.28); from the kernel's syscall tables.
_SYSCALL_RENAMEAT2 = {"x86_64": 316, "aarch64": 276, "arm64": 276, "riscv64": 276}


def _temp_name(target: Path, tag: str) -> Path:
    return target.with_name(f".{target.name}.{tag}-{os.getpid()}-{secrets.token_hex(4)}")


def _renameat2_exchange():
    """A callable (a, b) -> None that swaps two paths atomically, or None where the OS has none."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    func = getattr(libc, "renameat2", None)
    number = _SYSCALL_RENAMEAT2.get(platform.machine())
    if func is None and (number is None or not hasattr(libc, "syscall")):
        return None

    def exchange(a: Path, b: Path) -> None:
        pa, pb = os.fsencode(a), os.fsencode(b)
        if func is not None:
            rc = func(_AT_FDCWD, pa, _AT_FDCWD, pb, _RENAME_EXCHANGE)
        else:
            rc = libc.syscall(number, _AT_FDCWD, pa, _AT_FDCWD, pb, _RENAME_EXCHANGE)
        if rc != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), str(a), None, str(b))

    return exchange


_EXCHANGE = _renameat2_exchange()
# errno values meaning "this kernel / file system cannot exchange": use the fallback instead.
_NO_EXCHANGE = {errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM}


def exchange_supported() -> bool:
    """Whether this platform has an atomic exchange to try (a file system may still refuse it)."""
    return _EXCHANGE is not None


def _remove(path: Path) -> None:
    """Deletes a folder tree, or a link or file where a folder was (a target that was a symlink)."""
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def replace_dir(new: Path, target: Path, *, allow_exchange: bool = True) -> None:
    """Puts folder `new` at `target` (which may or may not exist) and deletes what was there."""
    if target.exists() or target.is_symlink():
        if allow_exchange and _EXCHANGE is not None:
            try:
                _EXCHANGE(new, target)
            except OSError as exc:
                if exc.errno not in _NO_EXCHANGE:
                    raise
            else:
                _remove(new)  # `new` now holds the old content
                return
        # Fallback: a short window where `target` is absent (see the module docstring).
        aside = _temp_name(target, OLD_TAG)
        os.replace(target, aside)
        try:
            os.replace(new, target)
        except BaseException:
            os.replace(aside, target)  # put the old content back
            raise
        _remove(aside)
    else:
        os.replace(new, target)


def _try_lock(fd: int, blocking: bool) -> bool:
    if fcntl is None:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        return True
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise


def clean_stale(target: Path) -> list[Path]:
    """Deletes the temporary folders that killed writes to `target` left beside it; returns them.
    A `.NAME.tmp-*` folder is stale when no process holds its lock; `.NAME.old-*` always is."""
    removed: list[Path] = []
    if fcntl is None or not target.parent.is_dir():
        return removed
    prefix_tmp, prefix_old = f".{target.name}.{TMP_TAG}-", f".{target.name}.{OLD_TAG}-"
    for entry in target.parent.iterdir():
        name = entry.name
        if name.startswith(prefix_old) or name == f".{target.name}.{OLD_TAG}":
            _remove(entry)
            removed.append(entry)
        elif name.startswith(prefix_tmp) and entry.is_symlink():  # a swapped-out link: nothing locks it
            entry.unlink(missing_ok=True)
            removed.append(entry)
        elif name.startswith(prefix_tmp) and entry.is_dir():
            try:
                fd = os.open(entry, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
            except OSError:
                continue  # vanished meanwhile or unreadable: not ours to judge
            try:
                if _try_lock(fd, blocking=False):
                    # Locked by us now: its writer is gone. A writer that created it a moment ago
                    # and waits for this lock sees the folder deleted and makes another.
                    shutil.rmtree(entry, ignore_errors=True)
                    removed.append(entry)
            finally:
                os.close(fd)
    return removed


def _make_locked_temp(target: Path) -> tuple[Path, int]:
    umask = os.umask(0)
    os.umask(umask)
    for _ in range(100):
        tmp = _temp_name(target, TMP_TAG)
        os.mkdir(tmp, 0o777 & ~umask)
        fd = os.open(tmp, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        _try_lock(fd, blocking=True)
        if os.fstat(fd).st_nlink > 0:  # a cleaner did not take it between mkdir and the lock
            return tmp, fd
        os.close(fd)
    raise OSError(f"could not create a temporary folder beside {target}")


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike[str], *, allow_exchange: bool = True) -> Iterator[Path]:
    """Yields a fresh empty sibling folder of `target`; on a normal exit it replaces `target`
    (see the module docstring), on an exception it is deleted and `target` is left as it was.
    `target` must be a folder or absent. `allow_exchange=False` forces the fallback (tests)."""
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"{target} exists and is not a directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(target)
    tmp, fd = _make_locked_temp(target)
    try:
        try:
            yield tmp
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        try:
            replace_dir(tmp, target, allow_exchange=allow_exchange)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    finally:
        os.close(fd)  # releases the lock
