"""Pure rules of venv images and secret masking on an agent: ids, Python match, LRU choice, masking lines."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from duanflow_proto.errors import InvalidInputError

from duanflow_agent.ports import LineSink

_IMAGE_ID = re.compile(r"^im-[0-9a-f]{8,64}$")
_VERSION = re.compile(r"^\s*version(?:_info)?\s*=\s*(\d+)\.(\d+)", re.MULTILINE)
MASK = "***"
MIN_MASKED_LEN = 4
"""Shorter secret values are not masked: masking ``1`` or ``on`` would garble every line and hide nothing."""


def image_dir_name(image_id: str) -> str:
    """The cache directory name of an image id (also its validation).

    >>> image_dir_name("im-0123456789abcdef01234567")
    'im-0123456789abcdef01234567'
    """
    if not _IMAGE_ID.match(image_id):
        raise InvalidInputError(f"image_id {image_id!r} is not an image id (im-<hex>)", details={"image_id": image_id})
    return image_id


def venv_python(pyvenv_cfg: str) -> str:
    """``major.minor`` of the Python a venv was made with, from its ``pyvenv.cfg`` ('' when not stated).

    >>> venv_python("home = /usr/bin\\nversion_info = 3.11.9\\n")
    '3.11'
    """
    m = _VERSION.search(pyvenv_cfg)
    return f"{m.group(1)}.{m.group(2)}" if m else ""


def check_python(image_id: str, image_python: str, agent_python: str) -> None:
    """Refuse an image whose packages were built for another Python than the one that runs replicas."""
    if image_python and image_python != agent_python:
        raise InvalidInputError(
            f"image {image_id} was built for Python {image_python} but this agent runs replicas with Python "
            f"{agent_python}: deploy with df.Image.debian_slim(python={agent_python!r}) or run an agent on "
            f"Python {image_python}",
            details={"image_id": image_id, "image_python": image_python, "agent_python": agent_python},
        )


def evictions(entries: Mapping[str, tuple[float, int]], cap_bytes: int, keep: Iterable[str]) -> list[str]:
    """Images to delete, least recently used first, until the cache fits ``cap_bytes`` (``keep`` never goes).

    ``entries``: image id → (last used, size in bytes).

    >>> evictions({"a": (1.0, 50), "b": (2.0, 50), "c": (3.0, 50)}, 100, keep={"a"})
    ['b']
    """
    total = sum(size for _, size in entries.values())
    protected = set(keep)
    out: list[str] = []
    for image, (_, size) in sorted(entries.items(), key=lambda kv: kv[1][0]):
        if total <= cap_bytes:
            break
        if image in protected:
            continue
        out.append(image)
        total -= size
    return out


def mask(line: str, values: Iterable[str]) -> str:
    """``line`` with every secret value replaced by ``***`` (longest first, so a value inside another goes too).

    >>> mask("token=hunter22 ok", ["hunter22"])
    'token=*** ok'
    """
    for value in sorted(values, key=len, reverse=True):
        if value and value in line:
            line = line.replace(value, MASK)
    return line


def secret_values(env_vars: Mapping[str, str], secret_keys: Iterable[str]) -> list[str]:
    """The values to mask in a replica's output: its secret keys' values long enough to mask."""
    return sorted(
        {env_vars[k] for k in secret_keys if len(env_vars.get(k, "")) >= MIN_MASKED_LEN}, key=len, reverse=True
    )


def masking(sink: LineSink, values: list[str]) -> LineSink:
    """A sink that masks secret values before ``sink`` (the on-disk log and the logs stream) sees a line."""
    if not values:
        return sink

    def masked(stream: str, line: str) -> None:
        sink(stream, mask(line, values))

    return masked


def with_image_paths(pythonpath: str, image_paths: list[str]) -> str:
    """``PYTHONPATH`` with the image's site-packages right after the bundle dir (its first entry).

    The image's pinned packages win over the agent's own; the bundle still wins over both.

    >>> with_image_paths("/b:/x", ["/img/site"])
    '/b:/img/site:/x'
    """
    if not image_paths:
        return pythonpath
    first, _, rest = pythonpath.partition(":")
    return ":".join([first, *image_paths, *([rest] if rest else [])])
