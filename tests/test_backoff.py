"""The one backoff rule (bridge/core/backoff.py) and every place that retries uses it."""
import ast
import random
from pathlib import Path

from bridge.core import backoff

ROOT = Path(__file__).resolve().parent.parent


def test_ceiling_doubles_from_base_to_the_cap():
    assert [backoff.ceiling(n, 0.5, 4.0) for n in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert backoff.ceiling(-3, 1.0, 30.0) == 1.0                 # a negative attempt is the first
    assert backoff.ceiling(5000, 1.0, 30.0) == 30.0              # no overflow far past the cap
    assert backoff.ceiling(3, 0.0, 30.0) == 0.0 and backoff.ceiling(3, 1.0, 0.0) == 0.0


def test_full_jitter_is_uniform_below_the_ceiling():
    assert backoff.delay(2, 1.0, 30.0, lambda: 0.0) == 0.0
    assert backoff.delay(2, 1.0, 30.0, lambda: 0.5) == 2.0
    assert backoff.delay(2, 1.0, 30.0, lambda: 0.999999) < 4.0
    assert backoff.delay(10, 1.0, 30.0, lambda: 0.5) == 15.0
    assert backoff.delay(0, 1.0, 30.0, lambda: 1.5) == 1.0       # a source off its range stays bounded
    assert backoff.delay(0, 1.0, 30.0, lambda: -1.0) == 0.0


def test_delays_spread_a_crowd_of_clients():
    """1000 clients failing at once: their first-retry delays cover the window evenly (not in lockstep)."""
    rng = random.Random(7)
    delays = [backoff.delay(3, 0.5, 30.0, rng.random) for _ in range(1000)]
    assert all(0.0 <= d < 4.0 for d in delays)
    buckets = [0] * 8
    for d in delays:
        buckets[int(d / 0.5)] += 1
    assert min(buckets) > 80 and max(buckets) < 170, buckets
    assert 1.8 < sum(delays) / len(delays) < 2.2                   # mean: half the ceiling


def test_default_source_is_random():
    seen = {backoff.delay(4, 1.0, 30.0) for _ in range(50)}
    assert len(seen) > 40 and all(0.0 <= d < 16.0 for d in seen)


def test_callers_share_the_rule():
    from bridge.agent.tools.breaker import backoff as tool_backoff
    from bridge.api.streams import backoff as stream_backoff
    assert tool_backoff(3, 0.2, 2.0, 0.5) == backoff.delay(3, 0.2, 2.0, lambda: 0.5) == 0.8
    assert stream_backoff(4, 0.2, 2.0, rnd=lambda: 0.5) == backoff.delay(3, 0.2, 2.0, lambda: 0.5)


def test_no_other_exponential_backoff_is_written():
    """``2 **`` next to a delay, or random.uniform jitter, appears only in the helper."""
    files = ["bridge/api/streams.py", "bridge/api/webhooks.py", "bridge/agent/hub.py", "bridge/box/supervisor.py",
             "bridge/agent/tools/breaker.py", "bridge/agent/tools/runner.py"]
    for f in files:
        tree = ast.parse((ROOT / f).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow) and \
                    isinstance(node.left, ast.Constant) and node.left.value in (2, 2.0):
                raise AssertionError(f"{f}:{node.lineno} computes its own exponential backoff")
            if isinstance(node, ast.Attribute) and node.attr == "uniform":
                raise AssertionError(f"{f}:{node.lineno} draws its own jitter")
