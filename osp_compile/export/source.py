"""The source of the functions an exported module calls, with everything they reference.

An exported module imports torch (numpy, which the host-side layout code uses) and the target's
libraries only, so the code of the osp ops and of their kernels is copied into it. Starting from the functions the graph calls, every global name
a copied function uses is looked up in that function's own module and emitted too:

- a function of osp-compile: its source (decorators dropped), under the name its caller uses;
- an opaque custom op (`lowering.attention_ops`): its eager implementation, under the op's name;
- a function whose attention was rebound to a kernel (`lowering.composites`): its source with the
  ``F.scaled_dot_product_attention`` calls renamed to that kernel;
- a module, or a class / function / typing name of an allowed library: an import line (imports
  inside a copied function move to the top: the target's library must exist where the export runs);
- a constant (number, string, dtype, tuple of those, a type union): an assignment;
- a module-level dict / list / set whose name says it is a cache: an empty one.
Anything else stops the export with an error that names it and who uses it. Dependencies come
before their users, so the file reads bottom-up as layout helpers, kernels, then the forward.
"""
from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import re
import textwrap
import types
import typing
from typing import Any, Callable, Iterable

import torch

from ..errors import OSPError
from ..lowering.attention_ops import OPAQUE_IMPLS
from ..lowering.composites import FunctionalWithAttention

COPIED_PACKAGES = ("osp_compile", "passes")
"""Functions of these packages are copied into the export; nothing of them may be imported."""

_CONSTANT_TYPES = (int, float, str, bool, type(None), torch.dtype, types.UnionType)


class ExportError(OSPError):
    """The graph or one of the functions it calls cannot be written as a standalone module."""


def _root(module_name: str) -> str:
    return module_name.split(".")[0]


def is_copied(value: Any) -> bool:
    """A function of osp-compile (or its lru_cache wrapper): its code goes into the export."""
    fn = getattr(value, "__wrapped__", None) if hasattr(value, "cache_parameters") else value
    return isinstance(fn, types.FunctionType) and _root(fn.__module__) in COPIED_PACKAGES


def _is_constant(value: Any) -> bool:
    if isinstance(value, (tuple, frozenset)):
        return all(_is_constant(v) for v in value)
    return isinstance(value, _CONSTANT_TYPES)


def _global_names(fn: Callable, definition: ast.FunctionDef) -> list[str]:
    """Global names the function's code reads (annotations included), in order of appearance."""
    local: set[str] = set()
    codes = [fn.__code__]
    while codes:
        code = codes.pop()
        local.update(code.co_varnames, code.co_cellvars)
        codes.extend(c for c in code.co_consts if isinstance(c, types.CodeType))
    parts = [definition.args, *definition.body] + ([definition.returns] if definition.returns else [])
    seen: dict[str, None] = {}
    for part in parts:  # not the decorators: they are dropped
        for node in ast.walk(part):
            if isinstance(node, ast.Name) and node.id not in local and node.id in fn.__globals__:
                seen.setdefault(node.id)
    return list(seen)


def function_source(fn: Callable, name: str) -> tuple[list[str], ast.FunctionDef]:
    """`fn`'s source lines from its def (renamed to `name`; decorators dropped), and its syntax tree.

    The tree's line numbers count from the first decorator: line i of the tree is
    `lines[i - tree.lineno]`.
    """
    try:
        text = textwrap.dedent(inspect.getsource(fn))
    except (OSError, TypeError) as exc:
        raise ExportError(f"no source for {getattr(fn, '__qualname__', fn)!r}: {exc}") from exc
    definition = ast.parse(text).body[0]
    if not isinstance(definition, ast.FunctionDef):
        raise ExportError(f"{fn!r} is not defined by a def statement; an export can only copy functions")
    lines = text.splitlines()[definition.lineno - 1:]
    lines[0] = re.sub(r"^def\s+\w+", f"def {name}", lines[0])
    return lines, definition


