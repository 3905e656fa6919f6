"""TLS handshakes per second at the Kamailio front and the CPU cost of SRTP at the edge
(rtpengine) per call (issue 12), saved as results/tls.json.

The generated front (real Kamailio, tls module, the profiles `trunkline serve` writes:
TLS 1.2+, client certificate required and verified against the CA, RSA 2048 keys from
a throwaway CA) on 127.0.0.1; client processes open new connections back to back, each
a full handshake (no session resumption) with a client certificate, optionally followed
by one OPTIONS answered by the front. Reported: handshakes/s and the front's CPU
seconds per handshake (all Kamailio processes), per TLS version and worker count.
Clients share the machine's cores with Kamailio, so handshakes/s is a floor.

    python tests/bench/run.py --only tls
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import socket
import ssl
import subprocess
import tempfile
import time
from pathlib import Path

TICKS = os.sysconf("SC_CLK_TCK")


def _tree_cpu(root: int) -> float:
    out = subprocess.run(["pgrep", "-P", str(root)], capture_output=True, text=True).stdout.split()
    total = 0.0
    for pid in [str(root), *out]:
        try:
            f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(f[11]) + int(f[12])) / TICKS
        except OSError:
            pass
    return total


def _client(port: int, pki: dict, version: str, options: bool, seconds: float, q) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2 if version == "1.2" else ssl.TLSVersion.TLSv1_3
    ctx.load_verify_locations(cafile=pki["ca"])
    ctx.load_cert_chain(*pki["far"])
    done = failed = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            with socket.create_connection(("127.0.0.1", port), 5) as raw:
                with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
                    if options:
                        s.sendall((f"OPTIONS sip:127.0.0.1:{port};transport=tls SIP/2.0\r\n"
                                   f"Via: SIP/2.0/TLS 127.0.0.1:{s.getsockname()[1]};branch=z9hG4bK{done}x{os.getpid()}\r\n"
                                   "Max-Forwards: 70\r\nFrom: <sip:bench@127.0.0.1>;tag=1\r\nTo: <sip:127.0.0.1>\r\n"
                                   f"Call-ID: {done}-{os.getpid()}@bench\r\nCSeq: 1 OPTIONS\r\n"
                                   "Content-Length: 0\r\n\r\n").encode())
                        if not s.recv(4096).startswith(b"SIP/2.0 200"):
                            failed += 1
                            continue
            done += 1
        except (OSError, ssl.SSLError):
            failed += 1
    q.put((done, failed))


def measure(front, pki: dict, version: str, workers: int, options: bool, seconds: float) -> dict:
    q = mp.Queue()
    procs = [mp.Process(target=_client, args=(front.tls_port, pki, version, options, seconds, q))
             for _ in range(workers)]
    c0, t0 = _tree_cpu(front.proc.pid), time.monotonic()
    for p in procs:
        p.start()
    results = [q.get(timeout=seconds + 60) for _ in procs]
    for p in procs:
        p.join(10)
    elapsed, cpu = time.monotonic() - t0, _tree_cpu(front.proc.pid) - c0
    done, failed = sum(r[0] for r in results), sum(r[1] for r in results)
    return {"tls": version, "workers": workers, "with_options": options, "seconds": round(elapsed, 2),
            "handshakes": done, "failed": failed, "handshakes_per_s": round(done / elapsed, 1),
            "front_cpu_ms_per_handshake": round(1000 * cpu / done, 2) if done else None}


def _tone(path: Path, seconds: float) -> None:
    import math
    import wave
    import numpy as np
    t = np.arange(int(8000 * seconds)) / 8000
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes((8000 * np.sin(2 * math.pi * 700 * t)).astype("<i2").tobytes())


def srtp_cost(tmp: Path, pki: dict, calls: int, seconds: float) -> dict:
    """``calls`` concurrent SRTP calls (pjsua2 far ends, SDES AES_CM_128_HMAC_SHA1_80, G.711)
    into an echo box through a srtp = "mandatory" TLS trunk: CPU of rtpengine (the whole
    SRTP cost: without SRTP no media relay runs and the cells do the same work either way)."""
    from support import BoxProcess, next_ports
    from tls_peer import Peer
    tmp.mkdir(parents=True, exist_ok=True)
    b = BoxProcess(tmp, max(1, -(-calls // 3)), "", cells_extra=f"front_port = {next_ports()['sip']}\n")
    edge = next_ports()["sip"]
    tls_port, far = b.ports["sip"] + 5, b.ports["sip"] + 6
    b.config_path.write_text(
        f'[sip]\ntls_listen = "127.0.0.1:{tls_port}"\ntls_cert = "{pki["box"][0]}"\ntls_key = "{pki["box"][1]}"\n'
        f'tls_ca = "{pki["ca"]}"\n[models]\nload = "never"\n[[trunks]]\nname = "carrier"\n'
        f'allow = ["127.0.0.1/32"]\ntransport = "tls"\nsrtp = "mandatory"\n' + b.config_path.read_text()
        + f'rtpengine_ng_port = {edge}\nrtpengine_ports = "{edge + 2}-{edge + 38}"\n')
    wav = tmp / "tone.wav"
    _tone(wav, seconds + 10)
    peers = []
    try:
        b.start()
        rtpe = int((b.run_dir / "rtpengine.pid").read_text().strip()) if (b.run_dir / "rtpengine.pid").exists() \
            else None
        for i in range(calls):
            peers.append(Peer(["call", "--listen", far + i, "--rtp", b.ports["rtp_lo"] + 4 * i, "--cert", pki["far"][0],
                               "--key", pki["far"][1], "--ca", pki["ca"], "--verify", "--srtp", "mandatory",
                               "--uri", f"sip:100@127.0.0.1:{tls_port};transport=tls", "--wav", wav,
                               "--seconds", str(seconds + 4), "--timeout", str(seconds + 30)],
                              tmp / f"srtp-far{i}.log"))
        for p in peers:
            p.wait_event("media", 30)
        time.sleep(2)
        rtpe = rtpe or int((b.run_dir / "rtpengine.pid").read_text().strip())
        c0, t0 = _tree_cpu(rtpe), time.monotonic()
        time.sleep(seconds)
        cpu, wall = _tree_cpu(rtpe) - c0, time.monotonic() - t0
        ok = sum(1 for p in peers if p.result(seconds + 40)["confirmed"])
    finally:
        for p in peers:
            p.kill()
        b.stop(40) if b.alive() else None
    pct = 100 * cpu / wall
    return {"calls": calls, "confirmed": ok, "seconds": round(wall, 1), "rtpengine_cpu_pct": round(pct, 2),
            "rtpengine_cpu_pct_per_call": round(pct / calls, 3)}


def main(out_path: str, seconds: float = 5.0) -> dict:
    from tls_peer import TlsFront, make_ca
    results = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpus": os.cpu_count(),
               "openssl": ssl.OPENSSL_VERSION, "load_average_at_start": os.getloadavg(), "runs": []}
    print(f"{'tls':>4} {'front procs':>11} {'clients':>7} {'OPTIONS':>7} {'handshakes/s':>12} "
          f"{'front ms/hs':>11} {'failed':>6}")
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        ca = make_ca(tmp / "pki")
        pki = {"ca": str(ca.ca), "box": ca.issue("box"), "far": tuple(map(str, ca.issue("far")))}
        for children in (2,):       # cells.children; TLS gets one TCP worker on Kamailio < 5.7.4
            front = TlsFront(tmp, pki, children=children)
            children = int(next(line.split("=")[1] for line in (front.run_dir / "kamailio.cfg").read_text()
                                .splitlines() if line.startswith("tcp_children=")))
            try:
                for version, workers, options in (("1.3", 1, False), ("1.3", 2, False), ("1.2", 2, False),
                                                  ("1.3", 2, True)):
                    r = measure(front, pki, version, workers, options, seconds)
                    r["front_tls_processes"] = children
                    results["runs"].append(r)
                    print(f"{version:>4} {children:>11} {workers:>7} {str(options):>7} {r['handshakes_per_s']:>12} "
                          f"{r['front_cpu_ms_per_handshake']!s:>11} {r['failed']:>6}")
            finally:
                front.close()
        print(f"\n{'SRTP calls':>10} {'confirmed':>9} {'rtpengine cpu%':>14} {'cpu%/call':>9}")
        results["srtp"] = []
        for calls in (1, 3):
            r = srtp_cost(tmp / f"srtp{calls}", pki, calls, 10.0)
            results["srtp"].append(r)
            print(f"{r['calls']:>10} {r['confirmed']:>9} {r['rtpengine_cpu_pct']:>14} {r['rtpengine_cpu_pct_per_call']:>9}")
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    Path(out_path).write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nsaved {out_path}\n")
    return results


if __name__ == "__main__":
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    main(str(Path(__file__).resolve().parent / "results" / "tls.json"))
