"""Ogg pages (RFC 3533) and Ogg Opus (RFC 7845): a streaming writer and a reader.

The writer is built for recordings that must survive a crash: packets are
laced into pages and a page is emitted whenever ``flush`` is called (the
recorder does so about once a second), so everything up to the last flush is
a valid, playable Ogg stream even if the process dies before ``close``.

The reader checks every page's CRC and sequence number and is what the tests
(and anyone decrypting a recording by hand) use to get PCM back.

Pure: bytes in, bytes out; no files, clocks or threads.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Iterator

from media.opus import OpusDecoder, OpusEncoder, OpusError

CAPTURE = b"OggS"
OPUS_RATE = 48000            # Opus granule positions always count 48 kHz samples
MAX_SEGMENTS = 255
FLAG_CONTINUED, FLAG_BOS, FLAG_EOS = 0x01, 0x02, 0x04
_HEADER = struct.Struct("<4sBBqIIIB")    # capture, version, flags, granule, serial, seq, crc, nsegs


class OggError(ValueError):
    pass


def _crc_table() -> list[int]:
    # Ogg's CRC-32: polynomial 0x04C11DB7, not reflected, initial value 0, no final xor.
    table = []
    for i in range(256):
        r = i << 24
        for _ in range(8):
            r = ((r << 1) ^ 0x04C11DB7) if r & 0x80000000 else (r << 1)
        table.append(r & 0xFFFFFFFF)
    return table


_CRC = _crc_table()


def ogg_crc(data: bytes) -> int:
    crc = 0
    table = _CRC
    for b in data:
        crc = ((crc << 8) & 0xFFFFFFFF) ^ table[(crc >> 24) ^ b]
    return crc


def build_page(serial: int, seq: int, granule: int, flags: int, lacing: bytes, body: bytes) -> bytes:
    header = _HEADER.pack(CAPTURE, 0, flags, granule, serial, seq, 0, len(lacing)) + lacing
    crc = ogg_crc(header + body)
    return header[:22] + struct.pack("<I", crc) + header[26:] + body


class OggWriter:
    """Lays packets out as pages of one logical stream.

    ``add(packet, granule)`` queues a packet whose last sample is ``granule``;
    ``flush()`` returns the queued packets as complete pages (bytes). A packet
    never waits for a later one: the recorder decides when pages are cut.
    """

    def __init__(self, serial: int):
        self.serial = serial & 0xFFFFFFFF
        self.seq = 0
        self._segments: list[int] = []
        self._body: list[bytes] = []
        self._granule = -1           # of the last packet completed in the pending page
        self._bos = True
        self._cont = False           # the pending page starts inside a packet
        self.closed = False

    def add(self, packet: bytes, granule: int) -> bytes:
        """Queue a packet; returns any pages that had to be cut because 255 segments were used."""
        if self.closed:
            raise OggError("the stream has ended")
        out = []
        n = len(packet)
        pos = 0
        for lace in [255] * (n // 255) + [n % 255]:
            if len(self._segments) == MAX_SEGMENTS:
                out.append(self._page())
                self._cont = pos > 0         # the next page begins with the rest of this packet
            self._segments.append(lace)
            self._body.append(packet[pos:pos + lace])
            pos += lace
        self._granule = granule
        return b"".join(out)

    def _page(self, eos: bool = False) -> bytes:
        flags = (FLAG_BOS if self._bos else 0) | (FLAG_EOS if eos else 0) | (FLAG_CONTINUED if self._cont else 0)
        # A page on which no packet ends carries granule -1 (RFC 3533).
        page = build_page(self.serial, self.seq, self._granule, flags, bytes(self._segments), b"".join(self._body))
        self.seq += 1
        self._bos = self._cont = False
        self._granule = -1
        self._segments.clear()
        self._body.clear()
        return page

    def flush(self) -> bytes:
        """Pending packets as one page (b"" if nothing is pending)."""
        return self._page() if self._segments else b""

    def close(self, granule: int | None = None) -> bytes:
        """The last page, flagged end-of-stream (an empty one if nothing is pending)."""
        if self.closed:
            return b""
        if granule is not None:
            self._granule = granule
        page = self._page(eos=True)
        self.closed = True
        return page


def opus_head(channels: int, pre_skip: int, input_rate: int) -> bytes:
    """The identification header (RFC 7845 §5.1), channel mapping family 0 (mono/stereo)."""
    return b"OpusHead" + struct.pack("<BBHIhB", 1, channels, pre_skip, input_rate, 0, 0)


def opus_tags(vendor: str, comments: list[str]) -> bytes:
    v = vendor.encode()
    out = b"OpusTags" + struct.pack("<I", len(v)) + v + struct.pack("<I", len(comments))
    for c in comments:
        b = c.encode()
        out += struct.pack("<I", len(b)) + b
    return out


class OggOpusEncoder:
    """PCM in (20 ms frames, mono or interleaved stereo), Ogg Opus bytes out.

    ``header()`` gives the two header pages (each on its own page, as RFC 7845
    requires); ``encode(frame)`` queues a packet; ``flush()`` returns a page of
    everything queued; ``close()`` pads the encoder's lookahead with one frame
    of silence and ends the stream with a granule position that trims it, so
    the decoded length equals the input length exactly.
    """

    def __init__(self, rate: int, channels: int = 2, serial: int = 1, bitrate: int = 0,
                 vendor: str = "trunkline", comments: list[str] | None = None):
        self.rate, self.channels = rate, channels
        self.enc = OpusEncoder(rate, channels, bitrate=bitrate)
        # pre-skip is the encoder's lookahead (libopus OPUS_GET_LOOKAHEAD), counted at 48 kHz
        self.pre_skip = self.enc._enc.lookahead * (OPUS_RATE // rate)
        self.ogg = OggWriter(serial)
        self.samples_in = 0          # input samples (per channel) at ``rate``
        self.packets = 0
        self._vendor, self._comments = vendor, list(comments or [])

    @property
    def frame_bytes(self) -> int:
        return self.enc.frame_bytes

    def header(self) -> bytes:
        head = self.ogg.add(opus_head(self.channels, self.pre_skip, self.rate), 0) + self.ogg.flush()
        return head + self.ogg.add(opus_tags(self._vendor, self._comments), 0) + self.ogg.flush()

    def _granule(self) -> int:
        # Decoder output so far, pre-skip included (RFC 7845 §4): playback time is granule - pre_skip.
        return self.packets * (OPUS_RATE // 50)

    def encode(self, pcm: bytes) -> bytes:
        packet = self.enc.encode(pcm)
        self.packets += 1
        self.samples_in += self.enc.samples
        return self.ogg.add(packet, self._granule())

    def flush(self) -> bytes:
        return self.ogg.flush()

    def close(self) -> bytes:
        out = b""
        if self.packets:
            # One more frame pushes the lookahead's worth of real audio out of the encoder.
            out += self.ogg.add(self.enc.encode(bytes(self.enc.frame_bytes)), 0)
            self.packets += 1
        end = self.pre_skip + self.samples_in * (OPUS_RATE // self.rate)
        return out + self.ogg.close(end)


# -- reading -----------------------------------------------------------------------------------


@dataclass
class Page:
    flags: int
    granule: int
    serial: int
    seq: int
    segments: bytes
    body: bytes


def read_pages(data: bytes) -> Iterator[Page]:
    """Every page in ``data``, CRC-checked. A page cut short at the end raises ``OggError``."""
    pos = 0
    while pos < len(data):
        if len(data) - pos < 27:
            raise OggError(f"truncated page header at byte {pos}")
        capture, version, flags, granule, serial, seq, crc, nseg = _HEADER.unpack_from(data, pos)
        if capture != CAPTURE or version != 0:
            raise OggError(f"no Ogg page at byte {pos}")
        lacing = data[pos + 27:pos + 27 + nseg]
        size = 27 + nseg + sum(lacing)
        if len(lacing) < nseg or pos + size > len(data):
            raise OggError(f"truncated page at byte {pos}")
        raw = data[pos:pos + size]
        if ogg_crc(raw[:22] + b"\0\0\0\0" + raw[26:]) != crc:
            raise OggError(f"bad CRC on page {seq} at byte {pos}")
        yield Page(flags, granule, serial, seq, lacing, raw[27 + nseg:])
        pos += size


def read_packets(data: bytes) -> Iterator[tuple[bytes, Page]]:
    """Packets of a single logical stream with the page each one ended on."""
    partial = b""
    expect = 0
    serial = None
    for page in read_pages(data):
        if serial is None:
            serial = page.serial
            if not page.flags & FLAG_BOS:
                raise OggError("the first page is not flagged beginning-of-stream")
        elif page.serial != serial:
            raise OggError("more than one logical stream")
        if page.seq != expect:
            raise OggError(f"page {expect} is missing (got {page.seq})")
        expect += 1
        if bool(page.flags & FLAG_CONTINUED) != bool(partial):
            raise OggError(f"page {page.seq}: continuation flag does not match")
        pos = 0
        for lace in page.segments:
            partial += page.body[pos:pos + lace]
            pos += lace
            if lace < 255:
                yield partial, page
                partial = b""


@dataclass
class OpusStream:
    channels: int
    pre_skip: int
    input_rate: int
    vendor: str
    comments: list[str]
    pcm: bytes                 # at the requested rate, pre-skip and end trimming applied
    rate: int
    ended: bool                # an end-of-stream page was seen
    pages: int
    granules: list[int]


def decode_ogg_opus(data: bytes, rate: int = OPUS_RATE) -> OpusStream:
    """Decode a whole Ogg Opus stream to interleaved s16le PCM at ``rate``."""
    packets = read_packets(data)
    try:
        head, _ = next(packets)
        tags, _ = next(packets)
    except StopIteration:
        raise OggError("missing OpusHead/OpusTags") from None
    if len(head) < 19 or head[:8] != b"OpusHead" or head[8] != 1:
        raise OggError("not an Opus stream (bad OpusHead)")
    channels, pre_skip, input_rate, _gain, family = struct.unpack_from("<BHIhB", head, 9)
    if family != 0 or channels not in (1, 2):
        raise OggError("only channel mapping family 0 is supported")
    if tags[:8] != b"OpusTags":
        raise OggError("missing OpusTags")
    vlen = struct.unpack_from("<I", tags, 8)[0]
    vendor = tags[12:12 + vlen].decode(errors="replace")
    n = struct.unpack_from("<I", tags, 12 + vlen)[0]
    pos, comments = 16 + vlen, []
    for _ in range(n):
        clen = struct.unpack_from("<I", tags, pos)[0]
        comments.append(tags[pos + 4:pos + 4 + clen].decode(errors="replace"))
        pos += 4 + clen
    dec = OpusDecoder(rate, channels)
    out = []
    last_granule = -1
    ended = False
    pages = set()
    granules = []
    for packet, page in packets:
        try:
            out.append(dec.decode(packet))
        except OpusError as exc:
            raise OggError(str(exc)) from None
        if page.seq not in pages:
            pages.add(page.seq)
            granules.append(page.granule)
        last_granule = page.granule
        ended = ended or bool(page.flags & FLAG_EOS)
    pcm = b"".join(out)
    width = 2 * channels
    scale = OPUS_RATE // rate
    skip = pre_skip // scale
    total = len(pcm) // width
    end = total
    if ended and last_granule >= 0:
        end = min(total, last_granule // scale)
    pcm = pcm[skip * width:end * width]
    return OpusStream(channels, pre_skip, input_rate, vendor, comments, pcm, rate, ended, len(pages) + 2,
                      granules)
