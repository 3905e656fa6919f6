"""SIP over TLS peers for the tests: a throwaway PKI made with ``openssl`` and a pjsua2
far end (its own process) that places or answers one call over TLS and echoes or
checks audio.

The far end is pjsua2 (pjsip's TLS transport) run as ``python tests/tls_peer.py``:

    call  --target HOST:PORT --uri sip:100@HOST:PORT ...   one call over TLS; sends a tone
                                                           and measures how much comes back
    answer --listen PORT ...                               answers one call over TLS; with
                                                           --wav/--record like ``call``,
                                                           else echoes what it hears

It prints one JSON line ({"event": ...}) per step; the last is {"event": "result", ...}.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


# -- PKI ------------------------------------------------------------------------------------
@dataclass
class Pki:
    dir: Path
    ca: Path
    ca_key: Path

    def issue(self, name: str, cn: str = "127.0.0.1", ca: "Pki | None" = None, days: int = 2) -> tuple[Path, Path]:
        """A certificate (with IP SAN 127.0.0.1 and DNS ``cn``) signed by this CA (or ``ca``): (cert, key)."""
        signer = ca or self
        key, csr, crt = self.dir / f"{name}.key", self.dir / f"{name}.csr", self.dir / f"{name}.crt"
        ext = self.dir / f"{name}.ext"
        ext.write_text("basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
                       "extendedKeyUsage=serverAuth,clientAuth\n"
                       f"subjectAltName=IP:127.0.0.1,DNS:{cn if not cn[0].isdigit() else 'localhost'}\n")
        _openssl("req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr, "-subj", f"/CN={cn}")
        _openssl("x509", "-req", "-in", csr, "-CA", signer.ca, "-CAkey", signer.ca_key, "-CAcreateserial",
                 "-out", crt, "-days", str(days), "-sha256", "-extfile", ext)
        return crt, key


def _openssl(*args) -> None:
    r = subprocess.run(["openssl", *map(str, args)], capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(map(str, args[:2]))}: {r.stderr[-800:]}")


def make_ca(directory: Path, name: str = "ca") -> Pki:
    """A self-signed throwaway CA in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    ca, key = directory / f"{name}.crt", directory / f"{name}.key"
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", ca, "-days", "2",
             "-subj", f"/CN=Trunkline test {name}", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    return Pki(directory, ca, key)


