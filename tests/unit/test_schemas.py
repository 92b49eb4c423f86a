"""The committed JSON Schemas in ``proto/schemas/`` are exactly what ``make schemas`` writes today."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import msgspec
import pytest
from duanflow_proto.messages import ALL_MESSAGES

ROOT = Path(__file__).resolve().parents[2]
SCHEMA_DIR = ROOT / "proto" / "schemas"


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("duanflow_scripts_schemas", ROOT / "scripts" / "schemas.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_schemas_are_current() -> None:
    rendered: dict[str, str] = _generator().render_all()
    committed = {p.name: p.read_text(encoding="utf-8") for p in SCHEMA_DIR.glob("*.json")}
    missing = sorted(set(rendered) - set(committed))
    stale = sorted(name for name in set(rendered) & set(committed) if rendered[name] != committed[name])
    extra = sorted(set(committed) - set(rendered))
    assert not (missing or stale or extra), (
        f"proto/schemas is out of date: run `make schemas` and commit the diff "
        f"(missing: {missing}, changed: {stale}, no longer a message: {extra})"
    )


def test_one_schema_per_message_named_by_tag() -> None:
    rendered = _generator().render_all()
    tags = {m.__struct_config__.tag for m in ALL_MESSAGES}  # type: ignore[attr-defined]
    assert set(rendered) == {f"{tag}.json" for tag in tags}


def test_schema_describes_fields_from_docstrings() -> None:
    text = _generator().render_all()["duanflow.v1.inv.invocation.json"]
    schema = json.loads(text)
    props = schema["$defs"]["Invocation"]["properties"]
    assert props["call_id"]["description"].startswith("Unique id of this call")
    assert props["type"]["enum"] == ["duanflow.v1.inv.invocation"]
    assert "call_id" in schema["$defs"]["Invocation"]["required"]


def test_schema_matches_msgspec(tmp_path: Path) -> None:
    gen = _generator()
    gen.write(tmp_path)
    for message in ALL_MESSAGES:
        on_disk = json.loads((tmp_path / f"{gen.message_tag(message)}.json").read_text())
        expected = msgspec.json.schema(message)
        assert on_disk["$ref"] == expected["$ref"]
        assert set(on_disk["$defs"]) == set(expected["$defs"])
    # a stale file of a removed message is deleted by the next run
    (tmp_path / "duanflow.v1.gone.message.json").write_text("{}")
    gen.write(tmp_path)
    assert not (tmp_path / "duanflow.v1.gone.message.json").exists()


def _script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"duanflow_scripts_{name}", ROOT / "scripts" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_architecture_nats_layout_is_current() -> None:
    gen = _script("arch_doc")
    text = gen.DOC_PATH.read_text(encoding="utf-8")
    assert gen.render(text) == text, "docs/ARCHITECTURE.md's generated sections are stale: run `make docs`"


def test_architecture_names_every_subject_builder_and_stream() -> None:
    from duanflow_proto import subjects

    text = _script("arch_doc").nats_layout()
    streams = [v for k, v in vars(subjects).items() if k.startswith("STREAM_")]
    buckets = [v for k, v in vars(subjects).items() if k.startswith("KV_")]
    assert streams and buckets
    for name in [*streams, *buckets]:
        assert f"`{name}`" in text, f"{name} is missing from the NATS layout of docs/ARCHITECTURE.md"


def test_architecture_doc_generator_can_fail() -> None:
    gen = _script("arch_doc")
    stale = "<!-- BEGIN GENERATED: nats-layout -->\nold\n<!-- END GENERATED: nats-layout -->\n"
    stale += "<!-- BEGIN GENERATED: nats-roles -->\n<!-- END GENERATED: nats-roles -->\n"
    assert gen.render(stale) != stale
    with pytest.raises(SystemExit, match="lacks the generated sections"):
        gen.render("no sections here\n")


def test_every_message_struct_is_listed_in_all_messages() -> None:
    """A message type left out of ALL_MESSAGES would get no schema and escape the staleness check."""
    import importlib
    import pkgutil

    import msgspec
    from duanflow_proto import messages

    listed = set(messages.ALL_MESSAGES)
    missing = []
    for info in pkgutil.iter_modules(messages.__path__):
        module = importlib.import_module(f"{messages.__name__}.{info.name}")
        for name, value in vars(module).items():
            is_struct = isinstance(value, type) and issubclass(value, msgspec.Struct)
            if is_struct and value.__module__ == module.__name__ and value not in listed:
                missing.append(f"{info.name}.{name}")
    assert not missing, f"add to duanflow_proto.messages.ALL_MESSAGES: {missing}"
