"""The console's session and request-forgery rules, as pure functions of the request's headers and cookie.

Signing in posts an API token once; the server answers with a cookie that holds that token: `__Host-` prefixed
(Secure, Path=/, no Domain), HttpOnly (page scripts never read it), SameSite=Strict (no other site's page sends it)
and without Max-Age (the browser drops it when it closes). Holding the token rather than an opaque session id is a
choice: every replica behind a load balancer accepts the cookie with no shared session table, and revoking the
token (`strata token`) ends every console session made with it at once; the cost is that a stolen cookie is the
token itself, which HttpOnly, Secure and the strict Content-Security-Policy below make hard to steal. The `/v1`
API never reads this cookie (bearer tokens only), so it needs no forgery defence of its own.

Actions also need a CSRF token, per session: an HMAC of a fixed label keyed by the session's token. The page reads
it from `/ui/api/session` (same-origin only: the policy allows no other origin to read answers) and sends it in a
header; a forged form or cross-site request cannot know it, and it changes with the token.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from typing import Final

COOKIE: Final = "__Host-strata-session"
CSRF_HEADER: Final = "x-csrf-token"
_CSRF_LABEL: Final = b"strata console csrf v1"

CONTENT_SECURITY_POLICY: Final = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "font-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
)
SECURITY_HEADERS: Final[Mapping[str, str]] = {
    "content-security-policy": CONTENT_SECURITY_POLICY,
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "same-origin",  # not no-referrer: Chromium then sends `Origin: null` on form posts
    "cross-origin-opener-policy": "same-origin",
    "cross-origin-resource-policy": "same-origin",
}


def session_cookie(token: str) -> str:
    """The `Set-Cookie` value that signs the browser in with `token`."""
    return f"{COOKIE}={token}; Path=/; Secure; HttpOnly; SameSite=Strict"


def cleared_cookie() -> str:
    """The `Set-Cookie` value that signs the browser out."""
    return f"{COOKIE}=; Path=/; Secure; HttpOnly; SameSite=Strict; Max-Age=0"


def csrf_token(session_secret: str) -> str:
    """The CSRF token of the session whose cookie holds `session_secret`."""
    return hmac.new(session_secret.encode(), _CSRF_LABEL, hashlib.sha256).hexdigest()


def csrf_valid(session_secret: str, presented: str | None) -> bool:
    """Whether `presented` is the session's CSRF token (compared in constant time)."""
    return presented is not None and hmac.compare_digest(csrf_token(session_secret), presented)


def same_origin(headers: Mapping[str, str], host: str | None) -> bool:
    """Whether a state-changing request comes from the console's own pages, as far as the browser says: a
    `Sec-Fetch-Site` other than same-origin, or an `Origin` of another host, is another site's page. Clients that
    send neither (scripts, older browsers) are judged by the CSRF token and the SameSite cookie alone."""
    site = headers.get("sec-fetch-site")
    if site is not None and site not in ("same-origin", "none"):
        return False
    origin = headers.get("origin")
    if origin is None:
        return True
    return host is not None and origin == f"https://{host}"  # the control plane serves HTTPS only
