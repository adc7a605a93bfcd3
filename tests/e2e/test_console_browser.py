"""The console in a real browser (headless Chromium, driven by Playwright) against a real local fleet: a control
plane and two agents on loopback serving the real digits model.

Signing in, each page with no console error, the fleet page's numbers against the API's, a rollout started from
the CLI seen progressing on the open page without a reload, the admin's pause and abort, and a read token that
sees no action and whose forged POST is refused. Screenshots go to `test-artifacts/console/` (ignored by git).
Where Chromium or Playwright is missing the test fails with what to install; it never skips.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from e2e_helpers import push_model

from strata.localfleet import LocalFleet
from strata.testing.browser import BrowserUnavailable, launch_chromium, sync_playwright

pytestmark = pytest.mark.slow

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "console"
NODES = {
    "ui-eu-1": ("device", {"fleet": "ui", "region": "eu-west", "site": "berlin"}),
    "ui-us-1": ("device", {"fleet": "ui", "region": "us-east", "site": "boston"}),
}
WAIT_MS = 20_000


@pytest.fixture
def browser() -> Iterator[Any]:
    try:
        with sync_playwright() as playwright:
            launched = launch_chromium(playwright)
            try:
                yield launched
            finally:
                launched.close()
    except BrowserUnavailable as exc:
        pytest.fail(str(exc))


def open_console(browser: Any, fleet: LocalFleet, token: str, errors: list[str]) -> Any:
    """A fresh browser context signed in with `token` through the sign-in form; console errors land in `errors`."""
    context = browser.new_context(ignore_https_errors=True, viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(f"{fleet.server_url}/ui/")
    assert page.url.endswith("/ui/login")
    page.fill("#token", token)
    page.click("button[type=submit]")
    page.wait_for_selector("[data-count=total]", timeout=WAIT_MS)
    return page


def count(page: Any, key: str) -> int:
    return int(page.inner_text(f"[data-count='{key}']"))


def test_console_in_chromium(
    fleet: LocalFleet, browser: Any, tmp_path: Path, digits_onnx: Path, digits_onnx_v2: Path
) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for name, (tier, labels) in NODES.items():
        fleet.start_agent(
            name, tier, labels, extra_args=["--telemetry-interval", "1", "--report-interval", "1s", "--probation", "0"]
        )
    # What `strata optimize --push` stores with a variant: the models page's report and plot draw it.
    measured = {"top1_agreement": 1.0, "throughput": 4000.0, "speedup": 1.0, "gate": "passed"}
    push_model(fleet, digits_onnx, "1", tmp_path, metrics=measured)
    faster = {**measured, "top1_agreement": 0.99, "throughput": 6400.0, "speedup": 1.6}
    push_model(fleet, digits_onnx_v2, "2", tmp_path, metrics=faster)
    fleet.client.deploy("digits", "1", {"fleet": "ui"})
    fleet.wait_for_versions({name: {"digits": "1"} for name in NODES}, timeout=60)
    errors: list[str] = []

    # --- fleet: the numbers on the page are the API's ---
    page = open_console(browser, fleet, fleet.admin_token, errors)
    nodes = fleet.client.nodes()
    # Selectors, not wait_for_function: Playwright polls a function with eval, which the page's CSP refuses.
    page.wait_for_selector("[data-count='in_sync']:text-is('2')", timeout=WAIT_MS)
    assert count(page, "total") == len(nodes) == 2
    assert count(page, "online") == sum(n["online"] for n in nodes)
    assert count(page, "in_sync") == sum(n["in_sync"] for n in nodes)
    assert count(page, "tier:device") == 2
    assert count(page, "region:eu-west") == count(page, "region:us-east") == 1
    assert count(page, "site:berlin") == 1
    assert count(page, "versions:digits@1") == sum(n["models"].get("digits") == "1" for n in nodes)
    assert page.inner_text("#who") == "admin"
    page.fill("input[name=selector]", "region=us-east")
    # A redraw before Filter is pressed (a refresh that was loading as the operator typed; here the live tick once
    # the field has lost focus) keeps what was typed: the field used to come back empty and Filter applied nothing.
    drawn = page.get_attribute("body", "data-refreshes")
    page.click("h2")
    page.wait_for_selector(f"body:not([data-refreshes='{drawn}'])", state="attached", timeout=WAIT_MS)
    assert page.input_value("input[name=selector]") == "region=us-east"
    page.click("form.filter button")
    page.wait_for_selector("[data-count='total']:text-is('1')", timeout=WAIT_MS)
    assert page.locator("#nodes tbody tr").count() == 1
    page.screenshot(path=str(ARTIFACTS / "fleet.png"), full_page=True)

    # --- node: labels, slots, charts of the telemetry ---
    page.click("#nodes a")
    page.wait_for_selector("#slots", timeout=WAIT_MS)
    assert "region=us-east" in page.inner_text("[data-labels=assigned]")
    assert page.locator("#slots tbody tr").count() == 1
    assert page.locator("svg.chart").count() == 4
    page.screenshot(path=str(ARTIFACTS / "node.png"), full_page=True)

    # --- models: versions and where they run ---
    page.click("nav a[data-page=models]")
    page.wait_for_selector("[data-model=digits]", timeout=WAIT_MS)
    assert page.inner_text("[data-running='1']").startswith("2:")
    assert page.inner_text("[data-running='2']") == "nowhere"
    assert page.locator("svg.plot[data-plot=digits] circle").count() == 2  # accuracy against throughput
    assert "top1_agreement 0.99" in page.inner_text("[data-version='2'] [data-report]")
    assert page.locator("[data-tuf]").count() == 2
    page.screenshot(path=str(ARTIFACTS / "models.png"), full_page=True)

    # --- rollouts: one started from the CLI is seen progressing on the open page, which never reloads ---
    page.click("nav a[data-page=rollouts]")
    page.wait_for_selector("main h2", timeout=WAIT_MS)
    page.evaluate("window.__notReloaded = true")
    created = fleet.cli(
        "rollout", "create", "digits", "2", "--selector", "fleet=ui", "--waves", "1,100%", "--bake", "2s",
        "--on-no-data", "pass",
    )  # fmt: skip
    rollout_id = created.stdout.strip().splitlines()[-1]
    section = f"[data-rollout='{rollout_id}']"
    page.wait_for_selector(section, timeout=WAIT_MS)
    seen = {page.inner_text(f"{section} [data-field=wave]")}
    page.wait_for_selector(f"{section}[data-status=succeeded]", timeout=60_000)
    seen.add(page.inner_text(f"{section} [data-field=wave]"))
    assert "2/2" in seen
    assert page.evaluate("window.__notReloaded") is True
    assert int(page.inner_text(f"{section} [data-wave='2'] [data-field=healthy]")) == 1
    # Its timeline (folded once it ended): started first, the nodes' activations of 2, then succeeded.
    assert page.locator(f"{section} details[data-timeline]:not([open])").count() == 1
    kinds = page.locator(f"{section} [data-timeline] tr").evaluate_all("rows => rows.map((r) => r.dataset.kind)")
    assert kinds[0] == "rollout"
    assert kinds.count("activated") == 2
    assert kinds[-1] == "rollout"
    page.screenshot(path=str(ARTIFACTS / "rollouts.png"), full_page=True)

    # --- the admin pauses and aborts a running rollout from the page ---
    held = fleet.cli("rollout", "create", "digits", "1", "--selector", "fleet=ui", "--waves", "1,100%", "--bake", "10m")
    held_id = held.stdout.strip().splitlines()[-1]
    running = f"[data-rollout='{held_id}']"
    page.wait_for_selector(f"{running} [data-timeline] tr[data-kind=rollout]", state="visible", timeout=WAIT_MS)
    page.click(f"{running} [data-action=pause]", timeout=WAIT_MS)
    page.wait_for_selector(f"{running}[data-status=paused]", timeout=WAIT_MS)
    assert fleet.client.rollout(held_id)["status"] == "paused"
    page.once("dialog", lambda dialog: dialog.accept())
    page.click(f"{running} [data-action=abort]")
    page.wait_for_selector(f"{running}[data-status=aborted]", timeout=WAIT_MS)
    # Aborted, its waves count what the nodes ended as (it showed them "updating" for good)
    assert page.inner_text(f"{running} table.waves thead").split() == [
        "wave", "target", "nodes", "rolled", "back", "unchanged", "failed",
    ]  # fmt: skip

    # --- a read token sees everything and can act on nothing ---
    resumable = fleet.cli("rollout", "create", "digits", "1", "--selector", "fleet=ui", "--bake", "10m")
    resumable_id = resumable.stdout.strip().splitlines()[-1]
    read_token = fleet.client.create_api_token("read")["token"]
    reader = open_console(browser, fleet, read_token, errors)
    assert reader.inner_text("#who") == "read-only"
    reader.click("nav a[data-page=rollouts]")
    reader.wait_for_selector(f"[data-rollout='{resumable_id}'][data-status=running]", timeout=WAIT_MS)
    assert reader.locator("[data-action]").count() == 0
    forged = reader.evaluate(
        """async (id) => {
            const plain = await fetch(`/ui/api/rollouts/${id}/pause`, {method: "POST"});
            const session = await (await fetch("/ui/api/session")).json();
            const withToken = await fetch(`/ui/api/rollouts/${id}/pause`,
                {method: "POST", headers: {"x-csrf-token": session.csrf}});
            return [plain.status, withToken.status, (await withToken.json()).error];
        }""",
        resumable_id,
    )
    assert forged[:2] == [403, 403]
    assert "admin" in forged[2]
    assert fleet.client.rollout(resumable_id)["status"] == "running"
    reader.screenshot(path=str(ARTIFACTS / "rollouts-read-only.png"), full_page=True)
    # The two refused POSTs above log "403" in the console by design; nothing else may.
    unexpected = [e for e in errors if not re.search(r"status of 403", e)]
    assert unexpected == []
