"""The import graph flows one way: data -> encoders -> vlm model -> training/eval -> cli.

Parses every module's imports (no execution) and checks none reaches a higher layer.
"""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("vlm", "encoders", "training", "eval")


FLOORS = (  # (dotted prefix, floor); the longest matching prefix wins
    ("vlm", 0), ("vlm.files", 0), ("vlm.config", 0), ("vlm.extras", 0), ("vlm.data", 0), ("vlm.world", 0),
    ("encoders", 1),
    ("vlm.model", 2),
    ("training", 3), ("eval", 3),
    ("vlm.cli", 4),
)


def layer_of(module: str) -> int | None:
    """Floor of a dotted module name of ours, or None for third-party modules."""
    if module.split(".")[0] not in PACKAGES:
        return None
    best = None
    for prefix, floor in FLOORS:
        if module == prefix or module.startswith(prefix + "."):
            if best is None or len(prefix) > len(best[0]):
                best = (prefix, floor)
    return best[1]


def test_every_module_has_a_named_floor():
    """A module directly under ``vlm/`` (not config, files, extras, or in data, world, model or cli) has no floor."""
    loose = [n for n, _ in ALL if n.startswith("vlm.") and n not in ("vlm.config", "vlm.files", "vlm.extras")
             and not n.startswith(("vlm.data", "vlm.world", "vlm.model", "vlm.cli"))]
    assert not loose, f"modules outside the floors' folders: {loose}"


def modules():
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            rel = path.relative_to(ROOT).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            yield ".".join(parts), path


def imports_of(name: str, path: Path):
    tree = ast.parse(path.read_text(), filename=str(path))
    pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            yield mod, node.lineno
            for alias in node.names:  # "from vlm import model" imports vlm.model.vision_language_model
                yield f"{mod}.{alias.name}", node.lineno


ALL = list(modules())


def test_every_package_has_modules():
    assert {n.split(".")[0] for n, _ in ALL} == set(PACKAGES)


@pytest.mark.parametrize("name,path", ALL, ids=[n for n, _ in ALL])
def test_imports_flow_downward(name, path):
    own = layer_of(name)
    for mod, line in imports_of(name, path):
        other = layer_of(mod)
        if other is None:
            continue
        assert other <= own, f"{path.relative_to(ROOT)}:{line} (layer {own}) imports {mod} (layer {other})"
        top_self, top_other = name.split(".")[0], mod.split(".")[0]
        assert {top_self, top_other} != {"training", "eval"}, (
            f"{path.relative_to(ROOT)}:{line}: training and eval must not import each other ({mod})")


GROUND_ORDER = ("vlm.files", "vlm.config", "vlm.data", "vlm.world")  # inside floor 0, each may import only those before it


def _ground_rank(module: str) -> int | None:
    for i, prefix in enumerate(GROUND_ORDER):
        if module == prefix or module.startswith(prefix + "."):
            return i
    return None


@pytest.mark.parametrize("name,path", [(n, p) for n, p in ALL if _ground_rank(n) is not None],
                         ids=[n for n, _ in ALL if _ground_rank(n) is not None])
def test_ground_floor_order(name, path):
    """files (the error type, atomic writes) imports nothing of ours; config imports files; data
    imports those; world imports all three."""
    own = _ground_rank(name)
    for mod, line in imports_of(name, path):
        other = _ground_rank(mod)
        if other is not None and _ground_rank(mod) != own:
            assert other < own, f"{path.relative_to(ROOT)}:{line} ({GROUND_ORDER[own]}) imports {mod}"


def _import_graph() -> dict[str, set[str]]:
    names = {n for n, _ in ALL}
    graph = {}
    for name, path in ALL:
        deps = set()
        for mod, _ in imports_of(name, path):
            while mod and mod not in names:
                mod = mod.rpartition(".")[0]
            if mod and mod != name and not name.startswith(mod + "."):  # a package's own __init__ is no edge
                deps.add(mod)
        graph[name] = deps
    return graph


def test_no_import_circle():
    """No module of ours reaches itself through imports (package __init__ files count as modules)."""
    graph = _import_graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                cycle = stack[stack.index(dep):] + [dep]
                raise AssertionError("import circle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


UNPICKLERS = {("pickle", "load"), ("pickle", "loads"), ("pickle", "Unpickler"), ("dill", "load"), ("dill", "loads"),
               ("cloudpickle", "load"), ("cloudpickle", "loads"), ("joblib", "load"), ("pd", "read_pickle"),
               ("pandas", "read_pickle")}


def _tree_files():
    """Every Python file of the tree (packages, tests, bench, scripts...), virtual environments excluded."""
    skip = {".venv", "venv", ".git", "build", "dist", "node_modules"}
    return [p for p in sorted(ROOT.rglob("*.py")) if not skip & set(p.relative_to(ROOT).parts)]


def unsafe_calls(source: str, filename: str = "<src>") -> list[tuple[int, str]]:
    """(line, what) for each call that can run code from a file: ``torch.load`` without a literal
    ``weights_only=True``, any ``trust_remote_code`` other than a literal False, unpicklers, and
    ``allow_pickle=True``. Parsed, so strings and comments never count and multi-line calls do."""
    out = []
    for node in ast.walk(ast.parse(source, filename=filename)):
        if not isinstance(node, ast.Call):
            continue
        kw = {k.arg: k.value for k in node.keywords if k.arg}
        f = node.func
        owner = f.value.id if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) else None
        name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None
        literal = lambda key, value: isinstance(kw.get(key), ast.Constant) and kw[key].value is value  # noqa: E731
        if (owner, name) == ("torch", "load") and not literal("weights_only", True):
            out.append((node.lineno, "torch.load without weights_only=True"))
        if "trust_remote_code" in kw and not literal("trust_remote_code", False):
            out.append((node.lineno, "trust_remote_code not False"))
        if (owner, name) in UNPICKLERS:
            out.append((node.lineno, f"{owner}.{name} (unpickling)"))
        if "allow_pickle" in kw and not literal("allow_pickle", False):
            out.append((node.lineno, "allow_pickle"))
    return out


def test_unsafe_call_detector():
    bad = ("torch.load(p)\ntorch.load(p, weights_only=False)\ntorch.load(\n  p,\n  map_location='cpu')\n"
           "AutoModel.from_pretrained(p, trust_remote_code=True)\nf(trust_remote_code=flag)\npickle.load(f)\n"
           "np.load(p, allow_pickle=True)\n")
    assert [line for line, _ in unsafe_calls(bad)] == [1, 2, 3, 6, 7, 8, 9]
    good = "torch.load(\n p, map_location='cpu',\n weights_only=True)\nf(trust_remote_code=False)\nx = 'torch.load(p)'\n"
    assert unsafe_calls(good) == []


def test_no_unsafe_loading():
    """No torch.load without weights_only=True, no trust_remote_code=True and no unpickling anywhere in the tree."""
    files = _tree_files()
    assert any(p.parts[-2:] == ("training", "checkpoint.py") for p in files)
    offenders = [f"{p.relative_to(ROOT)}:{line}: {what}" for p in files
                 for line, what in unsafe_calls(p.read_text(), str(p))]
    for p in sorted((ROOT / "configs").rglob("*.yaml")):  # no recipe turns it on either
        offenders += [f"{p.relative_to(ROOT)}:{i}: {ln.strip()}" for i, ln in enumerate(p.read_text().splitlines(), 1)
                      if "trust_remote_code" in ln]
    assert not offenders, "\n".join(offenders)
