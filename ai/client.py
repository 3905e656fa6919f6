"""The cell's side of the inference process.

``InferenceClient`` starts ``python -m ai.worker`` (a fresh interpreter: nothing
of pjsua2 is inherited) and owns the two ends of the
hand-off: a writer thread drains a queue into the Pipe (so the event loop
never blocks on a full pipe) and a reader thread delivers every message from
the worker to ``on_message`` (which the bridge turns into a loop callback).
When the worker dies, ``on_message(Died(exitcode))`` is delivered once. The
messages are the dataclasses of ``ai/messages.py``.
"""
from __future__ import annotations

import json
import os
import queue
import socket
import subprocess
import sys
import threading
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Callable

from ai import messages as m

ROOT = str(Path(__file__).resolve().parent.parent)


class EngineLoadError(RuntimeError):
    pass


class InferenceClient:
    def __init__(self, cfg: dict, on_message: Callable[[m.FromWorker], None]):
        self.cfg = cfg
        self.on_message = on_message
        self._out: queue.Queue = queue.Queue(maxsize=1000)
        self.proc = None
        self.conn = None
        self.info: dict = {}
        self._rid = 0
        self._stopping = False

    def next_id(self) -> int:
        self._rid += 1
        return self._rid

    def start(self, timeout: float = 120.0) -> dict:
        """Start ``python -m ai.worker`` on one end of a socket pair; wait for its models."""
        a, b = socket.socketpair()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
        self.proc = subprocess.Popen([sys.executable, "-m", "ai.worker", str(b.fileno()), json.dumps(self.cfg)],
                                     pass_fds=(b.fileno(),), env=env)
        b.close()
        self.conn = Connection(a.detach())
        if not self.conn.poll(timeout):
            self.proc.kill()
            raise EngineLoadError(f"models did not load within {timeout:.0f} s")
        try:
            msg = self.conn.recv()
        except EOFError:
            code = self.proc.wait(5)
            raise EngineLoadError(f"inference process exited while loading models (exit code {code})") from None
        if isinstance(msg, m.Fatal):
            self.proc.wait(5)
            raise EngineLoadError(msg.message)
        if not isinstance(msg, m.Ready):
            self.proc.kill()
            raise EngineLoadError(f"unexpected first message from the inference process: {type(msg).__name__}")
        self.info = msg.info
        threading.Thread(target=self._reader, name="ai-reader", daemon=True).start()
        threading.Thread(target=self._writer, name="ai-writer", daemon=True).start()
        return self.info

    def send(self, msg: m.ToWorker) -> None:
        try:
            self._out.put_nowait(msg)
        except queue.Full:
            raise RuntimeError("inference queue full") from None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _writer(self) -> None:
        while True:
            msg = self._out.get()
            if msg is None:
                return
            try:
                self.conn.send(msg)
            except (OSError, ValueError, BrokenPipeError):
                return

    def _reader(self) -> None:
        while True:
            try:
                msg = self.conn.recv()
            except (EOFError, OSError):
                break
            self.on_message(msg)
        try:
            code = self.proc.wait(2)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait(2)
        if not self._stopping:
            self.on_message(m.Died(code))

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping = True
        if self.proc is None:
            return
        try:
            self._out.put_nowait(m.Stop())
            self._out.put_nowait(None)
        except queue.Full:
            pass
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(2)
