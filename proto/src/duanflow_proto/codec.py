"""Encoding and decoding of wire messages (msgpack), with typed errors for garbage."""

from __future__ import annotations

from typing import Any, TypeVar

import msgspec

from duanflow_proto.errors import InvalidInputError

T = TypeVar("T")

_encoder = msgspec.msgpack.Encoder()
_decoders: dict[Any, msgspec.msgpack.Decoder[Any]] = {}


def encode(message: msgspec.Struct) -> bytes:
    """Encode one message."""
    return _encoder.encode(message)


def decode(data: bytes, type_: type[T]) -> T:
    """Decode one message of ``type_`` (a Struct or a Union of Structs).

    Raises :class:`InvalidInputError` naming the expected type when ``data`` is not one.
    """
    dec = _decoders.get(type_)
    if dec is None:
        dec = _decoders[type_] = msgspec.msgpack.Decoder(type_)
    try:
        return dec.decode(data)  # type: ignore[no-any-return]
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        name = getattr(type_, "__name__", str(type_))
        raise InvalidInputError(f"malformed message, expected {name}: {exc}", details={"expected": name}) from None
