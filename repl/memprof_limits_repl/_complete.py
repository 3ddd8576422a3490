"""Tab completion of names, attributes and REPL commands.

Completion runs while the user types, outside any cell, so it must not run
user code: attributes are looked up with ``inspect.getattr_static`` and the
lookup stops at a ``property`` or any other descriptor written in Python
(``dir()`` may still call a user-defined ``__dir__``, as ``rlcompleter``
does).  Only dotted names are completed -- never calls or subscripts.
"""

from __future__ import annotations

import builtins
import inspect
import keyword
import re
import types
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from prompt_toolkit.completion import CompleteEvent, Completer, Completion
from prompt_toolkit.document import Document

__all__ = ["NamespaceCompleter"]

_DOTTED = re.compile(r"(?<![\w.)\]}'\"])((?:[A-Za-z_]\w*\.)*)([A-Za-z_]\w*)?$")
_SAFE_DESCRIPTORS = (
    types.FunctionType,
    types.BuiltinFunctionType,
    types.MethodDescriptorType,
    types.WrapperDescriptorType,
    types.ClassMethodDescriptorType,
    types.MemberDescriptorType,
    types.GetSetDescriptorType,
    staticmethod,
    classmethod,
)


class _Unsafe(Exception):
    """Looking the attribute up could run user code."""


def _safe_getattr(obj: Any, name: str) -> Any:
    if isinstance(obj, types.ModuleType):
        return getattr(obj, name)
    static = inspect.getattr_static(obj, name)
    if hasattr(type(static), "__get__") and not isinstance(static, _SAFE_DESCRIPTORS):
        raise _Unsafe(name)  # a property or a descriptor written in Python
    return getattr(obj, name)


class NamespaceCompleter(Completer):
    """Completes the names of ``namespace`` (read when completing), builtins
    and keywords; attributes of dotted names (``os.pa`` -> ``os.path``,
    without running properties); and ``commands`` at the start of the input.
    Names starting with ``_`` are offered only when the typed prefix starts
    with ``_``.
    """

    def __init__(
        self,
        namespace: Mapping[str, Any] | Callable[[], Mapping[str, Any]],
        commands: Iterable[str],
    ) -> None:
        self._namespace = namespace
        self._commands = sorted(commands)

    def _names(self) -> Mapping[str, Any]:
        ns = self._namespace
        return ns() if callable(ns) else ns

    def get_completions(
        self, document: Document, complete_event: CompleteEvent
    ) -> Iterator[Completion]:
        before = document.text_before_cursor
        if before.lstrip().startswith("%") and " " not in before.strip():
            word = before.strip()
            for command in self._commands:
                if command.startswith(word):
                    yield Completion(command, start_position=-len(word))
            return
        match = _DOTTED.search(document.current_line_before_cursor)
        if match is None:
            return
        path, word = match.group(1), match.group(2) or ""
        if not path and not word:
            return
        try:
            candidates = self._attributes(path[:-1].split(".")) if path else self._globals()
        except Exception:  # an attribute that is not there, a failing __dir__
            return
        for name, meta in sorted(candidates.items()):
            if name.startswith(word) and (word.startswith("_") or not name.startswith("_")):
                yield Completion(name, start_position=-len(word), display_meta=meta)

    def _globals(self) -> dict[str, str]:
        names: dict[str, str] = {name: "builtin" for name in dir(builtins)}
        names.update({name: "keyword" for name in [*keyword.kwlist, *keyword.softkwlist]})
        names.update({name: type(value).__name__ for name, value in self._names().items()})
        return names

    def _attributes(self, path: list[str]) -> dict[str, str]:
        names = self._names()
        obj = names[path[0]] if path[0] in names else getattr(builtins, path[0])
        for name in path[1:]:
            obj = _safe_getattr(obj, name)
        return {name: "" for name in dir(obj)}
