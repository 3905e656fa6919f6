"""HTTPS for the API (``http.tls_cert`` / ``http.tls_key``): a test CA and a server certificate for
127.0.0.1 are made here; a client that verifies against that CA reaches /v1, the WebSocket and the
console; plain HTTP to the same port fails, as do clients that do not trust the CA or offer only
TLS 1.1."""
import asyncio
import datetime
import http.client
import ipaddress
import json
import re
import socket
import ssl
import time
import urllib.error
import urllib.request

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from bridge.core import config
from support import BoxProcess, create_key


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_ca_and_server(tmp_path) -> tuple[str, str, str]:
    """(CA cert PEM path, server cert chain PEM path, server key PEM path) for 127.0.0.1."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(_name("Trunkline test CA")).issuer_name(_name("Trunkline test CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(_name("127.0.0.1")).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    ca_path, cert_path, key_path = tmp_path / "ca.pem", tmp_path / "server.pem", tmp_path / "server.key"
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return str(ca_path), str(cert_path), str(key_path)


def _get(url: str, ctx: ssl.SSLContext | None, key: str | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(req, timeout=5, context=ctx) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _wait_https(cell, ctx: ssl.SSLContext, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert cell.alive(), cell.log_path.read_text()
        try:
            if _get(f"https://127.0.0.1:{cell.ports['http']}/healthz", ctx)[0] == 200:
                return
        except (OSError, ssl.SSLError):
            pass
        time.sleep(0.1)
    raise AssertionError("cell did not answer over HTTPS:\n" + cell.log_path.read_text()[-3000:])


async def _ws(port: int, key: str, ctx: ssl.SSLContext) -> dict:
    async with aiohttp.ClientSession() as s:
        async with s.ws_connect(f"wss://127.0.0.1:{port}/v1/ws", ssl=ctx,
                                headers={"Authorization": f"Bearer {key}"}) as ws:
            await ws.send_json({"type": "subscribe", "topics": ["*"], "since": 0})
            while True:
                m = await asyncio.wait_for(ws.receive_json(), 10)
                if m["type"] == "subscribed":
                    return m


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning")
def test_api_websocket_and_console_over_https_only(cell_factory, tmp_path):
    ca, cert, key = make_ca_and_server(tmp_path)
    cell = cell_factory(f'[http]\ntls_cert = "{cert}"\ntls_key = "{key}"\n', wait=False)
    trusted = ssl.create_default_context(cafile=ca)             # verifies the chain and 127.0.0.1
    _wait_https(cell, trusted)
    base = f"https://127.0.0.1:{cell.ports['http']}"
    read = create_key(cell.data, "read")

    status, body = _get(f"{base}/v1/calls", trusted, read)
    assert status == 200 and json.loads(body) == {"calls": []}
    assert _get(f"{base}/v1/calls", trusted)[0] == 401
    status, body = _get(f"{base}/console", trusted)
    assert status == 200 and b"<html" in body.lower()
    assert asyncio.run(_ws(cell.ports["http"], read, trusted))["type"] == "subscribed"

    # plain HTTP to the TLS port: no answer in clear
    with pytest.raises((OSError, http.client.HTTPException)):
        _get(f"http://127.0.0.1:{cell.ports['http']}/v1/calls", None, read)
    # a client that does not trust the test CA refuses the server
    with pytest.raises(urllib.error.URLError) as exc:
        _get(f"{base}/healthz", ssl.create_default_context())
    assert isinstance(exc.value.reason, ssl.SSLCertVerificationError)
    # TLS 1.1 and older are refused by the server (TLS 1.2 minimum)
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.load_verify_locations(ca)
    old.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
    old.maximum_version = ssl.TLSVersion.TLSv1_1
    with pytest.raises((ssl.SSLError, urllib.error.URLError, OSError)):
        _get(f"{base}/healthz", old)
    # what was negotiated with a default client
    with trusted.wrap_socket(socket.create_connection(("127.0.0.1", cell.ports["http"]), 5),
                             server_hostname="127.0.0.1") as s:
        assert s.version() in ("TLSv1.2", "TLSv1.3")
    assert cell.stop() == 0


def test_tls_settings_are_checked(tmp_path):
    ca, cert, key = make_ca_and_server(tmp_path)
    assert config.load(overrides={"http.tls_cert": cert, "http.tls_key": key}).raw["http"]["tls_cert"] == cert
    with pytest.raises(config.ConfigError, match="http.tls_cert: HTTPS needs both"):
        config.load(overrides={"http.tls_cert": cert})
    with pytest.raises(config.ConfigError, match="http.tls_key: .* is not a readable file"):
        config.load(overrides={"http.tls_cert": cert, "http.tls_key": str(tmp_path / "missing.key")})
    cfg = config.load(overrides={"http.tls_cert": cert, "http.tls_key": key})
    from bridge.api.http import server_tls
    ctx = server_tls(cfg.raw["http"])
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert server_tls(config.load().raw["http"]) is None


@pytest.mark.slow
def test_box_serves_https_while_its_cells_stay_plain_behind_it(tmp_path):
    """The box terminates HTTPS on its address; its cells (loopback, reached only by the box) are
    started without TLS, so the box's health, forwarding and metrics keep working."""
    ca, cert, key = make_ca_and_server(tmp_path)
    box = BoxProcess(tmp_path, 2, f'[models]\nload = "never"\n[http]\ntls_cert = "{cert}"\ntls_key = "{key}"\n')
    box.start(wait=False)
    try:
        trusted = ssl.create_default_context(cafile=ca)
        deadline = time.monotonic() + 30
        health = None
        while time.monotonic() < deadline:
            assert box.alive(), box.log_path.read_text()[-3000:]
            try:
                status, body = _get(f"https://127.0.0.1:{box.ports['http']}/healthz", trusted)
                health = json.loads(body)
                if status == 200:
                    break
            except (OSError, ValueError):
                pass
            time.sleep(0.2)
        assert health and health.get("cells_taking_calls") == 2, (health, box.log_path.read_text()[-3000:])
        read = create_key(box.data, "read")
        assert _get(f"https://127.0.0.1:{box.ports['http']}/v1/calls", trusted, read)[0] == 200
        with pytest.raises((OSError, http.client.HTTPException)):
            _get(f"http://127.0.0.1:{box.ports['http']}/healthz", None)
        status, text = _get(f"https://127.0.0.1:{box.ports['http']}/metrics", trusted)
        assert status == 200 and re.search(rb'trunkline_box_cell_up\{cell="0"\} 1(\.0)?\n', text), text[-2000:]
    finally:
        assert box.stop() == 0
