"""One run per output folder: `<folder>/.sftkey.lock`, taken by the launch's main process before anything is
written there and released at exit. The kernel's `flock` on it ends with the process, so a crashed run's lock never
stays stuck; the file names the holder (process id, host, start time) for the refusal line. Where the filesystem
has no `flock`, the holder's record decides: a lock whose process is dead on this host is stale and taken over."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from ..errors import SFTKeyError, first_line
from ..files import created_for, discard

try:
    import fcntl
except ImportError:  # not POSIX: the holder's record decides, as on a filesystem without flock
    fcntl = None

logger = logging.getLogger(__name__)

LOCK = ".sftkey.lock"
BUSY_FIX = "wait for it to end, or use another output_dir"


def _process_start(pid: int) -> str | None:
    """When process `pid` started, in clock ticks since boot (Linux), to tell a reused process id apart."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, started: str | None) -> bool:
    """Whether process `pid` on this host is running and is the one that started at `started` (when known)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: alive
    now = _process_start(pid)
    return started is None or now is None or now == started


def _read(path: Path) -> dict:
    """The holder's record, or {} when the file holds none (an empty file: a release, or a start cut short)."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    valid = isinstance(record, dict) and isinstance(record.get("pid"), int) and not isinstance(record["pid"], bool)
    return record if valid else {}


def _holder(record: dict) -> str:
    if not record.get("pid"):
        return "another run"
    return f"another run (process {record['pid']} on {record.get('host', '?')}, since {record.get('started', '?')})"


class FolderLock:
    """The lock of one folder, held from `acquire` to `release`."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.path = self.folder / LOCK
        self.handle = None

    def acquire(self, fix: str = BUSY_FIX) -> FolderLock:
        """Take the lock, or raise the one-line SFTKeyError naming the holder and `fix`."""
        self.folder.mkdir(parents=True, exist_ok=True)
        while True:  # until the file we lock is the one at the path (a release may remove it meanwhile)
            handle = open(self.path, "a+")
            try:
                if fcntl is None:
                    raise OSError("no flock here")
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                locked_by_kernel = True
            except BlockingIOError:
                record = _read(self.path)
                handle.close()
                raise SFTKeyError(f"{self.folder} is in use by {_holder(record)}: {fix}") from None
            except OSError:  # no flock on this filesystem: the holder's record decides below
                locked_by_kernel = False
            try:
                same = os.fstat(handle.fileno()).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            handle.close()
        record = _read(self.path)
        if record.get("pid") and record.get("pid") != os.getpid():
            here = record.get("host") == socket.gethostname()
            if not locked_by_kernel and not (here and not _alive(record["pid"], record.get("proc_start"))):
                handle.close()
                other = "" if here else f"; if that run has ended, delete {self.path}"
                raise SFTKeyError(f"{self.folder} is in use by {_holder(record)}: {fix}{other}")
            pid, host = record["pid"], record.get("host", "?")
            logger.warning(
                "%s: taking over the lock of process %s on %s, which ended without it", self.folder, pid, host
            )
        elif record.get("pid") == os.getpid() and not locked_by_kernel:
            handle.close()
            raise SFTKeyError(f"{self.folder} is in use by this process already: {fix}")
        mine = {
            "kind": "lock", "pid": os.getpid(), "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "proc_start": _process_start(os.getpid()),
            "command": sys.argv[:8],
        }  # fmt: skip
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps(mine) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
        self.handle = handle
        return self

    def release(self) -> None:
        """Remove the lock file (while still holding it: a waiting run then finds the path gone and retries)."""
        if self.handle is None:
            return
        with contextlib.suppress(SFTKeyError, OSError):
            discard(self.path, kinds=["lock"])
        self.handle.close()
        self.handle = None


@contextlib.contextmanager
def holding(
    folder: str | Path, state=None, fix: str = "wait for it to end, or use another output_dir"
) -> Iterator[None]:
    """Hold `folder`'s lock for the block: the launch's main process takes it (`state`: accelerate's; None: read
    from the launch's environment) and every rank learns the outcome, so a refused launch ends on every rank with
    the same line and no rank is refused by its own launch's lock."""
    from ..train.distributed import is_main_process

    main = state.is_main_process if state is not None else is_main_process()
    problem = None
    with contextlib.ExitStack() as held:
        if main:
            try:
                held.enter_context(created_for(folder))  # a refused or failed start leaves no empty folder
                held.callback(FolderLock(folder).acquire(fix).release)
            except SFTKeyError as error:
                problem = str(error)
            except OSError as error:
                problem = f"could not lock {folder} ({first_line(error)}); check that the folder is writable"
        if state is not None and state.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            problem = broadcast_object_list([problem])[0]
        if problem:
            raise SFTKeyError(problem)
        yield
