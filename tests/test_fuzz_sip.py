"""SIP fuzzing (issue 11): our grammar-aware mutation fuzzer (tests/fuzz/sipfuzz.py) over
UDP and TCP into a real cell and into the real Kamailio front, from a trusted
(127.0.0.1) and an untrusted (127.0.0.9) source.

After every batch the target must be alive and answer an OPTIONS from a trusted source
(and /healthz) within the probe budget; at the end a normal SIPp call must work. A
batch that breaks it is saved under tests/fuzz/regressions/ and
``test_saved_regressions_are_survived`` replays every saved batch on every run.

Sizes: the default suite sends a few hundred messages (``sample``); ``make fuzz`` runs
the ``slow`` tests with FUZZ_CASES (default 1300 cases per target/transport/source,
i.e. > 20,000 messages in all). FUZZ_SEED picks the run (default 11).
"""
import json
import os

import pytest

from fuzz.runner import Runner, load_regression, regression_dirs
from fuzz.sipfuzz import Endpoint, SipFuzzer
from fuzz.targets import TRUSTED, UNTRUSTED, BoxTarget, CellTarget, report, wait_idle

SEED = int(os.environ.get("FUZZ_SEED", "11"))
SLOW_CASES = int(os.environ.get("FUZZ_CASES", "1300"))
PROBE_TIMEOUT = 5.0
# calls the fuzzer could not end: the cell hangs up after sip.rtp_timeout (5 s here) without
# RTP, or when its 200 was never ACKed (the TCP flow had closed) after ~70 s (measured;
# RFC 3261 says 64*T1 = 32 s, see test_unacknowledged_200_frees_its_slot_within_timer_h)
IDLE_TIMEOUT = 80.0


@pytest.fixture
def targets(tmp_path):
    made = []

    def make(kind: str):
        t = CellTarget.start(tmp_path) if kind == "cell" else BoxTarget.start(tmp_path, cells=2)
        made.append(t)
        return t
    yield make
    for t in made:
        t.stop()


def _fuzz(target, tmp_path, plan: list[tuple[str, str, int]], seed: int = SEED, batch: int = 50) -> list[dict]:
    """Run ``plan`` ((transport, source ip, cases)...) into ``target``; fail on the
    first batch that crashes or hangs it, then check a trusted SIPp call still works."""
    results = []
    start_offset = 0
    for transport, src, count in plan:
        ep = Endpoint(*target.sip, transport)
        runner = Runner(ep, src, target.oracle(PROBE_TIMEOUT), f"{target.kind}-{'trusted' if src == TRUSTED else 'untrusted'}",
                        batch=batch, probe_timeout=PROBE_TIMEOUT, dialog_wait=_dialog_wait(src))
        try:
            failure = runner.run(seed, start_offset, count, rtp_port=target_rtp_sink(target))
        finally:
            runner.close()
        s = runner.stats
        rec = {"test": "sip-fuzz", "target": target.kind, "transport": transport, "source": src, "seed": seed,
               "first_case": start_offset, "cases": s.cases, "messages": s.messages, "bytes": s.bytes,
               "responses": s.responses, "calls_opened": s.calls_opened, "seconds": round(s.seconds, 1),
               "probe_max_s": round(s.probe_max, 2), "rss_kb_before": runner.rss_before,
               "rss_kb_after": runner.rss_after, "failure": failure}
        results.append(rec)
        report(rec)
        assert failure is None, (f"{target.kind} over {transport} from {src}: {failure}\n"
                                 f"reproduce: FUZZ_SEED={seed}, cases {start_offset}..{start_offset + count}")
        start_offset += count
    _idle_then_call(target, tmp_path)
    return results


