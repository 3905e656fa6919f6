"""Stock SIP scanners against a cell and against the Kamailio front (issue 11).

SIPVicious (Debian ``sipvicious``): ``svmap`` (OPTIONS, INVITE), ``svwar`` (REGISTER,
OPTIONS, INVITE) and ``svcrack``, from an untrusted and a trusted loopback address.
Nothing may crash, no extension may be told apart from another (nothing enumerated),
no Server/User-Agent header may carry a version, nothing may ever challenge or accept
a REGISTER (so svcrack has nothing to crack, even with a registering trunk's real
password in its dictionary), and a trusted call works right after.

svmap/svwar/svcrack ignore ``-b`` and always send from 127.0.0.1 (port 5060 when free):
for an "untrusted" scan the trunk allow-list names 127.0.0.5/32 instead and the
trusted SIPp call comes from 127.0.0.5. Scanners run one at a time (they share 5060).
"""
import re
import shutil
import socket
import subprocess
import time

import pytest

from fuzz.runner import header, status_of
from fuzz.targets import NO_MODELS, QUICK_RTP_TIMEOUT, BoxTarget, CellTarget, report, vm_rss_of, wait_idle
from support import CellProcess, next_ports, sipp

pytestmark = [pytest.mark.skipif(not all(shutil.which(x) for x in ("svmap", "svwar", "svcrack")),
                                reason="sipvicious (svmap/svwar/svcrack) is not installed"),
              pytest.mark.xdist_group("sipvicious")]

SCANNER_IP = "127.0.0.1"          # where sipvicious sends from, whatever -b says
ELSEWHERE = "127.0.0.5"           # the trunk's address when the scanner is untrusted
EXTENSIONS = "100-149"
VERSION = re.compile(r"\d+\.\d+")
REGISTRAR_USER, REGISTRAR_PASSWORD = "trunkuser", "s3cret"      # sipp-scenarios/registrar.xml


def _trunk(trusted_ip: str, registrar: int | None = None) -> str:
    t = f'[[trunks]]\nname = "carrier"\nallow = ["{trusted_ip}/32"]\n'
    if registrar:
        t += (f'address = "sip:127.0.0.1:{registrar}"\nregister = true\nusername = "{REGISTRAR_USER}"\n'
              f'password = "{REGISTRAR_PASSWORD}"\nrealm = "trunk.test"\n')
    return t


class Scan:
    """The target under scan: a CellTarget or BoxTarget plus what we saw."""

    def __init__(self, kind: str, tmp, trusted_ip: str, registrar: int | None = None):
        self.kind, self.tmp, self.trusted_ip = kind, tmp, trusted_ip
        conf = QUICK_RTP_TIMEOUT + _trunk(trusted_ip, registrar)
        if kind == "cell":
            self.t = CellTarget(CellProcess(tmp, conf, ("--app", "echo")).start())
        else:
            self.t = BoxTarget.start(tmp, cells=2, extra="", config=NO_MODELS + conf)
        self.port = self.t.sip[1]
        self.oracle = self.t.oracle(probe_ip=trusted_ip)
        self.rss_before = vm_rss_of(self.oracle)
        self.outputs: dict[str, str] = {}
        self.timings: dict[str, float] = {}

    def run(self, *cmd: str, timeout: float = 120) -> str:
        t0 = time.monotonic()
        r = subprocess.run([*cmd, "-p", str(self.port), SCANNER_IP], capture_output=True, text=True,
                           timeout=timeout)
        out = r.stdout + r.stderr
        self.outputs[" ".join(cmd)] = out
        self.timings[" ".join(cmd[:3])] = round(time.monotonic() - t0, 1)
        why = self.oracle.alive()
        assert why is None, f"{' '.join(cmd)} killed the {self.kind}: {why}"
        return out

    def stop(self):
        self.t.stop()


def _table(report_text: str) -> list[list[str]]:
    """Rows of sipvicious' result table (without the header row)."""
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in report_text.splitlines()
            if line.startswith("|")]
    return [r for r in rows if r and r[0] not in ("Extension", "SIP Device")]


def enumerated(report_text: str, scanned: int, calls: bool = False) -> dict[str, str]:
    """Extensions svwar could tell apart: none listed, or every scanned one listed with one
    verdict (a server answering all alike), tells a scanner nothing -> {}. Otherwise the listed
    extensions and verdicts ('weird' ones always count). ``calls``: the scan's INVITEs from a
    trusted source are real calls: the first few (svwar's reference request among them) are
    answered while the cell has room and every later one gets 503, which svwar calls 'weird',
    all alike whatever the number; then only the first extensions of the range may be missing
    (answered like svwar's reference), never any later one."""
    found = {r[0]: r[1] for r in _table(report_text) if len(r) >= 2 and r[0] not in ("None", "")}
    if not found:
        return {}
    if len(set(found.values())) == 1:
        if len(found) >= scanned:
            return {}
        last = int(EXTENSIONS.split("-")[1])
        if calls and len(found) >= scanned - 5 and set(found) == {str(e) for e in range(last - len(found) + 1, last + 1)}:
            return {}                    # a run to the end of the range: only the first few missing
    return found


