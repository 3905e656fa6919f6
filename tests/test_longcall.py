"""Long calls (issue 14): history truncation, the model's context window, memory flat.

The fast tests drive the turn machine through two hours of dialogue on a synthetic
clock with a fake at the model boundary (prompts counted in the bundled model's real
tokens), and check the context fitting of the llama.cpp adapter with its real
tokenizer. The slow ones run the real llama.cpp model for many rounds against a small
context window, and one real agent call (cell, inference process, SIPp caller) with
/proc sampled. Figures: ``python tests/bench/run.py --only longcall``.
"""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "bench"))

import longcall  # noqa: E402
from ai.llm import MESSAGE_OVERHEAD, PROMPT_OVERHEAD, fit_context  # noqa: E402
from bridge.core.config import DEFAULTS  # noqa: E402

AGENT = DEFAULTS["agent"]
CONTEXT = DEFAULTS["models"]["llm_context"]


def test_two_hours_of_dialogue_keep_the_prompt_flat():
    run = longcall.dialog_run(120.0)
    assert run.call_seconds >= 120 * 60 and run.turns >= 1000
    assert run.apologies == 0
    assert len(run.prompts) == run.turns                     # every turn got one reply round
    ht = AGENT["history_turns"]
    # The window: the system prompt, the last history_turns exchanges, and (a speculative
    # reply) the caller's words not yet in the history.
    assert max(p.messages for p in run.prompts) <= 2 + 2 * ht
    for i, p in enumerate(run.prompts):                     # the newest words are always there
        assert p.user == longcall.CALLER_LINES[i % len(longcall.CALLER_LINES)]
    toks = [p.tokens for p in run.prompts]
    early = toks[:100]                                      # the caller's lines repeat every 7 turns
    assert max(toks) == max(early), "the prompt grew after the history window was full"
    late = toks[-100:]
    assert sum(late) / len(late) <= 1.05 * sum(toks[50:150]) / 100
    assert max(toks) + AGENT["max_reply_tokens"] <= CONTEXT
    assert run.history_len == 1 + 2 * run.turns             # the machine keeps the whole call (summary)


def test_a_longer_history_window_is_bounded_too():
    run = longcall.dialog_run(15.0, history_turns=20)
    assert run.turns > 100
    toks = [p.tokens for p in run.prompts]
    assert max(p.messages for p in run.prompts) <= 2 + 2 * 20
    assert max(toks) == max(toks[:100])


def _count(text: str) -> int:
    return longcall.count_tokens(text)


def _conversation(turns: int, tools: bool = False) -> list[dict]:
    msgs = [{"role": "system", "content": AGENT["system_prompt"]}]
    for i in range(turns):
        msgs.append({"role": "user", "content": longcall.CALLER_LINES[i % len(longcall.CALLER_LINES)]})
        if tools and i % 3 == 1:
            msgs.append({"role": "assistant", "content": "(using tool lookup_invoices {})"})
            msgs.append({"role": "tool", "content": "lookup_invoices result: " + '{"count": 2}' * 20})
        msgs.append({"role": "assistant", "content": longcall.AGENT_LINES[i % len(longcall.AGENT_LINES)]})
    msgs.append({"role": "user", "content": "And is there parking?"})
    return msgs


@pytest.mark.parametrize("tools", [False, True])
def test_fit_context_drops_the_oldest_history_to_fit(tools):
    """history_turns = 100 (allowed) and 512 tokens of context (allowed): without fitting the
    prompt is refused by llama.cpp on every turn once it is full."""
    msgs = _conversation(60, tools)
    budget = 512 - 60
    assert longcall.chatml_tokens(msgs) > 4 * budget
    fitted = fit_context(msgs, budget, _count)
    assert longcall.chatml_tokens(fitted) <= budget        # the real template, not just the estimate
    assert fitted[0] == msgs[0] and fitted[-1] == msgs[-1]
    assert fitted[1:] == msgs[len(msgs) - len(fitted) + 1:]  # the newest, in order
    assert fitted[1]["role"] != "tool"
    assert len(fitted) >= 6                                 # and as much as fits
    assert sum(_count(m["content"]) + MESSAGE_OVERHEAD for m in
               [fitted[0]] + msgs[len(msgs) - len(fitted):]) + PROMPT_OVERHEAD > budget


def test_fit_context_leaves_a_prompt_that_fits_alone():
    msgs = _conversation(3)
    assert fit_context(msgs, CONTEXT - AGENT["max_reply_tokens"], _count) is msgs
    decide = msgs + [{"role": "system", "content": "Call the right tool."}]   # the tool pass keeps the caller
    fitted = fit_context(decide, 60, _count)
    assert [m["role"] for m in fitted] == ["system", "user", "system"]
    assert fitted[1] == msgs[-1]


@pytest.mark.slow
def test_the_real_model_never_overflows_a_small_context():
    """The real llama.cpp model, a conversation longer than its context window (history_turns =
    100, llm_context = 256): every round answers, none is refused, the prompt stays inside."""
    r = longcall.llm_rounds(14, n_ctx=256, history_turns=100, max_tokens=8)
    assert r["errors"] == {}, r["errors"]
    assert r["ok"] == r["rounds"] == 14
    assert r["trimmed"] > 0 and r["sent_tokens_max"] > 256          # the history did outgrow the window
    assert r["prompt_tokens_max"] + 8 <= 256
    assert all(x["reused"] > 0 for x in r["per_round"][1:])          # the system prompt stays cached


@pytest.mark.slow
def test_a_long_real_call_keeps_answering_with_flat_memory(tmp_path):
    """One real agent call, question after question for 100 s (more turns than history_turns),
    /proc sampled every 2 s: every question answered, no apology, memory flat over the second half
    of the call (after the engines' own warm-up: see tests/bench/longcall.py)."""
    c = longcall.real_call(seconds=100.0, warmup_turns=2, history_turns=2, tmp=tmp_path)
    assert c["questions"] > 2 + 2, c                              # past the history window
    assert c["missed"] == 0 and c["apologies"] == 0 and c["model_errors"] == 0, c
    assert c["end_reason"] == "goodbye" and c["sipp_rc"] == 0
    # The anonymous memory (heap) is what a leak grows; RSS also counts model weights paged in
    # from their mapped files as they get used, and PSS moves with every other process that maps
    # the same files (other cells' inference processes): both are reported, not asserted.
    cell, inference = c["memory"]["cell"], c["memory"]["inference"]
    assert cell["anon_kb"]["growth_pct"] < 5.0, cell
    # The inference process's heap still climbs in allocator steps toward its high-water mark this
    # early (Piper's onnxruntime allocations follow the longest sentence so far; each pooled llama.cpp
    # conversation allocates on first use); measured alone each engine levels off. A leak of a few
    # MB a turn would still show here.
    assert inference["anon_kb"]["growth_pct"] < 10.0, inference
