"""The package's shape: subpackages by concept, imports flowing one way, no cycles, short functions.

Layers, lowest first (a module may import its own layer or lower ones, never a higher one):

    errors, data  <  plugins  <  recipe  <  models  <  grpo  <  train  <  commands  <  the package root

Every import of a zenalign module counts, whether at the top of a module, inside a function or
under ``if TYPE_CHECKING``: an import moved into a function to dodge a cycle is still that cycle.
Imports inside functions of other libraries (transformers, deepspeed, matplotlib) are fine.
"""

from __future__ import annotations

import ast
from pathlib import Path

from helpers import REPO

PACKAGE = REPO / "zenalign"
LAYERS = ["errors", "data", "plugins", "recipe", "models", "grpo", "train", "commands"]
RANK = {"errors": 0, "data": 0, "plugins": 1, "recipe": 2, "models": 3, "grpo": 4, "train": 5, "commands": 6}
ROOT_RANK = 7  # zenalign/__init__.py, __main__.py and _moved.py: the public face, above everything
MAX_FUNCTION_LINES = 60


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    parts = module.split(".")
    if len(parts) == 1 or parts[1] not in RANK:
        return ROOT_RANK
    return RANK[parts[1]]


def resolve(module: str, names: list[str], known: set[str]) -> list[str]:
    """The zenalign modules an import statement reaches: ``from zenalign.x import y`` reaches
    zenalign.x.y when that is a module, zenalign.x otherwise."""
    out = []
    for name in names:
        candidate = f"{module}.{name}"
        out.append(candidate if candidate in known else module)
    return out


def import_graph() -> dict[str, set[str]]:
    files = sorted(PACKAGE.rglob("*.py"))
    known = {module_name(f) for f in files}
    graph: dict[str, set[str]] = {}
    for path in files:
        me = module_name(path)
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                edges.update(a.name for a in node.names if a.name.split(".")[0] == "zenalign")
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.split(".")[0] == "zenalign":
                edges.update(resolve(node.module, [a.name for a in node.names], known))
        graph[me] = {e for e in edges if e != me and e in known}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 visiting, 2 done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_every_import_goes_down_or_sideways():
    upward = [f"{src} -> {dst}" for src, dsts in import_graph().items() for dst in sorted(dsts)
              if layer_of(dst) > layer_of(src)]
    assert upward == [], "imports that go up a layer:\n" + "\n".join(upward)


def test_no_import_cycles():
    graph = import_graph()
    # A subpackage's __init__ re-exports its modules; treat it as the modules it re-exports, so
    # ``zenalign.plugins.registry -> zenalign.plugins.manager`` and ``zenalign.plugins -> ...`` are not a cycle.
    for package in [m for m in graph if m.count(".") == 1 and (PACKAGE / m.split(".")[1] / "__init__.py").exists()]:
        for module, edges in graph.items():
            if module.startswith(package + ".") and package in edges:
                raise AssertionError(f"{module} imports its own package {package}: import the module it needs instead")
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


# What a built-in plugin (plugins/, importable as zenalign_plugins) may import: the plugin API and its
# helpers, the leaves, recipe helpers (principles files) and model code (a judge, a reward model, a
# critic load models). Never the engine: grpo, train, generation or commands.
PLUGINS_MAY_IMPORT = ("zenalign.plugins", "zenalign.errors", "zenalign.data", "zenalign.recipe", "zenalign.models")


def zenalign_imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "zenalign"]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.split(".")[0] == "zenalign":
            found.append((node.lineno, node.module))
    return found


def test_built_in_plugins_use_the_plugin_api_never_the_engine():
    """Issue 31: built-in plugins are written as a third party's would be, on zenalign.plugins (which
    exports the helpers they need) and model code; they never reach into the engine."""
    allowed = lambda module: module == "zenalign" or module.startswith(tuple(f"{m}." for m in PLUGINS_MAY_IMPORT)) \
        or module in PLUGINS_MAY_IMPORT
    reaching = [f"{path.relative_to(REPO)}:{line} imports {module}" for path in sorted((REPO / "plugins").glob("*.py"))
                for line, module in zenalign_imports(path) if not allowed(module)]
    assert reaching == [], "built-in plugins that import the engine:\n" + "\n".join(reaching)
    assert allowed("zenalign.plugins") and allowed("zenalign.models.loading") and not allowed("zenalign.train.engine") \
        and not allowed("zenalign.grpo.advantages") and not allowed("zenalign.pluginsx")


def test_layers_are_the_subpackages():
    top = sorted(p.name for p in PACKAGE.iterdir() if not p.name.startswith("__"))
    assert top == sorted(["_moved.py", "commands", "data.py", "errors.py", "grpo", "models", "plugins", "recipe", "train"])


def test_no_function_is_longer_than_sixty_lines():
    long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({lines} lines)")
    assert long == [], "functions over 60 lines:\n" + "\n".join(long)


def test_the_trainer_class_stays_small():
    tree = ast.parse((PACKAGE / "train" / "trainer.py").read_text(encoding="utf-8"))
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "GRPOTrainer")
    assert cls.end_lineno - cls.lineno + 1 <= 300


def test_the_checker_sees_a_cycle_and_an_upward_import(tmp_path):
    """The checks above can fail: a hand-made graph with a function-level back-edge is caught."""
    graph = {"zenalign.grpo.loss": {"zenalign.models.lean"}, "zenalign.models.lean": {"zenalign.grpo.loss"}}
    assert find_cycle(graph) == ["zenalign.grpo.loss", "zenalign.models.lean", "zenalign.grpo.loss"]
    assert layer_of("zenalign.models.lean") < layer_of("zenalign.grpo.loss")
    source = "def f():\n    from zenalign.train.trainer import GRPOTrainer\n"
    node = next(n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.ImportFrom))
    assert resolve(node.module, [a.name for a in node.names], {"zenalign.train.trainer"}) == ["zenalign.train.trainer"]
