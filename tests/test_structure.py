"""The package's shape, read from its folders: imports run one way (no cycles), a stage (a folder
that is not a shared layer, or `download`) never imports another stage nor the assembled recipe, a
shared layer imports no stage module, a stage reads no other stage's recipe section, only `__main__`
imports the CLI, `__init__` files import nothing, and exit codes are defined once in `errors`.
Imports under `if TYPE_CHECKING:` never run and do not count."""

from __future__ import annotations

import ast
import dataclasses
import typing
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "openseek_cpt"
# Folders every stage may use: the contract on disk, the recipe, the model-level levers, fixtures.
SHARED_LAYERS = {"artifacts", "recipe", "modeling", "testing"}
# The module that assembles every stage's section into the whole recipe (the CLI's to hand out).
ASSEMBLY = "config"
# Each recipe section and the stage that owns it.
SECTION_OWNERS = {"assets": "download", "data": "data", "train": "train", "soup": "soup"}


def module_name(path: Path, package: Path = PACKAGE) -> str:
    """openseek_cpt/train/stage.py -> "train.stage"; openseek_cpt/cli.py -> "cli"."""
    parts = path.relative_to(package).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def stage_of(module: str, package: Path = PACKAGE) -> str | None:
    """The stage a module belongs to: its top folder unless shared, or the `download` module."""
    top = module.split(".")[0]
    if top and (package / top).is_dir():
        return None if top in SHARED_LAYERS else top
    return top if top == "download" else None


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def import_nodes(tree: ast.Module, at_load: bool = False) -> list[ast.Import | ast.ImportFrom]:
    """The import statements that run: anywhere (top level or inside functions), or with `at_load`
    only those that run when the module is imported (not inside a function); never the ones under
    `if TYPE_CHECKING:`."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if _is_type_checking(child):
                continue
            if at_load and isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
                continue
            if isinstance(child, ast.Import | ast.ImportFrom):
                found.append(child)
            visit(child)

    visit(tree)
    return found


def imports_of_every_module(package: Path = PACKAGE, at_load: bool = False) -> dict[str, set[str]]:
    """module -> package modules it imports (anywhere, or with `at_load` when it is imported)."""
    modules = {module_name(p, package) for p in package.rglob("*.py")}

    def resolve(dotted: str) -> str | None:
        while dotted and dotted not in modules:
            dotted = dotted.rpartition(".")[0]
        return dotted or None

    graph: dict[str, set[str]] = {}
    for path in package.rglob("*.py"):
        deps: set[str] = set()
        for node in import_nodes(ast.parse(path.read_text()), at_load):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("openseek_cpt"):
                base = node.module.removeprefix("openseek_cpt").lstrip(".")
                for alias in node.names:  # `from openseek_cpt.train import stage` names a module
                    full = f"{base}.{alias.name}" if base else alias.name
                    deps.add(full if full in modules else resolve(base) or "")
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.startswith("openseek_cpt."):
                        deps.add(resolve(a.name.removeprefix("openseek_cpt.")) or "")
        me = module_name(path, package)
        graph[me] = {d for d in deps if d and d != me and d in modules}
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


def layer_violations(graph: dict[str, set[str]], package: Path = PACKAGE) -> list[str]:
    """Every import that breaks the layering rule, as 'importer -> imported (why)'."""
    found = []
    for module, deps in sorted(graph.items()):
        mine = stage_of(module, package)
        for dep in sorted(deps):
            theirs = stage_of(dep, package)
            if dep == "cli" and module not in ("__main__",):
                found.append(f"{module} -> cli (only __main__ imports the CLI)")
            elif theirs and mine and theirs != mine:
                found.append(f"{module} -> {dep} (stage {mine} imports stage {theirs})")
            elif theirs and module.split(".")[0] in SHARED_LAYERS:
                found.append(f"{module} -> {dep} (a shared layer imports stage {theirs})")
            elif mine and dep == ASSEMBLY:
                found.append(f"{module} -> {dep} (a stage takes its own section, not the whole recipe)")
    return found


def section_fields() -> dict[str, set[str]]:
    """Section -> the keys it declares, read from the assembled recipe."""
    from openseek_cpt.config import Recipe

    hints = typing.get_type_hints(Recipe)
    return {name: {f.name for f in dataclasses.fields(hints[name])} for name in SECTION_OWNERS}


def _last_name(node: ast.expr) -> str:
    return node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else ""


def section_reads(package: Path = PACKAGE, fields: dict[str, set[str]] | None = None) -> list[str]:
    """Every place a stage module reads another stage's recipe section, as 'module:line reads CODE (why)'.

    A read is `<...recipe>.SECTION` (the section of anything named like a recipe) or
    `<anything>.SECTION.KEY` with KEY a key that section declares (`cfg.data.max_length`), where
    SECTION belongs to another stage; `param.data.float()` is neither."""
    fields = fields if fields is not None else section_fields()
    found = []
    for path in package.rglob("*.py"):
        module = module_name(path, package)
        mine = stage_of(module, package)
        if mine is None:
            continue
        reads, inside = [], set()  # `recipe.data.max_length` is one read, not two
        for node in ast.walk(ast.parse(path.read_text())):  # outer attributes come first
            if not isinstance(node, ast.Attribute) or id(node) in inside:
                continue
            inner = node.value
            if isinstance(inner, ast.Attribute) and inner.attr in fields and node.attr in fields[inner.attr]:
                reads.append((inner.attr, node))
                inside.add(id(inner))
            elif node.attr in fields and "recipe" in _last_name(inner).lower():
                reads.append((node.attr, node))
        found += [
            f"{module}:{node.lineno} reads {ast.unparse(node)} "
            f"(section {section} belongs to stage {SECTION_OWNERS[section]})"
            for section, node in reads
            if SECTION_OWNERS[section] != mine
        ]
    return sorted(found)


def test_the_import_graph_has_no_cycle():
    graph = imports_of_every_module()
    assert {"cli", "train.stage", "errors", "artifacts.checkpoints"} <= set(graph)  # the walk sees it
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def test_the_cycle_finder_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_stage_imports_another_stage_and_only_main_imports_the_cli():
    graph = imports_of_every_module()
    stages = {stage_of(m) for m in graph} - {None}
    assert stages >= {"download", "data", "train", "soup", "export"}
    assert layer_violations(graph) == []
    assert {stage_of(d) for d in graph["cli"]} >= stages  # the CLI knows every stage


def test_the_layer_rule_catches_a_planted_stage_import_and_a_cli_import(tmp_path):
    """The rule is read from folders: planted `soup -> train`, `data -> cli`, `recipe -> soup`,
    `recipe -> data.config` and `train -> config` imports in a copy of the package are all reported."""
    import shutil

    copy = tmp_path / "openseek_cpt"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "soup" / "planted.py").write_text("from openseek_cpt.train import stage\n")
    (copy / "data" / "planted.py").write_text("def f():\n    from openseek_cpt import cli\n")
    (copy / "recipe" / "planted.py").write_text("import openseek_cpt.soup.stage\n")
    (copy / "recipe" / "reads_a_table.py").write_text("from openseek_cpt.data import config\n")
    (copy / "train" / "planted.py").write_text("from openseek_cpt.config import Recipe\n")
    found = layer_violations(imports_of_every_module(copy), copy)
    assert "soup.planted -> train.stage (stage soup imports stage train)" in found
    assert "data.planted -> cli (only __main__ imports the CLI)" in found
    assert "recipe.planted -> soup.stage (a shared layer imports stage soup)" in found
    assert "recipe.reads_a_table -> data.config (a shared layer imports stage data)" in found
    assert "train.planted -> config (a stage takes its own section, not the whole recipe)" in found


def test_no_stage_reads_another_stages_recipe_section():
    assert section_reads() == []


def test_the_section_rule_owners_are_where_the_sections_are_declared():
    from openseek_cpt.config import Recipe

    hints = typing.get_type_hints(Recipe)
    owners = {name: stage_of(hints[name].__module__.removeprefix("openseek_cpt.")) for name in SECTION_OWNERS}
    assert owners == SECTION_OWNERS


def test_the_section_rule_catches_planted_reads(tmp_path):
    """Reads of another stage's section in a copy of the package are reported; a stage's own section,
    and an attribute that only shares a section's name (`param.data.float()`), are not."""
    import shutil

    copy = tmp_path / "openseek_cpt"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "train" / "planted.py").write_text(
        "def f(self, param, cfg):\n"
        "    return self.recipe.data, cfg.data.max_length, self.recipe.train.args, param.data.float()\n"
    )
    (copy / "soup" / "planted.py").write_text("def g(recipe):\n    return recipe.assets.model_dir\n")
    found = section_reads(copy)
    assert found == [
        "soup.planted:2 reads recipe.assets.model_dir (section assets belongs to stage download)",
        "train.planted:2 reads cfg.data.max_length (section data belongs to stage data)",
        "train.planted:2 reads self.recipe.data (section data belongs to stage data)",
    ]


def test_stage_and_layer_init_files_import_nothing():
    """The CLI's lazy imports and the assembly's use of a stage's config must not load the stage."""
    for init in PACKAGE.glob("*/__init__.py"):
        tree = ast.parse(init.read_text())
        imports = [n for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom)]
        assert not imports, f"{init.relative_to(PACKAGE.parent)} imports at load"


def test_no_package_module_is_over_400_lines():
    long = {module_name(p): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > 400}
    assert long == {}, f"split these by concern: {long}"


def test_exit_codes_are_defined_once_in_errors():
    defined = {}
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Assign):
                for target in node.targets:
                    if isinstance(target, ast.Name) and target.id.startswith("EXIT_"):
                        defined.setdefault(target.id, []).append(module_name(path))
    assert defined and all(where == ["errors"] for where in defined.values()), defined
