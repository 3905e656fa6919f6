"""Cells forked from one pre-imported process, so a box's cells share their imported code.

A cell started with ``python -m bridge.cli serve`` spends ~40 MB of private memory on what
it imports (aiohttp, numpy, prometheus, pjsua2's module, our own modules) before it takes a
call. The supervisor has all of that imported already (``bridge.cli`` imports the cell before
it makes the supervisor), so at start, while it still has one thread, it forks a *zygote*: a
process that only waits for "start a cell" requests and forks each cell from itself. A forked
cell shares the zygote's pages copy-on-write (``gc.freeze`` keeps the collector from dirtying
them), and initialises pjsua2 only after the fork, like any cell. It then runs exactly what
``python -m bridge.cli`` would run, with the cell's arguments, environment and log file.

The supervisor sees each cell through ``ForkedCell`` (what it uses of ``subprocess.Popen``:
``pid``, ``poll``, ``wait``, ``send_signal``, ``terminate``, ``kill``, ``returncode``); the
zygote reaps its children and reports their exit statuses. The zygote dies with the supervisor
and the cells with the zygote (``PR_SET_PDEATHSIG``, SIGTERM: they drain and stop).

Note: a forked cell's ``/proc/<pid>/cmdline`` and ``environ`` are the supervisor's; its pid is
in ``GET /v1/cells``, its parent is the zygote (the supervisor's child) and its name
(``/proc/<pid>/comm``, what ``ps -o comm`` and ``top`` show) is ``tl-cellN``.
"""
from __future__ import annotations

import ctypes
import gc
import json
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time

log = logging.getLogger("trunkline.supervisor")

PR_SET_PDEATHSIG = 1
PR_SET_NAME = 15


def _prctl(option: int, arg) -> None:
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(option, arg)
    except OSError:
        pass


def _die_with_parent() -> None:
    _prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class ForkedCell:
    """A cell forked by the zygote, seen through the part of ``subprocess.Popen`` the supervisor uses."""

    def __init__(self, zygote: "Zygote", pid: int):
        self._zygote = zygote
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self._zygote.collect()
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(f"cell {self.pid}", timeout)
            time.sleep(0.05)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:              # not reported dead: the zygote has not reaped the pid
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class Zygote:
    """The supervisor's end: ``spawn`` a cell, ``collect`` exit statuses, ``close``."""

    def __init__(self, pid: int, requests: int, replies: int):
        self.pid = pid
        self._req = requests
        self._rep = replies
        self._buf = b""
        self._cells: dict[int, ForkedCell] = {}
        self._exited: dict[int, int] = {}         # exits read before their spawn() returned
        self._pending: list[dict] = []

    @classmethod
    def start(cls) -> "Zygote | None":
        """Fork the zygote now, or ``None`` (cells are then started with exec) if this process has
        threads: a fork copies only the calling thread, and locks held by the others."""
        if threading.active_count() != 1:
            log.info("cells start with exec: the supervisor already runs %d threads", threading.active_count())
            return None
        req_r, req_w = os.pipe()
        rep_r, rep_w = os.pipe()
        for f in (sys.stdout, sys.stderr):
            f.flush()
        try:
            pid = os.fork()
        except OSError as exc:
            log.warning("cells start with exec: cannot fork the zygote (%s)", exc)
            for fd in (req_r, req_w, rep_r, rep_w):
                os.close(fd)
            return None
        if pid == 0:                                     # the zygote
            code = 1
            try:
                os.close(req_w)
                os.close(rep_r)
                code = _serve(req_r, rep_w)
            finally:
                os._exit(code)
        os.close(req_r)
        os.close(rep_w)
        os.set_blocking(rep_r, False)
        return cls(pid, req_w, rep_r)

    def alive(self) -> bool:
        try:
            return os.waitpid(self.pid, os.WNOHANG) == (0, 0)
        except ChildProcessError:
            return False

    def _read(self, timeout: float) -> None:
        r, _, _ = select.select([self._rep], [], [], timeout)
        if not r:
            return
        try:
            data = os.read(self._rep, 65536)
        except BlockingIOError:
            return
        if not data:
            raise OSError("the zygote is gone")
        self._buf += data
        while b"\n" in self._buf:
            line, self._buf = self._buf.split(b"\n", 1)
            msg = json.loads(line)
            if "exit" in msg:
                cell = self._cells.pop(msg["exit"], None)
                if cell is not None:
                    cell.returncode = msg["code"]
                else:
                    self._exited[msg["exit"]] = msg["code"]
            else:
                self._pending.append(msg)

    def collect(self) -> None:
        """Read what the zygote reported (exits) without waiting."""
        try:
            self._read(0)
        except OSError:                      # the zygote died: its cells died with it
            for cell in self._cells.values():
                cell.returncode = -signal.SIGTERM
            self._cells.clear()

    def spawn(self, argv: list[str], env: dict, log_path: str, cwd: str, timeout: float = 10.0) -> ForkedCell:
        """Start ``python -m bridge.cli *argv`` as a fork of the zygote; raises OSError if it cannot."""
        os.write(self._req, json.dumps({"argv": argv, "env": env, "log": log_path, "cwd": cwd}).encode() + b"\n")
        deadline = time.monotonic() + timeout
        while not self._pending:
            left = deadline - time.monotonic()
            if left <= 0:
                raise OSError("the zygote did not answer")
            self._read(left)
        msg = self._pending.pop(0)
        if "error" in msg:
            raise OSError(msg["error"])
        cell = ForkedCell(self, msg["pid"])
        cell.returncode = self._exited.pop(cell.pid, None)
        if cell.returncode is None:
            self._cells[cell.pid] = cell
        return cell

    def close(self) -> None:
        """No more cells: the zygote exits (cells still running get SIGTERM from their parent's death)."""
        try:
            os.close(self._req)
        except OSError:
            pass
        deadline = time.monotonic() + 5
        while self.alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.alive():
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        os.close(self._rep)


