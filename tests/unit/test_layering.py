"""The layering the design promises, pinned by reading the source (no imports executed):

- no service package imports another service package, nor the SDK (``duanflow``); the shared
  ``duanflow_kit`` and ``duanflow_proto`` are the only DuanFlow packages a service may use;
- ``domain`` modules import no transport, not even through their own package's other modules;
- ``duanflow_proto`` depends on msgspec and the standard library only;
- no subject is written as a string literal outside ``duanflow_proto/subjects.py`` (in ``sdk/``, ``services/``,
  ``bench/``, ``scripts/`` and ``examples/``);
- the SDK imports no service and not the kit;
- in services only ``settings.py`` reads the environment.
"""

from __future__ import annotations

import ast
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SERVICES_DIR = ROOT / "services"
PROTO_DIR = ROOT / "proto" / "src" / "duanflow_proto"
SDK_DIR = ROOT / "sdk" / "src" / "duanflow"
SUBJECTS_PY = PROTO_DIR / "subjects.py"

SHARED = {"duanflow_kit", "duanflow_proto"}
TRANSPORT = {
    "faststream",
    "nats",
    "litestar",
    "asyncpg",
    "minio",
    "uvicorn",
    "docker",
    "httpx",
    "aiohttp",
    "requests",
    "boto3",
    "botocore",
    "psycopg",
    "psycopg2",
}
# modules of the shared kit that are themselves transport (they wrap FastStream / nats-py)
KIT_TRANSPORT = {"duanflow_kit.service", "duanflow_kit.streams"}


def _packages() -> dict[str, Path]:
    """``duanflow_<svc>`` → its source directory, for every folder under services/ (kit included)."""
    found = {}
    for src in sorted(SERVICES_DIR.glob("*/src/duanflow_*")):
        if src.is_dir():
            found[src.name] = src
    return found


PACKAGES = _packages()
SERVICE_PACKAGES = {name: path for name, path in PACKAGES.items() if name not in SHARED}


@dataclass(frozen=True)
class Import:
    module: str  # absolute dotted name
    path: Path
    line: int


