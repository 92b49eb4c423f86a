"""Source bundles: download through a presigned URL, verify sha256, extract safely, cache by digest."""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import stat
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

from duanflow_proto.errors import InvalidInputError, PayloadTooLargeError, UnavailableError

from duanflow_agent.domain import bundle_digest, safe_member

MAX_BUNDLE_BYTES = 512 * 1024 * 1024
MAX_EXTRACTED_BYTES = 2 * 1024 * 1024 * 1024
CHUNK = 1024 * 1024


class HttpBundleStore:
    """Bundles under ``<work_dir>/bundles/<digest>/``; one download per digest even under concurrent starts."""

    def __init__(self, work_dir: Path, timeout_s: float = 60.0) -> None:
        self.root = work_dir / "bundles"
        self.timeout_s = timeout_s
        self._locks: dict[str, asyncio.Lock] = {}

    async def fetch(self, url: str, digest: str) -> Path:
        """The extracted bundle of ``digest`` (downloaded from ``url`` unless cached)."""
        bare = bundle_digest(digest)
        target = self.root / bare
        if target.is_dir():
            return target
        lock = self._locks.setdefault(bare, asyncio.Lock())
        async with lock:
            if not target.is_dir():
                await asyncio.to_thread(self._download_extract, url, bare, target)
        return target

    def _download_extract(self, url: str, digest: str, target: Path) -> None:
        if not url.startswith(("http://", "https://")):
            raise InvalidInputError(f"bundle_url must be http(s), not {url.split(':', 1)[0]!r}")
        self.root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=self.root, prefix=".tmp-") as tmp:
            zip_path = Path(tmp) / "bundle.zip"
            actual = self._download(url, zip_path)
            if actual != digest:
                raise InvalidInputError(
                    f"bundle digest mismatch: expected sha256 {digest}, downloaded {actual}",
                    details={"expected": digest, "actual": actual},
                )
            staging = Path(tmp) / "out"
            extract(zip_path, staging)
            try:
                staging.rename(target)
            except OSError:
                if not target.is_dir():  # lost a race with another agent process: theirs is as good
                    raise

    def _download(self, url: str, dest: Path) -> str:
        sha = hashlib.sha256()
        size = 0
        try:
            with urllib.request.urlopen(url, timeout=self.timeout_s) as resp, dest.open("wb") as out:  # noqa: S310
                while chunk := resp.read(CHUNK):
                    size += len(chunk)
                    if size > MAX_BUNDLE_BYTES:
                        raise PayloadTooLargeError(f"bundle is over {MAX_BUNDLE_BYTES} bytes")
                    sha.update(chunk)
                    out.write(chunk)
        except urllib.error.HTTPError as exc:
            retry = exc.code >= 500 or exc.code == 429
            cls = UnavailableError if retry else InvalidInputError
            raise cls(
                f"bundle download failed: HTTP {exc.code} {exc.reason}", details={"status": str(exc.code)}
            ) from None
        except (urllib.error.URLError, TimeoutError, OSError) as exc:
            raise UnavailableError(f"bundle download failed: {exc}") from None
        return sha.hexdigest()


def extract(zip_path: Path, dest: Path) -> None:
    """Extract ``zip_path`` into ``dest``, refusing path traversal, links and zip bombs."""
    dest.mkdir(parents=True)
    try:
        zf = zipfile.ZipFile(zip_path)
    except zipfile.BadZipFile as exc:
        raise InvalidInputError(f"bundle is not a zip file: {exc}") from None
    with zf:
        members = zf.infolist()
        total = sum(m.file_size for m in members)
        if total > MAX_EXTRACTED_BYTES:
            raise PayloadTooLargeError(f"bundle expands to {total} bytes, over {MAX_EXTRACTED_BYTES}")
        for m in members:
            rel = safe_member(m.filename)
            mode = m.external_attr >> 16
            if stat.S_ISLNK(mode):
                raise InvalidInputError(
                    f"bundle member {m.filename!r} is a symbolic link", details={"member": m.filename}
                )
            out = dest.joinpath(*rel.parts)
            if m.is_dir():
                out.mkdir(parents=True, exist_ok=True)
                continue
            out.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(m) as src, out.open("wb") as dst:
                shutil.copyfileobj(src, dst, CHUNK)
