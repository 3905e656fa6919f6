"""The SSRF guard (bridge/core/netguard.py, bridge/core/guarded_http.py) and its use by
webhooks, media streams, tools and the OpenAI-compatible LLM backend. Receivers are
real aiohttp servers on 127.0.0.1; the default policy must refuse to reach them."""
import asyncio
import socket
import time

import aiohttp
import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver

from bridge.agent.tools.runner import CallContext, ToolRunner
from bridge.core import config
from bridge.core.guarded_http import (GuardedConnector, RedirectRefused, RefusedConnection, failure_class,
                                      guarded_session)
from bridge.core.metrics import Metrics
from bridge.core.netguard import OutboundRefused, Policy, classify, parse_ip
from bridge.core.toolspec import load_toolbox
from support import Api, create_key, sipp

NEVER = '[models]\nload = "never"\n'


# -- the policy (pure) ------------------------------------------------------------------------
@pytest.mark.parametrize("addr,reason", [
    ("127.0.0.1", "loopback"), ("127.9.9.9", "loopback"), ("::1", "loopback"),
    ("169.254.1.1", "link-local"), ("fe80::1", "link-local"),
    ("169.254.169.254", "metadata"), ("fd00:ec2::254", "metadata"), ("100.100.100.200", "metadata"),
    ("168.63.129.16", "metadata"),
    ("224.0.0.1", "multicast"), ("ff02::1", "multicast"),
    ("0.0.0.0", "unspecified"), ("0.1.2.3", "unspecified"), ("::", "unspecified"),
    ("240.0.0.1", "reserved"), ("255.255.255.255", "reserved"),
    ("::ffff:127.0.0.1", "loopback"), ("64:ff9b::7f00:1", "loopback"), ("2002:a9fe:a9fe::", "metadata"),
])
def test_default_policy_refuses_inward_addresses(addr, reason):
    assert classify(parse_ip(addr)) == reason
    with pytest.raises(OutboundRefused) as e:
        Policy().check_address(addr)
    assert e.value.reason == reason


def test_private_ranges_only_in_strict_mode():
    for addr in ("10.1.2.3", "172.16.0.1", "192.168.1.1", "100.64.0.1", "fd12::1", "198.18.0.1"):
        Policy().check_address(addr)                               # default: a LAN receiver is fine
        with pytest.raises(OutboundRefused, match="private"):
            Policy(strict=True).check_address(addr)
    for addr in ("93.184.216.34", "2606:4700::1111"):
        Policy(strict=True).check_address(addr)                    # public stays allowed


def test_allow_list_cidrs_and_hosts():
    p = Policy.parse(["127.0.0.1/32", "10.0.0.0/8", "billing.internal", "::1"], strict=True)
    p.check_address("127.0.0.1")
    p.check_address("10.9.9.9")
    p.check_address("::1")
    with pytest.raises(OutboundRefused):
        p.check_address("127.0.0.2")
    p.check_host("Billing.Internal.", ["127.0.0.5"])                 # an allowed name: its answer is trusted
    with pytest.raises(OutboundRefused):
        p.check_host("other.internal", ["93.184.216.34", "127.0.0.5"])   # one bad address refuses the name
    # a wide range never opens the metadata service; naming it exactly does
    with pytest.raises(OutboundRefused, match="metadata"):
        Policy.parse(["169.254.0.0/16"]).check_address("169.254.169.254")
    Policy.parse(["169.254.169.254"]).check_address("169.254.169.254")
    for bad in (["10.0.0.0/33"], ["not a host!"], [""]):
        with pytest.raises(ValueError):
            Policy.parse(bad)


def test_check_url_refuses_literal_addresses_only():
    p = Policy()
    for url in ("http://127.0.0.1:9/x", "http://[::1]/", "http://169.254.169.254/latest/meta-data/",
                "http://[::ffff:127.0.0.1]/", "http://2130706433/", "http://127.1/", "http://0x7f.1/"):
        with pytest.raises(OutboundRefused):
            p.check_url(url, ("http", "https"))
    p.check_url("https://hooks.example.com/x", ("http", "https"))     # names are checked when connecting
    with pytest.raises(ValueError):
        p.check_url("ftp://example.com/", ("http", "https"))
    with pytest.raises(ValueError):
        p.check_url("http:///nohost", ("http", "https"))