def _idle_then_call(target, tmp_path):
    """Every call the fuzzing opened must end (we BYE those we can; the rest must end on
    their own within IDLE_TIMEOUT), then a trusted SIPp call must work."""
    left = wait_idle(target, IDLE_TIMEOUT)
    assert left is None, f"calls still held {IDLE_TIMEOUT:.0f}s after the fuzzing: {left}"
    why = target.call_works(tmp_path)
    assert why is None, f"a trusted SIPp call failed after the fuzzing:\n{why}"


def _dialog_wait(src: str) -> float:
    """An untrusted source should get no dialog at all: do not wait long for one."""
    return 3.0 if src == TRUSTED else 0.5


def target_rtp_sink(target) -> int:
    """The SDP offers point media at a loopback port nobody listens on (the sipp port + 3)."""
    ports = target.cell.ports if target.kind == "cell" else target.box.ports
    return ports["sipp"] + 3


def test_fuzzer_is_pure_and_seedable():
    t, s = Endpoint("127.0.0.1", 5060), Endpoint("127.0.0.9", 40000)
    a, b = SipFuzzer(5, t, s), SipFuzzer(5, t, s)
    assert [a.case(i).messages for i in range(200)] == [b.case(i).messages for i in range(200)]
    assert a.case(3).messages != SipFuzzer(6, t, s).case(3).messages
    kinds = {SipFuzzer(5, t, s).case(i).label.split(":")[0].split(" x")[0] for i in range(500)}
    assert {"known dialog", "unknown dialog", "keepalive", "cancel", "retransmit"} <= kinds
    with pytest.raises(ValueError):
        Endpoint("10.0.0.1", 5060)               # loopback only
    assert all(len(m) <= 65000 for i in range(500) for m in a.case(i).messages)


@pytest.mark.slow
@pytest.mark.sample
def test_fuzz_sample_into_a_cell(targets, tmp_path):
    """A few hundred fuzzed messages over UDP and TCP, trusted and untrusted, into one cell."""
    cell = targets("cell")
    _fuzz(cell, tmp_path, [("UDP", TRUSTED, 100), ("UDP", UNTRUSTED, 60), ("TCP", TRUSTED, 40),
                           ("TCP", UNTRUSTED, 30)])


@pytest.mark.slow
@pytest.mark.sample
def test_fuzz_sample_into_the_front(targets, tmp_path):
    """The same into the real Kamailio front (``--cells 2``: one cell runs without a front)."""
    box = targets("front")
    _fuzz(box, tmp_path, [("UDP", TRUSTED, 80), ("UDP", UNTRUSTED, 60), ("TCP", TRUSTED, 30),
                          ("TCP", UNTRUSTED, 30)], seed=SEED + 1)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["cell", "front"])
@pytest.mark.parametrize("transport", ["UDP", "TCP"])
@pytest.mark.parametrize("source", ["trusted", "untrusted"])
def test_fuzz_long(targets, tmp_path, kind, transport, source):
    """``make fuzz``: FUZZ_CASES cases (~2 messages each) per target/transport/source."""
    t = targets(kind)
    src = TRUSTED if source == "trusted" else UNTRUSTED
    # each combination gets its own slice of the run, so no two send the same cases
    offset = 1_000_000 * (["cell", "front"].index(kind) * 4 + ["UDP", "TCP"].index(transport) * 2
                          + ["trusted", "untrusted"].index(source))
    _fuzz_from(t, tmp_path, transport, src, offset, SLOW_CASES)


def _fuzz_from(target, tmp_path, transport, src, offset, count):
    ep = Endpoint(*target.sip, transport)
    runner = Runner(ep, src, target.oracle(PROBE_TIMEOUT), f"{target.kind}-{'trusted' if src == TRUSTED else 'untrusted'}",
                    probe_timeout=PROBE_TIMEOUT, budget=600, dialog_wait=_dialog_wait(src))
    try:
        failure = runner.run(SEED, offset, count, rtp_port=target_rtp_sink(target))
    finally:
        runner.close()
    s = runner.stats
    report({"test": "sip-fuzz-long", "target": target.kind, "transport": transport, "source": src, "seed": SEED,
            "first_case": offset, "cases": s.cases, "messages": s.messages, "bytes": s.bytes,
            "responses": s.responses, "calls_opened": s.calls_opened, "seconds": round(s.seconds, 1),
            "probe_max_s": round(s.probe_max, 2), "rss_kb_before": runner.rss_before,
            "rss_kb_after": runner.rss_after, "failure": failure})
    assert failure is None, f"{target.kind} over {transport} from {src}: {failure}"
    _idle_then_call(target, tmp_path)


