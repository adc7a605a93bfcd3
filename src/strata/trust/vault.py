"""Encryption at rest for model bytes on a node (AES-256-GCM), as a worker child process of the agent:

    python -m strata.trust.vault serve TRUST_DIR

The agent does not load `cryptography` (it would cost the gateway footprint about 12 MB); it starts this worker
while it writes or reads model bytes (downloads, assembly, activation, the near-edge relay) and stops it when idle.
The worker holds the node's data key and answers framed requests on stdin/stdout:

    request:  op (1 byte, E encrypt / D decrypt) | aad length (4, big-endian) | aad | data length (8) | data
    answer:   status (1 byte, 0 ok / 1 error)     | length (8)                | plaintext, ciphertext or message

A sealed value is `SENC1 | nonce (12 bytes) | AES-256-GCM ciphertext and tag`. The associated data names what the
bytes are (a package digest and file path, or a piece's sha256), so sealed bytes cannot be moved to another
package, path or piece. The data key (256 bits, made on the node) is kept wrapped for the node key: ECDH with an
ephemeral P-256 key, HKDF-SHA256, AES-GCM (an ECIES construction). Without the node key, a file read off the disk
is ciphertext, not a model.
"""

from __future__ import annotations

import base64
import json
import os
import struct
import sys
from pathlib import Path
from typing import BinaryIO, Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from strata.core.fsutil import write_json_atomic
from strata.trust.node import load_or_create_key

MAGIC: Final = b"SENC1"
NONCE_BYTES: Final = 12
OVERHEAD: Final = len(MAGIC) + NONCE_BYTES + 16
MAX_FRAME: Final = 1 << 33  # 8 GiB: more than any model file; a larger length is a broken stream
_INFO: Final = b"strata node data key"


class VaultError(Exception):
    """Decryption failed (another key, changed bytes, bytes of another file), or the key does not unwrap."""


def _kek(private: ec.EllipticCurvePrivateKey, peer: ec.EllipticCurvePublicKey) -> bytes:
    shared = private.exchange(ec.ECDH(), peer)
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_INFO).derive(shared)


def data_key(trust_dir: Path) -> bytes:
    """The node's data key, unwrapped with the node key (made and wrapped on first use).

    Raises:
        VaultError: the wrapped key does not unwrap with this node key (the node key was replaced).
    """
    node_key = load_or_create_key(trust_dir / "node.key")
    path = trust_dir / "datakey.json"
    if not path.exists():
        key = AESGCM.generate_key(bit_length=256)
        ephemeral = ec.generate_private_key(ec.SECP256R1())
        nonce = os.urandom(NONCE_BYTES)
        wrapped = AESGCM(_kek(ephemeral, node_key.public_key())).encrypt(nonce, key, _INFO)
        point = ephemeral.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
        document = {"ephemeral": point, "nonce": nonce, "wrapped": wrapped}
        write_json_atomic(path, {k: base64.b64encode(v).decode() for k, v in document.items()}, mode=0o600)
        return key
    raw = {k: base64.b64decode(v) for k, v in json.loads(path.read_text()).items()}
    peer = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), raw["ephemeral"])
    try:
        return AESGCM(_kek(node_key, peer)).decrypt(raw["nonce"], raw["wrapped"], _INFO)
    except InvalidTag as exc:
        raise VaultError("the data key does not unwrap with this node's key") from exc


def seal(aead: AESGCM, aad: bytes, data: bytes) -> bytes:
    nonce = os.urandom(NONCE_BYTES)
    return MAGIC + nonce + aead.encrypt(nonce, data, aad)


def unseal(aead: AESGCM, aad: bytes, sealed: bytes) -> bytes:
    """Raises:
    VaultError: not sealed, or does not decrypt with this key and associated data.
    """
    if not sealed.startswith(MAGIC) or len(sealed) < OVERHEAD:
        raise VaultError("the bytes are not sealed (plaintext or truncated)")
    nonce = sealed[len(MAGIC) : len(MAGIC) + NONCE_BYTES]
    try:
        return aead.decrypt(nonce, sealed[len(MAGIC) + NONCE_BYTES :], aad)
    except InvalidTag as exc:
        raise VaultError("the bytes do not decrypt: changed, moved, or sealed with another key") from exc


def _read_exact(stream: BinaryIO, size: int) -> bytes | None:
    data = bytearray()
    while len(data) < size:
        piece = stream.read(size - len(data))
        if not piece:
            return None
        data += piece
    return bytes(data)


def serve(trust_dir: Path, requests: BinaryIO, answers: BinaryIO) -> int:
    """Answer framed requests until stdin closes (see the module docstring)."""
    aead = AESGCM(data_key(trust_dir))
    answers.write(b"R")  # ready: the key unwrapped
    answers.flush()
    while (head := _read_exact(requests, 5)) is not None:
        op, aad_len = head[:1], struct.unpack(">I", head[1:])[0]
        aad = _read_exact(requests, aad_len)
        size_raw = _read_exact(requests, 8)
        if aad is None or size_raw is None:
            return 1
        (size,) = struct.unpack(">Q", size_raw)
        if size > MAX_FRAME:
            return 1
        data = _read_exact(requests, size)
        if data is None:
            return 1
        try:
            if op == b"E":
                status, out = 0, seal(aead, aad, data)
            elif op == b"D":
                status, out = 0, unseal(aead, aad, data)
            else:
                status, out = 1, f"unknown operation {op!r}".encode()
        except VaultError as exc:
            status, out = 1, str(exc).encode()
        answers.write(struct.pack(">BQ", status, len(out)))
        answers.write(out)
        answers.flush()
    return 0


def main(argv: list[str]) -> int:
    match argv:
        case ["serve", trust]:
            try:
                return serve(Path(trust), sys.stdin.buffer, sys.stdout.buffer)
            except (OSError, ValueError, KeyError, VaultError) as exc:
                sys.stderr.write(f"error: {exc}\n")
                return 1
        case _:
            sys.stderr.write("usage: python -m strata.trust.vault serve TRUST_DIR\n")
            return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
