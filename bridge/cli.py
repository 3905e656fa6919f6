"""The ``trunkline`` command."""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys

from bridge import __version__
from bridge.core.config import ConfigError, load

log = logging.getLogger("trunkline")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="TOML config file")
    p.add_argument("--data-dir", metavar="DIR", help="where the bridge writes everything (default ./data)")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="trunkline", description="SIP/RTP media bridge with a local voice agent")
    ap.add_argument("--version", action="version", version=f"trunkline {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run a cell that answers SIP calls")
    _common(s)
    s.add_argument("--sip", metavar="HOST:PORT", help="SIP listen address, UDP and TCP")
    s.add_argument("--http", metavar="HOST:PORT", help="health/metrics listen address")
    s.add_argument("--app", choices=["echo", "playback", "agent", "api"])
    s.add_argument("--prompt", metavar="WAV", help="prompt for the playback app")
    s.add_argument("--rtp-ports", metavar="LOW-HIGH")
    s.add_argument("--cells", type=int, default=1, metavar="N",
                   help="run N cells (3 calls each) behind a Kamailio front on the --sip address")

    c = sub.add_parser("call", help="place one outbound call through a trunk and run the app on it")
    _common(c)
    c.add_argument("uri", help="sip:user@host[:port], or a number when --trunk has an address")
    c.add_argument("--trunk", help="trunk name from the config")
    c.add_argument("--sip", metavar="HOST:PORT", help="local SIP address (default 0.0.0.0:5070)")
    c.add_argument("--app", choices=["echo", "playback"])
    c.add_argument("--prompt", metavar="WAV")
    c.add_argument("--rtp-ports", metavar="LOW-HIGH")
    c.add_argument("--duration", type=float, default=30.0, help="hang up after this many seconds")

    ch = sub.add_parser("chat", help="talk to the configured agent over text (same model, prompt and tools)")
    _common(ch)
    ch.add_argument("--caller", default="", metavar="NUMBER",
                    help="the caller's number tools see as call.from (e.g. +15551230001)")

    k = sub.add_parser("check-config", help="validate the configuration and print it")
    _common(k)

    keys = sub.add_parser("keys", help="manage API keys (stored hashed in DATA_DIR/trunkline.db)")
    ks = keys.add_subparsers(dest="keys_command", required=True)
    kc = ks.add_parser("create", help="create a key and print it once")
    _common(kc)
    kc.add_argument("--scope", choices=["read", "control", "recordings", "audit"], required=True,
                    help="read: GET only; control: read + change calls; recordings: read + download/delete "
                         "recordings audio (control does not include it); audit: read + the access audit")
    kc.add_argument("--name", required=True)
    kl = ks.add_parser("list", help="list keys (never the secrets)")
    _common(kl)
    kr = ks.add_parser("revoke", help="revoke a key by id")
    _common(kr)
    kr.add_argument("key_id")

    er = sub.add_parser("erase", help="erase everything held about one caller (calls, transcripts, events, "
                                      "recordings, journal lines; their key is destroyed)")
    _common(er)
    er.add_argument("--caller", required=True, metavar="NUMBER", help="the caller's number or SIP URI")
    return ap


def _erase(cfg, args) -> int:
    import json as _json
    from bridge.records.lifecycle import erase_caller
    from bridge.records.store import Store
    store = Store(cfg.data_dir)
    try:
        row = erase_caller(store, cfg.data_dir, args.caller, "cli")
    finally:
        store.close()
    print(_json.dumps({k: row[k] for k in ("id", "at", "by", "caller_hash", "counts")}))
    return 0


