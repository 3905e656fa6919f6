"""What of a model's output may be spoken: everything else never reaches TTS.

A small model imitates what it reads, and its history shows tool calls as
text; so now and then it "speaks" ``(using tool createpayment {"amount":10})``,
a JSON object, a code block, a stage direction (``*smiles*``, ``[laughs]``,
``(pauses)``) or a chat-template role tag (``assistant:``, ``<|im_start|>``).
``Speakable`` removes all of that from a token stream, as the tokens arrive:

    s = Speakable()
    for tok in tokens:
        say(s.feed(tok))          # the speakable part so far (maybe "")
    say(s.finish())               # the rest; the fallback line if only markup came

It is pure (no I/O, no clock) and streaming-safe: text that might still turn
out to be markup (an open bracket, a half-typed tag, the word being typed) is
held back until it is decided, so a sentence cut for TTS never contains half
a construct. Plain speech passes unchanged apart from markdown emphasis
characters. ``speakable(text)`` filters a whole string at once.
"""
from __future__ import annotations

import re

# A role label at the start of a line: the model writing a chat transcript.
_LABEL = re.compile(r"(?:#+\s*)?(assistant|agent|ai|bot|system|receptionist)\s*:", re.I)
# Somebody else's turn: the model goes on to write the caller's part; nothing after it is ours.
_OTHER = re.compile(r"(user|caller|human|customer)\s*:", re.I)
# Chat-template special tokens and instruction markers.
_SPECIAL = re.compile(r"<\|[^|<>\s]{0,40}\|>|</?s>|\[/?INST\]|<<(?:/?SYS)>>")
_TURN_START = re.compile(r"<\|im_start\|>\s*(\w*)|<\|start_header_id\|>\s*(\w*)")
# HTML/XML-ish tags; these wrap content that is never speech.
_TAG = re.compile(r"<(/?)([A-Za-z_][\w:-]*)([^<>]*)>")
_BLOCK_TAGS = {"tool_call", "tool_calls", "function_call", "function", "tool", "code", "json", "think",
               "tool_response", "tool_result", "scratchpad", "arguments"}
# Words announcing a tool call in prose form: "(using tool createpayment {...})", "calling function x".
_TOOL_PHRASE = re.compile(r"(?:using|calling|call|use|invoking|invoke|run|running|executing)\s+(?:the\s+)?"
                          r"(?:tool|function|api)\b\s*:?\s*(?:[A-Za-z_][\w.-]*)?", re.I)
_TOOL_START = re.compile(r"(?:using|calling|call|use|invoking|invoke|run|running|executing)\s+(?:the\s+)?"
                         r"(?:(?:tool|function|api)\s*:?\s*)?$", re.I)     # ... may be such a phrase: wait
_TOOL_PREFIX = re.compile(r"(?:tool_call|function_call|action|action_input|tool|function)\s*:", re.I)
# An identifier glued to an argument list or object: pay_invoice(...), functions.lookup{...}.
_CALL = re.compile(r"[A-Za-z_][\w.]*(?=[({])")
# snake_case / dotted identifiers are code, not words.
_IDENT = re.compile(r"[A-Za-z0-9]*_[A-Za-z0-9_]*|[A-Za-z]\w*\.[A-Za-z_]\w*(?:\.\w+)*(?=\()")
# A short action between asterisks/parentheses: *smiles*, (pauses), (laughs softly), *clears throat*.
_ACTIONS = {"smile", "smiles", "smiling", "laugh", "laughs", "laughing", "chuckle", "chuckles", "sigh", "sighs",
            "pause", "pauses", "pausing", "nod", "nods", "grin", "grins", "wink", "winks", "cough", "coughs",
            "clears", "giggles", "giggle", "whispers", "whisper", "shrugs", "shrug", "typing", "types", "beep",
            "silence", "music", "waits", "thinking", "thinks", "checks", "checking", "looks",
            "looking", "searching", "searches", "smirks", "gasps", "inhales", "exhales", "sound", "sounds",
            "friendly", "cheerfully", "warmly", "softly", "happily", "excitedly", "calmly",
            "noise", "ringing", "rings", "clicks", "click"}
# Markup characters that are dropped wherever they are (their content stays).
_STRIP = str.maketrans("", "", "*#`_~|^\\<>")
HOLD_LIMIT = 400            # an open ( or * this far back was not markup after all
FALLBACK = "Could you tell me a little more about what you need?"


def _close_of(buf: str, i: int) -> int | None:
    """Index just past the bracket group opening at ``buf[i]`` (``{[(``, nesting, JSON strings), or None."""
    pairs = {"{": "}", "[": "]", "(": ")"}
    stack = [pairs[buf[i]]]
    j = i + 1
    in_str = False
    while j < len(buf):
        c = buf[j]
        if in_str:
            if c == "\\":
                j += 1
            elif c == '"':
                in_str = False
        elif c == '"' and buf[i] != "(":
            in_str = True
        elif c in pairs:
            stack.append(pairs[c])
        elif c in ")]}":
            if c == stack[-1]:            # a stray closer of another kind is skipped
                stack.pop()
                if not stack:
                    return j + 1
        j += 1
    return None


