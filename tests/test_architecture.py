"""The package's shape: data flows one way through named layers, shared code names no family, and
functions stay small (docs/architecture.md)."""
import ast
from pathlib import Path

from transeg.registry import FORMATS, families

SRC = Path(__file__).resolve().parents[1] / "src" / "transeg"

# The layers, top to bottom. A module may import modules of its own layer (without a circle) or of
# any layer below it, never above. Families build Segmentors and register into the tables below them;
# inference drives any model through its contract, so the Segmentor (whose `predict` calls it) sits above it.
LAYERS = [
    ("interfaces", ("transeg.cli", "transeg.serve")),
    ("public API", ("transeg",)),
    ("workflows", ("transeg.engine", "transeg.bench", "transeg.export", "transeg.deploy", "transeg.share", "transeg.charts",
                   "transeg.data.prepare")),
    ("families", ("transeg.families",)),
    ("zoo", ("transeg.zoo",)),
    ("conversion", ("transeg.convert",)),
    ("checkpoints and counting", ("transeg.checkpoint", "transeg.flops")),
    ("registry", ("transeg.registry",)),
    ("segmentor", ("transeg.segmentor", "transeg.contracts")),
    ("inference", ("transeg.inference", "transeg.tiled", "transeg.compiled")),
    ("shared model code", ("transeg.heads", "transeg.backbones", "transeg.losses")),
    ("layers", ("transeg.layers",)),
    ("foundations", ("transeg.data", "transeg.viz", "transeg.images", "transeg.rasters", "transeg.files", "transeg.hub", "transeg.isr",
                     "transeg.device", "transeg.protocol", "transeg.errors", "transeg.version", "transeg.text")),
]


def _modules():
    """{module name: (path, is package)} for every file of the package."""
    found = {}
    for path in SRC.rglob("*.py"):
        parts = ("transeg",) + path.relative_to(SRC).with_suffix("").parts
        package = parts[-1] == "__init__"
        found[".".join(parts[:-1] if package else parts)] = (path, package)
    return found


def _imports(name, path, package, modules):
    """The package modules `name` imports anywhere in its file, function-local imports included. `from . import x`
    of a submodule counts as an import of that submodule only."""
    here = name.split(".") if package else name.split(".")[:-1]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets |= {a.name for a in node.names if a.name in modules}
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(here[:len(here) - node.level + 1] + ([node.module] if node.module else [])) \
                if node.level else node.module
            subs = {f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules}
            targets |= subs if len(subs) == len(node.names) else subs | ({base} & set(modules))
    return targets - {name}


def _layer(name):
    """The index of the layer `name` belongs to (the longest matching prefix)."""
    best = max(((len(p), i) for i, (_, prefixes) in enumerate(LAYERS) for p in prefixes
                if name == p or name.startswith(p + ".")), default=None)
    assert best is not None, f"{name} belongs to no layer: add it to LAYERS"
    return best[1]


def _graph():
    modules = _modules()
    return {name: _imports(name, path, package, modules) for name, (path, package) in modules.items()}


def test_every_import_points_down_the_layers():
    """No module imports from a layer above its own, function-local imports included: 0 upward edges
    out of the package's several hundred."""
    graph = _graph()
    edges = sum(len(v) for v in graph.values())
    assert edges > 300  # the walk found the package's imports
    upward = sorted(f"{a} -> {b} ({LAYERS[_layer(a)][0]} -> {LAYERS[_layer(b)][0]})"
                    for a, targets in graph.items() for b in targets if _layer(b) < _layer(a))
    assert upward == []


def test_no_import_circle():
    """Tarjan's strongly connected components of the import graph: every one is a single module."""
    graph = _graph()
    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    assert circles == []


def _special_cases(path, names):
    """String constants naming a family or format where code decides something: compared with (==, in),
    tested by startswith/endswith, or used as a dict key. Docstrings and help text do not count."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Compare):
            consts = [n for n in ast.walk(node) if isinstance(n, ast.Constant)]
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in (
                "startswith", "endswith", "removeprefix"):
            consts = [n for a in node.args for n in ast.walk(a) if isinstance(n, ast.Constant)]
        elif isinstance(node, ast.Dict):
            consts = [k for k in node.keys if isinstance(k, ast.Constant)]
        else:
            continue
        found += [f"{path.relative_to(SRC)}:{c.lineno} {c.value!r}" for c in consts
                  if isinstance(c.value, str) and (c.value in names or c.value.rstrip("-_") in names)]
    return found


def test_shared_code_special_cases_no_family():
    """registry, zoo, convert, bench, flops, checkpoint, inference, segmentor, engine, serve and the CLI decide
    nothing by a family's or format's name: what differs per family is declared in its package."""
    names = set(families()) | set(FORMATS)
    assert len(names) >= 7  # six families and their formats are registered
    shared = [p for p in SRC.rglob("*.py") if "families" not in p.relative_to(SRC).parts]
    found = [hit for p in shared for hit in _special_cases(p, names)]
    assert found == []


def test_no_function_is_longer_than_80_lines():
    """One job per function: none in src/ spans more than 80 lines (DESIGN.md's style rule)."""
    limit = 80
    long = []
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > limit:
                    long.append(f"{path.relative_to(SRC)}:{node.name} {lines} lines")
    assert long == []
