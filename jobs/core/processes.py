"""Process plumbing in one place: free ports, pid liveness, process-group stop, atomic JSON state files, a CLI's
exit."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import json
import logging
import os
import random
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil

log = logging.getLogger(__name__)


# The longest path an AF_UNIX address holds on Linux (sun_path is 108 bytes, one of them the terminating NUL).
UNIX_PATH_MAX = 107


@contextlib.contextmanager
def unix_address(path: Path) -> Iterator[str]:
    """An address that names path for a Unix socket's bind or connect: the path itself, or, where it is longer than an
    address holds (a deep EMBEDDECK_HOME), the same file through a descriptor of its folder, open for the block."""
    if len(os.fsencode(str(path))) <= UNIX_PATH_MAX:
        yield str(path)
        return
    folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{folder}/{path.name}"
    finally:
        os.close(folder)


# Where free_port looks: from here up to the kernel's ephemeral range.
FREE_PORT_FLOOR = 20000


def free_port() -> int:
    """A port free on loopback now, from below the kernel's ephemeral range: one from inside it (a bind to port 0)
    could be taken by any connection's or bind(0)'s port before the server it was chosen for bound it (a test's
    Spark master lost its web UI port so, to the other test worker's processes)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            ephemeral = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):  # not Linux
        ephemeral = FREE_PORT_FLOOR
    for port in ports_below(ephemeral):
        if not port_taken(port):
            return port
    with socket.socket() as s:  # a machine that leaves no room below its ephemeral range
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ports_below(ephemeral: int, n: int = 64) -> list[int]:
    """Up to n ports at random from FREE_PORT_FLOOR up to the ephemeral range's first, none where that is lower (a
    range tuned to start at 1024). From the OS, not a seedable generator: two choosers at once take different ports."""
    span = range(FREE_PORT_FLOOR, max(FREE_PORT_FLOOR, ephemeral))
    return random.SystemRandom().sample(span, min(n, len(span)))


def port_taken(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something already listens on the port, so that a server could not bind it now. Bound as servers bind
    (SO_REUSEADDR: a port whose last connections wait in TIME_WAIT is free); any other error is the server's to
    report."""
    try:
        with socket.create_server((host, port)):
            return False
    except OSError as exc:
        return exc.errno == errno.EADDRINUSE


def process_identity(pid: int) -> str | None:
    """What tells the process apart from every other that ever had its pid, or None where there is no such process:
    the boot it runs in and the clock tick it started at since that boot. Neither moves with the wall clock, where
    psutil's create_time adds /proc/stat's btime, whole seconds the wall clock moves: a 0.3 s step of the clock made
    every running daemon and driver look gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # Field 22, starttime; the fields before it are counted from the end of the name, which may itself hold ") ".
    ticks = int(stat[stat.rindex(b")") + 2:].split()[19])
    return f"{_boot_id()}:{ticks}"


@functools.cache
def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:  # a sandbox that hides it: the start tick alone still tells pids apart within a boot
        return ""


def started_at(pid: int | None = None) -> float:
    """When the process (this one by default) started, in epoch seconds to the clock tick. psutil's create_time
    counts from the boot time in /proc/stat, whole seconds, so it reads up to 1 s early (0.96 s on one VM here):
    fine to tell processes apart, wrong for a start-up's stages."""
    created = psutil.Process(pid).create_time()
    try:
        with open("/proc/uptime") as f:
            booted = time.time() - float(f.read().split()[0])
    except OSError:  # not Linux: psutil's own figure
        return created
    return booted + (created - psutil.boot_time())


def is_alive(pid: int | None, started: str | float | None = None) -> bool:
    """Whether pid runs, not a zombie, and is the process that `started` names when given: its process_identity, or
    the psutil create_time an older EmbedDeck recorded (within 1.5 s: a step of the clock moves that by a second)."""
    if pid is None:
        return False
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        if isinstance(started, str):
            return process_identity(pid) == started
        return started is None or abs(proc.create_time() - started) < 1.5
    except psutil.Error:
        return False


def _group_members(pgid: int) -> list[psutil.Process]:
    """The processes of a process group now."""
    members = []
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == pgid:
                members.append(proc)
        except (ProcessLookupError, PermissionError):
            pass
    return members


def stop_group(pgid: int, pid: int | None = None, grace_s: float = 10.0) -> None:
    """SIGTERM a process group, wait up to grace_s for its leader (or pid), then SIGKILL what is left of the
    group and return once it has exited: a Spark worker that is shutting down still launches the executors its
    master asks for, and those would outlive it, serving tasks on a worker that no longer exists."""
    stop_groups({pgid: pid or pgid}, grace_s)


def stop_groups(leaders: dict[int, int], grace_s: float = 10.0) -> None:
    """stop_group for several groups ({pgid: leader pid}) at once: all get SIGTERM together, so they stop in the
    time of the slowest, not the sum (a Spark daemon takes about 2 s to exit: a master and two workers took 5.7 s
    one after another, 1.9 s together)."""
    for pgid in leaders:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for pid in leaders.values():
        with contextlib.suppress(psutil.Error):
            psutil.Process(pid).wait(max(0.0, deadline - time.monotonic()))
    left = [proc for pgid in leaders for proc in _group_members(pgid)]
    for pgid in leaders:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
    # SIGKILL lands when the victim next runs, and a busy machine may not run it at once: return when every
    # member has exited. Ours are reaped here; one whose parent died with it stays a zombie until init reaps
    # it, and a zombie runs nothing.
    deadline = time.monotonic() + 5
    for proc in left:
        while True:
            try:
                if proc.status() == psutil.STATUS_ZOMBIE:
                    with contextlib.suppress(psutil.Error):
                        proc.wait(0)
                    break
            except psutil.Error:
                break
            if time.monotonic() > deadline:
                log.warning("process %d of a stopped group still runs after SIGKILL", proc.pid)
                break
            time.sleep(0.01)


@contextlib.contextmanager
def exclusive(lock_path: Path, wait: bool = True) -> Iterator[bool]:
    """Hold the lock file's exclusive lock, across processes; released when the block ends or its process dies.
    With wait=False the block runs at once, told False (and holding nothing) where another process holds it."""
    with open(lock_path, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True


def write_json(path: Path, data: object) -> None:
    """Replace path's contents at once, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, default=str))
    os.replace(tmp, path)


def write_private(path: Path, text: str, new: bool = False) -> None:
    """Write a secret to a file only its owner can read, created so from the start (never briefly 0644); with new,
    only a file that does not exist yet (FileExistsError)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | (os.O_EXCL if new else os.O_TRUNC), 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)


def read_json(path: Path) -> object | None:
    """A JSON state file's contents, or None when it is missing or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# What a shell reports for a process that SIGPIPE ended (128 + 13), as `yes | head -1` shows.
EXIT_CLOSED_STDOUT = 141
# And for one that Ctrl-C ended (128 + SIGINT).
EXIT_INTERRUPTED = 130


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextlib.contextmanager
def stops_deferred() -> Iterator[None]:
    """Act on Ctrl-C, SIGTERM and SIGHUP only once the block ends: one that lands between a child's start and the
    line that records it would leave the child unknown to the cleanup. Outside the main thread, which alone takes
    signals in Python, a plain block."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, _frame: caught.append(signum)) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for signum in caught:
            signal.raise_signal(signum)  # its handler runs here, at once


def exit_on_stop_signals(status: int | None = None) -> None:
    """Make SIGTERM (a service manager, `timeout`) and SIGHUP (a closed terminal) end this process as
    SystemExit(status, else 128 + N): by default they ended it at once, and nothing it had started was cleaned up."""

    def stop(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum if status is None else status)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, stop)


def exit_with(main: Callable[[], int]) -> None:
    """Exit with main's status; where its reader closed stdout first (`| head`, `| grep -q`), quietly with 141
    rather than a BrokenPipeError traceback; on Ctrl-C, SIGTERM or SIGHUP, with 128 + N once its cleanup ran,
    rather than a KeyboardInterrupt traceback or no cleanup at all."""
    exit_on_stop_signals()
    try:
        code = main()
        sys.stdout.flush()  # inside the try: an exit's own flush into a closed pipe prints "Exception ignored"
    except BrokenPipeError:
        # Python's own advice: point stdout at /dev/null, so that the interpreter's last flush raises nothing.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = EXIT_CLOSED_STDOUT
    except KeyboardInterrupt:
        code = EXIT_INTERRUPTED
    sys.exit(code)
