"""SRTP for the tests and benches (issue 12): AES_CM_128_HMAC_SHA1_80 (RFC 3711) with SDES keys
(RFC 4568) in plain Python on ``cryptography``. Used by tests/test_opus_edge.py (one SRTP call
with Opus) and tests/bench/srtpbox.py (many pre-encrypted SRTP calls into a box)."""
from __future__ import annotations

import struct


class Srtp:
    """SRTP with AES_CM_128_HMAC_SHA1_80 (RFC 3711, SDES keys as RFC 4568 sends them), one
    direction: ``protect`` the packets we send with our key, ``unprotect`` (authenticate, then
    decrypt) the ones rtpengine sends with its key. Plain AES-CTR and HMAC-SHA1 from
    ``cryptography``; the rollover counter follows the sequence numbers."""

    def __init__(self, inline: str):
        import base64
        raw = base64.b64decode(inline.split("|")[0])
        key, salt = raw[:16], raw[16:30]
        self.enc, self.auth = self._kdf(key, salt, 0, 16), self._kdf(key, salt, 1, 20)
        self.salt = self._kdf(key, salt, 2, 14)
        self.roc, self.last = 0, None

    @staticmethod
    def _ctr(key: bytes, iv: int, data: bytes) -> bytes:
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
        return Cipher(algorithms.AES(key), modes.CTR(iv.to_bytes(16, "big"))).encryptor().update(data)

    @classmethod
    def _kdf(cls, key: bytes, salt: bytes, label: int, n: int) -> bytes:
        return cls._ctr(key, (int.from_bytes(salt, "big") ^ (label << 48)) << 16, bytes(n))

    def _crypt(self, head: bytes, payload: bytes, index: int) -> bytes:
        ssrc = struct.unpack("!I", head[8:12])[0]
        iv = (int.from_bytes(self.salt, "big") << 16) ^ (ssrc << 64) ^ (index << 16)
        return self._ctr(self.enc, iv, payload)

    def _tag(self, data: bytes, roc: int) -> bytes:
        import hashlib
        import hmac
        return hmac.new(self.auth, data + struct.pack("!I", roc), hashlib.sha1).digest()[:10]

    @staticmethod
    def _split(packet: bytes) -> int:
        n = 12 + 4 * (packet[0] & 0x0F)
        if packet[0] & 0x10:
            n += 4 + 4 * struct.unpack("!H", packet[n + 2:n + 4])[0]
        return n

    def protect(self, packet: bytes) -> bytes:
        seq = struct.unpack("!H", packet[2:4])[0]
        if self.last is not None and seq < self.last and self.last - seq > 0x8000:
            self.roc += 1
        self.last = seq
        n = self._split(packet)
        out = packet[:n] + self._crypt(packet[:n], packet[n:], (self.roc << 16) | seq)
        return out + self._tag(out, self.roc)

    def unprotect(self, packet: bytes) -> bytes | None:
        """The plain RTP packet, or None when its authentication tag is wrong."""
        body, tag = packet[:-10], packet[-10:]
        seq = struct.unpack("!H", packet[2:4])[0]
        roc = self.roc + (1 if self.last is not None and seq < self.last and self.last - seq > 0x8000 else 0)
        if self._tag(body, roc) != tag:
            return None
        self.roc, self.last = roc, seq if self.last is None or roc > self.roc or seq > self.last else self.last
        n = self._split(body)
        return body[:n] + self._crypt(body[:n], body[n:], (roc << 16) | seq)
