"""Bring your own AI: a backend written here drives a live call purely through
the API (numbers -> api app, transcribe, WebSocket transcripts, say, flush on
interruption, hang up), against a real cell with the bundled STT/TTS."""
import asyncio
import threading
import time

import aiohttp

from support import Api, create_key
from voice import Caller, first_voice_time, last_voice_time, transcribe


async def backend(base: str, key: str, log: list, done: asyncio.Event):
    """Answers every caller transcript; flushes when the caller talks over it."""
    hdr = {"Authorization": f"Bearer {key}"}
    async with aiohttp.ClientSession(headers=hdr) as http, http.ws_connect(base.replace("http", "ws") + "/v1/ws") as ws:
        await ws.send_json({"type": "subscribe", "topics": ["*"]})
        speaking = None
        replies = iter(["We are open from nine to five, Monday to Friday, and on Saturdays from ten until two.",
                        "Sure, I will book you in for Monday at ten."])
        async for msg in ws:
            m = msg.json()
            if m["type"] != "event":
                continue
            e = m["event"]
            log.append(e)
            call = e["call_id"]
            if e["type"] == "call_progressing":
                async with http.post(f"{base}/v1/transcribes", json={"call_id": call, "direction": "both"}) as r:
                    assert r.status == 201, await r.text()
                async with http.post(f"{base}/v1/speakings", json={"call_id": call}) as r:
                    assert r.status == 201
                    speaking = (await r.json())["id"]
            elif e["type"] == "transcribe_speech_started" and speaking:
                async with http.post(f"{base}/v1/speakings/{speaking}/flush") as r:
                    log.append({"type": "flushed", "body": await r.json()})
            elif e["type"] == "transcript_created" and e["data"]["direction"] == "in":
                text = next(replies, None)
                if text is None:
                    async with http.post(f"{base}/v1/calls/{call}/hangup") as r:
                        assert r.status == 200
                else:
                    async with http.post(f"{base}/v1/speakings/{speaking}/say", json={"text": text},
                                         headers={"Idempotency-Key": e["id"]}) as r:
                        assert r.status == 202
            elif e["type"] == "call_hangup":
                done.set()
                return


def test_custom_backend_drives_the_call(cell_factory, tmp_path):
    cell = cell_factory('[numbers]\n"service" = "api"\n')       # SIPp dials sip:service@...
    key = create_key(cell.data)
    base = f"http://127.0.0.1:{cell.ports['http']}"
    log: list = []
    done_flag = threading.Event()

    def run_backend():
        async def main():
            done = asyncio.Event()
            await asyncio.wait_for(backend(base, key, log, done), 90)
        asyncio.run(main())
        done_flag.set()
    threading.Thread(target=run_backend, daemon=True).start()
    time.sleep(0.5)
    caller = Caller(cell, tmp_path)
    try:
        caller.silence(1.0)
        end1 = caller.speak("What are your opening hours?")
        deadline = time.monotonic() + 20
        while first_voice_time(caller.peer.received, end1) is None and time.monotonic() < deadline:
            caller.silence(0.1)
        first = first_voice_time(caller.peer.received, end1)
        assert first is not None, "the backend's answer was never heard"
        caller.silence(1.0)                         # hear the start of the long answer, then talk over it
        t_barge = time.monotonic()
        end2 = caller.speak("Can I come on Monday?")
        stopped = last_voice_time([r for r in caller.peer.received if t_barge <= r[0] < end2])
        reply2 = caller.wait_reply(end2)
        assert "monday" in transcribe(reply2).lower()
        caller.speak("Thank you.")
        deadline = time.monotonic() + 30
        while caller.proc.poll() is None and time.monotonic() < deadline:
            caller.silence(0.2)
        assert caller.proc.returncode == 0           # the API's hangup reached SIPp as a BYE
    finally:
        caller.close()
    assert done_flag.wait(15)
    types = [e["type"] for e in log]
    assert "transcribe_speech_interim" in types or "transcript_created" in types
    flushed = [e for e in log if e["type"] == "flushed"]
    heard = [f["body"]["heard"] for f in flushed if f["body"]["heard"]]
    assert heard and "We are open" in heard[0] and heard[0] != "We are open from nine to five, Monday to Friday, " \
        "and on Saturdays from ten until two."
    assert stopped is None or stopped - t_barge < 1.0
    api = Api(cell, key)
    call_id = log[0]["call_id"]
    lines = api.get(f"/v1/calls/{call_id}/transcript")[1]["transcript"]
    ins = [l["text"].lower() for l in lines if l["direction"] == "in"]
    outs = [l["text"] for l in lines if l["direction"] == "out"]
    assert any("opening" in t for t in ins) and any("monday" in t for t in ins)
    assert any(t.startswith("We are open") for t in outs) and any("Monday at ten" in t for t in outs)
    assert api.get(f"/v1/calls/{call_id}")[1]["app"] == "api"