# -- the generated front on its own, with TLS ----------------------------------------------------
class TlsFront:
    """The generated front with TLS (real Kamailio); trunk 127.0.0.1 (a cell UDP socket stands by)."""

    def __init__(self, tmp: Path, pki, verify: bool = True, children: int = 2):
        from bridge.box import kamailio
        from support import next_ports
        p = next_ports()
        self.port, self.tls_port, self.inner, self.cell = p["sip"], p["sip"] + 1, p["sip"] + 2, p["sip"] + 3
        self.run_dir = tmp / f"front-{self.port}"
        tls = kamailio.Tls(f"127.0.0.1:{self.tls_port}", str(pki["box"][0]), str(pki["box"][1]),
                           str(pki["ca"]) if verify else "", verify=verify)
        inner = f"udp:127.0.0.1:{self.inner}"
        text = kamailio.render([f"udp:127.0.0.1:{self.port}", f"tcp:127.0.0.1:{self.port}"], str(self.run_dir),
                               ["127.0.0.1/32"], 5, ping=30, children=children, cell_socket=inner,
                               trunks=[("", ["127.0.0.1/32"])], tls=tls, transports=["tls"])
        path = kamailio.write(str(self.run_dir), text,
                              kamailio.dispatcher_list([("127.0.0.1", self.cell)], 3, socket=inner), tls)
        self.log = open(self.run_dir / "kamailio.log", "ab")
        self.proc = subprocess.Popen(["kamailio", "-DD", "-E", "-f", path, "-P", str(self.run_dir / "k.pid")],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                socket.create_connection(("127.0.0.1", self.tls_port), 0.5).close()
                return
            except OSError:
                time.sleep(0.1)
        self.close()
        raise RuntimeError("kamailio did not listen:\n" + (self.run_dir / "kamailio.log").read_text()[-3000:])

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self.log.close()


def tls_options(port: int, pki, cert: tuple | None, verify_server: bool = True) -> bytes:
    """A TLS client (Python's ssl) that sends one OPTIONS to the front: what came back
    (b"" when the front closed the connection); raises ssl.SSLError on a refused handshake."""
    import ssl              # not at the top: the pjsua2 child process keeps to its own OpenSSL
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if verify_server:
        ctx.load_verify_locations(cafile=str(pki["ca"]))
    else:
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    if cert:
        ctx.load_cert_chain(str(cert[0]), str(cert[1]))
    with socket.create_connection(("127.0.0.1", port), 5) as raw:
        with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
            s.settimeout(3)
            lp = s.getsockname()[1]
            s.sendall((f"OPTIONS sip:127.0.0.1:{port};transport=tls SIP/2.0\r\n"
                       f"Via: SIP/2.0/TLS 127.0.0.1:{lp};branch=z9hG4bK{time.monotonic_ns()};rport\r\n"
                       "Max-Forwards: 70\r\nFrom: <sip:probe@127.0.0.1>;tag=1\r\nTo: <sip:127.0.0.1>\r\n"
                       f"Call-ID: {time.monotonic_ns()}@tls\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n").encode())
            try:
                return s.recv(4096)
            except (ssl.SSLError, ConnectionResetError, socket.timeout):
                return b""


# -- the pjsua2 far end -----------------------------------------------------------------------
class Peer:
    """A subprocess running this file; JSON lines on stdout."""

    def __init__(self, args: list[str], log: Path):
        self.log_path = log
        self._log = open(log, "wb")
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), *map(str, args)],
                                     cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT)

    def events(self) -> list[dict]:
        return [json.loads(x) for x in self.log_path.read_text(errors="replace").splitlines() if x.startswith("{")]

    def wait_event(self, name: str, timeout: float = 15.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = [e for e in self.events() if e.get("event") == name]
            if got:
                return got[0]
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"tls peer: no {name!r}; log:\n" + self.log_path.read_text(errors="replace")[-3000:])

    def result(self, timeout: float = 60.0) -> dict:
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()
        events = self.events()
        last = next((e for e in reversed(events) if e.get("event") == "result"), None)
        if last is None:
            raise AssertionError(f"tls peer gave no result (exit {self.proc.returncode}); events {events}; log:\n"
                                 + self.log_path.read_text(errors="replace")[-3000:])
        last["events"] = events
        return last

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


def _emit(event: str, **kw) -> None:
    print(json.dumps({"event": event, **kw}), flush=True)


