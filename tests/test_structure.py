"""The package's shape: imports run one way (no cycles), stages meet only through artifacts on disk,
the CLI is the only module that knows every stage, and exit codes are defined once (the sbatch
script's copy is tied to errors.EXIT_PREEMPTED in test_train_units)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "openseek_cpt"
STAGES = {"assets", "data", "train", "soup", "interop"}


def imports_of_every_module() -> dict[str, set[str]]:
    """module -> package modules it imports anywhere (top level or inside functions)."""
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.glob("*.py"):
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "openseek_cpt":
                deps |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("openseek_cpt."):
                deps.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                deps |= {a.name.split(".")[1] for a in node.names if a.name.startswith("openseek_cpt.")}
        graph[path.stem] = {d for d in deps if (PACKAGE / f"{d}.py").is_file()} - {path.stem}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return path[path.index(dep) :] + [dep] if dep in path else [node, dep]
            if dep not in state and (cycle := visit(dep, path + [dep])):
                return cycle
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [start])):
            return cycle
    return None


def test_the_import_graph_has_no_cycle():
    graph = imports_of_every_module()
    assert {"cli", "train", "errors", "checkpoints"} <= set(graph)  # the walk sees the package
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def test_the_cycle_finder_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_only_the_cli_imports_the_cli_and_no_stage_imports_another_stage():
    graph = imports_of_every_module()
    assert [m for m, deps in graph.items() if "cli" in deps and m != "__main__"] == []
    for stage in STAGES:
        assert not (graph[stage] & (STAGES - {stage})), f"{stage} imports {graph[stage] & STAGES}"
    assert graph["cli"] >= STAGES  # the CLI knows every stage


def test_exit_codes_are_defined_once_in_errors():
    defined = {}
    for path in PACKAGE.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Assign):
                for target in node.targets:
                    if isinstance(target, ast.Name) and target.id.startswith("EXIT_"):
                        defined.setdefault(target.id, []).append(path.stem)
    assert defined and all(where == ["errors"] for where in defined.values()), defined
