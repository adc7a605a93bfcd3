"""Node-side TPM 2.0 operations (tpm2-pytss), run as a short-lived child process like `strata.trust.node`:

    python -m strata.trust.tpm identify TCTI            -> JSON {ek_public, ek_certificate, ak_public, ak_name}
    python -m strata.trust.tpm activate TCTI < JSON     -> JSON {secret}: TPM2_ActivateCredential on a challenge
    python -m strata.trust.tpm quote TCTI < PAYLOAD     -> JSON {quoted, signature, pcrs}: a quote over sha256(PAYLOAD)

TCTI names the TPM the way tpm2-tss does: `device:/dev/tpmrm0` for the kernel's resource manager,
`swtpm:host=127.0.0.1,port=2321` for a software TPM.

The attestation key (AK) is a restricted ECDSA P-256 signing key made as a primary key of the endorsement
hierarchy from a fixed template. A TPM derives primary keys from its endorsement seed, so the same template gives
the same key on every call: nothing is stored on the node's disk and nothing can be copied from it; the key
never leaves the TPM. Being restricted, it signs only structures the TPM made itself (a quote, not arbitrary
bytes), which is what makes a quote evidence. The endorsement key (EK) and its manufacturer certificate prove to
the control plane that the AK lives in a real TPM: the control plane encrypts a secret to the EK bound to the
AK's name (TPM2_MakeCredential), and only that TPM, holding both, can recover it (TPM2_ActivateCredential).

Binary structures travel as base64 of their TPM marshalling (TPM 2.0 Part 2), which the control plane reads
with the same library (`strata.trust.tpm_verify`).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any, Final

# tpm2-tss logs every TPM error code to stderr, including the expected "no such NV index" while looking for
# EK certificates; the errors this module cares about are raised as exceptions. Set before the import.
os.environ.setdefault("TSS2_LOG", "all+NONE")

from tpm2_pytss import (
    ESAPI,
    ESYS_TR,
    TPM2_ALG,
    TPM2_SE,
    TPM2B_ENCRYPTED_SECRET,
    TPM2B_ID_OBJECT,
    TPM2B_PUBLIC,
    TPM2B_SENSITIVE_CREATE,
    TPML_PCR_SELECTION,
    TPMT_SIG_SCHEME,
    TPMT_SYM_DEF,
)
from tpm2_pytss.constants import TPM2_CAP, TPM2_HT, TPM2_RC
from tpm2_pytss.TSS2_Exception import TSS2_Exception
from tpm2_pytss.utils import NoSuchIndex, create_ek_template

# The AK's template: restricted, signing only, made in and bound to this TPM, usable with an empty auth value.
AK_TEMPLATE: Final = "ecc256:ecdsa-sha256:null"
AK_ATTRIBUTES: Final = "fixedtpm|fixedparent|sensitivedataorigin|userwithauth|restricted|sign"
# The one EK profile the control plane accepts (strata.trust.tpm_verify.EK_PROFILE): the TCG default RSA 2048 EK,
# which every TPM 2.0 with an EK certificate carries. One profile, so one TPM is one EK.
EK_TYPE: Final = "EK-RSA2048"
# PCRs 0-7: firmware, its configuration, option ROMs, boot loader and Secure Boot policy (measured boot).
PCR_BANK: Final = "sha256"
PCRS: Final = tuple(range(8))
# pcr_read and quote are separate commands; if a PCR is extended between them, read and quote again.
QUOTE_TRIES: Final = 3


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@contextlib.contextmanager
def connect(tcti: str) -> Iterator[ESAPI]:
    """A connection to the TPM with no transient objects left in it, closed on the way out.

    A TPM reached without a resource manager (a software TPM's socket, /dev/tpm0) keeps the objects of a client
    that was killed before flushing them, and has room for only three; they are flushed first. That assumes
    strata is the TPM's only user there; on shared hardware use the kernel's resource manager (/dev/tpmrm0),
    behind which the list holds only this connection's own objects (none).

    Raises:
        TSS2_Exception: the TPM cannot be reached.
    """
    ectx = ESAPI(tcti)
    try:
        more = True
        while more:
            more, data = ectx.get_capability(TPM2_CAP.HANDLES, TPM2_HT.TRANSIENT << 24, 16)
            handles = list(data.data.handles)
            for handle in handles:
                ectx.flush_context(ectx.tr_from_tpmpublic(handle))
            more = more and bool(handles)
        yield ectx
    finally:
        ectx.close()


@contextlib.contextmanager
def loaded(ectx: ESAPI, handle: ESYS_TR) -> Iterator[ESYS_TR]:
    """Flush a transient object or session when done with it (without hiding an error already on its way)."""
    try:
        yield handle
    except BaseException:
        with contextlib.suppress(TSS2_Exception):
            ectx.flush_context(handle)
        raise
    ectx.flush_context(handle)


def nv_reader(ectx: ESAPI) -> Callable[[int], bytes]:
    def read(index: int) -> bytes:
        try:
            handle = ectx.tr_from_tpmpublic(index)
        except TSS2_Exception as exc:
            if exc.error == TPM2_RC.HANDLE:
                raise NoSuchIndex(index) from exc
            raise
        try:
            public, _ = ectx.nv_read_public(handle)
            size = public.nvPublic.dataSize
            data = b""
            while len(data) < size:
                data += bytes(ectx.nv_read(handle, min(1024, size - len(data)), len(data), auth_handle=handle))
        finally:
            ectx.tr_close(handle)
        return data

    return read


def endorsement_key(ectx: ESAPI) -> tuple[ESYS_TR, TPM2B_PUBLIC, bytes | None]:
    """The EK (as a transient primary key), its public area, and its manufacturer certificate (DER) if any."""
    certificate, template = create_ek_template(EK_TYPE, nv_reader(ectx))
    handle, public, _, _, _ = ectx.create_primary(TPM2B_SENSITIVE_CREATE(), template, ESYS_TR.ENDORSEMENT)
    return handle, public, certificate


def attestation_key(ectx: ESAPI) -> tuple[ESYS_TR, TPM2B_PUBLIC]:
    """The AK: the same key on every call (a primary key from a fixed template)."""
    template = TPM2B_PUBLIC.parse(AK_TEMPLATE, objectAttributes=AK_ATTRIBUTES)
    handle, public, _, _, _ = ectx.create_primary(TPM2B_SENSITIVE_CREATE(), template, ESYS_TR.ENDORSEMENT)
    return handle, public


def identify(tcti: str) -> dict[str, Any]:
    """What the control plane needs to challenge this TPM: the EK, its certificate, and the AK."""
    with connect(tcti) as ectx:
        ek, ek_public, certificate = endorsement_key(ectx)
        ectx.flush_context(ek)
        ak, ak_public = attestation_key(ectx)
        ectx.flush_context(ak)
    return {
        "ek_public": b64(ek_public.marshal()),
        "ek_certificate": b64(certificate) if certificate else None,
        "ak_public": b64(ak_public.marshal()),
        "ak_name": bytes(ak_public.get_name()).hex(),
    }


def activate(tcti: str, challenge: dict[str, Any]) -> dict[str, str]:
    """Recover the secret the control plane encrypted to this TPM's EK for its AK (TPM2_ActivateCredential).

    The EK's policy requires the endorsement hierarchy's authorization (PolicySecret), given in a policy session.
    """
    blob, _ = TPM2B_ID_OBJECT.unmarshal(base64.b64decode(challenge["credential_blob"]))
    secret, _ = TPM2B_ENCRYPTED_SECRET.unmarshal(base64.b64decode(challenge["encrypted_secret"]))
    with connect(tcti) as ectx:
        ek, _, _ = endorsement_key(ectx)
        with loaded(ectx, ek), loaded(ectx, attestation_key(ectx)[0]) as ak:
            session = ectx.start_auth_session(
                ESYS_TR.NONE,
                ESYS_TR.NONE,
                TPM2_SE.POLICY,
                TPMT_SYM_DEF(algorithm=TPM2_ALG.NULL),
                TPM2_ALG.SHA256,
            )
            with loaded(ectx, session):
                ectx.policy_secret(ESYS_TR.ENDORSEMENT, session, b"", b"", b"", 0)
                recovered = ectx.activate_credential(ak, ek, blob, secret, session2=session)
    return {"secret": b64(bytes(recovered))}


def quote(tcti: str, payload: bytes) -> dict[str, Any]:
    """A quote by the AK over PCRs 0-7 with sha256(payload) as its qualifying data, and the PCR values it covers.

    Raises:
        RuntimeError: the PCRs kept changing between reading them and quoting them.
    """
    selection = TPML_PCR_SELECTION.parse(f"{PCR_BANK}:{','.join(str(pcr) for pcr in PCRS)}")
    qualifying = hashlib.sha256(payload).digest()
    with connect(tcti) as ectx, loaded(ectx, attestation_key(ectx)[0]) as ak:
        for _ in range(QUOTE_TRIES):
            before = _read_pcrs(ectx, selection)
            quoted, signature = ectx.quote(ak, selection, qualifying, TPMT_SIG_SCHEME(scheme=TPM2_ALG.NULL))
            if _read_pcrs(ectx, selection) == before:
                return {
                    "quoted": b64(bytes(quoted)),
                    "signature": b64(signature.marshal()),
                    "pcrs": {PCR_BANK: {str(pcr): value for pcr, value in zip(PCRS, before, strict=True)}},
                }
    raise RuntimeError(f"PCRs kept changing while quoting ({QUOTE_TRIES} tries)")


def _read_pcrs(ectx: ESAPI, selection: TPML_PCR_SELECTION) -> list[str]:
    _, _, digests = ectx.pcr_read(selection)
    values = [bytes(digest).hex() for digest in digests.digests]
    if len(values) != len(PCRS):
        raise RuntimeError(f"the TPM returned {len(values)} of {len(PCRS)} PCRs (is the {PCR_BANK} bank active?)")
    return values


def main(argv: list[str]) -> int:
    try:
        match argv:
            case ["identify", tcti]:
                out: dict[str, Any] = identify(tcti)
            case ["activate", tcti]:
                out = activate(tcti, json.loads(sys.stdin.buffer.read()))
            case ["quote", tcti]:
                out = quote(tcti, sys.stdin.buffer.read())
            case _:
                sys.stderr.write("usage: python -m strata.trust.tpm identify|activate|quote TCTI\n")
                return 2
    except TSS2_Exception as exc:
        sys.stderr.write(f"TPM error: {exc}\n")
        return 1
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 1
    sys.stdout.write(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
