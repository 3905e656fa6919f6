"""Generate the Kamailio front's config and dispatcher list for a set of cells."""
from __future__ import annotations

import glob
import os
from pathlib import Path

TEMPLATE = Path(__file__).resolve().parents[2] / "deploy" / "kamailio" / "kamailio.cfg.tmpl"


def modules_dir() -> str:
    for pattern in ("/usr/lib/*/kamailio/modules", "/usr/lib/kamailio/modules", "/usr/local/lib*/kamailio/modules"):
        hits = sorted(glob.glob(pattern))
        if hits:
            return hits[0]
    return "/usr/lib/x86_64-linux-gnu/kamailio/modules"


def dispatcher_list(cells: list[tuple[str, int]], maxload: int) -> str:
    """``cells``: (host, sip port) per cell; set 1, algorithm 10 needs duid and maxload."""
    lines = ["# setid destination flags priority attributes"]
    for i, (host, port) in enumerate(cells):
        h = f"[{host}]" if ":" in host else host
        lines.append(f"1 sip:{h}:{port} 0 0 duid=cell{i};maxload={maxload}")
    return "\n".join(lines) + "\n"


def render(listen: list[str], run_dir: str, trusted: list[str], retry_after: int, ping: int = 2,
           pike: int = 60, children: int = 2, debug: int = 1, fr_timer: int = 2000) -> str:
    tpl = TEMPLATE.read_text()
    trusted_lines = "\n".join(f'    if (is_in_subnet("$si", "{c}")) return 1;' for c in trusted) or "    # none"
    values = {
        "LISTEN": "\n".join(f"listen={x}" for x in listen), "RUN_DIR": run_dir, "MODULES": modules_dir(),
        "TRUSTED": trusted_lines, "RETRY_AFTER": str(retry_after), "PING": str(ping), "PIKE": str(pike),
        "CHILDREN": str(children), "DEBUG": str(debug), "FR_TIMER": str(fr_timer),
    }
    for k, v in values.items():
        tpl = tpl.replace("{{" + k + "}}", v)
    if "{{" in tpl:
        raise ValueError("unfilled placeholder in kamailio template")
    return tpl


def write(run_dir: str, cfg_text: str, dlist: str) -> str:
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "dispatcher.list"), "w") as f:
        f.write(dlist)
    path = os.path.join(run_dir, "kamailio.cfg")
    with open(path, "w") as f:
        f.write(cfg_text)
    return path