def is_stage_direction(inner: str) -> bool:
    """``smiles``, ``laughs softly``, ``pauses for a moment``: an action, not words to say."""
    words = re.findall(r"[A-Za-z']+", inner.lower())
    if not words or len(words) > 6 or re.search(r"\d", inner):
        return False
    return words[0] in _ACTIONS or (len(words) <= 3 and words[-1] in _ACTIONS)


def _markupish(inner: str) -> bool:
    """Parenthesised text that is code or a tool call rather than an aside."""
    return bool(re.search(r"[{}\[\]=<>`]|\"\s*:|\w_\w|\b(?:tool|function|args|arguments|json)\b", inner, re.I))


class Speakable:
    """Filters one model reply (one round), token by token."""

    def __init__(self, fallback: str = FALLBACK):
        self.fallback = fallback
        self.buf = ""
        self.dropped: list[str] = []      # what was removed (tests, logs)
        self.spoke = False                # something speakable came out
        self.ended = False                # the model started another party's turn: the rest is ignored
        self.tool_chosen = False          # the round ended in a real tool call (no fallback then)
        self._line_start = True           # the next text begins a line (role labels are looked for)

    # -- the stream ---------------------------------------------------------------------
    def feed(self, token: str) -> str:
        if self.ended:
            if token:
                self.dropped.append(token)
            return ""
        self.buf += token
        return self._emit(self._scan(final=False))

    def finish(self) -> str:
        """The rest of the reply; the fallback line if the round spoke nothing but markup."""
        out = self._emit(self._scan(final=True)) if not self.ended else ""
        if not self.ended and self.buf:
            self.dropped.append(self.buf)
        self.buf = ""
        if not self.spoke and self.dropped and not self.tool_chosen and self.fallback:
            self.spoke = True
            return (out + " " + self.fallback).strip()
        return out

    def chose_tool(self) -> None:
        self.tool_chosen = True

    # -- scanning ----------------------------------------------------------------------------
    def _emit(self, text: str) -> str:
        text = text.translate(_STRIP)
        text = re.sub(r"[ \t]*\n[ \t\n]*", " ", text)
        text = re.sub(r" {2,}", " ", text)
        if not self.spoke:
            text = re.sub(r"^[\W_]+", "", text)          # no punctuation before the first word
        if re.search(r"[^\W_]", text):
            self.spoke = True
        return text

    def _drop(self, what: str) -> None:
        if what.strip():
            self.dropped.append(what)

    def _scan(self, final: bool) -> str:
        buf = self.buf
        # Only whole words are decided: the word still being typed may become a tag or an identifier.
        end = len(buf)
        if not final:
            ws = max(buf.rfind(" "), buf.rfind("\n"), buf.rfind("\t"))
            end = ws + 1 if ws >= 0 else 0
        out: list[str] = []
        i = 0
        while i < end:
            c = buf[i]
            at_word = i == 0 or not (buf[i - 1].isalnum() or buf[i - 1] == "_")
            # role labels and other people's turns
            if self._line_start or at_word:
                m = _OTHER.match(buf, i) if at_word else None
                if m and (self._line_start or buf[:i].rstrip()[-1:] in ("", ".", "!", "?")):
                    self._drop(buf[i:])
                    self.ended = True
                    self.buf = ""
                    return "".join(out)
                m = _LABEL.match(buf, i) if self._line_start else None
                if m:
                    self._drop(m.group(0))
                    i = m.end()
                    continue
            if c == "\n":
                self._line_start = True
                out.append(c)
                i += 1
                continue
            if self._line_start and c == "#":             # a markdown heading mark: the line goes on
                m = re.compile(r"#+[ \t]*").match(buf, i)
                self._drop(m.group(0))
                i = m.end()
                continue
            if buf.startswith("[INST]", i):                # an instruction block: someone else's words
                j = buf.find("[/INST]", i)
                if j < 0:
                    return self._hold(out, i, final, drop=True)
                self._drop(buf[i:j + 7])
                i = j + 7
                continue
            if not c.isspace():
                self._line_start = False
            # code fences and inline code
            if buf.startswith("```", i) or c == "`":
                fence = "```" if buf.startswith("```", i) else "`"
                j = buf.find(fence, i + len(fence))
                if j < 0:
                    return self._hold(out, i, final, drop=True)
                self._drop(buf[i:j + len(fence)])
                i = j + len(fence)
                continue
            # chat-template tokens and tags
            if c == "<" or (c == "[" and buf.startswith("[INST]", i)) or (c == "[" and buf.startswith("[/INST]", i)):
                m = _TURN_START.match(buf, i)
                if m and (m.group(1) or m.group(2) or "").lower() in ("user", "system", "tool", "ipython"):
                    self._drop(buf[i:])
                    self.ended = True
                    self.buf = ""
                    return "".join(out)
                if m:                                   # <|im_start|>assistant: our own turn, restarted
                    self._drop(m.group(0))
                    i = m.end()
                    self._line_start = True
                    continue
                m = _SPECIAL.match(buf, i)
                if m:
                    self._drop(m.group(0))
                    i = m.end()
                    if m.group(0).startswith("<|im_start|>") or m.group(0).startswith("<|start_header_id|>"):
                        self._line_start = True
                    continue
                m = _TAG.match(buf, i)
                if m:
                    name = m.group(2).lower()
                    if not m.group(1) and name in _BLOCK_TAGS and not m.group(3).rstrip().endswith("/"):
                        close = re.compile(rf"</{re.escape(m.group(2))}\s*>", re.I).search(buf, m.end())
                        if close is None:
                            return self._hold(out, i, final, drop=True)
                        self._drop(buf[i:close.end()])
                        i = close.end()
                    else:
                        self._drop(m.group(0))
                        i = m.end()
                    continue
                nxt = buf[i + 1:i + 2]
                if c == "<" and (not nxt or nxt in "|/" or nxt.isalpha()) and ">" not in buf[i:i + 80] \
                        and len(buf) - i < 80 and not final:
                    return self._hold(out, i, final, drop=False)
            # prose tool-call announcements and prefixes
            if at_word and c.isalpha():
                if not final and _TOOL_START.match(buf[i:end]):
                    return self._hold(out, i, final, drop=False)
                m = _TOOL_PHRASE.match(buf, i) or _TOOL_PREFIX.match(buf, i)
                if m:
                    self._drop(m.group(0))
                    i = m.end()
                    continue
                m = _CALL.match(buf, i)
                if m and (buf[m.end()] == "{" or "_" in m.group(0) or "." in m.group(0)
                          or _markupish(buf[m.end():m.end() + 60]) or buf[m.end() + 1:m.end() + 2] in ("", ")")):
                    close = _close_of(buf, m.end())
                    if close is None:
                        return self._hold(out, i, final, drop=True)
                    self._drop(buf[i:close])
                    i = close
                    continue
                m = _IDENT.match(buf, i)
                if m and "_" in m.group(0).strip("_") and re.search(r"[A-Za-z]", m.group(0)):
                    self._drop(m.group(0))
                    i = m.end()
                    continue
            # JSON, arrays, bracketed stage directions: never speech
            if c in "{[":
                close = _close_of(buf, i)
                if close is None:
                    return self._hold(out, i, final, drop=True)
                self._drop(buf[i:close])
                i = close
                continue
            if c in "}]":
                self._drop(c)
                i += 1
                continue
            # parentheses: an aside is spoken, a stage direction or code is not
            if c == "(":
                close = _close_of(buf, i)
                if close is None:
                    if final or len(buf) - i > HOLD_LIMIT:
                        inner = buf[i + 1:]
                        if _markupish(inner) or is_stage_direction(inner):
                            self._drop(inner)
                            i = len(buf) if final else i + 1
                            if final:
                                break
                            continue
                        i += 1                       # a lone "(": not spoken, the words are
                        continue
                    return self._hold(out, i, final, drop=False)
                inner = buf[i + 1:close - 1]
                if _markupish(inner) or is_stage_direction(inner):
                    self._drop(buf[i:close])
                    i = close
                else:
                    out.append(" " + inner + " ")
                    i = close
                continue
            if c == ")":
                i += 1
                continue
            # *stage directions* (single asterisks); **bold** and *emphasis* keep their words
            if c == "*" and not buf.startswith("**", i) and (i == 0 or buf[i - 1] != "*"):
                j = buf.find("*", i + 1)
                if j < 0:
                    if final or len(buf) - i > HOLD_LIMIT:
                        i += 1
                        continue
                    return self._hold(out, i, final, drop=False)
                inner = buf[i + 1:j]
                if is_stage_direction(inner) or _markupish(inner):
                    self._drop(buf[i:j + 1])
                else:
                    out.append(inner)
                i = j + 1
                continue
            out.append(c)
            i += 1
        self.buf = buf[i:] if i < len(buf) else ""
        return "".join(out)

    def _hold(self, out: list[str], i: int, final: bool, drop: bool) -> str:
        """An open construct at ``buf[i]``: keep it for later (or, at the end, drop it)."""
        if final:
            if drop:
                self._drop(self.buf[i:])
            self.buf = ""
        else:
            self.buf = self.buf[i:]
        return "".join(out)


def speakable(text: str, fallback: str = "") -> str:
    """``text`` without markup, whitespace tidied ("" if nothing speakable is left and no fallback)."""
    s = Speakable(fallback)
    out = s.feed(text) + s.finish()
    return re.sub(r"\s+", " ", out).strip()
