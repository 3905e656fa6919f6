"""The deploy kit: configs parse and speak about metrics that exist."""
import json
import re
import subprocess
from pathlib import Path

import yaml

from bridge.box import kamailio
from bridge.core.metrics import Metrics

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
BOX_METRICS = {"trunkline_box_cell_up", "trunkline_box_cell_deaths_total", "trunkline_box_cell_drained",
               "trunkline_trunk_registered"}


def _known() -> set[str]:
    names = set(BOX_METRICS)
    for fam in Metrics().registry.collect():
        for s in fam.samples:
            names.add(s.name)
        names.add(fam.name)
        if fam.type == "counter":
            names.add(fam.name + "_total")
        if fam.type == "histogram":
            names |= {fam.name + "_bucket", fam.name + "_sum", fam.name + "_count"}
    return names


def _used(text: str) -> set[str]:
    return set(re.findall(r"\btrunkline_[a-z0-9_]+", text))


def test_alerts_and_dashboard_use_real_metrics():
    known = _known()
    alerts = yaml.safe_load((DEPLOY / "prometheus/alerts.yml").read_text())
    exprs = " ".join(r["expr"] for g in alerts["groups"] for r in g["rules"])
    assert len(alerts["groups"][0]["rules"]) >= 6
    assert _used(exprs) <= known, _used(exprs) - known
    dash = json.loads((DEPLOY / "grafana/trunkline-dashboard.json").read_text())
    exprs = " ".join(t["expr"] for p in dash["panels"] for t in p["targets"])
    assert _used(exprs) <= known, _used(exprs) - known
    for name in ("trunkline_call_mos_bucket", "trunkline_box_cell_up", "trunkline_turn_latency_seconds_bucket"):
        assert name in exprs


def test_compose_prometheus_and_grafana_files_parse():
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    assert set(compose["services"]) == {"trunkline", "prometheus", "grafana"}
    prom = yaml.safe_load((DEPLOY / "prometheus/prometheus.yml").read_text())
    assert prom["scrape_configs"][0]["job_name"] == "trunkline"
    for f in (DEPLOY / "grafana/provisioning").rglob("*.yml"):
        assert yaml.safe_load(f.read_text())["apiVersion"] == 1


def test_generated_kamailio_config_is_accepted_by_kamailio(tmp_path):
    text = kamailio.render(["udp:127.0.0.1:5060", "tcp:127.0.0.1:5060"], str(tmp_path), ["192.0.2.0/24"], 5)
    path = kamailio.write(str(tmp_path), text, kamailio.dispatcher_list([("127.0.0.1", 5061), ("127.0.0.2", 5061)], 3))
    r = subprocess.run(["kamailio", "-c", "-f", path], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert 'is_in_subnet("$si", "192.0.2.0/24")' in text
    assert "duid=cell1;maxload=3" in (tmp_path / "dispatcher.list").read_text()
