"""The package's import structure: no module imports, at module level, one that imports it back
(directly or through others), and every module imports on its own, in any order."""

import ast
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, Iterator, List, Set

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "llama"


def module_files() -> Dict[str, Path]:
    """Module name -> file, for every module of the package (a package is its __init__.py)."""
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _module_level_imports(node: ast.AST) -> Iterator[ast.AST]:
    """The import statements that run when the module is imported: not those inside functions
    (they run when called) nor under `if TYPE_CHECKING:` (they never run)."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child
        elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        elif isinstance(child, ast.If) and _is_type_checking(child.test):
            yield from _module_level_imports(ast.Module(body=child.orelse, type_ignores=[]))
        else:
            yield from _module_level_imports(child)


def _imported(name: str, path: Path, node: ast.AST, modules: Dict[str, Path]) -> Set[str]:
    """The package's modules that the statement `node` in module `name` imports."""
    if isinstance(node, ast.Import):
        targets = [alias.name for alias in node.names]
    else:
        target = node.module or ""
        if node.level:  # relative: count packages up from the module's own package
            package = name if path.name == "__init__.py" else name.rpartition(".")[0]
            base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
            target = f"{base}.{target}" if target else base
        # `from package import submodule` imports the submodule; any other name comes from the package.
        targets = [f"{target}.{alias.name}" if f"{target}.{alias.name}" in modules else target
                   for alias in node.names]
    return {t for t in targets if t in modules and t != name}


def import_graph() -> Dict[str, Set[str]]:
    modules = module_files()
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        graph[name] = set().union(*(_imported(name, path, node, modules) for node in _module_level_imports(tree)))
    return graph


def find_cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """One cycle per edge that closes one, each as the path of modules round it."""
    cycles, state, stack = [], {}, []

    def visit(module: str) -> None:
        state[module] = "open"
        stack.append(module)
        for dep in sorted(graph.get(module, ())):
            if state.get(dep) == "open":
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep)
        stack.pop()
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module)
    return cycles


def test_find_cycles_finds_one():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_graph_sees_the_imports():
    # So that an empty graph cannot pass the next test: relative, absolute, `from . import x`,
    # imports under try; a TYPE_CHECKING import and a function's import are not edges.
    graph = import_graph()
    assert "llama.rope" in graph["llama.model"]
    assert "llama.cpu_kernels" in graph["llama.bf16"]  # from . import cpu_kernels
    assert "llama.chat_template" in graph["llama.chat_format"]
    assert "llama.tokenizer" not in graph["llama.chat_format"]  # under TYPE_CHECKING
    assert "llama.convert.hf" not in graph["llama.convert.source"]  # inside open_source
    assert "llama.generation" in graph["llama"]


def test_no_import_cycles():
    cycles = find_cycles(import_graph())
    assert not cycles, "module-level import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


# Each module imported first into a package nothing of which is loaded yet. One interpreter for all
# of them (torch loads once); llama's own modules are dropped from sys.modules before each.
_IMPORT_EACH = """
import importlib, sys, traceback
failed = []
for name in sys.argv[1:]:
    for loaded in [m for m in sys.modules if m == "llama" or m.startswith("llama.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except BaseException:  # SystemExit too: llama.serve.__main__ exits when its extras are missing
        failed.append(name + ":\\n" + traceback.format_exc())
print("\\n".join(failed))
sys.exit(1 if failed else 0)
"""


def test_each_module_imports_on_its_own():
    paths = [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    run = subprocess.run([sys.executable, "-c", _IMPORT_EACH, *module_files()], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
