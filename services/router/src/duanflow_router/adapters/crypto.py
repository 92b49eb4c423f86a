"""AES-256-GCM sealing of secret values with a key derived from the stack's secret key (``cryptography``)."""

from __future__ import annotations

import hashlib
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from duanflow_router.ports_secrets import SealedValue, UnsealError

NONCE_BYTES = 12
_INFO = b"duanflow router secrets v1"


class AesGcmSealer:
    """:class:`duanflow_router.ports_secrets.Sealer`: AES-256-GCM, a fresh 96-bit nonce per seal.

    The key is HKDF-SHA256 of the configured secret key, so any long random string works as that setting. The
    associated data binds a ciphertext to its row (env and name): a sealed value copied to another secret's row
    does not open.
    """

    def __init__(self, secret_key: str) -> None:
        if len(secret_key) < 16:
            raise ValueError("the secret key must be at least 16 characters (use 32+ random bytes, e.g. hex)")
        key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_INFO).derive(secret_key.encode())
        self._aead = AESGCM(key)
        self.key_id = hashlib.sha256(b"key-id:" + key).hexdigest()[:16]

    def seal(self, plaintext: bytes, context: bytes) -> SealedValue:
        """Encrypt ``plaintext`` bound to ``context``."""
        nonce = os.urandom(NONCE_BYTES)
        return SealedValue(key_id=self.key_id, nonce=nonce, ciphertext=self._aead.encrypt(nonce, plaintext, context))

    def unseal(self, sealed: SealedValue, context: bytes) -> bytes:
        """Decrypt; :class:`UnsealError` when the key differs or the row was tampered with."""
        if sealed.key_id != self.key_id:
            raise UnsealError("sealed with another secret key (the router's secret key changed)")
        try:
            return self._aead.decrypt(sealed.nonce, sealed.ciphertext, context)
        except InvalidTag:
            raise UnsealError("the stored secret does not authenticate (tampered with or moved)") from None
