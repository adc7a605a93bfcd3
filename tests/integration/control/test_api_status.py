"""Status reports (stored only when they change), presence (memory first, flushed in batches) and node views."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from typing import Any

from control_harness import T0, Harness, NodeCredentials, StartServer, recorded_statements, writes
from sqlalchemy import create_engine, text

from strata.control.api.deps import MAX_JSON_BODY_BYTES
from strata.control.quota import NODE_RECORDS, NODE_RECORDS_PER_S
from strata.control.schemas import MAX_STATUS_ENTRIES
from strata.control.settings import ServerSettings


def _status(**fields: Any) -> dict[str, Any]:
    status: dict[str, Any] = {
        "tier": "device",
        "labels": {},
        "profile": "cpu-generic",
        "emulated": False,
        "agent_version": "0.1.0",
        "models": [],
        "failures": [],
        "desired_etag": None,
        "serve_url": "http://10.0.0.5:8000",
    }
    status.update(fields)
    return status


def _put(server: Harness, node: NodeCredentials, status: dict[str, Any]) -> int:
    return server.client.put(f"/v1/nodes/{node.node_id}/status", json=status, headers=node.headers).status_code


def _stored_last_seen(settings: ServerSettings, node_id: str) -> float | None:
    engine = create_engine(settings.database_url)
    try:
        with engine.connect() as connection:
            value = connection.execute(text("SELECT last_seen FROM nodes WHERE id = :id"), {"id": node_id}).scalar()
            return None if value is None else float(value)
    finally:
        engine.dispose()


def test_status_is_stored_only_when_it_changes(server: Harness) -> None:
    node = server.enroll("edge-1")
    model = {"name": "digits", "version": "1", "variant": "cpu-generic-fp32", "digest": "sha256:" + "a" * 64}
    first = _status(models=[{**model, "activated_at": 5.0}])
    assert _put(server, node, first) == 204
    with recorded_statements(server.plane.db.engine) as statements:
        assert _put(server, node, first) == 204
    assert writes(statements) == []
    changed = _status(models=[{**model, "activated_at": 6.0}])
    with recorded_statements(server.plane.db.engine) as statements:
        assert _put(server, node, changed) == 204
    assert len(writes(statements)) == 1


def test_node_view_reflects_the_last_status(server: Harness) -> None:
    node = server.enroll("edge-1", {"site": "lab"})
    failure = {"model": "detector", "version": "3", "variant": None, "reason": "golden check failed", "at": 7.0}
    status = _status(
        labels={"site": "lab"},
        profile="x86_64-avx2",
        emulated=True,
        models=[{"name": "digits", "version": "1", "variant": "v", "digest": "sha256:" + "a" * 64, "activated_at": 5}],
        failures=[failure],
    )
    assert _put(server, node, status) == 204
    view = server.client.get(f"/v1/nodes/{node.node_id}", headers=server.admin).json()
    assert (view["profile"], view["claims"]) == ("cpu-generic", {"profile": "x86_64-avx2"})  # the operator accepts
    assert view["emulated"] is True
    assert view["models"] == {"digits": "1"}
    assert view["failures"] == [{**failure, "attempts": 1, "kind": "other"}]
    assert view["serve_url"] == "http://10.0.0.5:8000"
    assert view["reported_etag"] is None
    assert view["in_sync"] is False

    etag = server.desired(node).headers["ETag"]
    assert view["desired_etag"] == etag
    assert _put(server, node, {**status, "desired_etag": etag}) == 204
    [listed] = server.client.get("/v1/nodes", headers=server.admin).json()
    assert listed["in_sync"] is True
    assert listed["reported_etag"] == etag


def test_a_node_that_names_no_labels_claims_none(server: Harness) -> None:
    """An agent started without --label reports no labels: that is no claim beside the ones its token assigned (the
    node list showed "claims none; not used"), where other labels are."""
    node = server.enroll("edge-1", {"site": "lab"})
    assert _put(server, node, _status(labels={})) == 204
    view = server.client.get(f"/v1/nodes/{node.node_id}", headers=server.admin).json()
    assert (view["labels"], view["claims"]) == ({"site": "lab"}, {})
    assert _put(server, node, _status(labels={"site": "home"})) == 204
    view = server.client.get(f"/v1/nodes/{node.node_id}", headers=server.admin).json()
    assert view["claims"] == {"labels": {"site": "home"}}


def test_malformed_status_is_422(server: Harness) -> None:
    node = server.enroll("edge-1")
    for status in (
        _status(tier="fog"),
        _status(profile="quantum-9000"),
        _status(labels={"": "x"}),
        _status(models=[{"name": "digits"}]),
        {"labels": {}},
    ):
        response = server.client.put(f"/v1/nodes/{node.node_id}/status", json=status, headers=node.headers)
        assert response.status_code == 422, status
        assert set(response.json()) == {"error", "code"}


def test_online_follows_last_seen_and_the_window(server: Harness) -> None:
    node = server.enroll("edge-1")
    [view] = server.client.get("/v1/nodes", headers=server.admin).json()
    assert view["online"] is False
    assert view["last_seen"] is None
    server.desired(node)
    seen = server.clock.now
    [view] = server.client.get("/v1/nodes", headers=server.admin).json()
    assert view["online"] is True
    assert view["last_seen"] == seen
    server.clock.advance(91)
    [view] = server.client.get("/v1/nodes", headers=server.admin).json()
    assert view["online"] is False
    assert view["last_seen"] == seen


def test_presence_is_flushed_in_one_batch(server: Harness) -> None:
    nodes = [server.enroll(f"edge-{i}") for i in range(3)]
    server.plane.flush_presence()  # the admin token's use in enrolling them (a batch of its own)
    for node in nodes:
        server.desired(node)
    settings = server.plane.settings
    assert _stored_last_seen(settings, nodes[0].node_id) is None
    with recorded_statements(server.plane.db.engine) as statements:
        assert server.plane.flush_presence() == 3
    assert len(writes(statements)) == 1  # one executemany
    for node in nodes:
        assert _stored_last_seen(settings, node.node_id) == server.clock.now
    # Nothing new: nothing written.
    with recorded_statements(server.plane.db.engine) as statements:
        assert server.plane.flush_presence() == 0
    assert statements == []


def test_the_background_flusher_writes_presence(settings: ServerSettings, start_server: StartServer) -> None:
    with start_server(replace(settings, presence_flush_s=0.1)) as server:
        node = server.enroll("edge-1")
        server.desired(node)
        deadline = time.monotonic() + 5
        while _stored_last_seen(settings, node.node_id) is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _stored_last_seen(settings, node.node_id) == server.clock.now


def test_shutdown_flushes_presence_and_it_survives_a_restart(
    settings: ServerSettings, start_server: StartServer
) -> None:
    with start_server(settings) as server:
        node = server.enroll("edge-1")
        server.clock.advance(5)
        server.desired(node)
        seen = server.clock.now
    assert _stored_last_seen(settings, node.node_id) == seen
    with start_server(settings) as server:
        [view] = server.client.get("/v1/nodes", headers=server.admin).json()
        assert view["last_seen"] == seen


def _db_counters(server: Harness) -> dict[str, float]:
    text = server.client.get("/metrics", headers=server.admin).text
    counters = {
        line.split('verb="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("strata_db_statements_total{")
    }
    counters["commits"] = float(
        next(line for line in text.splitlines() if line.startswith("strata_db_commits_total")).split()[1]
    )
    return counters


def test_metrics_count_the_statements_an_unchanged_status_report_costs(server: Harness) -> None:
    node = server.enroll("edge-1")
    assert _put(server, node, _status()) == 204
    _db_counters(server)  # the scrape's own reads land before the next one's counters are read
    before = _db_counters(server)
    assert _put(server, node, _status()) == 204
    after = _db_counters(server)
    scrape = _db_counters(server)
    own = {key: scrape[key] - after[key] for key in after}  # what one scrape costs, counted in the next
    delta = {key: after[key] - before[key] - own[key] for key in after}
    assert delta == {"select": 1, "insert": 0, "update": 0, "delete": 0, "other": 0, "commits": 1}


def test_what_a_node_reports_reaches_the_operators_terminal_as_text(server: Harness) -> None:
    # A node chooses its agent version, its failure reasons and its claimed labels (the API keeps them as sent: they
    # are its claims; its serving URL is checked as a URL). Printed raw, an escape sequence in one would act on the
    # operator's terminal (retitle the window, clear the screen, rewrite the line above), and a bidi override would
    # reorder what it shows.
    import io

    from strata.cli.common import TerminalConsole
    from strata.cli.nodes import fleet_table, node_detail

    title, clear, rtl = "\x1b]0;owned\x07", "\x1b[2J\x1b[H", "\u202e"
    node = server.enroll("edge-1", {"site": "lab"})
    failure = {"model": "digits", "version": "1", "reason": f"bad{clear}golden", "at": 7.0}
    status = _status(
        agent_version=f"1.0{title}",
        labels={"site": f"lab{rtl}evil"},
        failures=[failure],
    )
    assert _put(server, node, status) == 204
    view = server.client.get(f"/v1/nodes/{node.node_id}", headers=server.admin).json()
    assert view["agent_version"] == f"1.0{title}"  # stored as claimed: JSON readers get it exactly

    for renderable in (node_detail(view, T0), fleet_table([view], T0)):
        screen = io.StringIO()
        TerminalConsole(file=screen, force_terminal=True, color_system="truecolor", width=240).print(renderable)
        text = screen.getvalue()
        for injected in (title, clear, rtl, "\x07"):
            assert injected not in text
        assert "lab\\u202eevil" in text  # written out: both show the labels
    detail = io.StringIO()
    TerminalConsole(file=detail, width=240).print(node_detail(view, T0))
    assert "1.0\\x1b]0;owned\\x07" in detail.getvalue()
    assert "bad\\x1b[2J\\x1b[Hgolden" in detail.getvalue()
    assert "lab\\u202eevil" in detail.getvalue()


def test_a_node_cannot_flood_the_feed_or_the_server_through_its_reports(server: Harness) -> None:
    """A compromised node holds a valid certificate: one report of thousands of made-up models and failures
    would add a history row and feed events for each (10 MB made 15,000 rows), be stored, and be parsed again
    in every operator's node listing; and a JSON body of any size was read whole, before enrollment checks a
    token too."""
    node = server.enroll("edge-1")
    big = b'{"token": "' + b"a" * MAX_JSON_BODY_BYTES + b'"}'
    for path, headers in (("/v1/enroll", {}), (f"/v1/nodes/{node.node_id}/status", node.headers)):
        response = server.client.request(
            "POST" if path == "/v1/enroll" else "PUT",
            path,
            content=big,
            headers={**headers, "content-type": "application/json"},
        )
        assert response.status_code == 413, response.text
        assert response.json()["code"] == "payload_too_large"
    entries = MAX_STATUS_ENTRIES + 1
    model = {"version": "1", "variant": "v", "digest": "sha256:" + "a" * 64, "activated_at": 1.0}
    flood = _status(
        models=[{**model, "name": f"m{k}"} for k in range(entries)],
        failures=[{"model": f"m{k}", "version": "2", "reason": "bad", "at": 1.0} for k in range(entries)],
    )
    response = server.client.put(f"/v1/nodes/{node.node_id}/status", json=flood, headers=node.headers)
    assert response.status_code == 422, response.text
    assert "256" in response.json()["error"]
    assert server.client.get("/v1/events", headers=server.admin).json()[-1]["kind"] == "enrolled"
    assert _put(server, node, _status(models=[{**model, "name": f"m{k}"} for k in range(8)])) == 204


def test_what_a_nodes_reports_add_to_the_feed_is_budgeted(server: Harness) -> None:
    """Every report may name new failures (a made-up reason each time): each is an event. A compromised node
    reporting new ones in a loop grew the feed without bound; its budget stops that, and refills with time."""
    node = server.enroll("edge-1")

    def failures(round_: int) -> dict[str, Any]:
        failed = [{"model": "m", "version": "1", "reason": f"r{round_}-{k}", "at": 1.0} for k in range(200)]
        return _status(failures=failed)

    def feed_size() -> int:
        return len(server.client.get("/v1/events", params={"limit": 5000}, headers=server.admin).json())

    before = feed_size()
    for round_ in range(NODE_RECORDS // 200 + 2):
        assert _put(server, node, failures(round_)) == 204  # the report itself is stored
    assert feed_size() - before == NODE_RECORDS
    assert server.client.get(f"/v1/nodes/{node.node_id}", headers=server.admin).json()["failures"][0]["reason"] == (
        f"r{NODE_RECORDS // 200 + 1}-0"
    )
    server.clock.advance(10 / NODE_RECORDS_PER_S)
    assert _put(server, node, failures(99)) == 204
    assert feed_size() - before == NODE_RECORDS + 10


def test_nan_and_infinities_in_a_report_are_refused_with_422(server: Harness) -> None:
    # Python's JSON parser takes NaN and Infinity; the store writes strict JSON, so they made a 500 (ValueError
    # inside the fleet service) where the node's report is what is wrong.
    node = server.enroll("edge-1")
    model = {"name": "digits", "version": "1", "variant": "x", "digest": "sha256:" + "1" * 64, "activated_at": 1.0}
    serving = {"requests": 10, "errors": 0, "latency_p95_ms": 1.0, "since": 0.0}
    failure = {"model": "digits", "version": "2", "reason": "load failed", "at": 1.0}
    for where, field, value in (
        ("model", "activated_at", "NaN"),
        ("serving", "latency_p95_ms", "Infinity"),
        ("serving", "since", "-Infinity"),
        ("failure", "at", "NaN"),
    ):
        parts = {"model": dict(model), "serving": dict(serving), "failure": dict(failure)}
        parts[where][field] = "@"
        report = _status(models=[{**parts["model"], "serving": parts["serving"]}], failures=[parts["failure"]])
        response = server.client.put(
            f"/v1/nodes/{node.node_id}/status",
            content=json.dumps(report).replace('"@"', value),
            headers={**node.headers, "Content-Type": "application/json"},
        )
        assert response.status_code == 422, (field, value, response.text)
        assert field in response.text
    assert _put(server, node, _status(models=[{**model, "serving": serving}], failures=[failure])) == 204
    # An operator's request too: a rollout that bakes forever.
    rollout = json.dumps({"model": "digits", "version": "1", "bake_seconds": "@"}).replace('"@"', "Infinity")
    response = server.client.post(
        "/v1/rollouts", content=rollout, headers={**server.admin, "Content-Type": "application/json"}
    )
    assert response.status_code == 422, response.text


def _at_once(calls: list[Any]) -> None:
    """Run the calls at the same moment, one thread each."""
    import threading

    barrier = threading.Barrier(len(calls))
    errors: list[BaseException] = []

    def run(call: Any) -> None:
        barrier.wait()
        try:
            call()
        except BaseException as exc:  # handed to the test thread, which raises it
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(call,)) for call in calls]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    if errors:
        raise errors[0]


def test_one_report_sent_twice_at_once_is_recorded_once_and_labels_set_at_once_both_stay(server: Harness) -> None:
    """A report and its retry through another replica, at once: both compared with the same stored report, both
    recorded the activation (two history rows, two events). Two operators labelling one node at once: the second
    wrote over the first's label."""
    from sqlalchemy import func, select

    from strata.control.db import ActivationEvent
    from strata.core.wire import NodeStatus

    node = server.enroll("edge-1")
    fleet = server.plane.fleet
    model = {"name": "digits", "variant": "cpu-generic-fp32"}
    for round_ in range(8):
        version = {"version": str(round_ + 1), "digest": f"sha256:{round_:064x}", "activated_at": 5.0 + round_}
        report = NodeStatus.from_json(_status(models=[{**model, **version}]))
        _at_once([lambda report=report: fleet.report_status(node.node_id, report)] * 2)
        with server.plane.db.transaction() as session:
            rows = session.scalar(select(func.count()).select_from(ActivationEvent))
        assert rows == round_ + 1, f"round {round_}: {rows} history rows"
        _at_once(
            [
                lambda r=round_: fleet.assign(node.node_id, {f"a{r}": "x"}),
                lambda r=round_: fleet.assign(node.node_id, {f"b{r}": "y"}),
            ]
        )
        labels = fleet.get_node(node.node_id).labels
        assert {f"a{round_}", f"b{round_}"} <= set(labels), labels
