"""API fuzzing (issue 11): Schemathesis against a real cell's served /v1/openapi.json with a
real control key (support.create_key). No 5xx, and every response must match the spec
(status code, content type, headers, body schema).

The cell and Schemathesis run together inside a fresh network namespace (``unshare -n``,
loopback only) when the kernel allows it, so no generated webhook URL or SIP destination
can reach past 127.0.0.0/8. Without it the operations that make the box connect out
(placing calls, webhooks, transfers, streams, replays) are left out.

Every failure is printed with Schemathesis' ``curl`` line (the exact request).
"""
import json
import os
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from fuzz.targets import report
from support import next_ports

HERE = Path(__file__).resolve().parent
RUNNER = HERE / "fuzz" / "api_run.py"
SEED = os.environ.get("FUZZ_SEED", "11")
CONFORMANCE = ("not_a_server_error,status_code_conformance,content_type_conformance,"
               "response_headers_conformance,response_schema_conformance")
OUTBOUND = r"^POST (/v1/calls|/v1/webhooks|/v1/calls/\{call_id\}/(transfer|streams)|/v1/webhook-deliveries/.*)$"

pytestmark = pytest.mark.skipif(shutil.which("st", path=os.path.dirname(sys.executable)) is None,
                                reason="schemathesis is not installed (pip install -e '.[test]')")


def _netns_ok() -> bool:
    if not shutil.which("unshare") or not shutil.which("ip"):
        return False
    r = subprocess.run(["unshare", "-n", "ip", "link", "set", "lo", "up"], capture_output=True, timeout=10)
    return r.returncode == 0


def _failures(out: Path) -> list[str]:
    """One entry per failing operation: its block of Schemathesis' report (checks + curl)."""
    text = (out / "st.txt").read_text()
    blocks = re.split(r"\n_{5,} ", text)
    fails = []
    for b in blocks[1:]:
        head = b.split("\n", 1)[0].strip(" _")
        body = re.split(r"\n={3,}|\nMissing test data|\nSchema validation mismatch", b, 1)[0]
        if "ST" in body or "curl" in body:
            fails.append(f"{head}:\n{body.strip()[:1500]}")
    if not fails and (out / "junit.xml").exists():
        for tc in ET.parse(out / "junit.xml").getroot().iter("testcase"):
            for f in list(tc.findall("failure")) + list(tc.findall("error")):
                fails.append(f"{tc.get('name')}: {(f.get('message') or f.text or '')[:1500]}")
    return fails


def _run(tmp_path: Path, max_examples: int, checks: str, name: str) -> None:
    out = tmp_path / "schemathesis"
    extra = ["--checks", checks]
    if checks == "all":
        extra += ["--exclude-checks", "positive_data_acceptance"]
    isolated = _netns_ok()
    if not isolated:
        extra += ["--exclude-name-regex", OUTBOUND]
    script = f"{shlex_quote(sys.executable)} {shlex_quote(str(RUNNER))} {shlex_quote(str(out))} {max_examples} {SEED} " \
             + " ".join(shlex_quote(x) for x in extra)
    cmd = (["unshare", "-n", "sh", "-c", f"ip link set lo up && FUZZ_NETNS=1 exec {script}"] if isolated
           else ["sh", "-c", f"exec {script}"])
    # the runner's cell takes its ports from a block reserved here (not this worker's first block,
    # which a cell of this process may still hold)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST_")}
    env["TEST_PORT_BLOCK"] = str((next_ports(2)["sip"] - 10000) // 40)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1500, env=env)
    assert (out / "summary.json").exists(), f"the Schemathesis run did not finish:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    summary = json.loads((out / "summary.json").read_text())
    fails = _failures(out)
    text = (out / "st.txt").read_text()
    generated = re.search(r"(\d+) generated", text)
    report({"test": "api-fuzz", "name": name, "max_examples": max_examples, "seed": SEED, "checks": checks,
            "isolated": isolated, "cases": int(generated.group(1)) if generated else None,
            "seconds": summary["seconds"], "exit": summary["exit"], "alive": summary["alive"],
            "failures": [f.split("\n", 1)[0] for f in fails],
            "rss_kb_before": {"cell": summary["rss_kb_before"]}, "rss_kb_after": {"cell": summary["rss_kb_after"]}})
    assert summary["alive"], "the cell died under the API fuzzing"
    assert summary["exit"] == 0 and not fails, (
        f"Schemathesis ({summary['exit']}) found {len(fails)} failing operation(s):\n\n" + "\n\n".join(fails)
        + "\n\n" + text[-1500:])


def shlex_quote(s: str) -> str:
    import shlex
    return shlex.quote(s)


@pytest.mark.slow
@pytest.mark.sample
def test_api_fuzz_no_server_error_and_every_response_matches_the_spec(tmp_path):
    """A few examples per operation (~1,000 requests): no 5xx, responses as documented."""
    _run(tmp_path, 8, CONFORMANCE, "conformance")


@pytest.mark.slow
def test_api_fuzz_long_all_checks(tmp_path):
    """``make fuzz``: 100 examples per operation and every Schemathesis check except
    positive_data_acceptance (a schema-valid request may still be refused for what it
    names, e.g. an unknown trunk): also out-of-spec input must be refused."""
    _run(tmp_path, 100, "all", "all-checks")
