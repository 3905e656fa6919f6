"""Sealed files: append-only AES-256-GCM in independently authenticated chunks.

A recording is written for as long as a call lasts and must survive the
process dying at any moment, so the file cannot be one GCM message (that
would need the whole plaintext before the tag). Instead::

    header   "TLSEAL\\r\\n" | version (1) | key id length (1) | key id | salt (16)
    chunk*   flags (1) | length (4, big-endian) | ciphertext + 16-byte tag

- The file key is HKDF-SHA256(master key, salt, "trunkline sealed v1" + key id):
  a fresh random salt per file gives every file its own key, so the chunk
  index alone is a safe nonce (12 bytes, big-endian) and no nonce is ever
  reused under one key however many files a master key seals.
- Each chunk's associated data is SHA-256(header) | index (8) | flags (1):
  a chunk moved to another file or position, a flipped final flag or an
  edited header fails authentication.
- The last chunk carries the FINAL flag. A file whose chunks all verify but
  that has no final chunk (or ends inside a chunk) was cut short: a crash or
  a full disk while recording, or someone truncating it. Readers report it
  as *truncated* and give back everything up to the last whole chunk; they
  never call it complete. Any byte after the final chunk is corruption.

The master key never leaves the key ring; only its id is in the header.
"""
from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass
from typing import BinaryIO, Iterator

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from bridge.core.keys import KeyRing, KeyRingError

MAGIC = b"TLSEAL\r\n"
VERSION = 1
SALT_BYTES = 16
TAG_BYTES = 16
FINAL = 0x01
MAX_CHUNK = 1 << 20            # plaintext bytes per chunk (a writer cuts bigger writes)
_CHUNK = struct.Struct(">BI")


class SealedError(ValueError):
    """Not a sealed file, or it does not authenticate (tampered, wrong key)."""


class SealedKeyError(SealedError):
    """The file names a key id the key ring does not hold."""


class SealError(RuntimeError):
    """Encryption itself failed (distinct from an I/O error on the file)."""


def _file_key(master: bytes, salt: bytes, key_id: str) -> AESGCM:
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=b"trunkline sealed v1 " + key_id.encode())
    return AESGCM(hkdf.derive(master))


def _nonce(index: int) -> bytes:
    return index.to_bytes(12, "big")


def _aad(header_hash: bytes, index: int, flags: int) -> bytes:
    return header_hash + index.to_bytes(8, "big") + bytes([flags])


def make_header(key_id: str, salt: bytes) -> bytes:
    kid = key_id.encode()
    return MAGIC + bytes([VERSION, len(kid)]) + kid + salt


class SealedWriter:
    """Seals what is written to ``f`` chunk by chunk.

    ``write`` buffers; ``flush`` seals the buffer as one chunk and hands it to
    the file in a single write, then flushes the file object (so a killed
    process keeps every flushed chunk); ``close`` seals the rest as the final
    chunk and fsyncs. An ``OSError`` from the file propagates as is; a failure
    of the cipher is a ``SealError``.
    """

    def __init__(self, f: BinaryIO, key_id: str, key: bytes, salt: bytes | None = None):
        self.f = f
        self.key_id = key_id
        salt = salt or os.urandom(SALT_BYTES)
        self.header = make_header(key_id, salt)
        self._hash = hashlib.sha256(self.header).digest()
        try:
            self._aead = _file_key(key, salt, key_id)
        except Exception as exc:  # noqa: BLE001 - e.g. a key of the wrong size
            raise SealError(f"cannot set up encryption: {type(exc).__name__}") from None
        self.index = 0
        self._buf = bytearray()
        self.bytes_written = 0          # on disk, header and overhead included
        self.plain_bytes = 0            # sealed so far
        self.closed = False
        self._out(self.header)

    def _out(self, data: bytes) -> None:
        self.f.write(data)
        self.f.flush()
        self.bytes_written += len(data)

    def _seal(self, data: bytes, flags: int) -> bytes:
        try:
            ct = self._aead.encrypt(_nonce(self.index), bytes(data), _aad(self._hash, self.index, flags))
        except Exception as exc:  # noqa: BLE001
            raise SealError(f"encryption failed on chunk {self.index}: {type(exc).__name__}") from None
        self.index += 1
        self.plain_bytes += len(data)
        return _CHUNK.pack(flags, len(ct)) + ct

    def write(self, data: bytes) -> None:
        if self.closed:
            raise SealError("the sealed file is closed")
        self._buf += data
        while len(self._buf) > MAX_CHUNK:
            part = bytes(self._buf[:MAX_CHUNK])
            del self._buf[:MAX_CHUNK]
            self._out(self._seal(part, 0))

    def flush(self) -> None:
        """Seal and write what is buffered (nothing happens when the buffer is empty)."""
        if self._buf and not self.closed:
            chunk = self._seal(self._buf, 0)
            self._buf = bytearray()
            self._out(chunk)

    def close(self, fsync: bool = True) -> None:
        if self.closed:
            return
        chunk = self._seal(self._buf, FINAL)
        self._buf = bytearray()
        self.closed = True
        self._out(chunk)
        if fsync:
            try:
                os.fsync(self.f.fileno())
            except (OSError, AttributeError, ValueError):
                pass


