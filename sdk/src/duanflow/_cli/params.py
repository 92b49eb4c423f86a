"""``duanflow run FILE::FUNCTION --param value``: command-line options built from the function's signature.

``--text "hi"`` for ``def f(text)``; the annotation picks the type (``int``, ``float``, ``bool``, ``str``,
``list``/``dict`` as JSON; no annotation: ``str``). ``snake_case`` parameters are ``--kebab-case`` options
(the ``--snake_case`` spelling works too). Booleans are flags: ``--verbose`` / ``--no-verbose``.
"""

from __future__ import annotations

import inspect
import json
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from duanflow._cli.output import CliError


@dataclass(frozen=True)
class Param:
    """One parameter of the function as a command-line option."""

    name: str
    kind: type
    required: bool
    default: Any = None
    optional: bool = False

    @property
    def flag(self) -> str:
        """``--kebab-name``."""
        return "--" + self.name.replace("_", "-")

    def describe(self) -> str:
        """``--text TEXT (str, required)`` for help and errors."""
        if self.kind is bool:
            return f"{self.flag} / --no-{self.flag[2:]}"
        need = "required" if self.required else f"default {self.default!r}"
        return f"{self.flag} {self.name.upper()} ({self.kind.__name__}, {need})"


def signature_params(fn: Callable[..., Any]) -> list[Param]:
    """The parameters a caller may pass by name, with their types."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return []
    try:
        hints = typing.get_type_hints(fn)
    except Exception:
        hints = {}
    params = []
    for p in sig.parameters.values():
        if p.kind in (
            inspect.Parameter.VAR_POSITIONAL,
            inspect.Parameter.VAR_KEYWORD,
            inspect.Parameter.POSITIONAL_ONLY,
        ):
            continue
        kind, optional = _kind(hints.get(p.name, p.annotation))
        required = p.default is inspect.Parameter.empty
        params.append(Param(p.name, kind, required, None if required else p.default, optional))
    return params


def _kind(annotation: Any) -> tuple[type, bool]:
    """The type to convert to, and whether ``None`` is allowed."""
    if annotation is inspect.Parameter.empty or annotation is Any:
        return str, False
    if isinstance(annotation, str):  # an annotation that did not resolve
        base = annotation.replace(" ", "").removesuffix("|None").removeprefix("Optional[").rstrip("]")
        named = {"str": str, "int": int, "float": float, "bool": bool}
        return named.get(base.split("[")[0], str), "None" in annotation
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional = len(args) < len(typing.get_args(annotation))
        if len(args) == 1:
            return _kind(args[0])[0], optional
        return str, optional
    if origin is not None:
        annotation = origin
    if annotation in (str, int, float, bool, list, dict, tuple, set):
        return annotation, False
    return str, False


def parse_args(params: Sequence[Param], argv: Sequence[str], function: str) -> dict[str, Any]:
    """``['--text', 'hi']`` → ``{'text': 'hi'}``, converted and checked against ``params``."""
    by_flag: dict[str, Param] = {}
    for p in params:
        by_flag[p.flag] = p
        by_flag["--" + p.name] = p
    values: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or arg == "--":
            raise CliError(
                f"unexpected argument {arg!r} for {function}: pass parameters by name",
                hint=_usage(params, function),
            )
        flag, eq, inline = arg.partition("=")
        negated = False
        param = by_flag.get(flag)
        if param is None and flag.startswith("--no-"):
            cand = by_flag.get("--" + flag[5:])
            if cand is not None and cand.kind is bool:
                param, negated = cand, True
        if param is None:
            raise CliError(f"{function} has no parameter {flag}", hint=_usage(params, function))
        if param.name in values:
            raise CliError(f"{flag} is given twice")
        if param.kind is bool:
            if negated:
                values[param.name] = False
            elif eq:
                values[param.name] = _convert(param, inline)
            elif i + 1 < len(argv) and argv[i + 1].lower() in _BOOLS:
                i += 1
                values[param.name] = _BOOLS[argv[i].lower()]
            else:
                values[param.name] = True
        else:
            if eq:
                raw = inline
            elif i + 1 < len(argv):
                i += 1
                raw = argv[i]
            else:
                raise CliError(f"{flag} needs a value", hint=_usage(params, function))
            values[param.name] = _convert(param, raw)
        i += 1
    missing = [p.flag for p in params if p.required and p.name not in values]
    if missing:
        raise CliError(f"{function} needs {', '.join(missing)}", hint=_usage(params, function))
    return values


_BOOLS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def _convert(param: Param, raw: str) -> Any:
    if param.optional and raw.lower() in ("none", "null"):
        return None
    kind = param.kind
    try:
        if kind is str:
            return raw
        if kind is bool:
            return _BOOLS[raw.lower()]
        if kind is int:
            return int(raw)
        if kind is float:
            return float(raw)
        value = json.loads(raw)
        if kind in (list, tuple, set) and isinstance(value, list):
            return kind(value)
        if kind is dict and isinstance(value, dict):
            return value
    except (ValueError, KeyError):
        pass
    raise CliError(f"{param.flag} takes {_what(kind)}, got {raw!r}")


def _what(kind: type) -> str:
    return {
        int: "an integer",
        float: "a number",
        bool: "true or false",
        list: "a JSON list",
        tuple: "a JSON list",
        set: "a JSON list",
        dict: "a JSON object",
    }.get(kind, kind.__name__)


def _usage(params: Sequence[Param], function: str) -> str:
    if not params:
        return f"{function} takes no parameters"
    return f"parameters of {function}: " + "; ".join(p.describe() for p in params)
