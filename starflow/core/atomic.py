"""Atomic writes: an output is either the old file (or folder) or the complete new one, never half.

The rules, for every file and folder starflow writes:
- the target is absent or a regular file (for folders: a folder). A rename replaces whatever is at
  the name, so a symbolic link or a device (`/dev/full`, `/dev/stdout`) is refused with a
  one-line error rather than replaced; `check_target` says so before any work.
- the new content goes into a hidden sibling `.NAME.partial-PID-HOST-RANDOM`, created exclusively
  (mkstemp/mkdtemp: O_CREAT|O_EXCL|O_NOFOLLOW, so a planted name or link is never written
  through, and two writers, threads or processes, never share one), flushed to disk (fsync),
  then renamed over NAME; on failure it is removed.
- a partial whose process was killed is removed by the next write of that name (`remove_stale`,
  called by every writer here): only when it was made on this host and pid namespace and its
  pid is gone, so the partial of a live concurrent writer is never touched.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import shutil
import socket
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from starflow.core.errors import StarflowError

PARTIAL = re.compile(r"\.(?P<name>.+)\.partial-(?P<pid>\d+)-(?P<host>[0-9a-f]{8})-[a-z0-9_]+")


def current_umask() -> int:
    """The process umask, read without changing it where Linux allows (setting it and back, as
    the fallback does, would let another thread create a file under umask 0)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_target(path: str | Path, what: str | None = None, folder: bool = False) -> None:
    """`path` absent or a regular file (`folder`: a real folder); else a one-line StarflowError
    naming `what` (default: the path). A rename would replace a symlink or a device file."""
    what = what or str(path)
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as err:
        raise StarflowError(f"{what}: cannot look at it ({err.strerror or err})") from None
    if (stat.S_ISDIR if folder else stat.S_ISREG)(mode):
        return
    if stat.S_ISLNK(mode):
        kind = "a symbolic link"
    elif stat.S_ISDIR(mode):
        kind = "a directory"
    elif stat.S_ISREG(mode):
        kind = "a file"
    else:
        kind = "a device or other special file"
    expected = "a new name or a folder" if folder else "a new name or a regular file"
    raise StarflowError(f"{what}: is {kind}; expected {expected} (writing replaces what is there)")


def host_tag() -> str:
    """This host and pid namespace, hashed: a pid means something only within both."""
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        namespace = ""
    return hashlib.sha256(f"{socket.gethostname()}:{namespace}".encode()).hexdigest()[:8]


def partial_prefix(path: Path) -> str:
    """The name prefix of this process's partials of `path` (a random part completes it)."""
    return f".{path.name}.partial-{os.getpid()}-{host_tag()}-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def remove_stale(directory: Path, name: str | None = None) -> None:
    """Remove the partials in `directory` (of `name`, or of any name) whose process is gone."""
    host = host_tag()
    prefix = "." if name is None else f".{name}.partial-"  # every write calls this: a cheap test first
    try:
        entries = [e for e in os.scandir(directory) if e.name.startswith(prefix)]
    except OSError:
        return  # nothing to clean where nothing can be listed; the write itself reports the place
    for entry in entries:
        found = PARTIAL.fullmatch(entry.name)
        if (
            found
            and (name is None or found["name"] == name)
            and found["host"] == host
            and not _alive(int(found["pid"]))
        ):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                Path(entry.path).unlink(missing_ok=True)


def fsync_path(path: Path, mode: int | None = None) -> None:
    """Flush a file written by name to disk, opened without following links (`mode`: give it
    these permissions first); or a folder's entries (a folder reached through a link is fine)."""
    fd = os.open(path, os.O_RDONLY | (0 if os.path.isdir(path) else os.O_NOFOLLOW))
    try:
        if mode is not None:
            os.fchmod(fd, mode)
        os.fsync(fd)
    except OSError as err:  # some file systems (FUSE, some network ones) cannot sync a folder
        if err.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def _install(tmp: Path, path: Path, what: str | None) -> None:
    """Rename `tmp` over `path` (checked again: the place may have changed during the work)."""
    check_target(path, what)
    os.replace(tmp, path)
    fsync_path(path.parent)


@contextlib.contextmanager
def atomic_file(path: str | Path, what: str | None = None) -> Iterator[BinaryIO]:
    """A new binary file that replaces `path` once the block succeeds; removed if it fails."""
    path = Path(path)
    check_target(path, what)
    remove_stale(path.parent, path.name)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=partial_prefix(path))
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fchmod(f.fileno(), 0o666 & ~current_umask())  # what open(path, "w") would give
            os.fsync(f.fileno())
        _install(tmp, path, what)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_path(path: str | Path, what: str | None = None) -> Iterator[Path]:
    """`atomic_file` for writers that take a file name (safetensors, ONNX, ffmpeg): the yielded
    name exists already (empty, ours alone); whatever the block leaves there replaces `path`."""
    path = Path(path)
    check_target(path, what)
    remove_stale(path.parent, path.name)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=partial_prefix(path))
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        fsync_path(tmp, 0o666 & ~current_umask())  # mkstemp's 0600: what open(path, "w") would give
        _install(tmp, path, what)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def partial_folder(path: Path) -> Path:
    """A new hidden folder beside `path` to build it in (this process's; the umask's permissions,
    not mkdtemp's private 0700), after removing the partials of `path` whose process is gone."""
    remove_stale(path.parent, path.name)
    folder = Path(tempfile.mkdtemp(dir=path.parent, prefix=partial_prefix(path)))
    os.chmod(folder, 0o777 & ~current_umask())
    return folder


@contextlib.contextmanager
def staged_folder(path: Path, what: str | None = None) -> Iterator[Path]:
    """A `partial_folder` of `path`, removed unless the block moved it into place (`replace_folder`)."""
    check_target(path, what, folder=True)
    folder = partial_folder(path)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def replace_folder(staged: Path, path: Path, what: str | None = None) -> None:
    """Move the finished `staged` folder to `path` whole, its files flushed first; a folder already
    at `path` is moved aside into a partial and removed after. Two renames, not one exchange: a
    reader sees the old folder, no folder (between them), or the new one, never a mix; a kill
    between them leaves the old folder only inside that partial, which the next run deletes."""
    check_target(path, what, folder=True)
    for file in staged.iterdir():
        fsync_path(file)
    aside = partial_folder(path)
    try:
        try:
            os.replace(path, aside / path.name)
        except FileNotFoundError:
            pass
        try:
            os.replace(staged, path)
        except BaseException:
            if (aside / path.name).exists():
                os.replace(aside / path.name, path)  # put the old folder back
            raise
        fsync_path(path.parent)
    finally:
        shutil.rmtree(aside, ignore_errors=True)
