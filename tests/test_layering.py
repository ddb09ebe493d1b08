"""The import graph flows one way: data -> encoders -> vlm model -> training/eval -> cli.

Parses every module's imports (no execution) and checks none reaches a higher layer.
"""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("vlm", "encoders", "training", "eval")


def layer_of(module: str) -> int | None:
    """Layer number of a dotted module name of ours, or None for third-party modules."""
    top = module.split(".")[0]
    if top not in PACKAGES:
        return None
    if module in ("vlm", "vlm.config", "vlm.prompts") or module.startswith(
        ("vlm.config.", "vlm.prompts.", "vlm.world", "vlm.data")
    ):
        return 0
    if top == "encoders":
        return 1
    if module == "vlm.cli" or module.startswith("vlm.cli."):
        return 4
    if top == "vlm":
        return 2
    return 3  # training, eval


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
            for alias in node.names:  # "from vlm import model" imports vlm.model
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


def test_no_unsafe_loading():
    """No torch.load without weights_only=True and no trust_remote_code=True in our code."""
    offenders = []
    for name, path in ALL:
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            if "torch.load(" in line and "weights_only=True" not in line:
                offenders.append(f"{path.relative_to(ROOT)}:{lineno}: {line.strip()}")
            if "trust_remote_code=True" in line:
                offenders.append(f"{path.relative_to(ROOT)}:{lineno}: {line.strip()}")
    assert not offenders, "\n".join(offenders)
