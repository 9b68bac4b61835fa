"""Imports point downward only: cli -> engine -> {drafters, models} -> {sampling, config}."""

from __future__ import annotations

import ast
from pathlib import Path

import dspark

PACKAGE = Path(dspark.__file__).parent
# Layer of each top-level module or subpackage; a module may import only its own layer or lower.
LAYERS = {
    "errors": 0, "config": 0, "sampling": 1, "text": 1, "models": 2, "drafters": 3,
    "engine": 4, "data": 5, "train": 5, "eval": 5, "serve": 5, "cli": 6, "__main__": 7, "__init__": 0,
}
FORBIDDEN_IN_DRAFTERS = ("dspark.engine", "dspark.train", "torch.distributed", "logging")


def dspark_imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
        elif isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
    return names


def test_imports_point_downward_only():
    violations = []
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE)
        own = rel.parts[0].removesuffix(".py")
        assert own in LAYERS, f"{rel}: add its layer to LAYERS"
        for name in dspark_imports(path):
            if name.startswith("dspark."):
                target = name.split(".")[1]
                if LAYERS[target] > LAYERS[own]:
                    violations.append(f"{rel} imports {name}")
    assert not violations, violations


def test_drafters_stay_free_of_engine_training_and_distributed_code():
    for path in (PACKAGE / "drafters").rglob("*.py"):
        for name in dspark_imports(path):
            assert not name.startswith(FORBIDDEN_IN_DRAFTERS), f"{path.name} imports {name}"


def test_generate_and_eval_import_neither_training_nor_serving():
    """What `dspark generate` and `dspark eval` load (drafter registry, engine, policy resolution,
    evaluation runner) pulls in no dspark.train or dspark.serve module."""
    import subprocess
    import sys

    code = ("import sys; import dspark.drafters.registry, dspark.engine.engine, dspark.engine.policy_spec, "
            "dspark.models.target, dspark.text, dspark.eval.runner; "
            "print(sorted(m for m in sys.modules if m.startswith(('dspark.train', 'dspark.serve'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]", out


def module_graph() -> dict[str, set[str]]:
    """dspark module -> the dspark modules it imports, imports inside functions included."""
    modules = {".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"): p
               for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dspark"):
                deps.update(f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                            for a in node.names)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph


def test_no_module_imports_one_that_imports_it_back():
    """An import cycle works only while one side imports lazily, and breaks when someone tidies the
    import up (drafters/checkpoint, deepspec and eagle3 once imported each other that way)."""
    graph, done, path = module_graph(), set(), []

    def visit(name: str) -> None:
        if name in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(name):] + [name]))
        if name in done:
            return
        path.append(name)
        for dep in sorted(graph[name]):
            visit(dep)
        path.pop()
        done.add(name)

    for name in sorted(graph):
        visit(name)