@pytest.mark.parametrize("saved", regression_dirs(), ids=lambda p: p.name)
def test_saved_regressions_are_survived(targets, tmp_path, saved):
    """Every batch that once crashed or hung a target, replayed into a fresh one."""
    meta = json.loads((saved / "case.json").read_text())
    t = targets("cell" if meta["target"].startswith("cell") else "front")
    ep = Endpoint(*t.sip, meta["transport"])
    _, cases = load_regression(saved, ep)
    src = meta["source"]
    runner = Runner(ep, src, t.oracle(PROBE_TIMEOUT), "replay", probe_timeout=PROBE_TIMEOUT,
                    save_dir=tmp_path / "replayed", batch=len(cases) or 1)
    try:
        failure = runner.run_cases(cases)
    finally:
        runner.close()
    assert failure is None, f"{saved.name} ({meta['reason'][:200]}): {failure}"
    _idle_then_call(t, tmp_path)


def test_refer_from_the_caller_does_not_make_the_cell_dial_out(targets):
    """Found by the fuzzer: an in-dialog REFER makes the cell INVITE whatever Refer-To
    names (a third host: toll fraud through a trunk; the cell itself: two legs that echo
    to each other and hold 2 slots for app.max_duration). Outbound calls are placed only
    by the operator (API/CLI/app transfers), never on the caller's word."""
    import random
    import socket

    from fuzz.runner import UdpFlow, _final_invite_response, to_tag
    t = targets("cell")
    far = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    far.bind(("127.0.0.1", 0))
    far.settimeout(2.0)
    flow = UdpFlow(TRUSTED)
    try:
        ep = Endpoint(*t.sip)
        fz, rng = SipFuzzer(1, ep, Endpoint(TRUSTED, flow.port)), random.Random(1)
        call_id = "refer-%x@test" % rng.getrandbits(32)
        flow.send(fz.request(rng, "INVITE", call_id=call_id, from_tag="ft", cseq=1, sdp=True, user="100").serialise(),
                  t.sip)
        resp = flow.wait_for(_final_invite_response(call_id), 5)
        assert resp is not None and resp.startswith(b"SIP/2.0 200"), resp
        tag = to_tag(resp)
        flow.send(fz.request(rng, "ACK", call_id=call_id, from_tag="ft", to_tag=tag, cseq=1, user="100").serialise(),
                  t.sip)
        refer = fz.request(rng, "REFER", call_id=call_id, from_tag="ft", to_tag=tag, cseq=2, user="100")
        refer.set("Refer-To", f"<sip:900@127.0.0.1:{far.getsockname()[1]}>")
        flow.send(refer.serialise(), t.sip)
        try:
            data, _ = far.recvfrom(65535)
        except socket.timeout:
            data = b""
        assert not data.startswith(b"INVITE"), f"the cell dialled the Refer-To target: {data[:200]!r}"
        bye = fz.request(rng, "BYE", call_id=call_id, from_tag="ft", to_tag=tag, cseq=3, user="100")
        flow.send(bye.serialise(), t.sip)
    finally:
        flow.close()
        far.close()
    assert t.cell.alive()