# -- the connector (real sockets on loopback) ----------------------------------------------------
async def _server(handler_map: dict) -> tuple[web.AppRunner, int]:
    app = web.Application()
    for path, h in handler_map.items():
        app.router.add_route("*", path, h)
    runner = web.AppRunner(app)
    await runner.setup()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, port


def test_guarded_session_refuses_loopback_by_default_and_never_redirects():
    hits = []

    async def ok(request):
        hits.append(request.path)
        return web.Response(text="secret internal page")

    async def redirect(request):
        hits.append(request.path)
        raise web.HTTPFound("/internal")

    async def main():
        runner, port = await _server({"/ok": ok, "/internal": ok, "/redirect": redirect})
        try:
            async with guarded_session() as s:                 # the default policy
                for url in (f"http://127.0.0.1:{port}/ok", f"http://localhost:{port}/ok"):
                    with pytest.raises(RefusedConnection) as e:
                        await s.get(url)
                    assert failure_class(e.value) == "refused address"
            assert hits == []
            async with guarded_session(Policy.parse(["127.0.0.1/32"])) as s:
                async with s.get(f"http://127.0.0.1:{port}/ok") as r:
                    assert r.status == 200
                with pytest.raises(RedirectRefused) as e:       # even when the caller forgot allow_redirects
                    await s.get(f"http://127.0.0.1:{port}/redirect")
                assert failure_class(e.value) == "redirect refused"
                with pytest.raises(aiohttp.ClientError):        # a WebSocket handshake does not follow one either
                    await s.ws_connect(f"ws://127.0.0.1:{port}/redirect")
            assert hits == ["/ok", "/redirect", "/redirect"]    # /internal was never reached
        finally:
            await runner.cleanup()
    asyncio.run(main())


class FlipResolver(AbstractResolver):
    """A DNS that answers 127.0.0.1 and then 127.0.0.2 for the same name (rebinding)."""

    def __init__(self):
        self.answers = ["127.0.0.1", "127.0.0.2"]
        self.asked = 0

    async def resolve(self, host, port=0, family=socket.AF_INET):
        a = self.answers[min(self.asked, len(self.answers) - 1)]
        self.asked += 1
        return [{"hostname": host, "host": a, "port": port, "family": socket.AF_INET, "proto": 0,
                 "flags": socket.AI_NUMERICHOST}]

    async def close(self):
        pass


def test_connector_connects_to_the_address_it_checked():
    seen = []

    async def ok(request):
        seen.append(request.transport.get_extra_info("sockname")[0])
        return web.Response(text="ok")

    async def main():
        runner, port = await _server({"/": ok})
        resolver = FlipResolver()
        conn = GuardedConnector(Policy.parse(["127.0.0.1/32"]), resolver=resolver, use_dns_cache=False,
                                force_close=True)
        try:
            async with aiohttp.ClientSession(connector=conn) as s:
                async with s.get(f"http://rebind.test:{port}/") as r:
                    assert r.status == 200
                # the name now points elsewhere: that answer is checked before it is used
                with pytest.raises(RefusedConnection):
                    await s.get(f"http://rebind.test:{port}/")
        finally:
            await runner.cleanup()
        assert resolver.asked == 2 and seen == ["127.0.0.1"]
    asyncio.run(main())


# -- tools ------------------------------------------------------------------------------------
def _box(tmp_path, url: str):
    return load_toolbox([{"name": "lookup", "description": "d", "url": url + "/{args.id}",
                          # (the id's provenance is not what this test is about: bridge/agent/tools/provenance.py)
                          "parameters": {"type": "object", "properties": {"id": {"type": "string",
                                                                                 "x-source": "model"}}}}],
                        environ={})


