"""Import a user's app file the way a replica will (module named after the file) and find its apps and functions.

Every way this can go wrong (no such file, a syntax error, an exception at import, no app, no such
function) is a :class:`~duanflow._cli.output.CliError` that says where, never a traceback.
"""

from __future__ import annotations

import importlib.util
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from duanflow._cli.output import CliError

_LOADED: set[str] = set()
"""Module names this process imported from app files (another file of the same name may replace one)."""


@dataclass(frozen=True)
class Target:
    """``FILE[::NAME]`` as given on the command line."""

    path: Path
    name: str = ""

    @classmethod
    def parse(cls, text: str) -> Target:
        """Split ``examples/hello.py::classify_ticket`` into the file and the name after ``::``."""
        file_part, sep, name = text.partition("::")
        if sep and not name:
            raise CliError(f"{text!r} names no function after '::'", hint="write FILE.py::FUNCTION")
        if not file_part:
            raise CliError(f"{text!r} names no file", hint="write FILE.py or FILE.py::FUNCTION")
        return cls(Path(file_part), name)


def import_file(path: Path) -> ModuleType:
    """Import ``path`` as the module named after its stem, with its directory first on ``sys.path``."""
    path = path.expanduser()
    if not path.exists():
        raise CliError(f"{path}: no such file")
    if path.is_dir():
        raise CliError(f"{path} is a directory, not a Python file")
    if path.suffix != ".py":
        raise CliError(f"{path} is not a Python file (.py)")
    path = path.resolve()
    source = path.read_bytes()
    try:
        compile(source, str(path), "exec")
    except SyntaxError as exc:
        raise CliError(_syntax_message(path, exc), hint=_caret(exc)) from None
    name = path.stem
    if not name.isidentifier():
        raise CliError(f"{path.name}: the file name must be a Python module name (letters, digits, _)")
    existing = sys.modules.get(name)
    if existing is not None:
        if getattr(existing, "__file__", None) == str(path):
            return existing
        if name not in _LOADED:
            where = getattr(existing, "__file__", None) or "built in"
            raise CliError(
                f"{path.name} has the name of the module {name!r} that is already imported ({where})",
                hint="replicas import the app by its file name: rename the file",
            )
    directory = str(path.parent)
    if directory not in sys.path:
        sys.path.insert(0, directory)
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise CliError(f"{path}: cannot be imported")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    _LOADED.add(name)
    try:
        spec.loader.exec_module(module)
    except SystemExit as exc:
        sys.modules.pop(name, None)
        raise CliError(f"{path} called exit({exc.code}) while being imported") from None
    except Exception as exc:
        sys.modules.pop(name, None)
        where = _user_frame(exc, path)
        raise CliError(
            f"importing {path.name} failed{where}: {type(exc).__name__}: {exc}",
            hint="the file's module scope ran and raised; fix it or guard that code with `if __name__ == '__main__':`",
        ) from None
    return module


def find_apps(module: ModuleType) -> dict[str, Any]:
    """Variable name → ``duanflow.App`` defined at the module's top level."""
    from duanflow._app import App

    return {var: obj for var, obj in vars(module).items() if isinstance(obj, App)}


def find_app(module: ModuleType, path: Path, *, var: str = "") -> Any:
    """The module's one app (or the one in variable ``var``)."""
    from duanflow._app import App

    apps = find_apps(module)
    if var:
        obj = getattr(module, var, None)
        if isinstance(obj, App):
            return obj
        raise CliError(f"{path} has no app named {var!r}", hint=_choices("apps", apps))
    if not apps:
        raise CliError(
            f"{path} defines no duanflow.App",
            hint='declare one at module level: app = df.App("my-app")',
        )
    unique = {id(a): a for a in apps.values()}
    if len(unique) > 1:
        raise CliError(f"{path} defines several apps ({', '.join(sorted(apps))})", hint="pick one with FILE.py::APP")
    return next(iter(unique.values()))


def find_function(module: ModuleType, path: Path, name: str) -> tuple[Any, Any]:
    """``(app, function)`` for ``FILE::name``: a function registered on one of the file's apps, or one of its
    ``@app.local_entrypoint()`` functions (a plain callable)."""
    apps = find_apps(module)
    if not apps:
        raise CliError(f"{path} defines no duanflow.App", hint='declare one: app = df.App("my-app")')
    known: dict[str, Any] = {}
    for app in {id(a): a for a in apps.values()}.values():
        for fn_name, fn in app._registry().items():
            known.setdefault(fn_name, (app, fn))
        for fn_name, entry in app._local_entrypoints().items():
            known.setdefault(fn_name, (app, entry))
    if name in known:
        return known[name]  # type: ignore[no-any-return]
    obj = getattr(module, name, None)
    if obj is not None and callable(obj):
        raise CliError(
            f"{name} in {path} is not a DuanFlow function",
            hint="decorate it with @app.function(...) (or @app.endpoint / @app.worker / @app.job), or with "
            "@app.local_entrypoint() to run it here",
        )
    raise CliError(f"{path} has no function {name!r}", hint=_choices("functions", known))


def _choices(what: str, names: dict[str, Any]) -> str:
    return f"{what} in this file: {', '.join(sorted(names))}" if names else f"this file declares no {what}"


def _syntax_message(path: Path, exc: SyntaxError) -> str:
    line = f":{exc.lineno}" if exc.lineno else ""
    return f"{path}{line}: syntax error: {exc.msg}"


def _caret(exc: SyntaxError) -> str:
    if not exc.text:
        return ""
    text = exc.text.rstrip("\n")
    stripped = text.lstrip()
    col = max(0, (exc.offset or 1) - 1 - (len(text) - len(stripped)))
    return f"    {stripped}\n    {' ' * col}^"


def _user_frame(exc: BaseException, path: Path) -> str:
    """`` (hello.py:12)``: the deepest frame of the traceback inside the user's file."""
    found = ""
    for frame in traceback.extract_tb(exc.__traceback__):
        if Path(frame.filename) == path:
            found = f" ({path.name}:{frame.lineno})"
    return found