def _versions_in(messages: list[bytes]) -> list[str]:
    out = []
    for m in messages:
        for name in ("server", "user-agent"):
            v = header(m, name)
            if v and VERSION.search(v):
                out.append(f"{name}: {v}")
    return out


def _answers(dest: tuple[str, int], src_ip: str, methods=("OPTIONS", "INVITE", "REGISTER", "MESSAGE", "SUBSCRIBE",
                                                           "INFO", "PUBLISH", "NOTIFY", "BYE")) -> dict[str, list[bytes]]:
    """Every answer a target gives to one plain request of each method from ``src_ip``."""
    from sipwire import request
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((src_ip, 0))
    out: dict[str, list[bytes]] = {}
    try:
        for method in methods:
            s.sendto(request(method, f"{dest[0]}:{dest[1]}", s.getsockname(), sdp=method == "INVITE",
                             extra="Event: presence\r\n" if method in ("SUBSCRIBE", "NOTIFY") else ""), dest)
            got, end = [], time.monotonic() + 1.0
            while time.monotonic() < end:
                s.settimeout(max(0.01, end - time.monotonic()))
                try:
                    data = s.recv(65535)
                except (socket.timeout, ConnectionRefusedError):
                    continue
                got.append(data)
                if (status_of(data) or 0) >= 200:
                    break
            out[method] = got
    finally:
        s.close()
    return out


def _svcrack_dictionary(tmp) -> str:
    path = tmp / "passwords.txt"
    path.write_text("\n".join(["1234", "password", "admin", REGISTRAR_PASSWORD, "trunkline", "secret"]) + "\n")
    return str(path)


def _scan_everything(scan: Scan, tmp, invite: bool = True, crack: bool = True) -> dict:
    """svmap OPTIONS/INVITE, svwar REGISTER/OPTIONS(/INVITE), svcrack; returns the findings."""
    n = 50
    results = {"enumerated": {}, "versions": [], "cracked": [], "challenged": []}
    for method in ("OPTIONS", "INVITE") if invite else ("OPTIONS",):
        out = scan.run("svmap", "-m", method)
        results["versions"] += [f"svmap {method}: {r[1]}" for r in _table(out) if len(r) > 1 and VERSION.search(r[1])]
        results[f"svmap {method} found"] = [r[0] for r in _table(out)]
    for method in ("REGISTER", "OPTIONS", "INVITE") if invite else ("REGISTER", "OPTIONS"):
        out = scan.run("svwar", "-m", method, "-e", EXTENSIONS, "--force", "--maximumtime", "3")
        found = enumerated(out, n, calls=method == "INVITE" and scan.trusted_ip == SCANNER_IP)
        if found:
            results["enumerated"][method] = found
    if crack:
        out = scan.run("svcrack", "-u", REGISTRAR_USER, "-d", _svcrack_dictionary(tmp), "--maximumtime", "3")
        if _table(out) or REGISTRAR_PASSWORD in out:          # svcrack tables what it cracked
            results["cracked"].append(out[-500:])
    return results


def _finish(scan: Scan, tmp, results: dict, name: str, local_ip: str) -> None:
    """No version in any answer, nothing enumerated or cracked, alive, a trusted call works."""
    answers = _answers(scan.t.sip, SCANNER_IP)
    results["versions"] += _versions_in([m for v in answers.values() for m in v])
    results["register_answers"] = sorted({status_of(m) for m in answers["REGISTER"] if status_of(m)})
    results["challenged"] += [m.split(b"\r\n")[0].decode() for v in answers.values() for m in v
                              if status_of(m) in (401, 407)]
    why = scan.oracle.alive() or scan.oracle.probe()
    assert why is None, why
    left = wait_idle(scan.t, 80)     # svwar never ACKs most 200s: pjsip frees those after ~70 s
    assert left is None, f"calls held after the scans: {left}"
    res = sipp("call_pcmu.xml", f"127.0.0.1:{scan.port}", tmp, "-d", "300", local_port=next_ports()["sipp"],
               local_ip=local_ip, timeout=20)
    report({"test": "scanners", "name": name, "target": scan.kind, "seconds": scan.timings,
            "rss_kb_before": scan.rss_before,
            "rss_kb_after": vm_rss_of(scan.oracle), "results": {k: v for k, v in results.items()}})
    assert res.returncode == 0, "a trusted call failed after the scans:\n" + res.stdout.decode(errors="replace")[-1500:]
    assert not results["versions"], f"a version was revealed: {results['versions']}"
    assert not results["enumerated"], f"extensions told apart: {results['enumerated']}"
    assert not results["cracked"] and not results["challenged"], (results["cracked"], results["challenged"])


@pytest.fixture
def scans(tmp_path):
    made = []

    def make(kind, trusted_ip, registrar=None):
        s = Scan(kind, tmp_path, trusted_ip, registrar)
        made.append(s)
        return s
    yield make
    for s in made:
        s.stop()


