"""Writing files so that a crash never leaves a half-written one behind, and no run takes another's output."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

from .errors import OutputError, UserInputError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it over ``path`` in one step.

    The temporary file is in the same folder, so the rename is atomic: readers see the old file or the
    new one, never a mixture. On any exception the temporary file is removed and ``path`` is untouched.
    Any OS error (a missing or read-only folder, a full disk) becomes an :class:`OutputError` naming ``path``.
    """
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp makes the file private; give it the usual permissions
    except OSError as exc:
        raise write_error(path, exc) from None
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise write_error(path, exc) from None
        raise


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp_path)`` and move the result to ``path`` atomically."""
    with atomic_path(path) as tmp:
        write(tmp)


def umask() -> int:
    """The process's file-creation mask (reading it means setting it, so set it back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def usual_permissions(folder: str | os.PathLike) -> None:
    """Give ``folder`` and everything in it the permissions a new file normally gets (0644/0755 under umask 022).

    Some writers (mkdtemp, safetensors) create files readable by their owner only.
    """
    mask = umask()
    for root, dirs, files in os.walk(folder):
        os.chmod(root, 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~mask)


def write_error(path, exc: OSError) -> OutputError:
    """An OS error while writing ``path``, as one line for the person who chose the path."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    return OutputError(f"cannot write {path}: {reason}; check that its folder exists, is writable and has free space")


# ---------------------------------------------------------------- outputs that must not replace inputs

def same_file(a: Path, b: Path) -> bool:
    """True when ``a`` and ``b`` name one file (or folder), through links and relative paths too."""
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return Path(a).resolve() == Path(b).resolve()


def inside(path: Path, folder: Path) -> bool:
    """True when ``path`` is ``folder`` or lies somewhere under it."""
    path, folder = Path(path).resolve(), Path(folder).resolve()
    return path == folder or folder in path.parents


def check_new_output(path: Path, flag: str, inputs: dict, overwrite: bool) -> None:
    """Refuse an output file that is one of the command's inputs, exists without ``--overwrite``, or cannot be
    written (tried with a scratch file beside it, so a long run never fails only at the end)."""
    path = Path(path)
    for input_flag, source in inputs.items():
        if source is not None and same_file(path, source):
            raise UserInputError(f"{flag} {path}: is the {input_flag} file this command reads; "
                                 f"choose another name for {flag}")
    if path.is_dir():
        raise UserInputError(f"{flag} {path}: is a directory; give a file name")
    if path.exists() and not overwrite:
        raise UserInputError(f"{flag} {path}: already exists; pass --overwrite to replace it "
                             "(only when the command succeeds)")
    if not path.parent.is_dir():
        raise UserInputError(f"{flag} {path}: the folder {path.parent} does not exist; create it first")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=path.parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutputError(f"{flag} {path}: cannot write in the folder {path.parent} "
                          f"({exc.strerror or exc}); choose another folder") from None


# ---------------------------------------------------------------- one run per output

class RunLock:
    """An exclusive claim on one output, held as a lock file beside it (``OUT.lock``) while a run writes it.

    Two runs with the same ``--out`` would share one progress file and replace each other's model; with the
    lock, the second fails at once, naming the first. A lock whose process has died (SIGKILL, a power cut) is
    stale, and the next run takes it over. Use as ``with RunLock(out) as lock: ... lock.acquire() ...``: the
    file is made by :meth:`acquire` and removed when the ``with`` block ends, however it ends.
    """

    def __init__(self, target: str | os.PathLike, flag: str = "--out"):
        self.target = Path(target)
        self.path = self.target.with_name(self.target.name + ".lock")
        self.flag = flag
        self.held = False

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()

    def acquire(self) -> None:
        """Make the lock file, or fail naming the run that holds it."""
        if self.held:
            return
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                "command": " ".join(["gptlib", *sys.argv[1:]]) if sys.argv else "gptlib"}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            except FileExistsError:
                holder = _read_lock(self.path)
                if holder is None or _alive(holder):
                    raise self._busy(holder) from None
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)  # stale: its process is gone
                continue
            except OSError as exc:
                raise self._cannot_create(exc) from None
            with os.fdopen(fd, "w") as f:
                json.dump(info, f)
            self.held = True
            return
        raise self._busy(_read_lock(self.path))

    def release(self) -> None:
        """Remove the lock file, if this process made it."""
        if self.held:
            holder = _read_lock(self.path)
            if holder is not None and holder.get("pid") == os.getpid():
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)
            self.held = False

    def _busy(self, holder: dict | None) -> UserInputError:
        if holder is None:
            who = "another gptlib run (its lock file is being written or is damaged)"
        else:
            where = "" if holder.get("host") == socket.gethostname() else f" on {holder.get('host')}"
            who = (f"another gptlib run (PID {holder.get('pid')}{where}, started {holder.get('started')}: "
                   f"`{holder.get('command')}`)")
        return UserInputError(f"{self.flag} {self.target}: {who} is writing it; wait for it to finish, or choose "
                              f"another {self.flag}. If no such run is going on, delete {self.path}")

    def _cannot_create(self, exc: OSError) -> UserInputError:
        folder = self.target.parent
        if not folder.is_dir():
            return UserInputError(f"{self.flag} {self.target}: the folder {folder} does not exist; create it first")
        return OutputError(f"{self.flag} {self.target}: cannot write in the folder {folder} "
                           f"({exc.strerror or exc}); choose another folder")


def _read_lock(path: Path) -> dict | None:
    try:
        holder = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) and isinstance(holder.get("pid"), int) else None


def _alive(holder: dict) -> bool:
    """Whether the lock's process still runs. On another host we cannot tell, so it counts as running."""
    if holder.get("host") != socket.gethostname():
        return True
    try:
        os.kill(holder["pid"], 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists, under another user
        pass
    return True


def file_sha256(path) -> str:
    """The sha256 of a file's bytes, read in 1 MB blocks."""
    import hashlib
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