# -- the zygote process ---------------------------------------------------------------------------
def _serve(req: int, rep: int) -> int:
    """Wait for requests (and SIGCHLD); fork a cell per request; report each child's exit."""
    _die_with_parent()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)      # a Python handler, so the wakeup fd is written
    gc.collect()
    gc.freeze()                                         # what is imported stays shared with the cells
    buf = b""
    while True:
        try:
            r, _, _ = select.select([req, wake_r], [], [])
        except InterruptedError:
            r = []
        if wake_r in r:
            try:
                os.read(wake_r, 4096)
            except BlockingIOError:
                pass
        _reap(rep)
        if req in r:
            data = os.read(req, 65536)
            if not data:
                return 0
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                try:
                    pid = _fork_cell(json.loads(line), (req, rep, wake_r, wake_w))
                    _send(rep, {"pid": pid})
                except Exception as exc:  # noqa: BLE001 - tell the supervisor, keep serving
                    _send(rep, {"error": f"{type(exc).__name__}: {exc}"})


def _send(fd: int, msg: dict) -> None:
    os.write(fd, json.dumps(msg).encode() + b"\n")


def _reap(rep: int) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        _send(rep, {"exit": pid, "code": os.waitstatus_to_exitcode(status)})


def _fork_cell(spec: dict, inherited: tuple[int, ...]) -> int:
    log_fd = os.open(spec["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    pid = os.fork()
    if pid:
        os.close(log_fd)
        return pid
    code = 1
    try:                                                # the cell
        _die_with_parent()
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        for fd in inherited:
            os.close(fd)
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        os.close(log_fd)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        _blank_inherited(null)
        os.close(null)
        os.chdir(spec["cwd"])
        os.environ.clear()
        os.environ.update(spec["env"])
        _prctl(PR_SET_NAME, f"tl-cell{spec['env'].get('TRUNKLINE_CELL', '')}"[:15].encode())
        code = _run_cell(spec["argv"])
    except BaseException:  # noqa: BLE001
        import traceback
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _blank_inherited(null: int) -> None:
    """Point every descriptor the cell inherited beyond 0-2 (the supervisor's event loop: its epoll
    and self-pipe, anything else it had open when it forked the zygote) at /dev/null. A cell gets no
    handle on the supervisor's resources; the numbers stay taken, so an inherited Python object that
    still names one (never used in the cell) cannot close a descriptor the cell opens later."""
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd <= 2 or fd == null:
            continue
        try:
            os.fstat(fd)
        except OSError:                       # the listing's own descriptor, closed by now
            continue
        os.dup2(null, fd)


def _run_cell(argv: list[str]) -> int:
    """``python -m bridge.cli *argv``, in this (forked) process: the module runs afresh as
    ``__main__``; everything it imports is already loaded, and shared with the zygote."""
    import runpy
    sys.argv = ["bridge.cli", *argv]
    try:
        runpy.run_module("bridge.cli", run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            return exc.code or 0
        print(exc.code, file=sys.stderr)
        return 1
    return 0
