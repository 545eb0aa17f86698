"""Finding, waiting for and stopping a service's processes (psutil), and picking free ports.

A service runs in its own process group; its processes are that group plus every descendant
(Ray's workers start process groups of their own under the raylet). psutil's `Process` checks
a pid's start time before it signals, so a pid reused by another program is never hit.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
from pathlib import Path

import psutil


def tool(name: str) -> str:
    """The console script `name` of this interpreter's environment, else from PATH."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"`{name}` not found next to {sys.executable} or on PATH")
    return found


def _running(process: psutil.Process) -> bool:
    # Zombies count as gone: an exited child of a long-lived parent (the pytest process) stays
    # a zombie until reaped, and signalling it would "succeed" forever.
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def group_processes(group: int) -> dict[int, psutil.Process]:
    """Live processes of process group `group` and all their descendants, by pid."""
    members = {}
    for process in psutil.process_iter():
        try:
            if os.getpgid(process.pid) == group and _running(process):
                members[process.pid] = process
        except (ProcessLookupError, psutil.Error):
            continue  # exited meanwhile
    for process in list(members.values()):
        try:
            members.update({child.pid: child for child in process.children(recursive=True) if _running(child)})
        except psutil.Error:
            continue
    return members


def name_of(process: psutil.Process) -> str:
    """The process's command name (`raylet`, `gcs_server`, ...); empty once it has exited."""
    try:
        return process.name()
    except psutil.Error:
        return ""


def command_line(process: psutil.Process) -> str:
    """Its arguments joined by spaces; empty when it has exited or belongs to another user."""
    try:
        return " ".join(process.cmdline())
    except psutil.Error:
        return ""


def still_running(processes: dict[int, psutil.Process], group: int) -> dict[int, psutil.Process]:
    """The processes of `processes` still alive, plus any new member of `group`."""
    alive = {pid: process for pid, process in processes.items() if _running(process)}
    return alive | group_processes(group)


def terminate(processes: list[psutil.Process], timeout_s: float) -> None:
    """SIGTERM, wait up to `timeout_s` for them to exit, then SIGKILL the rest."""
    for process in processes:
        try:
            process.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(processes, timeout=timeout_s)
    alive = [process for process in alive if _running(process)]
    for process in alive:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5.0)


def port_is_free(port: int) -> bool:
    """True if nothing listens on `port` on any local address.

    Binds the wildcard address because Ray's GCS listens on all interfaces; SO_REUSEADDR so a
    port left in TIME_WAIT by a stack that just stopped does not count as busy (the servers
    set it too).
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("", port))
        except OSError:
            return False
    return True


def reserve_port(held: list[socket.socket], pair: bool) -> int:
    """Binds a free port (and, with `pair`, its +1) and keeps the sockets in `held`."""
    for _ in range(100):
        first = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        first.bind(("", 0))
        port = first.getsockname()[1]
        if not pair:
            held.append(first)
            return port
        second = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            second.bind(("", port + 1))
        except (OSError, OverflowError):  # taken, or port was 65535
            first.close()
            second.close()
            continue
        held.extend([first, second])
        return port
    raise RuntimeError("found no free pair of adjacent ports in 100 tries")
