"""Images: what replicas run in, declared by immutable chaining and sent to the builder as an ``ImageSpec``."""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from duanflow_proto.messages.build import ImageSpec

from duanflow._errors import InvalidOptionError

_CUDA = re.compile(r"^\d{2}\.\d(\.\d+)?$")
_PYTHON = re.compile(r"^3\.\d{1,2}$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class Image:
    """A container or virtualenv image. Every method returns a new Image; none changes this one.

    Example::

        image = (
            df.Image.cuda("12.4", python="3.11")
            .pip_install("torch", "transformers", "accelerate")
            .apt_install("ffmpeg")
        )
    """

    base: str = "debian_slim"
    cuda_version: str | None = None
    python: str = ""
    pip: tuple[str, ...] = ()
    apt: tuple[str, ...] = ()
    commands: tuple[str, ...] = ()
    env_vars: tuple[tuple[str, str], ...] = field(default=())
    working_dir: str | None = None

    @classmethod
    def debian_slim(cls, python: str | None = None) -> Image:
        """A Debian slim base with Python ``python`` (default: the deploying client's ``major.minor``).

        Example::

            image = df.Image.debian_slim(python="3.11").pip_install("numpy")
        """
        return cls(base="debian_slim", python=_python(python))

    @classmethod
    def cuda(cls, version: str, python: str | None = None) -> Image:
        """An NVIDIA CUDA base (``version`` like ``"12.4"``) with Python ``python``.

        Example::

            image = df.Image.cuda("12.4", python="3.11")
        """
        if not isinstance(version, str) or not _CUDA.match(version):
            raise InvalidOptionError(f"Image.cuda() takes a CUDA version like '12.4', got {version!r}")
        return cls(base="cuda", cuda_version=version, python=_python(python))

    def pip_install(self, *packages: str | Iterable[str]) -> Image:
        """Add pip requirements (``"torch"``, ``"numpy>=2"``), installed in order.

        Example::

            image = df.Image.debian_slim().pip_install("torch", "transformers")
        """
        return replace(self, pip=self.pip + _strings(packages, "pip_install"))

    def pip_install_from_requirements(self, path: str | os.PathLike[str]) -> Image:
        """Add the requirements of a ``requirements.txt`` (read now, at deploy; ``-r other.txt`` lines followed).

        The requirements become part of the spec, so editing the file changes the image id.

        Example::

            image = df.Image.debian_slim().pip_install_from_requirements("requirements.txt")
        """
        if not isinstance(path, (str, os.PathLike)):
            raise InvalidOptionError(f"Image.pip_install_from_requirements() takes a file path, got {path!r}")
        return replace(self, pip=self.pip + read_requirements(Path(path)))

    def apt_install(self, *packages: str | Iterable[str]) -> Image:
        """Add Debian packages (docker runtime only; the process runtime refuses them clearly).

        Example::

            image = df.Image.debian_slim().apt_install("ffmpeg")
        """
        return replace(self, apt=self.apt + _strings(packages, "apt_install"))

    def run_commands(self, *commands: str | Iterable[str]) -> Image:
        """Add shell commands run at build time (docker runtime only).

        Example::

            image = df.Image.debian_slim().run_commands("echo built > /built.txt")
        """
        return replace(self, commands=self.commands + _strings(commands, "run_commands"))

    def env(self, values: Mapping[str, str]) -> Image:
        """Bake environment variables into the image.

        Example::

            image = df.Image.debian_slim().env({"HF_HOME": "/cache"})
        """
        if not isinstance(values, Mapping):
            raise InvalidOptionError(f"Image.env() takes a dict of str to str, got {type(values).__name__}")
        merged = dict(self.env_vars)
        merged.update(env_dict(values, "Image.env()"))
        return replace(self, env_vars=tuple(merged.items()))

    def workdir(self, path: str) -> Image:
        """Set the working directory (an absolute path).

        Example::

            image = df.Image.debian_slim().workdir("/app")
        """
        if not isinstance(path, str) or not path.startswith("/"):
            raise InvalidOptionError(f"Image.workdir() takes an absolute path, got {path!r}")
        return replace(self, working_dir=path)

    def __getattr__(self, name: str) -> Any:
        """Name the Image methods when a chain calls one that does not exist (``.pip_instal(...)``)."""
        if name.startswith("__"):
            raise AttributeError(name)
        methods = sorted(n for n in dir(type(self)) if not n.startswith("_") and callable(getattr(type(self), n)))
        close = difflib.get_close_matches(name, methods, n=1)
        hint = f"did you mean .{close[0]}()? " if close else ""
        raise AttributeError(f"df.Image has no method .{name}(): {hint}its methods are {', '.join(methods)}")

    def to_spec(self, default_python: str = "") -> ImageSpec:
        """The canonical wire spec (its hash is the image id); an unset Python becomes ``default_python``."""
        return ImageSpec(
            base=self.base,
            cuda=self.cuda_version,
            python=self.python or default_python,
            pip=list(self.pip),
            apt=list(self.apt),
            commands=list(self.commands),
            env=dict(self.env_vars),
            workdir=self.working_dir,
        )


def _python(version: str | None) -> str:
    if version is None:
        return ""
    if not isinstance(version, str) or not _PYTHON.match(version):
        raise InvalidOptionError(f"python= takes a version like '3.11', got {version!r}")
    return version


def _strings(items: tuple[str | Iterable[str], ...], method: str) -> tuple[str, ...]:
    out: list[str] = []
    for item in items:
        values = [item] if isinstance(item, str) else list(item)
        for value in values:
            if not isinstance(value, str) or not value.strip():
                raise InvalidOptionError(f"Image.{method}() takes non-empty strings, got {value!r}")
            out.append(value.strip())
    return tuple(out)


def env_dict(values: object, option: str) -> dict[str, str]:
    """Validate an env mapping: keys are env var names, values strings."""
    if values is None:
        return {}
    if not isinstance(values, Mapping):
        raise InvalidOptionError(f"{option} takes a dict of str to str, got {type(values).__name__}")
    out: dict[str, str] = {}
    for key, value in values.items():
        if not isinstance(key, str) or not _ENV_NAME.match(key):
            raise InvalidOptionError(f"{option}: {key!r} is not a valid environment variable name")
        if not isinstance(value, str):
            raise InvalidOptionError(f"{option}: the value of {key} must be a str, got {type(value).__name__}")
        out[key] = value
    return out


def read_requirements(path: Path, _seen: frozenset[Path] = frozenset()) -> tuple[str, ...]:
    """The requirements in a requirements file, in order: comments and blanks dropped, ``-r FILE`` followed.

    Other pip options (``-e``, ``--index-url``...) are refused: the image spec holds requirements only.
    """
    path = path.expanduser()
    try:
        text = path.read_text()
    except OSError as exc:
        raise InvalidOptionError(f"Image.pip_install_from_requirements(): cannot read {path}: {exc}") from None
    resolved = path.resolve()
    if resolved in _seen:
        raise InvalidOptionError(f"Image.pip_install_from_requirements(): {path} includes itself")
    out: list[str] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith(("-r ", "--requirement ")):
            nested = Path(line.split(None, 1)[1].strip())
            out.extend(read_requirements(resolved.parent / nested, _seen | {resolved}))
            continue
        if line.startswith("-"):
            raise InvalidOptionError(
                f"{path}:{number}: pip option {line.split()[0]!r} is not supported in an image's requirements "
                "(list requirements only)"
            )
        out.append(line)
    return tuple(out)
