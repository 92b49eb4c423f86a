"""The wire contracts: every message is frozen, keyword-only, tagged ``duanflow.v1.…``, documented field by
field, and survives a round trip through ``duanflow_proto.codec``; garbage is a typed error, never a crash."""

from __future__ import annotations

import ast
import inspect
import re
import textwrap
from typing import Any, Union

import msgspec
import msgspec.inspect as mi
import pytest
from duanflow_proto import codec, errors
from duanflow_proto.messages import ALL_MESSAGES
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

TAG = re.compile(r"^duanflow\.v1\.[a-z][a-z0-9_]*\.[a-z][a-z0-9_]*$")
IDS = [m.__name__ for m in ALL_MESSAGES]


def _config(message: type) -> msgspec.structs.StructConfig:
    return message.__struct_config__  # type: ignore[attr-defined,no-any-return]


def _field_docs(message: type) -> dict[str, str | None]:
    """Field name → the string literal on the line after it, as written in the class body."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(message)))
    cls = next(node for node in tree.body if isinstance(node, ast.ClassDef))
    docs: dict[str, str | None] = {}
    for i, node in enumerate(cls.body):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            nxt = cls.body[i + 1] if i + 1 < len(cls.body) else None
            ok = isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)
            docs[node.target.id] = nxt.value.value if ok else None  # type: ignore[union-attr]
    return docs


def test_there_are_messages() -> None:
    assert len(ALL_MESSAGES) >= 20
    assert len(set(ALL_MESSAGES)) == len(ALL_MESSAGES), "a message is listed twice in ALL_MESSAGES"


@pytest.mark.parametrize("message", ALL_MESSAGES, ids=IDS)
def test_message_is_frozen_kw_only_and_tagged(message: type) -> None:
    assert issubclass(message, msgspec.Struct)
    cfg = _config(message)
    assert cfg.frozen, f"{message.__name__} must be frozen=True"
    params = inspect.signature(message).parameters.values()
    positional = [p.name for p in params if p.kind is not inspect.Parameter.KEYWORD_ONLY]
    assert not positional, f"{message.__name__} must be kw_only=True (positional: {positional})"
    assert isinstance(cfg.tag, str) and TAG.match(cfg.tag), (
        f"{message.__name__} tag {cfg.tag!r} is not duanflow.v1.<domain>.<name>"
    )
    assert cfg.tag_field == "type", f"{message.__name__} must use tag_field='type'"
    assert message.__doc__, f"{message.__name__} has no docstring"


def test_tags_are_unique() -> None:
    tags = [_config(m).tag for m in ALL_MESSAGES]
    dupes = sorted({t for t in tags if tags.count(t) > 1})  # type: ignore[type-var]
    assert not dupes, f"two messages share a tag: {dupes}"


@pytest.mark.parametrize("message", ALL_MESSAGES, ids=IDS)
def test_every_field_has_a_docstring(message: type) -> None:
    docs = _field_docs(message)
    fields = [f.name for f in msgspec.structs.fields(message)]
    missing = [name for name in fields if not (docs.get(name) or "").strip()]
    assert not missing, f"{message.__name__}: fields without a one-line docstring below them: {missing}"


# --------------------------------------------------------------------------- round trips


def _strategy(t: mi.Type) -> st.SearchStrategy[Any]:
    text = st.text(max_size=12)
    if isinstance(t, mi.StrType):
        return text
    if isinstance(t, mi.BoolType):
        return st.booleans()
    if isinstance(t, mi.IntType):
        return st.integers(min_value=-(2**62), max_value=2**62)
    if isinstance(t, mi.FloatType):
        return st.floats(allow_nan=False, allow_infinity=False)
    if isinstance(t, mi.BytesType):
        return st.binary(max_size=32)
    if isinstance(t, mi.NoneType):
        return st.none()
    if isinstance(t, mi.ListType):
        return st.lists(_strategy(t.item_type), max_size=3)
    if isinstance(t, mi.DictType):
        return st.dictionaries(_strategy(t.key_type), _strategy(t.value_type), max_size=3)
    if isinstance(t, mi.UnionType):
        return st.one_of(*[_strategy(member) for member in t.types])
    if isinstance(t, mi.StructType):
        kwargs = {f.name: _strategy(f.type) for f in t.fields}
        cls: type[msgspec.Struct] = t.cls
        return st.fixed_dictionaries(kwargs).map(lambda kw: cls(**kw))
    if isinstance(t, mi.LiteralType):
        return st.sampled_from(t.values)
    if isinstance(t, mi.AnyType):
        return st.none()
    raise TypeError(f"no strategy for {t!r}: add one to tests/unit/test_proto.py")


@pytest.mark.parametrize("message", ALL_MESSAGES, ids=IDS)
def test_round_trip_through_codec(message: type) -> None:
    strategy = _strategy(mi.type_info(message))

    @settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(strategy)
    def check(value: msgspec.Struct) -> None:
        data = codec.encode(value)
        assert codec.decode(data, message) == value
        # tagged: the same bytes decode through a union of every message to the same type
        assert codec.decode(data, ANY_MESSAGE) == value  # type: ignore[arg-type]

    check()


ANY_MESSAGE = Union[tuple(ALL_MESSAGES)]  # type: ignore[valid-type]  # noqa: UP007


GARBAGE = [b"", b"\x00", b"\xff\xfe\xfd", b"not msgpack at all", b"\x81\xa4type\xa3bad", b"\x93\x01\x02\x03"]


@pytest.mark.parametrize("message", ALL_MESSAGES, ids=IDS)
@pytest.mark.parametrize("data", GARBAGE)
def test_garbage_is_invalid_input(message: type, data: bytes) -> None:
    with pytest.raises(errors.InvalidInputError) as info:
        codec.decode(data, message)
    assert info.value.code == "invalid_input"
    assert info.value.http_status == 400
    assert not info.value.retryable
    assert message.__name__ in str(info.value)


@pytest.mark.parametrize("message", ALL_MESSAGES, ids=IDS)
def test_another_message_type_is_invalid_input(message: type) -> None:
    other = next(m for m in ALL_MESSAGES if m is not message)
    sample = _minimal(other)
    with pytest.raises(errors.InvalidInputError):
        codec.decode(codec.encode(sample), message)


def _minimal(message: type) -> msgspec.Struct:
    """An instance with only the required fields set, to plain values."""
    plain: dict[type, object] = {
        mi.StrType: "x",
        mi.IntType: 1,
        mi.FloatType: 1.0,
        mi.BoolType: True,
        mi.BytesType: b"x",
    }
    kwargs: dict[str, Any] = {}
    for f in mi.type_info(message).fields:  # type: ignore[attr-defined]
        if f.required:
            kwargs[f.name] = _minimal(f.type.cls) if isinstance(f.type, mi.StructType) else plain.get(type(f.type))
    return message(**kwargs)  # type: ignore[no-any-return]


def test_error_reply_turns_back_into_its_class() -> None:
    err = errors.NotFoundError("no function hello-gpu/classify_ticket in env main", details={"app": "hello-gpu"})
    back = errors.from_reply(codec.decode(codec.encode(err.to_reply()), type(err.to_reply())))
    assert isinstance(back, errors.NotFoundError)
    assert back.details == {"app": "hello-gpu"}
    assert str(back) == str(err)