def _keys(cfg, args) -> int:
    from bridge.records.store import Store
    store = Store(cfg.data_dir)
    try:
        if args.keys_command == "create":
            kid, secret = store.create_key(args.name, args.scope)
            print(secret)
            print(f"created {kid} ({args.scope}, {args.name!r}); the key is shown only now", file=sys.stderr)
        elif args.keys_command == "list":
            import time as _t
            for k in store.list_keys():
                state = "revoked" if k["revoked"] else "active"
                created = _t.strftime("%Y-%m-%d %H:%M", _t.gmtime(k["created"]))
                print(f"{k['id']}\t{k['scope']}\t{state}\t{created}\t{k['name']}")
        elif args.keys_command == "revoke":
            if not store.revoke_key(args.key_id):
                print(f"trunkline: no active key {args.key_id}", file=sys.stderr)
                return 1
            print(f"revoked {args.key_id}")
    finally:
        store.close()
    return 0


def _masked_trunk_passwords(raw: dict) -> dict:
    """``check-config`` output: trunk passwords shown as ``********`` (set) or ``""`` (not set)."""
    out = dict(raw)
    out["trunks"] = [{**t, "password": "********" if t.get("password") else ""} if "password" in t else t
                     for t in raw.get("trunks", []) if isinstance(t, dict)]
    return out


def _overrides(args) -> dict:
    return {
        "sip.listen": getattr(args, "sip", None), "http.listen": getattr(args, "http", None),
        "app.name": getattr(args, "app", None), "app.prompt": getattr(args, "prompt", None),
        "media.rtp_ports": getattr(args, "rtp_ports", None), "data_dir": getattr(args, "data_dir", None),
    }


def main(argv: list[str] | None = None) -> int:
    from bridge.core.perms import secure_umask, tighten
    secure_umask()                   # files 0600, directories 0700: secrets and transcripts live here
    args = _parser().parse_args(argv)
    try:
        overrides = _overrides(args)
        if args.command == "call" and overrides["sip.listen"] is None:
            overrides["sip.listen"] = "0.0.0.0:5070"
        cfg = load(args.config, overrides)
    except ConfigError as exc:
        print(f"trunkline: config error: {exc}", file=sys.stderr)
        return 2
    from bridge.core import logs
    logs.setup(cfg.raw["log_level"], words=cfg.raw["records"]["log_words"])
    if args.command != "check-config":
        for d in {cfg.data_dir, cfg.raw["recordings"]["dir"]} - {""}:
            tighten(d)               # a data dir left group/world-readable by an older version
    if args.command == "keys":
        return _keys(cfg, args)
    if args.command == "erase":
        return _erase(cfg, args)
    if args.command == "check-config":
        import json
        print(json.dumps(_masked_trunk_passwords(cfg.raw), indent=2))
        return 0
    if args.command == "chat":
        from ai.client import EngineLoadError
        from bridge.agent.chat import run_chat
        try:
            return asyncio.run(run_chat(cfg, args.caller))
        except EngineLoadError as exc:
            print(f"trunkline: the model did not load: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            return 130
    if cfg.app == "playback":
        from bridge.cell.apps import load_prompt
        from media.wav import WavError
        try:
            load_prompt(cfg.raw["app"]["prompt"], cfg.clock_rate)
        except WavError as exc:
            print(f"trunkline: config error: app.prompt: {exc}", file=sys.stderr)
            return 2
    from bridge.cell.run import run_call, run_serve
    try:
        # SIP over TLS (or a TCP trunk) lives in the front: such a box runs it even with one
        # cell (a cell started by the supervisor has TRUNKLINE_CELL and never does)
        front = cfg.runs_front() and "TRUNKLINE_CELL" not in os.environ
        if args.command == "serve" and (args.cells > 1 or front):
            from bridge.box.supervisor import Supervisor
            try:
                sup = Supervisor(cfg, max(args.cells, 1), args.config)
            except ValueError as exc:
                print(f"trunkline: config error: {exc}", file=sys.stderr)
                return 2
            return asyncio.run(sup.run())
        if args.command == "serve":
            return asyncio.run(run_serve(cfg))
        return asyncio.run(run_call(cfg, args.uri, args.trunk, args.duration))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
