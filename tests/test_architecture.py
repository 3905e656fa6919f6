"""The parts and their allowed imports (README, "Architecture"), checked on the source:
every import (module level, inside functions, under TYPE_CHECKING) counts."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("bridge", "sip", "media", "ai")

# part -> the parts (prefixes) it may import besides itself
ALLOWED = {
    "bridge.core": {"media", "sip.config"},
    "bridge.records": {"bridge.core", "media", "sip.uri", "sip.config"},
    "bridge.agent": {"bridge.core", "bridge.records", "media", "ai", "sip.uri", "sip.config"},
    "bridge.api": {"bridge.core", "bridge.records", "media", "sip.commands", "sip.uri", "sip.config", "bridge"},
    "bridge.cell": {"bridge.core", "bridge.records", "bridge.agent", "bridge.api", "sip", "media", "ai", "bridge"},
    "bridge.box": {"bridge.core", "bridge.records", "bridge.api", "sip.uri", "sip.config", "bridge"},
    "bridge.cli": {"bridge", "sip", "media", "ai"},
    "bridge": set(),
    "media": set(),
    "ai": {"media"},
    "sip": {"media"},
}
CLOCK_FREE = {"time", "datetime", "threading", "asyncio", "socket", "select", "queue", "subprocess"}


def _modules():
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            rel = path.relative_to(ROOT).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            yield ".".join(parts), path


def _imports(name: str, path: Path, modules=()) -> set[str]:
    """What ``name`` imports; ``from pkg import mod`` counts as ``pkg.mod`` alone when it is a module."""
    out = set()
    is_pkg = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[: len(base) - node.level + (1 if is_pkg else 0)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            subs = {f"{mod}.{a.name}" for a in node.names}
            out.update(s for s in subs if s in modules)
            if any(s not in modules for s in subs):
                out.add(mod)
    return out


def _graph():
    mods = dict(_modules())
    graph = {}
    for name, path in mods.items():
        graph[name] = {m for m in _imports(name, path, mods) if m in mods and m != name}
        graph[name] -= {p for p in graph[name] if name.startswith(p + ".")}   # own package __init__
    return mods, graph


def _part(mod: str) -> str:
    for p in sorted(ALLOWED, key=len, reverse=True):
        if mod == p or mod.startswith(p + "."):
            return p
    return mod


def _covered(target: str, allowed: set[str]) -> bool:
    return any(target == a or target.startswith(a + ".") for a in allowed)


def test_every_part_imports_only_what_it_may():
    mods, graph = _graph()
    bad = []
    for name, deps in graph.items():
        part = _part(name)
        assert part in ALLOWED, f"{name} is in no declared part"
        for d in deps:
            if _part(d) == part or (d == "bridge" and part.startswith("bridge")):
                continue
            if not _covered(d, ALLOWED[part]) or (d == "bridge" and part not in ("bridge.api", "bridge.cli")):
                if d != "bridge":
                    bad.append(f"{name} -> {d}")
    assert not bad, "imports across parts that the architecture does not allow:\n" + "\n".join(sorted(bad))


def test_no_import_cycles():
    _, graph = _graph()
    state, stack, cycles = {}, [], []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for d in sorted(graph[n]):
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_only_sip_imports_pjsua2_and_media_is_clock_free():
    for name, path in _modules():
        imports = {m.split(".")[0] for m in _imports(name, path)}
        if "pjsua2" in imports:
            assert name.startswith("sip."), f"{name} imports pjsua2"
        if name.startswith("media"):
            assert not imports & CLOCK_FREE, f"{name} imports {imports & CLOCK_FREE}"


def test_every_part_says_what_lives_there_and_what_it_may_import():
    for init in (ROOT / "bridge").rglob("__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert doc, f"{init} has no docstring"
        if init.parent != ROOT / "bridge":
            assert "May import" in doc, f"{init} does not say what it may import"
