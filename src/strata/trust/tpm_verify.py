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
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from strata.core.errors import AuthError, ConfigError

os.environ.setdefault("TSS2_LOG", "all+NONE")  # tpm2-tss logs unmarshalling errors to stderr; they are raised too

SECRET_BYTES: Final = 32
PCR_BANK: Final = "sha256"
QUOTED_PCRS: Final = frozenset(str(pcr) for pcr in range(8))  # what a quote must cover, no more and no less
EK_PROFILE: Final = "EK-RSA2048"  # the one EK profile nodes register (see check_ek_template)
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
    """The AK must be a restricted signing key made in and bound to its TPM (so it signs only TPM-made data), of
    exactly the kind the node makes: ECC P-256, ECDSA with SHA-256, SHA-256 names, no policy. Pinning the scheme
    matters: a restricted key with a weaker or unset hash could be led to sign a forged quote.

    Raises:
        AuthError: it is not.
    """
    tss = _tss()
    area = ak_public.publicArea
    attributes = int(area.objectAttributes)
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
    if attributes & int(tss.TPMA_OBJECT.ADMINWITHPOLICY) or bytes(area.authPolicy):
        raise AuthError("the attestation key carries an authorization policy")
    detail = area.parameters.eccDetail
    if (
        int(area.type) != int(tss.TPM2_ALG.ECC)
        or int(area.nameAlg) != int(tss.TPM2_ALG.SHA256)
        or int(detail.curveID) != int(tss.TPM2_ECC.NIST_P256)
        or int(detail.scheme.scheme) != int(tss.TPM2_ALG.ECDSA)
        or int(detail.scheme.details.ecdsa.hashAlg) != int(tss.TPM2_ALG.SHA256)
    ):
        raise AuthError("the attestation key is not ECC P-256 with ECDSA-SHA256 and SHA-256 names")


def check_ek_template(ek_public: Any) -> None:
    """The EK must be the TCG default RSA 2048 EK (template L-1): a TPM has exactly one certified EK of that
    profile, so its fingerprint names one TPM. (Accepting a second profile, say the ECC EK many TPMs also carry,
    would let one TPM answer for two nodes.)

    Raises:
        AuthError: it is another kind of key.
    """
    tss = _tss()
    from tpm2_pytss.utils import NoSuchIndex, create_ek_template

    def no_nv(index: int) -> bytes:
        raise NoSuchIndex(index)

    _, template = create_ek_template(EK_PROFILE, no_nv)
    want, got = template.publicArea, ek_public.publicArea
    same = (
        int(got.type) == int(want.type)
        and int(got.nameAlg) == int(want.nameAlg)
        and int(got.objectAttributes) == int(want.objectAttributes)
        and bytes(got.authPolicy) == bytes(want.authPolicy)
        and got.parameters.marshal(int(got.type)) == want.parameters.marshal(int(want.type))
    )
    if not same:
        kind = str(tss.TPM2_ALG(int(got.type))).upper()
        raise AuthError(f"the endorsement key is not the TCG default {EK_PROFILE} EK (got a {kind} key)")


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
    problem = "is not issued by a trusted TPM manufacturer CA"
    for issuer in (ca for ca in cas if ca.subject == certificate.issuer):
        try:
            certificate.verify_directly_issued_by(issuer)
        except (InvalidSignature, ValueError, TypeError, UnsupportedAlgorithm):
            continue
        if not issuer.not_valid_before_utc <= moment <= issuer.not_valid_after_utc:
            problem = "is issued by a TPM manufacturer CA certificate that is not valid now"
            continue  # a renewed certificate of the same CA may follow
        if not _is_ca(issuer):
            problem = "is issued by a certificate that is not a CA"
            continue
        break
    else:
        raise AuthError(f"the EK certificate (issuer {certificate.issuer.rfc4514_string()}) {problem}")
    certified = certificate.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    try:
        presented = _pem_key(ek_public).public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise AuthError(f"the endorsement key is not a usable public key: {exc}") from exc
    if certified != presented:
        raise AuthError("the EK certificate certifies another key than the EK the node presented")
    return hashlib.sha256(presented).hexdigest()


def _is_ca(certificate: x509.Certificate) -> bool:
    """A CA certificate by its basic constraints (a manufacturer root without the extension counts as one)."""
    try:
        return bool(certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return certificate.subject == certificate.issuer


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
    check_ek_template(ek_public)
    fingerprint = check_ek(ek_public, _decode(ek_certificate_b64, "EK certificate"), cas, now)
    check_ak(ak_public)
    secret = secrets.token_bytes(SECRET_BYTES)
    from tpm2_pytss.utils import make_credential

    try:
        name = ak_public.get_name()
        blob, encrypted = make_credential(ek_public, secret, name)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise AuthError(f"the EK or AK cannot be used for credential activation: {exc}") from exc
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
    if int(signature.sigAlg) != int(tss.TPM2_ALG.ECDSA) or int(signature.signature.ecdsa.hash) != int(
        tss.TPM2_ALG.SHA256
    ):
        raise AuthError("the quote is not signed with ECDSA-SHA256")
    try:
        signature.verify_signature(ak_public, quoted_bytes)
    except (InvalidSignature, ValueError, TypeError, UnsupportedAlgorithm) as exc:
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
    if set(quoted) != {PCR_BANK} or set(quoted[PCR_BANK]) != QUOTED_PCRS:
        covered = ", ".join(f"{bank}:{','.join(sorted(v, key=int))}" for bank, v in quoted.items()) or "no PCRs"
        raise AuthError(f"the quote covers {covered}, not {PCR_BANK}:0-7")
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
