"""Functions of Meta's own code, taken from the installed `llama-models` package by name.

Its modules import their whole model stack (torchvision, fairscale and more) on import, so a
single self-contained function is compiled from the package's source file instead."""

import ast
import importlib.resources
from pathlib import Path


def meta_function(module_path: str, name: str, namespace: dict):
    """The function `name` defined at top level of llama_models/<module_path>, or the method
    "Class.method" of a top-level class (as a plain function taking self), compiled with the
    globals in `namespace` (e.g. {"torch": torch})."""
    path = Path(str(importlib.resources.files("llama_models") / module_path))
    tree = ast.parse(path.read_text(), filename=str(path))
    body = tree.body
    *classes, name = name.split(".")
    for class_name in classes:
        body = next(node.body for node in body if isinstance(node, ast.ClassDef) and node.name == class_name)
    found = [node for node in body if isinstance(node, ast.FunctionDef) and node.name == name]
    assert found, f"{name} is not defined in {path}"
    scope = dict(namespace)
    exec(compile(ast.Module(body=found, type_ignores=[]), str(path), "exec"), scope)
    return scope[name]