def _module_name(path: Path, package_root: Path) -> str:
    rel = path.relative_to(package_root.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path, package_root: Path) -> Iterator[Import]:
    """Every module ``path`` imports, relative imports resolved (``from . import x`` yields ``pkg.x``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    this = _module_name(path, package_root)
    is_pkg = path.name == "__init__.py"
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(alias.name, path, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = this.split(".")
                drop = node.level - 1 if is_pkg else node.level
                base_parts = base_parts[: len(base_parts) - drop] if drop else base_parts
                base = ".".join(base_parts)
                mod = f"{base}.{node.module}" if node.module else base
            else:
                mod = node.module or ""
            yield Import(mod, path, node.lineno)
            for alias in node.names:  # `from pkg import submodule`
                yield Import(f"{mod}.{alias.name}", path, node.lineno)


def _py_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.py") if "__pycache__" not in p.parts)


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def _top(module: str) -> str:
    return module.split(".", 1)[0]


# --------------------------------------------------------------------------- services import no other service


def test_services_found() -> None:
    assert "duanflow_kit" in PACKAGES
    assert set(SERVICE_PACKAGES) >= {f"duanflow_{s}" for s in ("router", "builder", "gateway", "agent", "logs")}


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_no_service_imports_another_service_or_the_sdk(package: str) -> None:
    root = PACKAGES[package]
    bad = []
    for path in _py_files(root):
        for imp in _imports(path, root):
            top = _top(imp.module)
            other_service = top in SERVICE_PACKAGES and top != package
            kit_imports_service = package == "duanflow_kit" and top in SERVICE_PACKAGES
            sdk = top == "duanflow"
            if other_service or kit_imports_service or sdk:
                bad.append(f"{_rel(path)}:{imp.line} imports {imp.module}")
    assert not bad, (
        f"{package} may use only duanflow_kit and duanflow_proto of DuanFlow's packages "
        "(services talk over NATS, never through each other's code):\n  " + "\n  ".join(sorted(set(bad)))
    )


def test_sdk_imports_no_service_nor_the_kit() -> None:
    bad = [
        f"{_rel(path)}:{imp.line} imports {imp.module}"
        for path in _py_files(SDK_DIR)
        for imp in _imports(path, SDK_DIR)
        if _top(imp.module) in PACKAGES
    ]
    assert not bad, (
        "the SDK (and the worker runtime inside replicas) talks to the platform over NATS only and depends on "
        "duanflow_proto alone, never on a service or duanflow_kit:\n  " + "\n  ".join(sorted(set(bad)))
    )


def test_the_import_resolver_follows_relative_imports(tmp_path: Path) -> None:
    pkg = tmp_path / "duanflow_demo"
    (pkg / "adapters").mkdir(parents=True)
    (pkg / "adapters" / "__init__.py").write_text("from . import pg\nfrom ..domain import rules\n")
    found = {imp.module for imp in _imports(pkg / "adapters" / "__init__.py", pkg)}
    assert {"duanflow_demo.adapters.pg", "duanflow_demo.domain.rules"} <= found


# --------------------------------------------------------------------------- domain imports no transport


def _domain_modules(root: Path) -> list[Path]:
    return [p for p in _py_files(root) if p.stem == "domain" or "domain" in p.relative_to(root).parts[:-1]]


def _module_file(module: str) -> Path | None:
    """The source file of a module in a services/ package, if it is one."""
    top = _top(module)
    if top not in PACKAGES:
        return None
    base = PACKAGES[top].parent.joinpath(*module.split("."))
    for cand in (base.with_suffix(".py"), base / "__init__.py"):
        if cand.is_file():
            return cand
    return None


def _transport_chain(start: Path) -> list[str]:
    """Follow imports from ``start`` through services/ packages; return one chain that reaches transport."""
    seen: set[Path] = set()
    stack: list[tuple[Path, list[str]]] = [(start, [_rel(start)])]
    while stack:
        path, chain = stack.pop()
        if path in seen:
            continue
        seen.add(path)
        root = PACKAGES[_module_name(path, next(r for r in PACKAGES.values() if path.is_relative_to(r))).split(".")[0]]
        for imp in _imports(path, root):
            step = [*chain, f"line {imp.line}: {imp.module}"]
            if (
                _top(imp.module) in TRANSPORT
                or imp.module in KIT_TRANSPORT
                or any(imp.module.startswith(k + ".") for k in KIT_TRANSPORT)
            ):
                return step
            nxt = _module_file(imp.module)
            if nxt is not None and nxt not in seen:
                stack.append((nxt, step))
    return []


DOMAIN_MODULES = [p for root in PACKAGES.values() for p in _domain_modules(root)]


@pytest.mark.parametrize("path", DOMAIN_MODULES, ids=[_rel(p) for p in DOMAIN_MODULES])
def test_domain_imports_no_transport(path: Path) -> None:
    chain = _transport_chain(path)
    assert not chain, (
        "domain modules are pure logic over plain data; take transport through a port (ports.py) instead:\n  "
        + "\n  -> ".join(chain)
    )


def test_the_transport_check_can_fail(tmp_path: Path) -> None:
    pkg = tmp_path / "duanflow_demo"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "domain.py").write_text("from .adapters import pg\n")
    (pkg / "adapters.py").write_text("import asyncpg\n")
    PACKAGES["duanflow_demo"] = pkg
    try:
        assert _transport_chain(pkg / "domain.py")[-1].endswith("asyncpg")
    finally:
        del PACKAGES["duanflow_demo"]


# --------------------------------------------------------------------------- proto depends on msgspec only


def test_proto_depends_on_msgspec_only() -> None:
    allowed = set(sys.stdlib_module_names) | {"msgspec", "duanflow_proto", "__future__"}
    bad = [
        f"{_rel(imp.path)}:{imp.line} imports {imp.module}"
        for path in _py_files(PROTO_DIR)
        for imp in _imports(path, PROTO_DIR)
        if _top(imp.module) not in allowed
    ]
    assert not bad, "duanflow_proto may import only msgspec and the standard library:\n  " + "\n  ".join(bad)
    import tomllib

    deps = tomllib.loads((ROOT / "proto" / "pyproject.toml").read_text())["project"]["dependencies"]
    assert [re.split(r"[<>=!~\[ ;]", d, maxsplit=1)[0] for d in deps] == ["msgspec"]


# --------------------------------------------------------------------------- subjects only from subjects.py


def _subject_namespaces() -> set[str]:
    """Second tokens of the subjects built in subjects.py (``inv``, ``logs``, ``agent``, ...)."""
    text = SUBJECTS_PY.read_text(encoding="utf-8")
    found = set(re.findall(r"\{PREFIX\}\.([a-z_]+)", text)) | set(re.findall(r"\bduanflow\.([a-z_]+)\.", text))
    assert {"inv", "api", "logs"} <= found, f"cannot read the subject namespaces from {SUBJECTS_PY}"
    return found


NAMESPACES = _subject_namespaces()
SUBJECT = re.compile(r"^duanflow\.(" + "|".join(sorted(NAMESPACES)) + r")(\.|$)")


def _literal_subjects(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    skip: set[int] = set()
    for node in ast.walk(tree):
        # docstrings, logger names and `python -m module` style names are not subjects
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            skip.add(id(node.value))
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            if name in {"getLogger", "import_module"}:
                skip.update(id(a) for a in node.args)
    found = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        text: str | None = None
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            text = node.value
        elif isinstance(node, ast.JoinedStr) and node.values:
            first = node.values[0]
            if isinstance(first, ast.Constant) and isinstance(first.value, str):
                text = first.value
                skip.add(id(first))
        if text is not None and SUBJECT.match(text):
            found.append(f"{_rel(path)}:{getattr(node, 'lineno', 0)} {text!r}")
    return found


def test_subject_literal_detector_can_fail(tmp_path: Path) -> None:
    mod = tmp_path / "m.py"
    mod.write_text(
        'import logging\nlog = logging.getLogger("duanflow.agent")\n'
        'A = "duanflow.inv.main.app.fn"\nB = f"duanflow.logs.{1}"\nC = "duanflow._runtime"\n'
    )
    hits = _literal_subjects(mod)
    assert [h.split(" ", 1)[1] for h in hits] == ["'duanflow.inv.main.app.fn'", "'duanflow.logs.'"]


SUBJECT_SCAN = [
    p
    for base in (SDK_DIR, SERVICES_DIR, ROOT / "bench", ROOT / "scripts", ROOT / "examples")
    if base.is_dir()
    for p in _py_files(base)
    if p != SUBJECTS_PY
]


def test_no_literal_subjects_outside_subjects_py() -> None:
    hits = [hit for path in SUBJECT_SCAN for hit in _literal_subjects(path)]
    assert not hits, (
        "subjects come only from duanflow_proto/subjects.py (add a constant or a builder there):\n  "
        + "\n  ".join(hits)
    )


# --------------------------------------------------------------------------- only settings.py reads the environment


def _env_reads(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    hits = []
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and node.attr in {"environ", "environb", "getenv", "getenvb"}
            and isinstance(node.value, ast.Name)
            and node.value.id == "os"
        ):
            hits.append(f"{_rel(path)}:{node.lineno} os.{node.attr}")
        if isinstance(node, ast.ImportFrom) and node.module == "os":
            hits += [f"{_rel(path)}:{node.lineno} from os import {a.name}" for a in node.names if "env" in a.name]
    return hits


def test_only_settings_read_the_environment() -> None:
    hits = [
        hit
        for root in PACKAGES.values()
        for path in _py_files(root)
        if path.name != "settings.py"
        for hit in _env_reads(path)
    ]
    assert not hits, (
        "services are configured through their typed settings (settings.py, DUANFLOW_<SVC>_*) only:\n  "
        + "\n  ".join(hits)
    )
