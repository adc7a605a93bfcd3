"""The operator's console: a live web dashboard of the fleet at `/ui`, served by `strata server` itself.

`routes` holds the HTTP side (sign-in, the page, its data, the rollout actions), `session` the cookie and CSRF
rules, `console` what each page shows; `static/` the page's own script and styles (no build step, nothing loaded
from elsewhere).
"""

from strata.control.ui.routes import install_console

__all__ = ["install_console"]
