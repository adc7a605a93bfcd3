"""The control plane's side of TPM attestation: register a node's attestation key (AK) by credential
activation against its endorsement key (EK) and the EK's manufacturer certificate, then check quotes.

Registration (see `strata.trust.tpm` for the node's side):
1. The node sends its EK public area, the EK certificate from its TPM's NV memory, and its AK public area.
2. The EK certificate must be issued by a TPM manufacturer CA this control plane trusts (`--tpm-ca`), be within
   its validity, and certify the EK the node sent; the AK must be a restricted signing key fixed to its TPM.
3. A fresh secret is encrypted to the EK, bound to the AK's name (TPM2_MakeCredential, done in software here):
   only the TPM holding that EK can recover it, and only if it also holds a key with that exact name. The node
   returning the secret proves the AK is in the certified TPM.

A quote is then checked against the registered AK: the signature over the TPMS_ATTEST structure, its type, its
qualifying data (sha256 of the attestation report, which itself carries the control plane's nonce), and the
digest of the PCR values the node reports. Parsing uses tpm2-pytss's unmarshalling (`pip install strata[tpm]`),
imported only when a node uses a TPM.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from strata.core.errors import AuthError, ConfigError

os.environ.setdefault("TSS2_LOG", "all+NONE")  # tpm2-tss logs unmarshalling errors to stderr; they are raised too

SECRET_BYTES: Final = 32
PCR_BANK: Final = "sha256"
TPM_GENERATED: Final = 0xFF544347  # TPM_GENERATED_VALUE: the TPM made this structure


def _tss() -> Any:
    """tpm2-pytss, or a ConfigError that says how to get it."""
    try:
        import tpm2_pytss
    except ImportError as exc:  # the optional extra is missing, or its C library
        raise ConfigError(f"TPM attestation needs tpm2-pytss (pip install 'strata[tpm]'): {exc}") from exc
    return tpm2_pytss


def load_manufacturer_cas(paths: Sequence[Path]) -> tuple[x509.Certificate, ...]:
    """Every certificate in the PEM files given with `--tpm-ca`.

    Raises:
        ConfigError: a file does not read or holds no certificate.
    """
    certificates: list[x509.Certificate] = []
    for path in paths:
        try:
            found = x509.load_pem_x509_certificates(path.read_bytes())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"the TPM manufacturer CA file {path} does not load: {exc}") from exc
        certificates.extend(found)
    return tuple(certificates)


def _decode(value: str, what: str) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError, TypeError) as exc:
        raise AuthError(f"the {what} is not base64: {exc}") from exc


def _public(value: str, what: str) -> Any:
    tss = _tss()
    try:
        public, _ = tss.TPM2B_PUBLIC.unmarshal(_decode(value, what))
    except Exception as exc:  # tpm2-tss reports a malformed buffer as TSS2_Exception, ValueError or others
        raise AuthError(f"the {what} is not a TPM2B_PUBLIC: {exc}") from exc
    return public


def _pem_key(public: Any) -> Any:
    return serialization.load_pem_public_key(public.to_pem())


def check_ak(ak_public: Any) -> None:
    """The AK must be a restricted signing key made in and bound to its TPM (so it signs only TPM-made data).

    Raises:
        AuthError: it is not.
    """
    tss = _tss()
    attributes = int(ak_public.publicArea.objectAttributes)
    required = {
        "restricted": tss.TPMA_OBJECT.RESTRICTED,
        "sign": tss.TPMA_OBJECT.SIGN_ENCRYPT,
        "fixedtpm": tss.TPMA_OBJECT.FIXEDTPM,
        "fixedparent": tss.TPMA_OBJECT.FIXEDPARENT,
        "sensitivedataorigin": tss.TPMA_OBJECT.SENSITIVEDATAORIGIN,
    }
    missing = [name for name, bit in required.items() if not attributes & int(bit)]
    if missing:
        raise AuthError(f"the attestation key is not a TPM-bound restricted signing key (lacks {', '.join(missing)})")
    if attributes & int(tss.TPMA_OBJECT.DECRYPT):
        raise AuthError("the attestation key is also a decryption key")


def check_ek(ek_public: Any, certificate_der: bytes, cas: Sequence[x509.Certificate], now: float) -> str:
    """The EK certificate is issued by a trusted manufacturer CA, valid now, and certifies this EK.

    Returns:
        The EK's fingerprint (sha256 of its public key, DER), which names one physical TPM.

    Raises:
        AuthError: any of those fails.
    """
    if not cas:
        raise AuthError("this control plane trusts no TPM manufacturer (start it with --tpm-ca)")
    try:
        certificate = x509.load_der_x509_certificate(strip_der_padding(certificate_der))
    except ValueError as exc:
        raise AuthError(f"the EK certificate does not parse: {exc}") from exc
    moment = datetime.fromtimestamp(now, UTC)
    if not certificate.not_valid_before_utc <= moment <= certificate.not_valid_after_utc:
        raise AuthError(f"the EK certificate is not valid now (valid until {certificate.not_valid_after_utc})")
    issuers = [ca for ca in cas if ca.subject == certificate.issuer]
    for issuer in issuers:
        try:
            certificate.verify_directly_issued_by(issuer)
        except (InvalidSignature, ValueError, TypeError):
            continue
        if not issuer.not_valid_before_utc <= moment <= issuer.not_valid_after_utc:
            raise AuthError(f"the TPM manufacturer CA {issuer.subject.rfc4514_string()} is not valid now")
        break
    else:
        raise AuthError(
            f"the EK certificate (issuer {certificate.issuer.rfc4514_string()}) is not issued by a trusted "
            "TPM manufacturer CA"
        )
    certified = certificate.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    presented = _pem_key(ek_public).public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    if certified != presented:
        raise AuthError("the EK certificate certifies another key than the EK the node presented")
    return hashlib.sha256(presented).hexdigest()


def strip_der_padding(data: bytes) -> bytes:
    """The DER certificate at the start of `data`: some TPMs store EK certificates in NV areas larger than the
    certificate, padded after it."""
    if len(data) < 4 or data[0] != 0x30:
        return data
    first = data[1]
    if first < 0x80:
        return data[: 2 + first]
    count = first & 0x7F
    if count == 0 or count > 4 or len(data) < 2 + count:
        return data
    return data[: 2 + count + int.from_bytes(data[2 : 2 + count], "big")]


@dataclass(frozen=True)
class Challenge:
    """A credential activation challenge: what goes to the node, and what the control plane keeps."""

    ak_public: str  # base64 TPM2B_PUBLIC
    ak_name: str  # hex
    ek_fingerprint: str
    secret: bytes
    credential_blob: str  # base64 TPM2B_ID_OBJECT
    encrypted_secret: str  # base64 TPM2B_ENCRYPTED_SECRET


def make_challenge(
    ek_public_b64: str, ek_certificate_b64: str | None, ak_public_b64: str, cas: Sequence[x509.Certificate], now: float
) -> Challenge:
    """Check a node's EK and AK and encrypt a fresh secret to the EK, bound to the AK's name.

    Raises:
        AuthError: the EK is not certified by a trusted manufacturer, or the AK is not an attestation key.
        ConfigError: tpm2-pytss is not installed.
    """
    if not ek_certificate_b64:
        raise AuthError("the node's TPM has no EK certificate in NV memory; it cannot prove it is a TPM")
    ek_public = _public(ek_public_b64, "EK public area")
    ak_public = _public(ak_public_b64, "AK public area")
    fingerprint = check_ek(ek_public, _decode(ek_certificate_b64, "EK certificate"), cas, now)
    check_ak(ak_public)
    secret = secrets.token_bytes(SECRET_BYTES)
    name = ak_public.get_name()
    _tss()
    from tpm2_pytss.utils import make_credential

    blob, encrypted = make_credential(ek_public, secret, name)
    return Challenge(
        ak_public=ak_public_b64,
        ak_name=bytes(name).hex(),
        ek_fingerprint=fingerprint,
        secret=secret,
        credential_blob=base64.b64encode(blob.marshal()).decode(),
        encrypted_secret=base64.b64encode(encrypted.marshal()).decode(),
    )


def check_activation(challenge: Challenge, answer_b64: str) -> None:
    """Raises:
    AuthError: the node did not recover the secret (its AK is not in the TPM that holds the certified EK).
    """
    if not secrets.compare_digest(_decode(answer_b64, "activated secret"), challenge.secret):
        raise AuthError("credential activation failed: the secret does not match (the AK is not in that TPM)")


def verify_quote(ak_public_b64: str, quote: Mapping[str, Any], qualifying_data: bytes) -> dict[str, dict[str, str]]:
    """Check a quote made by the registered AK over `qualifying_data` and the PCR values the node reports.

    Returns:
        The quoted PCR values, `{bank: {index: hex}}`.

    Raises:
        AuthError: a signature, type, qualifying data or PCR digest that does not match, or a malformed quote.
    """
    tss = _tss()
    ak_public = _public(ak_public_b64, "registered AK")
    try:
        quoted_bytes = _decode(str(quote["quoted"]), "quote")
        signature_bytes = _decode(str(quote["signature"]), "quote signature")
        reported = {str(bank): {str(k): str(v) for k, v in values.items()} for bank, values in quote["pcrs"].items()}
    except (KeyError, AttributeError, TypeError) as exc:
        raise AuthError(f"the quote is malformed: {exc}") from exc
    try:
        attest, _ = tss.TPMS_ATTEST.unmarshal(quoted_bytes)
        signature, _ = tss.TPMT_SIGNATURE.unmarshal(signature_bytes)
    except Exception as exc:  # tpm2-tss reports a malformed buffer as TSS2_Exception, ValueError or others
        raise AuthError(f"the quote does not unmarshal: {exc}") from exc
    try:
        signature.verify_signature(ak_public, quoted_bytes)
    except (InvalidSignature, ValueError, TypeError) as exc:
        raise AuthError("the quote is not signed by this node's registered attestation key") from exc
    if int(attest.magic) != TPM_GENERATED or int(attest.type) != int(tss.TPM2_ST.ATTEST_QUOTE):
        raise AuthError("the signed structure is not a quote made by a TPM")
    if bytes(attest.extraData) != qualifying_data:
        raise AuthError("the quote is over another report (its qualifying data does not match)")
    selections = attest.attested.quote.pcrSelect
    digest = hashlib.sha256()
    quoted: dict[str, dict[str, str]] = {}
    for selection in selections.pcrSelections[: selections.count]:
        bank = str(tss.TPM2_ALG(selection.hash)).lower()
        bitmap = bytes(selection.pcrSelect)[: selection.sizeofSelect]
        indices = [byte * 8 + bit for byte, bits in enumerate(bitmap) for bit in range(8) if bits >> bit & 1]
        values = reported.get(bank, {})
        for index in indices:
            value = values.get(str(index))
            if value is None:
                raise AuthError(f"the quote covers PCR {bank}:{index}, which the node did not report")
            try:
                digest.update(bytes.fromhex(value))
            except ValueError as exc:
                raise AuthError(f"PCR {bank}:{index} is not hex") from exc
            quoted.setdefault(bank, {})[str(index)] = value
    if digest.digest() != bytes(attest.attested.quote.pcrDigest):
        raise AuthError("the PCR values the node reports are not the ones the TPM quoted")
    return quoted


def check_pcr_policy(quoted: Mapping[str, Mapping[str, str]], required: Mapping[str, str]) -> str | None:
    """Compare quoted PCR values with the required ones (`{"sha256:0": hex}`); the first difference, in words."""
    for key, wanted in sorted(required.items()):
        bank, _, index = key.partition(":")
        got = quoted.get(bank, {}).get(index)
        if got is None:
            return f"PCR {key} is required but was not quoted"
        if got.lower() != wanted.lower():
            return f"PCR {key} is {got[:16]}..., not the required {wanted[:16]}..."
    return None
