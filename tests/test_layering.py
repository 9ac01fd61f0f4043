"""The layering rule of ../shared/ARCHITECTURE.md, checked on the source with `ast`.

Packages, top to bottom: agent > training > calibration > engines > metrics. A module imports only
its own package and the packages below it, function-local imports included. Inside agent/, the
service (everything but the CLI and agent/tools) never imports the tools or the CLI, and imports
no package above engines. torch, pycocotools and matplotlib are imported only under training/ and
in calibration/reports.py (matplotlib also in agent/tools/report.py, the offline coil report). No import cycle between modules (module-level imports).
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RANK = {"metrics": 0, "engines": 1, "calibration": 2, "training": 3, "agent": 4}
HEAVY = ("torch", "pycocotools", "matplotlib")
# Front ends: their own processes beside the service (CLI, tools, the plant bridge, the web page); they
# may import any package, and the service imports none of them.
AGENT_FRONT = ("agent.cli", "agent.commands", "agent.engine_commands", "agent.tools", "agent.bridge", "agent.web")


def module_name(path: Path, root: Path) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: Path, root: Path) -> list[tuple[str, int, bool]]:
    """(imported module, line, at module level) for every import statement in the file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    me = module_name(path, root)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    top_level = {id(node) for node in tree.body}
    out: list[tuple[str, int, bool]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.extend((alias.name, node.lineno, id(node) in top_level) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            # `from pkg import mod` imports pkg.mod when it is a module
            for alias in node.names:
                sub = f"{name}.{alias.name}"
                target = sub if (root / Path(*sub.split("."))).with_suffix(".py").exists() or \
                    (root / Path(*sub.split(".")) / "__init__.py").exists() else name
                out.append((target, node.lineno, id(node) in top_level))
    return out


def violations(root: Path) -> list[str]:
    found: list[str] = []
    for pkg in RANK:
        for path in sorted((root / pkg).rglob("*.py")):
            if "models" in path.relative_to(root / pkg).parts[:1] and pkg == "engines" and path.parent.name != "engines":
                continue
            me = module_name(path, root)
            rel = path.relative_to(root)
            for target, line, _ in imports_of(path, root):
                top = target.split(".")[0]
                if top in HEAVY and not (pkg == "training" or me == "calibration.reports"
                                         or (top == "matplotlib" and me == "agent.tools.report")):
                    found.append(f"{rel}:{line}: {me} imports {target} (only training/ and calibration.reports may)")
                if top not in RANK or top == pkg:
                    if pkg == "agent" and top == "agent" and not me.startswith(AGENT_FRONT) \
                            and target.startswith(AGENT_FRONT):
                        found.append(f"{rel}:{line}: the service module {me} imports {target} (a tool or the CLI)")
                    continue
                if pkg == "agent" and me.startswith(AGENT_FRONT):
                    continue
                allowed_rank = RANK["engines"] if pkg == "agent" else RANK[pkg] - 1
                if RANK[top] > allowed_rank:
                    found.append(f"{rel}:{line}: {me} imports {target}, a package above it or beside it")
    return found


def cycles(root: Path) -> list[list[str]]:
    graph: dict[str, set[str]] = {}
    for pkg in RANK:
        for path in (root / pkg).rglob("*.py"):
            me = module_name(path, root)
            graph[me] = {t for t, _, top in imports_of(path, root) if top and t.split(".")[0] in RANK and t != me}
    found: list[list[str]] = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in graph:
                continue
            if state.get(nxt) == 1:
                # an import of a package's __init__ from inside it is not a cycle of modules
                cycle = stack[stack.index(nxt):]
                if not any(other.startswith(nxt + ".") for other in cycle[1:]):
                    found.append([*cycle, nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def test_no_package_imports_a_package_above_it():
    assert violations(ROOT) == []


def test_no_import_cycles_between_modules():
    assert cycles(ROOT) == []


def test_the_checker_catches_each_kind_of_breach(tmp_path):
    """The rule itself can fail: a tree with one breach of each kind reports each one."""
    files = {
        "metrics/__init__.py": "",
        "engines/__init__.py": "",
        "engines/a.py": "def f():\n    from training import nets\n",  # engines -> training, function-local
        "calibration/__init__.py": "",
        "calibration/b.py": "import torch\n",  # heavy import outside training
        "training/__init__.py": "",
        "training/nets.py": "import torch\n",  # allowed
        "training/c.py": "from agent.config import load\n",  # training -> agent
        "agent/__init__.py": "",
        "agent/config.py": "from agent.tools import bench\n",  # service -> tools
        "agent/tools/__init__.py": "",
        "agent/tools/bench.py": "from training import nets\n",  # allowed: a tool
        "agent/x.py": "from agent import y\n",
        "agent/y.py": "from agent import x\n",  # a cycle
    }
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    found = "\n".join(violations(tmp_path))
    assert "engines.a imports training.nets" in found
    assert "calibration.b imports torch" in found
    assert "training.c imports agent.config" in found
    assert "the service module agent.config imports agent.tools.bench" in found
    assert "agent.tools.bench" not in found.replace("imports agent.tools.bench", "")
    assert "training.nets imports torch" not in found
    assert cycles(tmp_path) == [["agent.x", "agent.y", "agent.x"]]
