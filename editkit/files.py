"""Files the project writes and reads: atomic writes, output locks, one-line I/O errors, hashes, slugs.

Every file the project writes goes through :func:`atomic_path`, so an interrupted run (a kill, a full
disk) never leaves a half-written file under the final name. A script that writes into a folder holds
its :class:`OutputLock`, so two runs never mix their files there, and reports file-system failures
(full disk, read-only or missing folder, no permission) through :func:`io_errors` as one line naming
the path and the cause. :func:`refuse_overwriting_inputs` keeps outputs off the inputs.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import socket
import time
import uuid
import warnings
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from editkit.errors import InputError, ReportedError

# Suffixes of pickle-based checkpoints: never loaded (unpickling can run code); exports are safetensors.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
LOCK_FILE = ".output.lock"  # in a folder a run writes: names the run that holds it
# errno values caused by the machine or the file system, never by the code: always reported in one line
MACHINE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO,
                            errno.EFBIG, errno.ENOLCK})
# errno values of a bad path: reported in one line when the path lies in the output being written
PATH_ERRNOS = frozenset({errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.ENOTEMPTY,
                         errno.ENAMETOOLONG, errno.ELOOP})
# what atomic_path names its temporary files: `.<name>.<pid>-<random>.tmp` (earlier: `.<name>.<hex>.tmp`)
_ATOMIC_TEMP = re.compile(r"^\..+\.(?:(?P<pid>\d+)-[0-9a-f]{8}|[0-9a-f]{12})\.tmp$")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed onto `path`, on error removed.

    The writer creates the temporary file itself, so it gets the usual permissions (umask), not 0600.
    A file-system error while writing names `path`, not the temporary file. The temporary name holds the
    writer's pid, so that what a killed writer left can be told from a live writer's file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except OSError as err:
        if err.errno is None or err.filename not in (None, str(tmp_path), tmp_path):
            raise
        raise OSError(err.errno, err.strerror, str(path)) from err
    finally:
        with contextlib.suppress(OSError):
            tmp_path.unlink(missing_ok=True)


def remove_temporaries(
    *folders: str | Path, dead_writers_only: bool = False, older_than_s: float | None = None
) -> list[Path]:
    """Delete the temporary files of :func:`atomic_path` that a killed run left in `folders` (not in their
    subfolders).

    By default every one: for folders the caller owns (holds the :class:`OutputLock` of), where no other run
    writes. With `dead_writers_only` (a folder other runs may write, e.g. a shared cache), only files whose
    writing process no longer runs on this machine, or that are older than `older_than_s`.
    """
    removed = []
    now = time.time()
    for folder in folders:
        for path in Path(folder).glob(".*.tmp"):
            match = _ATOMIC_TEMP.match(path.name)
            if match is None or not path.is_file():
                continue
            if dead_writers_only:
                pid = match.group("pid")
                with contextlib.suppress(OSError):
                    old = older_than_s is not None and now - path.stat().st_mtime > older_than_s
                    if pid is not None and pid_alive(int(pid)) and not old:
                        continue
            with contextlib.suppress(OSError):
                path.unlink()
                removed.append(path)
    return removed


def write_json(path: str | Path, data: Any) -> None:
    """`data` as indented JSON, written atomically (NaN kept as JSON's NaN, other objects as str)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=str, allow_nan=True) + "\n")


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def slug(text: str) -> str:
    """A file-name-safe form of a word or token: "[I]" → "I", "ice-cream" → "ice_cream"."""
    return re.sub(r"\W", "_", text).strip("_") or "token"


# ----------------------------------------------------------------------------------------- inputs vs outputs


def resolved(path: str | Path, key: str | None = None) -> Path:
    """`path` with symlinks and relative parts resolved. A symlink loop (Python raises RuntimeError or
    OSError ELOOP for it) is an InputError naming the path (and its key, when given)."""
    try:
        return Path(path).resolve()
    except (RuntimeError, OSError) as err:
        if isinstance(err, OSError) and err.errno != errno.ELOOP:
            raise
        named = f"{key}='{path}'" if key else f"'{path}'"
        raise InputError(f"{named} is a symbolic link that loops back on itself: point it at a real file or "
                         "folder") from None


def same_file(a: str | Path, b: str | Path) -> bool:
    """Whether two paths name one file: equal once symlinks and relative parts are resolved, or hard links."""
    a, b = Path(a), Path(b)
    if resolved(a) == resolved(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist
        return False


def refuse_overwriting_inputs(
    out_key: str,
    out: str | Path,
    inputs: Mapping[str, str | Path | None],
    files: Iterable[str | Path] = (),
    folders: Iterable[str | Path] = (),
) -> None:
    """InputError when a run would overwrite one of its `inputs` ({key: path}): when one of the `files` it
    writes is an input, or an input lies inside one of the `folders` it writes into or replaces."""
    given = {key: Path(value) for key, value in inputs.items() if value is not None}
    resolved(out, out_key)
    for key, value in given.items():  # a symlink loop among them is named as the input it is
        resolved(value, key)
    for file in files:
        for key, value in given.items():
            if same_file(file, value):
                raise InputError(f"{out_key}='{out}' would overwrite the input {key}='{value}': "
                                 f"choose another {out_key}=")
    for folder in folders:
        inside = resolved(folder)
        for key, value in given.items():
            if resolved(value).is_relative_to(inside):
                raise InputError(f"the input {key}='{value}' lies in '{folder}', which {out_key}='{out}' "
                                 f"writes: move it or choose another {out_key}=")


# ----------------------------------------------------------------------------------------- I/O errors


def describe_io_error(err: OSError, out: str | Path | None = None) -> str | None:
    """One line for a file-system failure ("could not write 'x.png': No space left on device"), or None
    when `err` looks like a bug rather than the machine's or the user's doing.

    Failures of the machine (full disk, read-only, no permission) are always described; path errors
    (missing folder, a file in the way) only when the path lies in the output `out`.
    """
    if err.errno is None:
        return None
    names = [name for name in (err.filename2, err.filename) if name is not None]  # a rename's target first
    inside = [n for n in names if out is not None and Path(n).resolve().is_relative_to(Path(out).resolve())]
    if err.errno not in MACHINE_ERRNOS and not (err.errno in PATH_ERRNOS and (inside or not names)):
        return None
    if not names and out is None:
        return None
    name = (inside or names or [out])[0]
    verb = "write" if inside or not names else "access"
    return f"could not {verb} '{name}': {err.strerror or os.strerror(err.errno)}"


@contextlib.contextmanager
def io_errors(out: str | Path) -> Iterator[None]:
    """Report a file-system failure while writing the output `out` (a file or a folder) as one
    ReportedError line naming the path and the cause; other errors (bugs) pass unchanged."""
    try:
        yield
    except OSError as err:
        message = describe_io_error(err, out)
        if message is None:
            raise
        raise ReportedError(message) from err


# ----------------------------------------------------------------------------------------- output lock


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def _describe_holder(text: str) -> str:
    try:
        info = json.loads(text)
        return f"pid {info['pid']} on {info['host']}, started {info['started']}: {info['command']}"
    except (ValueError, KeyError, TypeError):
        return "unknown process"


class OutputLock:
    """Exclusive use of an output folder by one run, as a context manager.

    Creates the folder (and its missing parents; the ones it created go again on exit if left empty)
    and holds `<folder>/.output.lock` with an advisory `flock`, so the kernel releases it when the run
    dies however it dies. The file names the holder (pid, host, start time, command) for a run that is
    refused. A lock file whose holder is gone is taken over with one warning.
    """

    def __init__(self, folder: str | Path, command: str = "", key: str = "out") -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self.command = command
        self.key = key
        self._fd: int | None = None
        self._created: list[Path] = []

    def __enter__(self) -> OutputLock:
        import fcntl  # POSIX

        ancestor = next(p for p in (self.folder, *self.folder.parents) if p.exists() or p == Path(p.anchor))
        if ancestor.exists() and not ancestor.is_dir():
            raise InputError(f"{self.key}='{self.folder}' must be a folder, but '{ancestor}' is a file: "
                             f"choose another {self.key}=")
        self._created = [p for p in (self.folder, *self.folder.parents) if p.is_relative_to(ancestor)
                         and p != ancestor]
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._fd = self._acquire(fcntl)
            previous = os.pread(self._fd, 4096, 0).decode(errors="replace")
            info = {"pid": os.getpid(), "host": socket.gethostname(),
                    "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": self.command}
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, (json.dumps(info) + "\n").encode(), 0)
        except BaseException as err:
            self._release()
            if not isinstance(err, OSError):
                raise
            named = err if err.filename else OSError(err.errno, err.strerror, str(self.path))
            message = describe_io_error(named, self.folder)
            if message is None:
                raise
            raise ReportedError(message) from err
        if previous.strip():
            warnings.warn(f"took over the lock '{self.path}' of a run that is no longer running "
                          f"({_describe_holder(previous)})", stacklevel=2)
        return self

    def _acquire(self, fcntl: Any) -> int:
        """Open and flock the lock file; refuse when another run holds it."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _describe_holder(os.pread(fd, 4096, 0).decode(errors="replace"))
                os.close(fd)
                raise InputError(
                    f"{self.key}='{self.folder}' is in use by another run ({holder}; lock file "
                    f"'{self.path}'): wait for it to finish or choose another {self.key}="
                ) from None
            except BaseException:
                os.close(fd)
                raise
            # the holder may have removed the file between our open and flock: then lock the new one
            if os.path.exists(self.path) and os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                return fd
            os.close(fd)

    def __exit__(self, *exc: object) -> None:
        self._release()

    def _release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                self.path.unlink()
            os.close(self._fd)
            self._fd = None
        for folder in self._created:  # innermost first; only folders this run made, only when empty
            with contextlib.suppress(OSError):
                folder.rmdir()
        self._created = []
