"""The import contract: layers point one way, jobs/ never imports cluster/, and no two modules import
each other (imports inside functions count). Read from the source with ast, no import executed."""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# Lower rank = lower layer; a module may import its own layer or a lower one.
LAYERS = [
    ("core", ("jobs/core/",)),
    ("store", ("jobs/store/",)),
    ("embed", ("jobs/embed/",)),
    ("spark", ("jobs/spark/",)),
    ("lifecycle", ("jobs/lifecycle.py",)),
    ("cluster", ("cluster/",)),
    ("doors", ("jobs/doors/", "jobs/__main__.py", "cluster/cli.py", "cluster/__main__.py", "dashboard/",
               "pages/", "app.py")),
]
PACKAGES = ("jobs", "cluster", "dashboard", "pages")


def layer_of(rel: str) -> int:
    """Rank of the layer a file belongs to; the most specific prefix wins (cluster/cli.py is a door)."""
    best, rank = "", -1
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if rel.startswith(prefix) and len(prefix) > len(best):
                best, rank = prefix, i
    if rank < 0:
        raise AssertionError(f"{rel} belongs to no layer: add it to LAYERS")
    return rank


def module_name(rel: str) -> str:
    parts = rel.removesuffix(".py").split("/")
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_files(root: Path) -> dict[str, Path]:
    """Module name → file, for every Python file of the project's packages and app.py."""
    files = [p for pkg in PACKAGES for p in (root / pkg).rglob("*.py")] + [root / "app.py"]
    return {module_name(str(p.relative_to(root))): p for p in files if p.exists()}


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """Project modules a file imports anywhere in it (inside functions too), resolved to modules."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
        else:
            continue
        for name in names:
            if name in modules:
                found.add(name)
            elif f"{name}.__init__" in modules:
                found.add(name)
    # "from jobs.core import errors" adds both jobs.core (the package) and jobs.core.errors: keep the module.
    return {m for m in found if not any(o.startswith(m + ".") for o in found)}


def violations(root: Path) -> list[str]:
    """Every import that breaks the contract, as readable lines."""
    files = project_files(root)
    graph = {m: imports_of(p, set(files)) - {m} for m, p in files.items()}
    rel = {m: str(p.relative_to(root)) for m, p in files.items()}
    out = []
    for mod, targets in graph.items():
        for target in targets:
            if layer_of(rel[target]) > layer_of(rel[mod]):
                out.append(f"{mod} ({LAYERS[layer_of(rel[mod])][0]}) imports {target} "
                           f"({LAYERS[layer_of(rel[target])][0]}), a higher layer")
            if rel[mod].startswith("jobs/") and rel[target].startswith("cluster/"):
                out.append(f"{mod} imports {target}: jobs/ never imports cluster/ (cluster/ imports jobs/)")
    out += [f"import cycle: {' -> '.join(c)}" for c in cycles(graph)]
    return sorted(set(out))


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each strongly connected group of modules (Tarjan)."""
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group) + [sorted(group)[0]])

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_project_keeps_the_import_contract():
    assert violations(REPO) == []


@pytest.mark.parametrize("files,expected", [
    ({"jobs/core/spec.py": "from jobs.doors import api\n", "jobs/doors/api.py": ""},
     "jobs.core.spec (core) imports jobs.doors.api (doors), a higher layer"),
    ({"jobs/doors/api.py": "def f():\n    from cluster import autoscale\n", "cluster/autoscale.py": ""},
     "jobs.doors.api imports cluster.autoscale: jobs/ never imports cluster/"),
    ({"jobs/core/a.py": "def f():\n    import jobs.core.b\n", "jobs/core/b.py": "from jobs.core import a\n"},
     "import cycle: jobs.core.a -> jobs.core.b -> jobs.core.a"),
])
def test_a_deliberate_violation_is_caught(tmp_path, files, expected):
    for rel, text in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    (tmp_path / "app.py").write_text("")
    assert any(v.startswith(expected) for v in violations(tmp_path)), violations(tmp_path)
