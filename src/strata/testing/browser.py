"""Headless Chromium for the console's browser test and bench: Debian's `chromium` package driven by Playwright
(PyPI), never a browser Playwright downloads (there is no network for that, and the system's is the one
`tools/install-browser-deps` installs). Where either is missing, `launch_chromium` says what to install."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from strata.core.errors import StrataError

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Playwright

# Debian's /usr/bin/chromium is a shell wrapper; Playwright needs the binary it execs.
_CANDIDATES = ("/usr/lib/chromium/chromium", "/usr/lib/chromium-browser/chromium-browser")


class BrowserUnavailable(StrataError):
    code = "browser_unavailable"


def chromium_path() -> Path:
    """The Chromium binary: `STRATA_CHROMIUM` when set, else Debian's, else `chromium` on the PATH.

    Raises:
        BrowserUnavailable: none found (with what to install).
    """
    chosen = os.environ.get("STRATA_CHROMIUM")
    if chosen:
        if Path(chosen).is_file():
            return Path(chosen)
        raise BrowserUnavailable(f"STRATA_CHROMIUM={chosen} is not a file")
    for candidate in _CANDIDATES:
        if Path(candidate).is_file():
            return Path(candidate)
    on_path = shutil.which("chromium") or shutil.which("chromium-browser")
    if on_path:
        return Path(on_path)
    raise BrowserUnavailable(
        "no Chromium binary (/usr/lib/chromium/chromium, $STRATA_CHROMIUM or `chromium` on the PATH): run "
        "tools/install-browser-deps (Debian's `chromium` package) or set STRATA_CHROMIUM"
    )


def launch_chromium(playwright: Playwright, **options: Any) -> Browser:
    """Headless Chromium from `chromium_path()`, launched by Playwright.

    Raises:
        BrowserUnavailable: no Chromium binary.
    """
    # --no-sandbox: the tests run as root in containers, where Chromium's sandbox cannot start.
    args = ["--no-sandbox", "--disable-dev-shm-usage", *options.pop("args", [])]
    return playwright.chromium.launch(executable_path=str(chromium_path()), headless=True, args=args, **options)


def sync_playwright() -> Any:
    """`playwright.sync_api.sync_playwright()`, or a clear error when Playwright is not installed.

    Raises:
        BrowserUnavailable: the `playwright` package is missing.
    """
    try:
        from playwright.sync_api import sync_playwright as start
    except ImportError as exc:
        raise BrowserUnavailable(
            f"Playwright is not installed ({exc}): pip install -e '.[dev]' (it drives Debian's chromium)"
        ) from exc
    return start()
