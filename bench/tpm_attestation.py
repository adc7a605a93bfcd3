"""What a TPM adds to attestation: the node's cost of one quoted report against a software-only one, and the
control plane's cost of checking a quote, on a real software TPM (swtpm, manufactured here with its own CA).

Node side, in the same run: the software report is one child signing with the node key (`python -m
strata.trust.node sign`); a quoted report adds one `python -m strata.trust.tpm quote` child. Registration (once
per agent start) is identify + credential activation. Control plane side: verify_quote alone. Medians of REPEAT.
Needs swtpm (Debian: swtpm swtpm-tools) and strata[tpm]. Prints one JSON object.
"""

from __future__ import annotations

import hashlib
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from softtpm import SoftTpm
from strata.agent.attestation import NodeTpm
from strata.agent.identity import FleetIdentity
from strata.trust import tpm_verify

REPEAT = 9


def median_s(call: Callable[[], Any], repeat: int = REPEAT) -> tuple[float, Any]:
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = call()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main() -> None:
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        started = time.perf_counter()
        tpm = SoftTpm(root / "tpm").start()
        setup_s = time.perf_counter() - started
        try:
            node = NodeTpm(tpm.tcti)
            identity = FleetIdentity(root / "node")
            identity.make_csr("bench")  # makes the node key
            payload = b'{"report": "' + b"x" * 400 + b'"}'
            sign_s, _ = median_s(lambda: identity.sign(payload))
            quote_s, quote = median_s(lambda: node.quote(payload))
            identify_s, ident = median_s(node.identify, 3)
            cas = tpm_verify.load_manufacturer_cas(tpm.ca_files)

            def register() -> None:
                challenge = tpm_verify.make_challenge(
                    ident["ek_public"], ident["ek_certificate"], ident["ak_public"], cas, time.time()
                )
                answer = node.activate(
                    {"credential_blob": challenge.credential_blob, "encrypted_secret": challenge.encrypted_secret}
                )
                tpm_verify.check_activation(challenge, answer)

            activate_s, _ = median_s(register, 3)
            qualifying = hashlib.sha256(payload).digest()
            ak = ident["ak_public"]
            verify_s, _ = median_s(lambda: tpm_verify.verify_quote(ak, quote, qualifying), 50)
        finally:
            tpm.stop()
    print(
        json.dumps(
            {
                "software_report_sign_s": round(sign_s, 3),
                "tpm_quote_s": round(quote_s, 3),
                "quoted_report_vs_software_ratio": round((sign_s + quote_s) / sign_s, 2),
                "registration_s": round(identify_s + activate_s, 3),
                "control_plane_verify_quote_ms": round(verify_s * 1000, 3),
                "quote_json_bytes": len(json.dumps(quote)),
                "swtpm_manufacture_and_start_s": round(setup_s, 2),
                "repeat": REPEAT,
            }
        )
    )


if __name__ == "__main__":
    main()