def test_tool_requests_obey_the_guard(tmp_path):
    hits = []

    async def ok(request):
        hits.append(request.path)
        return web.json_response({"ok": True})

    async def redirect(request):
        hits.append(request.path)
        raise web.HTTPFound("/v/other")

    async def main():
        runner, port = await _server({"/v/{id}": ok, "/r/{id}": redirect})
        sets = {"max_per_call": 8, "breaker_failures": 5, "breaker_cooldown": 30.0}
        try:
            r = ToolRunner(_box(tmp_path, f"http://127.0.0.1:{port}/v"), sets, Metrics())     # default guard
            await r.start()
            o = await r.call(CallContext("c1"), "lookup", {"id": "1"})
            await r.close()
            assert o.status == "error" and o.kind == "refused" and "127.0.0.1" not in o.message
            assert hits == []
            allow = Policy.parse(["127.0.0.1/32"])
            r = ToolRunner(_box(tmp_path, f"http://127.0.0.1:{port}/v"), sets, Metrics(), guard=allow)
            await r.start()
            assert (await r.call(CallContext("c2"), "lookup", {"id": "1"})).status == "ok"
            await r.close()
            r = ToolRunner(_box(tmp_path, f"http://127.0.0.1:{port}/r"), sets, Metrics(), guard=allow)
            await r.start()
            o = await r.call(CallContext("c3"), "lookup", {"id": "1"})
            await r.close()
            assert o.kind == "refused" and o.attempts == 1
            assert hits == ["/v/1", "/r/1"]                      # the redirect target was never asked
        finally:
            await runner.cleanup()
    asyncio.run(main())


# -- config: the LLM URL and tool URLs -----------------------------------------------------------
def test_config_refuses_inward_llm_and_tool_urls_unless_allowed(tmp_path):
    cfg = tmp_path / "c.toml"
    llm = '[models]\nllm_backend = "openai"\nllm_url = "{}"\nllm_model = "m"\n'
    for url in ("http://127.0.0.1:8000/v1", "http://169.254.169.254/v1", "http://localhost:8000/v1"):
        cfg.write_text(llm.format(url))
        with pytest.raises(config.ConfigError, match="models.llm_url: .*refused"):
            config.load(str(cfg), environ={})
    cfg.write_text(llm.format("http://127.0.0.1:8000/v1") + '[http]\noutbound_allow = ["127.0.0.1/32"]\n')
    assert config.load(str(cfg), environ={}).outbound.allow_nets
    cfg.write_text(llm.format("http://localhost:8000/v1") + '[http]\noutbound_allow = ["localhost"]\n')
    config.load(str(cfg), environ={})
    tool = ('[[tool]]\nname = "t"\ndescription = "d"\nurl = "http://127.0.0.1:9/x"\n'
            '[tool.parameters]\ntype = "object"\n')
    cfg.write_text(tool)
    with pytest.raises(config.ConfigError, match="tool t: url: loopback address refused"):
        config.load(str(cfg), environ={})
    cfg.write_text('[http]\noutbound_allow = ["127.0.0.0/8"]\n' + tool)
    config.load(str(cfg), environ={})
    cfg.write_text('[http]\noutbound_allow = ["10.0.0.0/40"]\n')
    with pytest.raises(config.ConfigError, match="http.outbound_allow"):
        config.load(str(cfg), environ={})
    cfg.write_text('[http]\noutbound_strict = "maybe"\n')
    with pytest.raises(config.ConfigError, match="http.outbound_strict"):
        config.load(str(cfg), environ={})


