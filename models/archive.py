"""Export archives: a zip written as a stream into ``export_chunks``, and the signed link that reads it back.

``ArchiveWriter`` wraps ``zipfile.ZipFile`` over an unseekable sink (entries carry data descriptors
and ZIP64 sizes, so nothing is ever rewritten in place): whatever the zip has produced is cut into
chunks of ``CHUNK_BYTES`` that the caller stores as it goes (``take``), so memory holds at most a
chunk plus one batch of rows whatever the tenant's size. Its SHA-256 and size are counted on the way.

A download link names the tenant, the job and an expiry, signed with HMAC-SHA256
(``sign_download``/``verify_download``): it is its own credential, for one tenant's one job, until it
expires; the route refuses it after the first download.
"""

from __future__ import annotations

import hashlib
import hmac
import uuid
import zipfile
from dataclasses import dataclass
from typing import IO, Any

CHUNK_BYTES = 1 << 20


class _Sink:
    """What the zip writes to: an append-only buffer that ``ArchiveWriter`` drains."""

    def __init__(self) -> None:
        self.buffer = bytearray()

    def write(self, data: bytes) -> int:
        self.buffer += data
        return len(data)

    def flush(self) -> None:
        return None

    def close(self) -> None:
        return None


class ArchiveWriter:
    """A zip archive produced in chunks (module docstring)."""

    def __init__(self, chunk_bytes: int = CHUNK_BYTES) -> None:
        self._sink = _Sink()
        self._zip = zipfile.ZipFile(self._sink, "w", compression=zipfile.ZIP_DEFLATED)
        self._chunk_bytes = chunk_bytes
        self._digest = hashlib.sha256()
        self.size = 0

    def entry(self, name: str) -> IO[bytes]:
        """A file of the archive to write to (close it before opening the next)."""
        entry: IO[bytes] = self._zip.open(name, "w", force_zip64=True)
        return entry

    def take(self, *, final: bool = False) -> list[bytes]:
        """The full chunks produced so far (and, when ``final``, the rest)."""
        chunks: list[bytes] = []
        buffer = self._sink.buffer
        while len(buffer) >= self._chunk_bytes or (final and buffer):
            chunk = bytes(buffer[:self._chunk_bytes])
            del buffer[:self._chunk_bytes]
            self._digest.update(chunk)
            self.size += len(chunk)
            chunks.append(chunk)
        return chunks

    def close(self) -> list[bytes]:
        """Write the central directory; the remaining chunks."""
        self._zip.close()
        return self.take(final=True)

    @property
    def sha256(self) -> str:
        return self._digest.hexdigest()


@dataclass(frozen=True)
class DownloadGrant:
    tenant_id: uuid.UUID
    job_id: uuid.UUID
    expires: int


def _signature(key: str, tenant_id: uuid.UUID, job_id: uuid.UUID, expires: int) -> str:
    message = f"atrium-export:{tenant_id}:{job_id}:{expires}".encode()
    return hmac.new(key.encode(), message, hashlib.sha256).hexdigest()


def sign_download(key: str, tenant_id: uuid.UUID, job_id: uuid.UUID, expires: int) -> str:
    """The query string of a download link for ``job_id`` valid until ``expires`` (epoch seconds)."""
    return f"tenant={tenant_id}&expires={expires}&signature={_signature(key, tenant_id, job_id, expires)}"


def verify_download(key: str, job_id: str, params: Any, now: float) -> DownloadGrant | None:
    """The grant a link's ``job_id`` and query ``params`` carry, or None when they are malformed,
    wrongly signed or expired."""
    try:
        grant = DownloadGrant(uuid.UUID(params["tenant"]), uuid.UUID(job_id), int(params["expires"]))
        signature = str(params["signature"])
    except (KeyError, ValueError):
        return None
    expected = _signature(key, grant.tenant_id, grant.job_id, grant.expires)
    if not hmac.compare_digest(expected, signature) or grant.expires < now:
        return None
    return grant
