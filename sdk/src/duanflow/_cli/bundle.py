"""Source bundles: a deterministic zip of the ``*.py`` files beside the app file (not recursive).

Deterministic (sorted names, fixed timestamps and modes) so the same sources give the same sha256,
which names the bundle in S3: an unchanged app uploads nothing.
"""

from __future__ import annotations

import hashlib
import io
import zipfile
from dataclasses import dataclass
from pathlib import Path

from duanflow._cli.output import CliError

EPOCH = (1980, 1, 1, 0, 0, 0)
"""The earliest date a zip entry can carry: every entry gets it, so the bytes depend on content only."""


@dataclass(frozen=True)
class Bundle:
    """A zipped source bundle."""

    data: bytes
    digest: str
    files: tuple[str, ...]

    @property
    def size(self) -> int:
        """Size in bytes."""
        return len(self.data)


def make_bundle(app_file: Path) -> Bundle:
    """Zip every ``*.py`` of ``app_file``'s directory (the app file included), deterministically."""
    directory = app_file.resolve().parent
    files = sorted(p for p in directory.glob("*.py") if p.is_file())
    if app_file.resolve() not in files:
        raise CliError(f"{app_file} is not a .py file of {directory}")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=6) as zf:
        for path in files:
            info = zipfile.ZipInfo(path.name, date_time=EPOCH)
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, path.read_bytes())
    data = buf.getvalue()
    return Bundle(data=data, digest=hashlib.sha256(data).hexdigest(), files=tuple(p.name for p in files))