def _run(args) -> int:      # pragma: no cover - runs in the child process
    import pjsua2 as pj

    ep = pj.Endpoint()
    ep.libCreate()
    ec = pj.EpConfig()
    ec.uaConfig.maxCalls = 2
    ec.uaConfig.threadCnt = 0
    ec.uaConfig.mainThreadOnly = True
    ec.logConfig.level = 3
    ec.logConfig.consoleLevel = 3
    ec.medConfig.hasIoqueue = True
    ec.medConfig.clockRate = 8000
    ec.medConfig.sndClockRate = 8000
    ec.medConfig.channelCount = 1
    ec.medConfig.noVad = True
    ep.libInit(ec)
    ep.audDevManager().setNullDev()
    tc = pj.TransportConfig()
    tc.port = args.listen
    tc.boundAddress = args.host
    tc.tlsConfig.CaListFile = args.ca
    tc.tlsConfig.certFile = args.cert
    tc.tlsConfig.privKeyFile = args.key
    tc.tlsConfig.method = pj.PJSIP_TLSV1_2_METHOD
    tc.tlsConfig.verifyServer = args.verify
    tc.tlsConfig.verifyClient = False
    tc.tlsConfig.requireClientCert = False
    ep.transportCreate(pj.PJSIP_TRANSPORT_TLS, tc)
    rc = pj.TransportConfig()
    rc.port = args.rtp
    rc.boundAddress = args.host
    for codec in ep.codecEnum2():
        ep.codecSetPriority(codec.codecId, 255 if codec.codecId.startswith("PCMU/") else 0)
    ep.libStart()
    _emit("started", port=args.listen)

    done = {"state": None, "code": 0, "media": False}

    class Call(pj.Call):
        def __init__(self, acc, cid=pj.PJSUA_INVALID_ID):
            super().__init__(acc, cid)
            self.player = self.recorder = None

        def onCallState(self, prm):
            ci = self.getInfo()
            done["state"], done["code"] = ci.state, ci.lastStatusCode
            _emit("state", state=ci.stateText, code=ci.lastStatusCode, reason=ci.lastReason)
            if ci.state == pj.PJSIP_INV_STATE_DISCONNECTED:
                return

        def onCallMediaState(self, prm):
            ci = self.getInfo()
            for i, mi in enumerate(ci.media):
                if mi.type == pj.PJMEDIA_TYPE_AUDIO and mi.status == pj.PJSUA_CALL_MEDIA_ACTIVE:
                    am = self.getAudioMedia(i)
                    if not args.wav:
                        am.startTransmit(am)          # echo
                    elif self.player is None:
                        self.player = pj.AudioMediaPlayer()
                        self.player.createPlayer(args.wav, pj.PJMEDIA_FILE_NO_LOOP)
                        self.player.startTransmit(am)
                        if args.record:
                            self.recorder = pj.AudioMediaRecorder()
                            self.recorder.createRecorder(args.record)
                            am.startTransmit(self.recorder)
                    done["media"] = True
                    _emit("media", index=i)

    class Acc(pj.Account):
        def onIncomingCall(self, prm):
            call = Call(self, prm.callId)
            calls.append(call)
            _emit("incoming", remote=prm.rdata.srcAddress)
            op = pj.CallOpParam()
            op.statusCode = 200
            call.answer(op)

    acfg = pj.AccountConfig()
    acfg.idUri = "sip:far@127.0.0.1"
    acfg.sipConfig.transportId = 0
    acfg.mediaConfig.transportConfig = rc
    acfg.mediaConfig.srtpUse = {"off": pj.PJMEDIA_SRTP_DISABLED, "optional": pj.PJMEDIA_SRTP_OPTIONAL,
                                "mandatory": pj.PJMEDIA_SRTP_MANDATORY}[args.srtp]
    acfg.mediaConfig.srtpSecureSignaling = 0
    acc = Acc()
    acc.create(acfg)
    calls: list = []
    if args.command == "call":
        call = Call(acc)
        calls.append(call)
        op = pj.CallOpParam(True)
        call.makeCall(args.uri, op)
    deadline = time.monotonic() + args.timeout
    answered_at = None
    while time.monotonic() < deadline:
        ep.libHandleEvents(20)
        if done["state"] == pj.PJSIP_INV_STATE_CONFIRMED and answered_at is None:
            answered_at = time.monotonic()
        if done["state"] == pj.PJSIP_INV_STATE_DISCONNECTED:
            break
        if args.command == "call" and answered_at and time.monotonic() - answered_at > args.seconds:
            calls[0].hangup(pj.CallOpParam(True))
            answered_at = float("inf")
    result = {"state": done["state"], "code": done["code"], "media": done["media"],
              "confirmed": answered_at is not None}
    ep.libDestroy()                  # closes the recorder: its WAV header is complete from here
    _emit("result", **result)
    sys.stdout.flush()
    os._exit(0)                      # no pjsua2 destructors after libDestroy


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("command", choices=["call", "answer"])
    ap.add_argument("--listen", type=int, required=True, help="our TLS port")
    ap.add_argument("--host", default="127.0.0.1", help="the address we bind (SIP and RTP)")
    ap.add_argument("--rtp", type=int, required=True, help="first RTP port")
    ap.add_argument("--cert", required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument("--ca", required=True)
    ap.add_argument("--verify", action="store_true", help="verify the server's certificate")
    ap.add_argument("--uri", default="", help="call: whom to call (sip:...;transport=tls)")
    ap.add_argument("--wav", default="", help="what to send (8 kHz mono WAV; answer: none = echo)")
    ap.add_argument("--record", default="", help="where to record what comes back")
    ap.add_argument("--seconds", type=float, default=4.0, help="call: how long to stay up once answered")
    ap.add_argument("--timeout", type=float, default=30.0)
    ap.add_argument("--srtp", choices=["off", "optional", "mandatory"], default="off", help="SRTP (SDES) use")
    return _run(ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
