"""Bundle signatures: HMAC-SHA256 over the manifest and the library's bytes, with a key the
pipeline holds. A hash in the manifest catches accidental damage; only a signature catches a
library replaced together with the hash that describes it. Signing (at save) is here; the
check is the runtime core's (`mtcompile.runtime.contract`, rule signature)."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from pathlib import Path

from mtcompile.errors import ArtifactError

SCHEME = "hmac-sha256"
FIELD = "bundle_signature"  # the manifest key that holds it


def as_key(key: bytes | str | None, what: str) -> bytes | None:
    """`key` as bytes (a str is taken as UTF-8); None stays None."""
    if key is None:
        return None
    if isinstance(key, str):
        key = key.encode()
    if not isinstance(key, bytes | bytearray) or not key:
        raise ArtifactError(f"{what} must be non-empty bytes or str, got {type(key).__name__}")
    return bytes(key)


def read_key_file(path: str | os.PathLike, what: str = "key file") -> bytes:
    """A key kept in a file (the CLI's ``--sign-key-file`` / ``--verify-key-file``, the
    driver's ``--verify-key-file``): its bytes, one trailing newline (``\\n`` or
    ``\\r\\n``) dropped, so that ``echo secret > key`` gives the key ``secret``."""
    p = Path(path)
    try:
        if not p.is_file():
            raise OSError("not a regular file")
        key = p.read_bytes()
    except OSError as e:
        raise ArtifactError(f"{what} {p}: cannot be read: {e}") from e
    key = key[:-2] if key.endswith(b"\r\n") else key[:-1] if key.endswith(b"\n") else key
    if not key:
        raise ArtifactError(f"{what} {p}: the key is empty")
    return key


def state(manifest_signature: str | None, verified: bool) -> dict:
    """What a report says of a bundle's signature: signed or not, and checked or not."""
    signed = manifest_signature is not None
    note = (
        "not signed"
        if not signed
        else "signed and verified with the key given"
        if verified
        else "signed, NOT verified: no key was given (load with verify_key=, "
        "or --verify-key-file on the command line)"
    )
    return {
        "signed": signed,
        "scheme": SCHEME if signed else None,
        "verified": verified,
        "note": note,
    }


def _canonical(manifest: dict) -> bytes:
    """The manifest's JSON, less its signature, in one canonical form (key order, spacing)."""
    body = {k: v for k, v in manifest.items() if k != FIELD}
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def signer(key: bytes, manifest: dict):
    """An HMAC already fed the manifest; feed it the library's bytes, then `seal` it."""
    text = _canonical(manifest)
    mac = hmac.new(key, f"{SCHEME}\0{len(text)}\0".encode(), hashlib.sha256)
    mac.update(text)
    return mac


def seal(mac) -> str:
    return f"{SCHEME}:{mac.hexdigest()}"


def sign(key: bytes, manifest: dict, library: Path) -> str:
    """The signature of `manifest` (its JSON layout) with the library file `library`."""
    mac = signer(key, manifest)
    with open(library, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            mac.update(chunk)
    return seal(mac)
