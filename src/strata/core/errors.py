"""Error roots for strata, each with a stable code; one catalog maps codes to HTTP statuses.

Every public function documents the errors it raises. Third-party exceptions (onnxruntime, SQLAlchemy,
httpx, OS errors) are wrapped with `raise ... from exc` so that nothing foreign crosses a public boundary.
"""

from __future__ import annotations

from typing import ClassVar


class StrataError(Exception):
    """Root of every error strata raises on purpose."""

    code: ClassVar[str] = "strata_error"
    http_status: ClassVar[int] = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class PackageError(StrataError):
    """A model package is malformed, does not verify, or cannot be built."""

    code = "package_invalid"
    http_status = 422


class PackageBuildError(PackageError):
    """A package could not be built from the given model and samples."""

    code = "package_build_failed"


class VerificationError(PackageError):
    """Bytes on disk or on the wire do not match the hash or size that vouches for them."""

    code = "verification_failed"


class ProfileError(StrataError):
    """Unknown hardware profile, or a catalog that does not parse."""

    code = "profile_unknown"
    http_status = 422


class InferenceError(StrataError):
    """An inference request that cannot be served; the subclass says whose fault it is."""

    code = "inference_failed"
    http_status = 500


class BadRequest(InferenceError):
    """The caller sent a request that does not fit the model (names, shapes, datatypes, sizes)."""

    code = "bad_request"
    http_status = 400


class NotFound(StrataError):
    """The named thing (model, version, node, blob) does not exist here."""

    code = "not_found"
    http_status = 404


class Unavailable(StrataError):
    """The thing exists but cannot serve right now (model loading, queue full)."""

    code = "unavailable"
    http_status = 503


class TransportError(StrataError):
    """A peer could not be reached or answered outside the protocol."""

    code = "transport_error"
    http_status = 502


class AuthError(StrataError):
    """The caller is not who it must be for this call."""

    code = "unauthenticated"
    http_status = 401


class Forbidden(StrataError):
    """The caller is known but may not do this."""

    code = "forbidden"
    http_status = 403


class Conflict(StrataError):
    """The request contradicts what is stored (a different package under the same variant id, say)."""

    code = "conflict"
    http_status = 409


class ConfigError(StrataError):
    """Configuration or command-line input that cannot work."""

    code = "config_invalid"
    http_status = 400


class OptimizationError(StrataError):
    """A model optimization step (a pass, a calibration, an evaluation run) could not be carried out."""

    code = "optimization_failed"
    http_status = 500


class ModelLoadError(StrataError):
    """A package verified but its model would not load or failed its golden health check."""

    code = "model_load_failed"
    http_status = 503


class SignatureError(VerificationError):
    """A package is unsigned where a signature is required, or its signature is not by a trusted release key."""

    code = "signature_invalid"


# What a server with release keys says to an unsigned upload (and the CLI, having asked `/v1/health` first, before it
# sends a byte of the package).
UNSIGNED_REFUSED = (
    "this server accepts only packages signed by a release key: `strata model push ... --sign-key "
    "release.key` (`strata optimize ... --push --sign-key release.key`), or build and sign where the "
    "key is (`strata package build`, `strata model sign PKG --key release.key`) and upload with "
    "`strata package push PKG`"
)


class MetadataError(VerificationError):
    """TUF metadata was refused: stale, rolled back, mixed from different states, too large, badly signed, or the
    repositories disagree about a target."""

    code = "metadata_refused"
