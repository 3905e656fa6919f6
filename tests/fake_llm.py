"""A scripted OpenAI-compatible chat server (SSE, native tool calls) on loopback.

It stands in for the user's own model server where a test is about the
plumbing around the model (tools, text mode), not about the model: the
reply depends on keywords in the last message, so the script is plain.
"""
from __future__ import annotations

import json

from aiohttp import web

from support import serve_on_loopback

# last user message contains -> tool call (name, arguments as sent, in pieces)
RULES = [
    ("later", ("pay_invoice_later", ['{"invoice_', 'number": "INV-1001"}'])),
    ("pay", ("pay_invoice", ['{"invoice_number"', ': "INV-1002"}'])),
    ("owe", ("lookup_invoices", ["{", "}"])),
    ("bill", ("lookup_invoices", ["{}"])),
    ("invoice", ("lookup_invoices", ["{}"])),
]


class FakeLLM:
    def __init__(self):
        self.requests: list[dict] = []
        self.port, self.loop = serve_on_loopback(self._app)
        self.url = f"http://127.0.0.1:{self.port}/v1"

    def _app(self) -> web.Application:
        async def chat(request):
            body = await request.json()
            self.requests.append(body)
            last = body["messages"][-1]
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)

            async def send(delta):
                await resp.write(f"data: {json.dumps({'choices': [{'delta': delta}]})}\n\n".encode())
            rule = None
            if last["role"] == "user" and body.get("tools"):
                text = last["content"].lower()
                offered = {t["function"]["name"] for t in body["tools"]}
                rule = next((r for k, r in RULES if k in text and r[0] in offered), None)
            if rule is not None:
                name, pieces = rule
                await send({"tool_calls": [{"index": 0, "id": f"call_{len(self.requests)}", "type": "function",
                                            "function": {"name": name, "arguments": ""}}]})
                for p in pieces:
                    await send({"tool_calls": [{"index": 0, "function": {"arguments": p}}]})
            elif last["role"] == "tool":
                for piece in ["I looked that up ", "for you."]:
                    await send({"content": piece})
            else:
                for piece in ["We are open ", "nine to five."]:
                    await send({"content": piece})
            await resp.write(b"data: [DONE]\n\n")
            return resp

        app = web.Application()
        app.router.add_post("/v1/chat/completions", chat)
        return app
