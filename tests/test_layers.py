"""Imports flow one way: every jaxtune import is read from the source (ast) and checked against
the layers of the README's Layout section. A failure names the file, the line and the import."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "jaxtune"

# Top to bottom; a package may import only packages of lower layers (not its neighbours in its own).
LAYERS = [
    ("cli",),
    ("job",),
    ("eval",),
    ("align",),
    ("train", "interop"),
    ("peft",),
    ("quant",),
    ("checkpoint", "data", "generate"),
    ("models",),
    ("kernels", "parallel"),
    ("ops",),
    ("config",),
    ("utils",),
]
RANK = {package: i for i, layer in enumerate(LAYERS) for package in layer}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def package_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def imports_of(module: str):
    """-> [(imported module, imported names, line, at top level)] of jaxtune modules."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(), str(path))
    top = {id(node) for node in tree.body}
    is_package = path.name == "__init__.py"
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("jaxtune"):
                    found.append((alias.name, [], node.lineno, id(node) in top))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("jaxtune"):
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                if sub in MODULES:  # `from jaxtune.quant import codes`: the module itself
                    found.append((sub, [], node.lineno, id(node) in top))
                else:
                    found.append((target, [alias.name], node.lineno, id(node) in top))
    return found


EDGES = {m: imports_of(m) for m in MODULES}


def where(module: str, line: int) -> str:
    return f"{MODULES[module].relative_to(ROOT)}:{line}"


def test_every_package_has_a_layer():
    packages = {package_of(m) for m in MODULES} - {""}
    assert packages <= set(RANK), f"packages without a layer in tests/test_layers.py: {sorted(packages - set(RANK))}"


def test_imports_flow_down_the_layers():
    wrong = []
    for module, edges in EDGES.items():
        source = package_of(module)
        for target, _, line, _ in edges:
            dest = package_of(target)
            if not source or not dest or dest == source:
                continue
            if RANK[dest] <= RANK[source]:
                direction = "up" if RANK[dest] < RANK[source] else "sideways"
                wrong.append(f"{where(module, line)}: jaxtune.{source} imports {target} ({direction}: "
                             f"{source} is in layer {RANK[source]}, {dest} in layer {RANK[dest]})")
    assert not wrong, "imports against the layers:\n" + "\n".join(wrong)


def test_jaxtune_imports_are_at_the_top_of_files():
    inside = [f"{where(m, line)}: import of {target} inside a function or block"
              for m, edges in EDGES.items() for target, _, line, top in edges if not top]
    assert not inside, "\n".join(inside)


def test_no_private_name_crosses_modules():
    crossing = [f"{where(m, line)}: imports {target}.{name}"
                for m, edges in EDGES.items() for target, names, line, _ in edges
                for name in names if name.startswith("_") and target != m]
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(), str(path))
        aliases = {}
        for node in tree.body:
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("jaxtune"):
                for alias in node.names:
                    if f"{node.module}.{alias.name}" in MODULES:
                        aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("jaxtune") and alias.asname:
                        aliases[alias.asname] = alias.name
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                crossing.append(f"{where(module, node.lineno)}: uses {aliases[node.value.id]}.{node.attr}")
    assert not crossing, "private names used outside their module:\n" + "\n".join(crossing)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan), each as a list."""
    index, low, on_stack, stack, out, counter = {}, {}, set(), [], [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


@pytest.mark.parametrize("level", ["package", "module"])
def test_no_import_cycles(level):
    graph: dict[str, set[str]] = {}
    for module, edges in EDGES.items():
        for target, _, _, _ in edges:
            a, b = (package_of(module), package_of(target)) if level == "package" else (module, target)
            if a != b and b in (RANK if level == "package" else MODULES):
                graph.setdefault(a, set()).add(b)
    cycles = _cycles(graph)
    assert not cycles, f"{level} import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_readme_layout_lists_the_layers_in_order():
    """The README's Layout section shows the same layers, top to bottom."""
    text = (ROOT / "README.md").read_text()
    layout = text[text.index("## Layout"):]
    lines = [line for line in layout.splitlines() if line.startswith("jaxtune/")]
    shown = [line.split()[0].removeprefix("jaxtune/") for line in lines]
    order = [package for layer in LAYERS for package in layer]
    assert shown == order, f"README Layout lists {shown}; tests/test_layers.py has {order}"
