"""ITU-T G.107 E-model: transmission rating R and MOS for a narrowband call.

Only the terms a VoIP endpoint can know are inputs: codec (equipment
impairment Ie and packet-loss robustness Bpl from ITU-T G.113 Appendix I),
packet loss, its burstiness, and one-way mouth-to-ear delay. Everything else
uses the G.107 default values (Table 3), which give R = 93.2.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

# G.107 Table 3 default values.
SLR, RLR, STMR, LSTR = 8.0, 2.0, 15.0, 18.0
DS, DR, TELR, WEPL = 3.0, 3.0, 65.0, 110.0
PS, PR, NC, NFOR = 35.0, 35.0, -70.0, -64.0
QDU, A = 1.0, 0.0
OLR = SLR + RLR


@dataclass(frozen=True)
class CodecImpairment:
    ie: float    # equipment impairment factor
    bpl: float   # packet-loss robustness factor


# G.113 Appendix I (Table I.1 / I.3). G.711 with PLC (pjmedia conceals loss).
CODECS: dict[str, CodecImpairment] = {
    "PCMU": CodecImpairment(0.0, 25.1),
    "PCMA": CodecImpairment(0.0, 25.1),
    "G711_NOPLC": CodecImpairment(0.0, 4.3),
    # G.722 is wideband; on the narrowband scale it is at least as good as
    # G.711, so it is rated with G.711's values (documented simplification).
    "G722": CodecImpairment(0.0, 25.1),
    "G729": CodecImpairment(11.0, 19.0),
    "GSM": CodecImpairment(20.0, 10.0),
    "ILBC": CodecImpairment(10.0, 32.0),
    "OPUS": CodecImpairment(0.0, 25.1),
}


def _noise_sum() -> float:
    """No: power sum of circuit, send-room, receive-room and floor noise (dBm0p)."""
    nfo = NFOR + RLR
    pre = PR + 10 * math.log10(1 + 10 ** ((10 - LSTR) / 10))
    nor = RLR - 121 + pre + 0.008 * (pre - 35) ** 2
    nos = PS - SLR - DS - 100 + 0.004 * (PS - OLR - DS - 14) ** 2
    return 10 * math.log10(10 ** (NC / 10) + 10 ** (nos / 10) + 10 ** (nor / 10) + 10 ** (nfo / 10))


NO = _noise_sum()
R0 = 15 - 1.5 * (SLR + NO)   # basic signal-to-noise ratio Ro (G.107 7.2)


def _simultaneous_impairment() -> float:
    """Is = Iolr + Ist + Iq (G.107 7.3), default values, T = 0 for the sidetone term."""
    xolr = OLR + 0.2 * (64 + NO - RLR)
    iolr = 20 * ((1 + (xolr / 8) ** 8) ** (1 / 8) - xolr / 8)
    stmro = -10 * math.log10(10 ** (-STMR / 10) + 10 ** (-TELR / 10))
    ist = (12 * (1 + ((stmro - 13) / 6) ** 8) ** (1 / 8)
           - 28 * (1 + ((stmro + 1) / 19.4) ** 35) ** (1 / 35)
           - 13 * (1 + ((stmro - 3) / 33) ** 13) ** (1 / 13) + 29)
    q = 37 - 15 * math.log10(QDU)
    g = 1.07 + 0.258 * q + 0.0602 * q * q
    z = 46 / 30 - g / 40
    y = (R0 - 100) / 15 + 46 / 8.4 - g / 9
    iq = 15 * math.log10(1 + 10 ** y + 10 ** z)
    return iolr + ist + iq


IS = _simultaneous_impairment()


def _idte(t: float) -> float:
    terv = TELR - 40 * math.log10((1 + t / 10) / (1 + t / 150)) + 6 * math.exp(-0.3 * t * t)
    roe = -1.5 * (NO - RLR)
    re = 80 + 2.5 * (terv - 14)
    idte = ((roe - re) / 2 + math.sqrt((roe - re) ** 2 / 4 + 100) - 1) * (1 - math.exp(-t))
    return idte  # STMR <= 20 with the defaults, so no sidetone correction


def _idle(tr: float) -> float:
    rle = 10.5 * (WEPL + 7) * (tr + 1) ** (-0.25)
    return (R0 - rle) / 2 + math.sqrt((R0 - rle) ** 2 / 4 + 169)


def _idd(ta: float) -> float:
    if ta <= 100:
        return 0.0
    x = math.log10(ta / 100) / math.log10(2)
    return 25 * ((1 + x ** 6) ** (1 / 6) - 3 * (1 + (x / 3) ** 6) ** (1 / 6) + 2)


def delay_impairment(delay_ms: float) -> float:
    """Id for a one-way mouth-to-ear delay, with T = Ta and Tr = 2 Ta (echo-free VoIP path)."""
    t = max(0.0, delay_ms)
    return _idte(t) + _idle(2 * t) + _idd(t)


def effective_ie(codec: str, loss_pct: float, burst_ratio: float = 1.0) -> float:
    imp = CODECS.get(codec.upper(), CODECS["PCMU"])
    ppl = max(0.0, min(100.0, loss_pct))
    burst = max(1.0, burst_ratio)
    return imp.ie + (95 - imp.ie) * ppl / (ppl / burst + imp.bpl)


def r_factor(codec: str = "PCMU", loss_pct: float = 0.0, delay_ms: float = 0.0, burst_ratio: float = 1.0) -> float:
    r = R0 - IS - delay_impairment(delay_ms) - effective_ie(codec, loss_pct, burst_ratio) + A
    return max(0.0, min(100.0, r))


def mos_from_r(r: float) -> float:
    if r <= 0:
        return 1.0
    if r >= 100:
        return 4.5
    return 1 + 0.035 * r + r * (r - 60) * (100 - r) * 7e-6


def mos(codec: str = "PCMU", loss_pct: float = 0.0, delay_ms: float = 0.0, burst_ratio: float = 1.0) -> float:
    return mos_from_r(r_factor(codec, loss_pct, delay_ms, burst_ratio))
