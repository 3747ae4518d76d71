"""Opaque global IDs: base64url of ``"<TypeName>:<uuid>"``, decoded with the expected type checked."""

from __future__ import annotations

import base64
import binascii
import os
import uuid

from core.errors import BadUserInput

_VERSION_4 = 0x4000 << 64 | 0x8000 << 48
"""The version (4) and variant (RFC 4122) bits of a random UUID."""
_RANDOM = ~(0xF000 << 64 | 0xC000 << 48)


def new_uuids(n: int) -> list[uuid.UUID]:
    """``n`` random (version 4) UUIDs, as ``uuid.uuid4`` makes them, from one read of the system's
    randomness: a bulk write (an import chunk's thousand rows and their audit rows) needs
    thousands at once, and ``uuid4`` asks the system for each."""
    raw = os.urandom(16 * n)
    return [uuid.UUID(int=int.from_bytes(raw[i:i + 16]) & _RANDOM | _VERSION_4) for i in range(0, 16 * n, 16)]


def to_global_id(type_name: str, id: uuid.UUID) -> str:
    return base64.urlsafe_b64encode(f"{type_name}:{id}".encode()).decode().rstrip("=")


def parse_global_id(value: str, *, field: str = "id") -> tuple[str, uuid.UUID]:
    """``(type_name, uuid)`` of a global ID; BAD_USER_INPUT naming ``field`` when it is not one."""
    try:
        raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)).decode()
        type_name, _, key = raw.partition(":")
        if not type_name.isidentifier():
            raise ValueError(type_name)
        return type_name, uuid.UUID(key)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise BadUserInput(field, "is not a valid ID") from None


def decode_id(value: str, expected: str, *, field: str = "id") -> uuid.UUID:
    """The uuid behind a global ID of type ``expected``; BAD_USER_INPUT for any other type."""
    type_name, key = parse_global_id(value, field=field)
    if type_name != expected:
        raise BadUserInput(field, f"is not a {expected} ID")
    return key
