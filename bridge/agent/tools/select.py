"""Which tools are worth offering the model for this turn.

A 135M model asked to choose among every tool on every turn mostly guesses
(see the tools benchmark), and the choice pass costs a few hundred ms. So the
model is shown only the tools whose words (name, description, ``examples``)
the caller actually used; a turn that matches none skips the choice pass
entirely, and a bigger model can be given every tool (``tools.shortlist = 0``).
"""
from __future__ import annotations

import re

from bridge.core.toolspec import ToolSpec

STOP = set("""a an the and or but if of to in on at for with from by about as is are was were be been being am
i me my mine you your yours we our us it its this that these those there here what which who whom whose when
where why how do does did done can could would should will shall may might must have has had having not no yes
please thanks thank hi hello okay ok just like want wanna need get got let know tell say one some any all
so very really too also than then now up out into over again more most much many""".split())
_WORD = re.compile(r"[a-z0-9]+")


def stem(w: str) -> str:
    for suffix in ("ing", "ed", "es", "s"):
        if w.endswith(suffix) and len(w) - len(suffix) >= 3:
            return w[: -len(suffix)]
    return w


def words(text: str) -> set[str]:
    return {stem(w) for w in _WORD.findall(text.lower().replace("_", " ")) if w not in STOP and len(w) > 1}


def keywords(spec: ToolSpec) -> set[str]:
    return words(" ".join([spec.name, spec.description, *spec.examples]))


def shortlist(text: str, specs: list[ToolSpec], limit: int) -> list[ToolSpec]:
    """Tools sharing words with ``text``, best first, at most ``limit`` (0: all tools)."""
    if limit <= 0:
        return list(specs)
    said = words(text)
    scored = [(len(said & keywords(s)), i, s) for i, s in enumerate(specs)]
    scored = [x for x in scored if x[0] > 0]
    scored.sort(key=lambda x: (-x[0], x[1]))
    return [s for _, _, s in scored[:limit]]
