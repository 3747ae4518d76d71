"""Standard Webhooks signatures, and the signing secrets' protection at rest.

A signing secret is ``whsec_`` followed by the base64 of 32 random bytes (the Standard Webhooks
form). Each attempt of a delivery is signed over ``"{webhook-id}.{webhook-timestamp}.{body}"``
with HMAC-SHA256 under the secret's bytes; the signature header is ``v1,<base64 of the MAC>``.

HMAC needs the secret itself at every send, so it cannot be stored as a hash (as API keys are).
It is stored encrypted with AES-256-GCM under a server key (``ATRIUM_WEBHOOK_KEY``), which never
enters the database: a database dump, a backup or a read-only SQL injection yields ciphertext
only. The endpoint's tenant and id are the cipher's associated data, so a ciphertext copied onto
another endpoint or tenant does not decrypt. Stored form: ``0x01 | key id (4) | nonce (12) |
ciphertext and tag``; the key id (the first bytes of the key's SHA-256) picks the key, so keys can
be rotated: the first key of ``ATRIUM_WEBHOOK_KEY`` encrypts, every listed one decrypts.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import uuid
from functools import cache

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

SECRET_PREFIX = "whsec_"
FORMAT = b"\x01"


def new_secret() -> tuple[str, bytes]:
    """A fresh signing secret: ``(whsec_<base64>, its bytes)``; the text is shown once."""
    raw = secrets.token_bytes(32)
    return SECRET_PREFIX + base64.b64encode(raw).decode(), raw


def signature(secret: bytes, message_id: str, timestamp: int, body: str) -> str:
    """The ``webhook-signature`` value of one attempt: ``v1,<base64 HMAC-SHA256>``."""
    mac = hmac.new(secret, f"{message_id}.{timestamp}.{body}".encode(), hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def headers(secret: bytes, message_id: str, timestamp: int, body: str) -> dict[str, str]:
    """The Standard Webhooks headers of one attempt."""
    return {"webhook-id": message_id, "webhook-timestamp": str(timestamp),
            "webhook-signature": signature(secret, message_id, timestamp, body)}


class SecretUnreadable(Exception):
    """A stored secret was encrypted under a key this server does not have (or was tampered with)."""


class SecretBox:
    """Encrypts and decrypts endpoints' signing secrets under the server's webhook keys."""

    def __init__(self, keys: str) -> None:
        decoded = [base64.b64decode(k.strip(), validate=True) for k in keys.split(",") if k.strip()]
        if not decoded or any(len(k) != 32 for k in decoded):
            raise ValueError("webhook keys are 32 bytes each, base64")
        self._keys = {hashlib.sha256(k).digest()[:4]: AESGCM(k) for k in decoded}
        self._current = hashlib.sha256(decoded[0]).digest()[:4]

    @staticmethod
    def _context(tenant_id: uuid.UUID, endpoint_id: uuid.UUID) -> bytes:
        return tenant_id.bytes + endpoint_id.bytes

    def seal(self, secret: bytes, tenant_id: uuid.UUID, endpoint_id: uuid.UUID) -> bytes:
        nonce = secrets.token_bytes(12)
        sealed = self._keys[self._current].encrypt(nonce, secret, self._context(tenant_id, endpoint_id))
        return FORMAT + self._current + nonce + sealed

    def open(self, stored: bytes, tenant_id: uuid.UUID, endpoint_id: uuid.UUID) -> bytes:
        """The secret's bytes; ``SecretUnreadable`` when no key of this server opens it."""
        if stored[:1] != FORMAT or (key := self._keys.get(stored[1:5])) is None:
            raise SecretUnreadable("the endpoint's secret was sealed under a webhook key this server does not have")
        try:
            return key.decrypt(stored[5:17], stored[17:], self._context(tenant_id, endpoint_id))
        except InvalidTag:
            raise SecretUnreadable("the endpoint's stored secret does not decrypt") from None


@cache
def secret_box(keys: str) -> SecretBox:
    """The box for a ``Settings.webhook_key`` value (made once per process)."""
    return SecretBox(keys)