# both run in the slow suite: in the default one test_hostile.py scans a cell with svwar and
# test_front_hostile.py scans the front (svmap, svwar, svcrack from an untrusted source)
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["cell", "front"])
def test_scans_from_an_untrusted_source_find_nothing(scans, tmp_path, kind):
    """The scanner (127.0.0.1) is outside the allow-list (127.0.0.5): every method gets
    403 or silence, so nothing is enumerated, and the trunk's call works after."""
    scan = scans(kind, ELSEWHERE)
    results = _scan_everything(scan, tmp_path, crack=False)     # svcrack: the registering-box test
    answers = _answers(scan.t.sip, SCANNER_IP)
    results["untrusted_answers"] = {m: sorted({status_of(x) for x in v if status_of(x)}) for m, v in answers.items()}
    # 100 Trying is the transaction layer's hop-by-hop receipt (it tells nothing the 403 does not)
    wrong = {m: c for m, c in results["untrusted_answers"].items() if any(x not in (100, 403) for x in c)}
    _finish(scan, tmp_path, results, f"untrusted-{kind}", ELSEWHERE)
    assert not wrong, f"an untrusted source got answers other than 403: {wrong}"


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["cell", "front"])
def test_scans_from_a_trusted_source_reveal_nothing(scans, tmp_path, kind):
    """From inside the allow-list the scans are real traffic: svwar's INVITEs become
    (unacknowledged) calls and fill the cell. Still no extension stands out, no version,
    no challenge; the calls time out and a trusted call works after."""
    scan = scans(kind, SCANNER_IP)
    results = _scan_everything(scan, tmp_path)
    _finish(scan, tmp_path, results, f"trusted-{kind}", SCANNER_IP)


@pytest.mark.slow
@pytest.mark.parametrize("kind", [pytest.param("cell", marks=pytest.mark.sample), "front"])
def test_svcrack_has_nothing_to_crack_on_a_registering_box(scans, tmp_path, kind):
    """A trunk that registers (to SIPp's registrar, which checks the digest) has real
    credentials in the box; svcrack with that very password in its dictionary, against
    the cell and the front, gets no challenge and no 200: the box is no registrar."""
    far = next_ports()
    registrar = sipp("registrar.xml", "", tmp_path, local_port=far["sipp"], background=True, timeout=30)
    try:
        scan = scans(kind, ELSEWHERE, registrar=far["sipp"])
        if kind == "cell":            # (in a box every cell registers: SIPp's scenario takes one)
            out, _ = registrar.communicate(timeout=30)
            assert registrar.returncode == 0, "the trunk did not register:\n" + out.decode(errors="replace")[-1500:]
        results = {"enumerated": {}, "versions": [], "cracked": [], "challenged": []}
        out = scan.run("svcrack", "-u", REGISTRAR_USER, "-d", _svcrack_dictionary(tmp_path), "--maximumtime", "3")
        if _table(out) or REGISTRAR_PASSWORD in out:
            results["cracked"].append(out[-500:])
        _finish(scan, tmp_path, results, f"svcrack-registering-{kind}", ELSEWHERE)
    finally:
        if registrar.poll() is None:
            registrar.kill()


def test_the_verdict_checks_can_fail():
    """The parsers behind the verdicts: a table where some extensions stand out is an
    enumeration, one where all answer alike is not; a version in a Server header is seen."""
    row = "| {} | {} |"
    alike = "\n".join(["| Extension | Authentication |"] + [row.format(e, "reqauth") for e in range(100, 150)])
    assert enumerated(alike, 50) == {}
    differ = alike.replace("| 123 | reqauth |", "| 123 | noauth |")
    assert enumerated(differ, 50) == {str(e): ("noauth" if e == 123 else "reqauth") for e in range(100, 150)}
    assert enumerated("| Extension | Authentication |\n| 101 | reqauth |", 50) == {"101": "reqauth"}
    assert enumerated("| 105 | weird |", 50) == {"105": "weird"}
    weird = "\n".join(["| Extension | Authentication |"] + [row.format(e, "weird") for e in range(101, 150)])
    assert enumerated(weird, 50, calls=True) == {}            # 101-149 alike: the full cell's 503s
    assert enumerated(weird, 50) != {}                        # not from a trusted source's INVITEs
    assert enumerated(weird.replace("| 123 | weird |", "| 123 | reqauth |"), 50, calls=True) != {}
    assert enumerated(weird.replace("| 123 | weird |\n", ""), 50, calls=True) != {}   # a gap: 123 stood out
    assert enumerated("\n".join(weird.splitlines()[:48]), 50, calls=True) != {}   # 148, 149 answered otherwise
    assert enumerated("WARNING:root:found nothing", 50) == {}
    msgs = [b"SIP/2.0 200 OK\r\nServer: Trunkline\r\n\r\n", b"SIP/2.0 200 OK\r\nUser-Agent: Trunkline 0.1.0\r\n\r\n"]
    assert _versions_in(msgs) == ["user-agent: Trunkline 0.1.0"]