@dataclass
class Scan:
    key_id: str
    chunks: int                 # whole chunks (not decrypted: structure only)
    plain_bytes: int            # plaintext in those chunks
    complete: bool              # the final chunk is there and nothing follows it
    trailing: int               # bytes after the last whole chunk (a cut chunk, or junk after FINAL)


def _parse_header(f: BinaryIO) -> tuple[str, bytes, bytes]:
    head = f.read(len(MAGIC) + 2)
    if len(head) < len(MAGIC) + 2 or head[:len(MAGIC)] != MAGIC:
        raise SealedError("not a sealed recording file")
    version, klen = head[len(MAGIC)], head[len(MAGIC) + 1]
    if version != VERSION:
        raise SealedError(f"unsupported sealed file version {version}")
    rest = f.read(klen + SALT_BYTES)
    if len(rest) < klen + SALT_BYTES:
        raise SealedError("the file header is cut short")
    try:
        key_id = rest[:klen].decode("ascii")
    except UnicodeDecodeError:
        raise SealedError("the key id in the header is not ASCII") from None
    return key_id, rest[klen:], head + rest


def scan(f: BinaryIO) -> Scan:
    """Walk the chunk headers without decrypting: size and completeness of a sealed file."""
    f.seek(0)
    key_id, _, _ = _parse_header(f)
    chunks = plain = 0
    complete = False
    trailing = 0
    while True:
        head = f.read(_CHUNK.size)
        if not head:
            break
        if complete or len(head) < _CHUNK.size:
            trailing = len(head) + len(f.read())
            break
        flags, length = _CHUNK.unpack(head)
        if length < TAG_BYTES or length > MAX_CHUNK + TAG_BYTES or flags & ~FINAL:
            trailing = len(head) + len(f.read())
            break
        body = f.read(length)
        if len(body) < length:
            trailing = len(head) + len(body)
            break
        chunks += 1
        plain += length - TAG_BYTES
        complete = bool(flags & FINAL)
    return Scan(key_id, chunks, plain, complete and not trailing, trailing)


class SealedReader:
    """Decrypts a sealed file chunk by chunk; every chunk is authenticated before it is returned.

    Iterating yields plaintext pieces. A chunk that fails authentication, junk
    after the final chunk or a malformed chunk header raises ``SealedError``.
    A file that simply stops (no final chunk, or a chunk cut short at the end)
    ends the iteration quietly with ``complete = False``.
    """

    def __init__(self, f: BinaryIO, keys: KeyRing):
        self.f = f
        f.seek(0)
        self.key_id, salt, header = _parse_header(f)
        try:
            master = keys.key(self.key_id)
        except KeyRingError:
            raise SealedKeyError(f"the recording was sealed with key {self.key_id!r}, which is not configured") \
                from None
        self._aead = _file_key(master, salt, self.key_id)
        self._hash = hashlib.sha256(header).digest()
        self.complete = False
        self.chunks = 0

    def __iter__(self) -> Iterator[bytes]:
        index = 0
        while True:
            head = self.f.read(_CHUNK.size)
            if not head:
                return                                   # ended without the final chunk: truncated
            if self.complete:
                raise SealedError("data after the final chunk")
            if len(head) < _CHUNK.size:
                return
            flags, length = _CHUNK.unpack(head)
            if length < TAG_BYTES or length > MAX_CHUNK + TAG_BYTES or flags & ~FINAL:
                raise SealedError(f"chunk {index}: malformed chunk header")
            body = self.f.read(length)
            if len(body) < length:
                return                                   # the last chunk was cut short
            try:
                plain = self._aead.decrypt(_nonce(index), body, _aad(self._hash, index, flags))
            except InvalidTag:
                raise SealedError(f"chunk {index} failed authentication (tampered, reordered or wrong key)") \
                    from None
            index += 1
            self.chunks = index
            if flags & FINAL:
                self.complete = True
            yield plain


def decrypt_file(path: str, keys: KeyRing) -> tuple[bytes, bool]:
    """The whole plaintext of a sealed file and whether it is complete."""
    with open(path, "rb") as f:
        r = SealedReader(f, keys)
        data = b"".join(r)
        return data, r.complete