class SourceEmitter:
    """Collects the module-level code of an export: import lines, then functions and constants."""

    def __init__(self, libraries: Iterable[str], reserved: Iterable[str] = ()) -> None:
        self.libraries = {"torch", "numpy", "math", "typing", "collections", "functools", *libraries}
        self.imports: dict[str, None] = {}
        self.blocks: list[str] = []
        self.names: dict[str, Any] = {name: None for name in reserved}

    def _claim(self, name: str, value: Any, user: str) -> bool:
        """Reserve a module-level name; False if it already holds this value."""
        if name in self.names:
            if self.names[name] is value and value is not None:
                return False
            raise ExportError(f"two different objects would be called {name!r} in the exported module "
                              f"(the second is used by {user}); rename one of them")
        self.names[name] = value
        return True

    def function(self, fn: Callable, name: str | None = None) -> str:
        """Emit `fn` (and what it uses) under `name` (default: its own); returns the name.

        A `functools.lru_cache` wrapper is emitted as its function with the same decorator.
        """
        name = name or fn.__name__
        if not self._claim(name, fn, "the graph"):
            return name
        decorator = ""
        if hasattr(fn, "cache_parameters"):
            self.add_import("functools", "lru_cache", name)
            params = fn.cache_parameters()
            decorator = f"@lru_cache(maxsize={params['maxsize']!r}, typed={params['typed']!r})\n"
            fn = fn.__wrapped__
        lines, definition = function_source(fn, name)
        where = f"{fn.__module__}.{fn.__qualname__}"
        local_imports = [n for n in ast.walk(definition) if isinstance(n, (ast.Import, ast.ImportFrom))]
        for node in sorted(local_imports, key=lambda n: n.lineno, reverse=True):  # now module-level: drop them
            self._local_import(node, fn.__globals__["__package__"], where)
            del lines[node.lineno - definition.lineno:node.end_lineno - definition.lineno + 1]
        source = decorator + "\n".join(lines) + "\n"
        for ref in _global_names(fn, definition):
            value = fn.__globals__[ref]
            if isinstance(value, FunctionalWithAttention):
                kernel = self.function(value.scaled_dot_product_attention)
                source = source.replace(f"{ref}.scaled_dot_product_attention(", f"{kernel}(")
                if f"{ref}." not in source:
                    continue
                value = torch.nn.functional
            self._reference(ref, value, where)
        self.blocks.append(source)
        return name

    def import_statement(self, statement: str, user: str, package: str | None = None) -> None:
        """An import statement (e.g. a kernel's `imports`), made module-level like `_local_import`."""
        for node in ast.parse(statement).body:
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                raise ExportError(f"{user} declares {statement!r}, which is not an import statement")
            self._local_import(node, package, user)

    def _local_import(self, node: ast.Import | ast.ImportFrom, package: str | None, user: str) -> None:
        """An import inside a copied function becomes module-level: osp-compile code is copied in,
        an allowed library is imported once at the top (it must exist where the export runs)."""
        if isinstance(node, ast.Import):
            for alias in node.names:
                self.add_import(alias.name, alias.asname or alias.name, user, from_module=False)
            return
        module = importlib.util.resolve_name("." * node.level + (node.module or ""), package)
        for alias in node.names:
            if _root(module) in COPIED_PACKAGES:
                self._reference(alias.asname or alias.name, getattr(importlib.import_module(module), alias.name), user)
            else:
                self.add_import(module, alias.asname or alias.name, user, attr=alias.name)

    def _reference(self, name: str, value: Any, user: str) -> None:
        impl = next((impl for op, impl in OPAQUE_IMPLS.items() if op is value), None)
        if impl is not None:
            self.function(impl, name)
        elif isinstance(value, types.ModuleType):
            self.add_import(value.__name__, name, user, from_module=False)
        elif is_copied(value):
            self.function(value, name)
        elif getattr(typing, name, None) is value:
            self.add_import("typing", name, user)
        elif _is_constant(value):
            if self._claim(name, value, user):
                self.blocks.append(f"{name} = {value!r}\n")
        elif isinstance(value, (dict, list, set)) and "cache" in name.lower():
            if self._claim(name, value, user):
                self.blocks.append(f"{name} = {type(value).__name__}()  # a cache: starts empty\n")
        elif isinstance(getattr(value, "__module__", None), str) and getattr(value, "__qualname__", "") == name:
            self.add_import(value.__module__, name, user)
        else:
            raise ExportError(f"cannot write {name!r} ({type(value).__name__}), used by {user}, into a standalone "
                              f"module: only functions of {COPIED_PACKAGES}, modules of {sorted(self.libraries)} "
                              f"and constants can be")

    def add_import(self, module: str, name: str, user: str, from_module: bool = True, attr: str | None = None) -> None:
        """`from module import attr [as name]`, or (from_module=False) `import module [as name]`."""
        if _root(module) not in self.libraries:
            raise ExportError(f"{user} uses {module!r}, which an export for this target may not import "
                              f"(allowed: {sorted(self.libraries)})")
        if from_module:
            attr = attr or name
            line = f"from {module} import {attr}" + (f" as {name}" if attr != name else "")
        else:
            line = f"import {module}" if module == name else f"import {module} as {name}"
        if line not in self.imports and self._claim(name, line, user):
            self.imports[line] = None

    def module_code(self) -> tuple[str, str]:
        """(the import lines, the functions and constants), as text."""
        return "".join(f"{line}\n" for line in self.imports), "\n\n".join(self.blocks)