# -- the API on a real cell --------------------------------------------------------------------
class Receiver:
    """A webhook receiver on loopback, in its own thread, counting what reaches it."""

    def __init__(self, redirect_to: str | None = None):
        import threading
        self.hits: list[str] = []
        self.redirect_to = redirect_to
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        self.ready.wait(5)

    def _run(self):
        asyncio.set_event_loop(self.loop)

        async def handle(request):
            self.hits.append(request.path)
            if self.redirect_to and request.path != "/final":
                raise web.HTTPFound(self.redirect_to)
            return web.Response(text="<html>internal admin page</html>", status=200)
        self.runner, self.port = self.loop.run_until_complete(_server({"/{tail:.*}": handle}))
        self.ready.set()
        self.loop.run_forever()

    def close(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def _delivery(api, webhook_id: str, timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ds = [d for d in api.get("/v1/webhook-deliveries")[1]["deliveries"] if d["webhook_id"] == webhook_id]
        if ds and ds[0]["status"] in ("failed", "dead", "delivered"):
            return ds[0]
        time.sleep(0.1)
    raise AssertionError(f"no finished delivery for {webhook_id}")


def _make_event(cell, tmp_path) -> None:
    """A short SIPp call: its events go to every webhook."""
    assert sipp("call_pcmu.xml", cell.sip, tmp_path, "-d", "200", local_port=cell.ports["sipp"]).returncode == 0


def test_api_refuses_inward_webhook_urls_by_default(cell_factory, tmp_path):
    cell = cell_factory(NEVER + '[webhooks]\nmax_attempts = 2\nbase_delay = 0.05\nretry_for = 0\n')
    api = Api(cell, create_key(cell.data))
    for url in ("http://127.0.0.1:9/x", "http://[::1]:9/", "http://169.254.169.254/latest/meta-data/",
                "http://[::ffff:127.0.0.1]/", "http://0.0.0.0:9/", "http://2130706433/"):
        status, body, _ = api.post("/v1/webhooks", {"url": url, "topics": ["*"]})
        assert status == 400, (url, body)
        assert body["error"]["field"] == "url" and body["error"]["code"] == "refused_address"
    assert api.get("/v1/webhooks")[1]["webhooks"] == []
    # a name is checked when connecting: "localhost" is registered but never reached
    rx = Receiver()
    try:
        status, wh, _ = api.post("/v1/webhooks", {"url": f"http://localhost:{rx.port}/hook"})
        assert status == 201
        _make_event(cell, tmp_path)
        d = _delivery(api, wh["id"])
        assert d["status"] == "failed" and d["last_error"] == "refused address"
        assert rx.hits == []
        m = cell.metrics()
        assert m.get('trunkline_outbound_refused_total{use="webhook"}', 0) >= 1
    finally:
        rx.close()


def test_webhook_redirects_are_failures_and_errors_say_only_the_class(cell_factory, tmp_path):
    rx = Receiver(redirect_to="/final")
    try:
        cell = cell_factory(NEVER + '[http]\noutbound_allow = ["127.0.0.1/32"]\n'
                            '[webhooks]\nmax_attempts = 2\nbase_delay = 0.05\nretry_for = 0\n')
        api = Api(cell, create_key(cell.data))
        _, redirected, _ = api.post("/v1/webhooks", {"url": f"http://127.0.0.1:{rx.port}/hook"})
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
        s.close()
        _, nowhere, _ = api.post("/v1/webhooks", {"url": f"http://127.0.0.1:{closed_port}/hook"})
        _make_event(cell, tmp_path)
        d = _delivery(api, redirected["id"])
        assert d["status"] == "failed" and d["last_error"] == "redirect refused" and d["last_status"] == 302
        assert "/final" not in rx.hits
        d = _delivery(api, nowhere["id"], timeout=20)
        assert d["status"] == "dead" and d["last_error"] == "connect failed"    # no address, no exception text
    finally:
        rx.close()


def test_stream_urls_are_checked_when_registered(cell_factory, tmp_path):
    from test_streams import API_CALLS, finish_call, kill, start_call
    cell = cell_factory(API_CALLS.split("[http]")[0])               # no allow-list: the default policy
    peer, proc, api, call_id = start_call(cell, tmp_path, 2.0)
    try:
        base = f"/v1/calls/{call_id}/streams"
        for url in ("ws://127.0.0.1:9/media", "wss://[::1]/x", "ws://169.254.169.254/"):
            status, body, _ = api.post(base, {"url": url})
            assert status == 400 and body["error"]["field"] == "url", (url, body)
        status, st, _ = api.post(base, {"url": "ws://localhost:9/media"})     # a name: checked on connect
        assert status == 201
        deadline = time.monotonic() + 5
        while api.get(f"{base}/{st['id']}")[1]["status"] != "failed" and time.monotonic() < deadline:
            time.sleep(0.05)
        got = api.get(f"{base}/{st['id']}")[1]
        assert got["status"] == "failed" and got["reason"] == "refused"
        assert got["detail"] == "connect failed: refused address"
        finish_call(proc, peer)
    finally:
        kill(proc)


def test_openai_backend_never_follows_a_redirect():
    from ai.llm import GenParams, OpenAIChat
    hits = []

    async def redirect(request):
        hits.append(request.path)
        raise web.HTTPFound("/internal")          # urllib would follow this one (as a GET)

    async def internal(request):
        hits.append(request.path)
        return web.Response(text="data: [DONE]\n\n", content_type="text/event-stream")

    async def main():
        runner, port = await _server({"/v1/chat/completions": redirect, "/internal": internal})
        try:
            llm = OpenAIChat(f"http://127.0.0.1:{port}/v1", "m", api_key="sk-secret", timeout=5)
            with pytest.raises(RuntimeError, match="redirects are not followed"):
                await asyncio.to_thread(lambda: list(llm.stream("c", [{"role": "user", "content": "hi"}],
                                                                GenParams())))
        finally:
            await runner.cleanup()
    asyncio.run(main())
    assert hits == ["/v1/chat/completions"]
