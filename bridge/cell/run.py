"""Entry points that own the event loop: ``serve`` and ``call``."""
from __future__ import annotations

import asyncio
import logging
import sys

from bridge.cell.cell import Cell, install_signal_handlers
from bridge.core.config import Config
from bridge.api.http import make_app, make_ops_app, start_http
from bridge.core.logs import event
from ai.client import EngineLoadError
from sip.engine import EngineError

log = logging.getLogger("trunkline")


async def run_serve(cfg: Config) -> int:
    cell = Cell(cfg)
    try:
        await cell.start()
    except EngineLoadError as exc:
        print(f"trunkline: cannot load models: {exc}", file=sys.stderr)
        return 2
    except EngineError as exc:
        print(f"trunkline: cannot start SIP: {exc}", file=sys.stderr)
        return 1
    ops = cfg.raw["http"]["ops_listen"]
    runners = []
    try:
        runners.append(await start_http(make_app(cell, with_ops=not ops), cfg.raw["http"]["listen"]))
        if ops:
            runners.append(await start_http(make_ops_app(cell), ops))
    except OSError as exc:
        print(f"trunkline: cannot listen on http: {exc.strerror}", file=sys.stderr)
        for r in runners:
            await r.cleanup()
        await cell.stop()
        return 1
    event(log, "cell_ready", sip=cfg.raw["sip"]["listen"], http=cfg.raw["http"]["listen"], app=cfg.app,
          capacity=cfg.raw["sip"]["capacity"], fast_frame_copy=cell.engine.fast_copy)
    stop = asyncio.Event()
    install_signal_handlers(stop)
    waiters = [asyncio.create_task(stop.wait()), asyncio.create_task(cell.stopped.wait())]
    await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    for w in waiters:
        w.cancel()
    if cell.engine_failed is None:
        # A second signal during the drain cuts it short.
        stop.clear()
        drain = asyncio.create_task(cell.drain())
        second = asyncio.create_task(stop.wait())
        await asyncio.wait([drain, second], return_when=asyncio.FIRST_COMPLETED)
        drain.cancel()
        second.cancel()
    for r in runners:
        await r.cleanup()
    await cell.stop()
    event(log, "cell_stopped", error=cell.engine_failed)
    return 1 if cell.engine_failed else 0


async def run_call(cfg: Config, uri: str, trunk: str | None, duration: float) -> int:
    cell = Cell(cfg)
    try:
        await cell.start()
    except EngineError as exc:
        print(f"trunkline: cannot start SIP: {exc}", file=sys.stderr)
        return 1
    stop = asyncio.Event()
    install_signal_handlers(stop)
    code = 1
    try:
        call_id = await cell.make_call(uri, trunk)
        deadline = asyncio.get_running_loop().time() + duration
        while not cell.ended and not stop.is_set() and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        if not cell.ended:
            s = cell.sessions.get(call_id)
            if s:
                s.hangup("duration reached")
            for _ in range(100):
                if cell.ended:
                    break
                await asyncio.sleep(0.05)
        code = 0 if cell.ended and cell.ended[0].answered else 1
    except Exception as exc:  # noqa: BLE001
        print(f"trunkline: call failed: {exc}", file=sys.stderr)
    finally:
        await cell.stop()
    return code
