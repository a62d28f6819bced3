"""The architecture of README's section, checked on the source text: data
flows one way with no import cycles, only the source layer imports bcc, each
shared definition exists once, and no module outgrows 600 lines."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "ksmtrace"
MAX_LINES = 600


def modules() -> dict[str, ast.Module]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        name = ".".join(rel.parts).removesuffix(".__init__")
        out[name] = ast.parse(path.read_text(), str(path))
    return out


def runtime_nodes(tree: ast.AST):
    """Every node, except those of `if TYPE_CHECKING:` blocks (annotations
    only: never imported when the code runs)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) \
                and node.test.id == "TYPE_CHECKING":
            for other in node.orelse:
                yield other
                yield from runtime_nodes(other)
            continue
        yield node
        yield from runtime_nodes(node)


def imports(name: str, tree: ast.Module, known: set[str]) -> set[str]:
    """The ksmtrace modules `name` imports when it runs, at any depth of its
    code (a function-level import is a dependency too). `from pkg import mod`
    counts as an import of pkg.mod where that is a module."""
    package = name if name in known and any(k.startswith(name + ".") for k in known) \
        else name.rpartition(".")[0]
    out = set()
    for node in runtime_nodes(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            out.add(base)
            out |= {f"{base}.{a.name}" for a in node.names}
    return {m for m in out if m in known and m != name}


def test_no_import_cycles():
    mods = modules()
    known = set(mods)
    graph = {n: imports(n, t, known) for n, t in mods.items()}
    # a package's __init__ importing its own submodules is not a cycle of the flow
    for n in graph:
        graph[n] = {m for m in graph[n] if not (m.startswith(n + ".") or n.startswith(m + "."))}
    # the scan sees the imports it must (module level, function level, relative)
    assert "ksmtrace.model" in graph["ksmtrace.collector"]
    assert "ksmtrace.sources.live" in graph["ksmtrace.session"]  # inside open_source()
    assert sum(map(len, graph.values())) > 150
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(n: str) -> None:
        state[n] = 1
        path.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(m):] + [m]))
            if m not in state:
                visit(m)
        path.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n)


def test_only_the_source_layer_imports_bcc():
    offenders = []
    for name, tree in modules().items():
        if name.startswith("ksmtrace.sources."):
            continue
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            offenders += [f"{name}: {n}" for n in names if n == "bcc" or n.startswith("bcc.")]
    assert offenders == []


def test_shared_definitions_exist_once():
    wanted = {"PAGE_SIZE", "STAGES", "CLK_TCK", "Terminated", "EVENT_FIELDS", "MERGE_KINDS",
              "errno_name", "merge_kind", "FIGURES", "EVENT_SIZE"}
    where: dict[str, list[str]] = {w: [] for w in wanted}
    for name, tree in modules().items():
        for node in tree.body:  # module level: a definition, not a use or a re-export
            targets = [node.name] if isinstance(node, (ast.ClassDef, ast.FunctionDef)) else \
                [t.id for t in node.targets if isinstance(t, ast.Name)] \
                if isinstance(node, ast.Assign) else \
                [node.target.id] if isinstance(node, ast.AnnAssign) and \
                isinstance(node.target, ast.Name) else []
            for t in targets:
                if t in wanted:
                    where[t].append(name)
    assert {w: len(m) for w, m in where.items()} == dict.fromkeys(wanted, 1), where


def test_no_module_is_over_600_lines():
    long = {str(p.relative_to(PACKAGE.parent)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}
