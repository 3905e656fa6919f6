"""A small billing API for the tool tests and the tools benchmark: a real aiohttp
server on loopback with customers, open invoices and payments.

It behaves like a careful production API: bearer-token auth, payments need an
``Idempotency-Key`` (a repeated key returns the first answer and charges
nothing), unknown invoices are 404, paid ones 409. Tests make it misbehave
with ``fail(path, mode, times)``: ``500``, ``429`` (with ``Retry-After``),
``slow`` (answers after ``slow_seconds``) and ``garbage`` (200 with a body
that is not JSON).
"""
from __future__ import annotations

import asyncio
import json
import time
from collections import defaultdict

import aiohttp
from aiohttp import web

from support import serve_on_loopback

TOKEN = "sk_test_billing_51f0c1"

CUSTOMERS = [
    {"id": "cus_001", "name": "Ada Lovelace", "phone": "+15551230001", "email": "ada@example.com"},
    {"id": "cus_002", "name": "Alan Turing", "phone": "+15551230002", "email": "alan@example.com"},
]


def _invoices() -> list[dict]:
    return [
        {"id": "in_9f1", "number": "INV-1001", "customer_id": "cus_001", "amount_due": 120.5, "currency": "USD",
         "status": "open", "due_date": "2026-12-01"},
        {"id": "in_9f2", "number": "INV-1002", "customer_id": "cus_001", "amount_due": 42.0, "currency": "USD",
         "status": "ovd", "due_date": "2026-11-15"},
        {"id": "in_9f3", "number": "INV-1003", "customer_id": "cus_001", "amount_due": 0.0, "currency": "USD",
         "status": "paid", "due_date": "2026-10-01"},
        {"id": "in_9f4", "number": "INV-2001", "customer_id": "cus_002", "amount_due": 75.0, "currency": "USD",
         "status": "open", "due_date": "2026-12-10"},
    ]


class BillingApi:
    def __init__(self, slow_seconds: float = 3.0):
        self.slow_seconds = slow_seconds
        self.invoices = _invoices()
        self.payments: list[dict] = []           # actual charges
        self.idempotent: dict[str, tuple[int, dict]] = {}
        self.requests: list[dict] = []          # every request: path, method, headers, query, body, at
        self.faults: dict[str, list[str]] = defaultdict(list)
        self.callbacks: list[tuple[int, str]] = []   # async results posted: (status, url)
        self.async_delay = 0.5
        self.port, self.loop = serve_on_loopback(self._app)
        self.url = f"http://127.0.0.1:{self.port}"

    # -- test controls ------------------------------------------------------
    def fail(self, path: str, mode: str, times: int = 1) -> None:
        """The next ``times`` requests to ``path`` misbehave as ``mode``."""
        self.faults[path].extend([mode] * times)

    def count(self, path: str, method: str | None = None) -> int:
        return sum(1 for r in self.requests if r["path"] == path and (method is None or r["method"] == method))

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)

    # -- server -------------------------------------------------------------
    def _app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware])
        app.router.add_get("/v1/customers", self._customers)
        app.router.add_get("/v1/invoices", self._list_invoices)
        app.router.add_post("/v1/payments", self._pay)
        app.router.add_post("/v1/payments/async", self._pay_async)
        return app

    @web.middleware
    async def _middleware(self, request, handler):
        raw = await request.read()
        self.requests.append({"path": request.path, "method": request.method, "headers": dict(request.headers),
                              "query": dict(request.query), "body": raw.decode(errors="replace"),
                              "at": time.monotonic()})
        if request.headers.get("Authorization") != f"Bearer {TOKEN}":
            return web.json_response({"error": {"message": "bad token"}}, status=401)
        queue = self.faults.get(request.path)
        mode = queue.pop(0) if queue else None
        if mode == "500":
            return web.json_response({"error": {"message": "database unavailable"}}, status=500)
        if mode == "429":
            return web.json_response({"error": {"message": "slow down"}}, status=429, headers={"Retry-After": "1"})
        if mode == "429long":
            return web.json_response({"error": {"message": "slow down"}}, status=429, headers={"Retry-After": "120"})
        if mode == "slow":
            await asyncio.sleep(self.slow_seconds)
        if mode == "garbage":
            return web.Response(status=200, body=b"<html>502 Bad Gateway</html>", content_type="application/json")
        return await handler(request)

    def _customer(self, phone: str) -> dict | None:
        return next((c for c in CUSTOMERS if c["phone"] == phone), None)

    async def _customers(self, request):
        c = self._customer(request.query.get("phone", ""))
        return web.json_response({"customers": [c] if c else []})

    async def _list_invoices(self, request):
        c = self._customer(request.query.get("phone", ""))
        if c is None:
            return web.json_response({"error": {"message": "no customer with that phone number"}}, status=404)
        status = request.query.get("status")
        out = [i for i in self.invoices if i["customer_id"] == c["id"]
               and (status is None or (status == "open" and i["status"] in ("open", "ovd")) or i["status"] == status)]
        return web.json_response({"customer": {"id": c["id"], "name": c["name"], "email": c["email"]},
                                  "invoices": out})

    def _charge(self, body: dict) -> tuple[int, dict]:
        inv = next((i for i in self.invoices if i["number"] == body.get("invoice_number")), None)
        if inv is None:
            return 404, {"error": {"message": "no such invoice"}}
        if inv["status"] == "paid":
            return 409, {"error": {"message": "that invoice is already paid"}}
        amount = inv["amount_due"]
        pay = {"id": f"pay_{len(self.payments) + 1:03d}", "invoice_number": inv["number"], "amount": amount,
               "status": "succeeded", "card_last4": "4242"}
        self.payments.append(pay)
        inv["status"], inv["amount_due"] = "paid", 0.0
        return 201, {"payment": pay}

    async def _pay(self, request):
        key = request.headers.get("Idempotency-Key")
        if not key:
            return web.json_response({"error": {"message": "Idempotency-Key is required"}}, status=400)
        if key in self.idempotent:
            status, body = self.idempotent[key]
            return web.json_response(body, status=status, headers={"Idempotent-Replayed": "true"})
        try:
            body = json.loads(await request.read())
        except ValueError:
            return web.json_response({"error": {"message": "body is not JSON"}}, status=400)
        status, out = self._charge(body)
        self.idempotent[key] = (status, out)
        return web.json_response(out, status=status)

    async def _pay_async(self, request):
        body = json.loads(await request.read())
        callback = body.get("callback_url")
        if not callback:
            return web.json_response({"error": {"message": "callback_url is required"}}, status=400)

        async def later():
            await asyncio.sleep(self.async_delay)
            status, out = self._charge(body)
            result = {"status": "confirmed" if status == 201 else "failed", **out}
            try:
                async with aiohttp.ClientSession() as s:
                    async with s.post(callback, json=result) as r:
                        self.callbacks.append((r.status, callback))
            except aiohttp.ClientError:
                self.callbacks.append((0, callback))          # nobody listening (unit tests)
        asyncio.ensure_future(later())
        return web.json_response({"status": "pending", "reference": "req_77"}, status=202)


