"""The agent's parts talk through public methods: no module of agent/ reads another object's private
attribute (``other._name``), e.g. the heartbeat takes the cameras' seqs from ``Ingest.camera_seqs()``,
not from the ingest thread's ``_last_seq`` (issue 20 follow-up; the heartbeat's map itself is
tested in test_first_hour.py)."""
from __future__ import annotations

import ast
from pathlib import Path

AGENT = Path(__file__).resolve().parents[2] / "agent"


def private_reads(source: str) -> list[str]:
    tree = ast.parse(source)
    modules = {alias.asname or alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
               for alias in node.names}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            base = node.value
            if isinstance(base, ast.Name) and (base.id in ("self", "cls") or base.id in modules):
                continue  # its own attributes; a library module's names (os._exit)
            out.append(f"line {node.lineno}: {ast.unparse(node)}")
    return out


def test_no_agent_module_reads_another_objects_private_attributes():
    found = {str(p.relative_to(AGENT.parent)): r for p in sorted(AGENT.rglob("*.py")) if (r := private_reads(p.read_text()))}
    assert found == {}


def test_the_checker_sees_a_private_read():
    assert private_reads("def f(self):\n    return dict(self.ingest._last_seq)\n") == [
        "line 2: self.ingest._last_seq"]
    assert private_reads("import os\nos._exit(1)\nclass A:\n    def f(self):\n        return self._x\n") == []