def _late_offer_call(t, ack: bool) -> bytes:
    """A trusted late-offer INVITE (no SDP): the cell answers 200 with its offer; then ACK
    without the answer (``ack``) or no ACK at all. Returns the 200."""
    import re as _re

    from sipwire import UdpPeer, request
    peer = UdpPeer(TRUSTED)
    try:
        call_id = "late-offer-%d@test" % os.getpid()
        peer.send(request("INVITE", f"{t.sip[0]}:{t.sip[1]}", peer.addr, sdp=False, call_id=call_id), t.sip)
        final = [m for m in peer.gather(3.0, until_final=True) if m.startswith(b"SIP/2.0 ")][-1]
        assert final.startswith(b"SIP/2.0 200"), final[:200]
        if ack:
            to = _re.search(rb"\r\nTo: ([^\r]*)", final).group(1).decode()
            frm = _re.search(rb"\r\nFrom: ([^\r]*)", final).group(1).decode()
            peer.send((f"ACK sip:100@{t.sip[0]}:{t.sip[1]} SIP/2.0\r\n"
                       f"Via: SIP/2.0/UDP {peer.addr[0]}:{peer.addr[1]};branch=z9hG4bKlateack;rport\r\n"
                       f"Max-Forwards: 70\r\nFrom: {frm}\r\nTo: {to}\r\nCall-ID: {call_id}\r\nCSeq: 1 ACK\r\n"
                       "Content-Length: 0\r\n\r\n").encode(), t.sip)
        return final
    finally:
        peer.close()


def test_late_offer_acked_without_an_answer_does_not_hold_a_slot(targets):
    """Found by the fuzzer (svwar does this too): a late-offer INVITE whose ACK carries no
    SDP answer leaves a confirmed call with no media that sip.rtp_timeout never ends: one
    message pair holds a slot for app.max_duration. The cell must end it (BYE) quickly."""
    t = targets("cell")
    _late_offer_call(t, ack=True)
    left = wait_idle(t, 15.0)                     # rtp_timeout is 5 s on this cell
    assert left is None, f"a late-offer call ACKed without an answer still holds a slot after 15 s: {left}"
    assert t.cell.alive()


@pytest.mark.slow
def test_unacknowledged_200_frees_its_slot_within_timer_h(targets):
    """A late-offer INVITE answered 200 and never ACKed frees its slot after timer H
    (64*T1 = 32 s), plus a little slack."""
    t = targets("cell")
    _late_offer_call(t, ack=False)
    left = wait_idle(t, 40.0)
    assert left is None, f"an unacknowledged 200 still holds a slot after 40 s: {left}"


def test_the_oracle_catches_a_hang_and_a_crash_and_saves_the_batch(targets, tmp_path):
    """The tooling can fail: a stopped cell (SIGSTOP) is a hang, a killed one a crash, and
    the batch sent before either is saved as a replayable regression case."""
    import signal
    t = targets("cell")
    ep, pid = Endpoint(*t.sip), t.cell.proc.pid
    saved = tmp_path / "saved"
    hang = Runner(ep, TRUSTED, t.oracle(1.0), "selftest", batch=5, probe_timeout=1.0, save_dir=saved)
    os.kill(pid, signal.SIGSTOP)
    try:
        failure = hang.run(SEED, 0, 5)
    finally:
        os.kill(pid, signal.SIGCONT)
        hang.close()
    assert failure and failure.startswith("hang:"), failure
    meta, cases = load_regression(hang.saved, ep)
    assert len(cases) == 5 and meta["reason"].startswith("hang") and all(c.messages for c in cases)
    assert [c.label for c in cases] == [SipFuzzer(SEED, ep, Endpoint(TRUSTED, 1)).case(i).label for i in range(5)]
    t.cell.proc.kill()
    t.cell.proc.wait(5)
    crash = Runner(ep, TRUSTED, t.oracle(1.0), "selftest", batch=5, probe_timeout=1.0, save_dir=saved)
    try:
        failure = crash.run(SEED, 5, 5)
    finally:
        crash.close()
    assert failure and failure.startswith("crash:"), failure
    assert len(list(saved.glob("*/case.json"))) == 2