def tools_toml(url: str, timeout: float = 1.0, attempts: int = 3) -> str:
    """The tool declarations the tests and the benchmark use against this API."""
    return f'''
[tools]
secrets_file = "{{secrets}}"
breaker_failures = 3
breaker_cooldown = 2.0
filler_after = 0.5

[[tool]]
name = "lookup_invoices"
description = "Look up the caller's open invoices: how much they owe and when it is due."
examples = ["what do I owe", "my bill", "open invoices", "how much is my balance"]
method = "GET"
url = "{url}/v1/invoices"
query = {{ phone = "{{args.phone}}", status = "open" }}
bind = {{ phone = "call.from" }}
parameters = {{ type = "object", properties = {{ phone = {{ type = "string", format = "e164" }} }}, required = ["phone"] }}
headers = {{ Authorization = "Bearer ${{secret:billing_token}}" }}
timeout = {timeout}
retry = {{ attempts = {attempts}, base_delay = 0.05, max_delay = 0.2 }}
result = {{ path = "invoices", fields = {{ number = "number", amount_due = "amount", due_date = "due", status = "status" }}, max_items = 3, codes = {{ status = {{ ovd = "overdue", open = "open" }} }} }}
say = "You have {{count}} open invoices. The first is {{items[0].number}} for {{items[0].amount}} dollars."
errors = {{ 404 = "I could not find an account for this phone number." }}

[[tool]]
name = "pay_invoice"
description = "Pay one of the caller's open invoices with the card on file."
examples = ["pay my invoice", "make a payment", "pay the bill"]
method = "POST"
url = "{url}/v1/payments"
parameters = {{ type = "object", properties = {{ invoice_number = {{ type = "string", pattern = "^INV-[0-9]{{4}}$", description = "like INV-1001" }} }}, required = ["invoice_number"] }}
headers = {{ Authorization = "Bearer ${{secret:billing_token}}" }}
idempotency_key = "{{call.id}}-pay-{{args_hash}}"
timeout = {timeout}
retry = {{ attempts = {attempts}, base_delay = 0.05, max_delay = 0.2 }}
result = {{ path = "payment", fields = {{ invoice_number = "invoice", amount = "amount", status = "status" }} }}
say = "Done. I paid {{invoice}}, {{amount}} dollars."
errors = {{ 404 = "I could not find that invoice.", 409 = "That invoice is already paid." }}

[[tool]]
name = "pay_invoice_later"
description = "Start a payment that the bank confirms later."
examples = ["pay later", "schedule a payment"]
method = "POST"
url = "{url}/v1/payments/async"
parameters = {{ type = "object", properties = {{ invoice_number = {{ type = "string", pattern = "^INV-[0-9]{{4}}$" }} }}, required = ["invoice_number"] }}
body = {{ invoice_number = "{{args.invoice_number}}", callback_url = "{{callback_url}}" }}
headers = {{ Authorization = "Bearer ${{secret:billing_token}}" }}
idempotency_key = "{{call.id}}-later-{{args_hash}}"
timeout = {timeout}
async = {{ accepted = [202], say = "I have started the payment. I will tell you when the bank confirms it.", result_say = "Your payment is {{status}}." }}
result = {{ fields = {{ status = "status" }} }}
'''
