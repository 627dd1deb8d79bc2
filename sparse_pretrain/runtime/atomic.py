"""Files that are either complete or absent: write to a temporary name beside the target, then
rename over it (``os.replace`` is atomic within a filesystem).

For builds that take long (``prepare-data``): temporary directories named by their owner process,
so the next run removes what a killed one left (:func:`owned_temp_dir`,
:func:`remove_stale_temp_dirs`), and SIGTERM turned into an exception so ``finally`` cleans up
(:func:`sigterm_raises`)."""
from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
from pathlib import Path
from typing import Iterator, Optional


@contextlib.contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it becomes ``path``, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)                     # mkstemp makes 0600 files
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def replacing_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary directory next to ``path``; on success it replaces ``path`` (an old directory
    there is moved aside first, then removed), on error it is removed and ``path`` is untouched."""
    import shutil
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)                     # mkdtemp makes 0700 directories
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_text(path: str | Path, text: str) -> None:
    with replacing(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def torch_save(obj, path: str | Path) -> None:
    import torch
    with replacing(path) as tmp:
        torch.save(obj, tmp)


# -- temporary directories a killed run leaves behind ---------------------------------------------
# A directory built under a temporary name survives SIGKILL (and a node that dies), which no handler
# can catch. Its name therefore says who builds it (PID, the PID's start time, host), so a later run
# can tell a dead owner's leftover from a live run's work and remove only the former; an owner on
# another host cannot be asked and its directory is kept.

_OWNED = re.compile(r"^\.(?P<target>.+)\.(?P<pid>\d+)-(?P<start>\d*)@(?P<host>[A-Za-z0-9-]+)\.[a-z0-9_]+$")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname()) or "localhost"


def _process_start(pid: int) -> str:
    """The process's start time in clock ticks since boot (``/proc/PID/stat``), so a PID reused by a
    later process is not taken for the owner; "" where there is no ``/proc``."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[19]        # field 22; the command name may hold spaces


def _process_alive(pid: int, start: str) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:                          # someone else's process: alive
        pass
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return True                                  # no /proc: the PID exists, take it as the owner
    if fields[0] == "Z":                             # killed, not yet reaped by its parent
        return False
    return not start or fields[19] == start


@dataclasses.dataclass(frozen=True)
class OwnedTempDir:
    """A directory made by :func:`owned_temp_dir`, read back from its name."""
    path: Path
    target: str          # the name of the directory it is built for
    pid: int
    host: str
    start: str

    def owner_alive(self) -> Optional[bool]:
        """Whether the process that made it still runs; None when it ran on another host."""
        if self.host != _host():
            return None
        return _process_alive(self.pid, self.start)


def owned_temp_dir(path: str | Path) -> Path:
    """A new empty directory beside ``path``, named ``.<name>.<pid>-<start>@<host>.<random>``."""
    path = Path(path)
    pid = os.getpid()
    return Path(tempfile.mkdtemp(prefix=f".{path.name}.{pid}-{_process_start(pid)}@{_host()}.",
                                 dir=path.parent))


def owned_temp_dirs(parent: str | Path) -> list[OwnedTempDir]:
    """Every directory in ``parent`` that :func:`owned_temp_dir` made."""
    found = []
    try:
        entries = sorted(os.scandir(parent), key=lambda e: e.name)
    except FileNotFoundError:
        return []
    for entry in entries:
        m = _OWNED.match(entry.name)
        if m and entry.is_dir(follow_symlinks=False):
            found.append(OwnedTempDir(Path(entry.path), m["target"], int(m["pid"]), m["host"], m["start"]))
    return found


def remove_stale_temp_dirs(parent: str | Path) -> list[Path]:
    """Remove the directories in ``parent`` whose owner process on this host is gone; returns them."""
    removed = []
    for owned in owned_temp_dirs(parent):
        if owned.owner_alive() is False:
            remove_tree(owned.path)
            removed.append(owned.path)
    return removed


# -- SIGTERM as an exception ---------------------------------------------------------------------
# Python turns SIGINT into KeyboardInterrupt, so ``finally`` blocks clean up after Ctrl-C; SIGTERM
# (what ``kill``, ``scancel`` and a SLURM time limit send) kills the process outright and leaves
# temporary output behind. Inside ``sigterm_raises()`` it raises ``Terminated`` instead; on the way out
# the previous handler is put back and the signal handed to it, so by default the process still dies
# of SIGTERM (its exit status says so) after the cleanup.

class Terminated(BaseException):
    """SIGTERM arrived (a BaseException, as KeyboardInterrupt is: ``except Exception`` lets it pass)."""


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """Within: SIGTERM raises :class:`Terminated` in this process, once (a second SIGTERM during the
    cleanup is held back); processes forked meanwhile (``datasets``' ``num_proc`` workers) die of it
    as they would have, their parent cleans up. After: the previous handler is back and receives the
    signal. A no-op outside the main thread or where SIGTERM is ignored."""
    try:
        previous = signal.getsignal(signal.SIGTERM)
        usable = previous not in (signal.SIG_IGN, None)
        if usable:
            owner, fired = os.getpid(), []

            def handler(signum, frame):
                if os.getpid() != owner:              # a forked child: the default action
                    signal.signal(signum, signal.SIG_DFL)
                    os.kill(os.getpid(), signum)
                    return
                if not fired:
                    fired.append(signum)
                    raise Terminated(f"terminated by signal {signum}")

            signal.signal(signal.SIGTERM, handler)
    except ValueError:                                # not the main thread: signals cannot be handled here
        usable = False
    if not usable:
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        if fired:
            for stream in (sys.stdout, sys.stderr):  # what was printed, before the process ends
                with contextlib.suppress(Exception):
                    stream.flush()
            signal.raise_signal(signal.SIGTERM)      # the default action ends the process here


def remove_tree(path: str | Path) -> None:
    """``shutil.rmtree`` that finishes even when :class:`Terminated` interrupts it (cleanup first;
    the signal is handed on when ``sigterm_raises`` exits)."""
    while True:
        try:
            shutil.rmtree(path, ignore_errors=True)
            return
        except Terminated:
            continue
