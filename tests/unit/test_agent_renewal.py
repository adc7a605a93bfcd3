"""When the agent renews its certificate, and what it does with one its own clock says has expired: it asks the
control plane all the same (a node off for a weekend, or whose clock runs a day ahead), and gives up for a new
enrollment only when the control plane refuses it. The control plane is a stand-in; the clock a fake."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from strata.agent.client import ControlPlaneClient
from strata.agent.config import AgentConfig
from strata.agent.identity import StoredIdentity
from strata.agent.loop import AgentLoop
from strata.agent.transport import H11Transport
from strata.core.errors import AuthError, TransportError
from strata.core.wire import CertificateRenewal

DAY = 86400.0
T0 = 1_800_000_000.0


class Renewals(ControlPlaneClient):
    """Answers renewals with a certificate for 30 more days, or refuses them with `refusal`."""

    def __init__(self, now: list[float], behind: float = 0.0) -> None:
        super().__init__("https://cp.example", H11Transport())
        self.now = now
        self.behind = behind  # how far the control plane's clock is behind this node's
        self.asked = 0
        self.refusal: Exception | None = None

    def renew(self, csr: str) -> CertificateRenewal:
        self.asked += 1
        if self.refusal is not None:
            raise self.refusal
        issued = self.now[0] - self.behind
        return CertificateRenewal(certificate="PEM", not_after=issued + 30 * DAY, issued_at=issued)


def make_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, received_at: float | None = T0, behind: float = 0.0
) -> tuple[AgentLoop, Renewals, list[float]]:
    """A loop holding a 30-day certificate received at T0, its clock at T0 (the control plane's `behind` it); no
    files, keys or TLS."""
    now = [T0]
    client = Renewals(now, behind)
    config = AgentConfig(server="https://cp.example", data_dir=tmp_path, name="n1", tier="device")
    loop = AgentLoop(config, client, object(), clock=lambda: now[0])  # no reconciler needed
    issued = T0 - behind if received_at is not None else None
    loop.stored = StoredIdentity(config.server, "node-1", T0 - behind + 30 * DAY, received_at, issued)
    monkeypatch.setattr(loop.identity, "make_csr", lambda name: "CSR")
    monkeypatch.setattr(loop, "_adopt", lambda stored: setattr(loop, "stored", stored))
    return loop, client, now


def test_a_certificate_is_renewed_once_a_third_of_its_life_is_left(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loop, client, now = make_loop(tmp_path, monkeypatch)
    now[0] = T0 + 19 * DAY
    loop.renew_if_due()
    assert client.asked == 0
    now[0] = T0 + 21 * DAY
    loop.renew_if_due()
    assert client.asked == 1
    assert loop.stored is not None
    assert loop.stored.not_after == now[0] + 30 * DAY
    assert loop.stored.received_at == now[0]


@pytest.mark.parametrize("behind", [25 * DAY, -40 * DAY])
def test_a_node_whose_clock_is_weeks_wrong_renews_on_the_certificates_life_not_its_dates(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, behind: float
) -> None:
    """The life is the server's (issued_at to not_after, one clock), counted from its receipt on the node's: a node
    25 days ahead took not_after - received_at for a 5-day life and renewed every 3.3 days, until the control plane
    refused a fifth live certificate and every round failed; one 40 days behind would have waited 40 days."""
    loop, client, now = make_loop(tmp_path, monkeypatch, behind=behind)
    for day in (1, 10, 19):
        now[0] = T0 + day * DAY
        loop.renew_if_due()
    assert client.asked == 0
    now[0] = T0 + 21 * DAY
    loop.renew_if_due()
    assert client.asked == 1
    for day in (22, 30, 40):  # the new certificate, received at day 21, lasts until day 51 by this node's clock
        now[0] = T0 + day * DAY
        loop.renew_if_due()
    assert client.asked == 1
    assert loop.stored is not None
    assert loop.stored.expires_at == T0 + 51 * DAY


def test_an_identity_from_before_lifetimes_were_kept_renews_8_hours_before_the_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loop, client, now = make_loop(tmp_path, monkeypatch, received_at=None)
    now[0] = T0 + 29 * DAY
    loop.renew_if_due()
    assert client.asked == 0
    now[0] = T0 + 30 * DAY - 7 * 3600
    loop.renew_if_due()
    assert client.asked == 1


def test_a_certificate_expired_by_this_nodes_clock_is_renewed_when_the_control_plane_takes_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A node off for longer than its certificate's life, or whose clock runs ahead: it refused to even ask, and
    needed an operator to enroll it again (its buffered telemetry stranded)."""
    loop, client, now = make_loop(tmp_path, monkeypatch)
    now[0] = T0 + 31 * DAY
    with caplog.at_level(logging.WARNING, logger="strata.agent"):
        loop.renew_if_due()
    assert client.asked == 1
    assert loop.stored is not None
    assert loop.stored.not_after == now[0] + 30 * DAY
    (said,) = [r.getMessage() for r in caplog.records if "expired" in r.getMessage()]
    assert "by this node's clock, which says it is 2027-02-15 08:00:00 UTC" in said
    assert "if this node's clock is wrong, set it right" in said


@pytest.mark.parametrize(
    "refusal",
    [
        AuthError("this certificate is not the current one of a live node"),
        TransportError(
            "connection broke while reading: [SSL: TLSV13_ALERT_CERTIFICATE_EXPIRED] tlsv13 alert certificate expired"
        ),
    ],
)
def test_an_expired_certificate_the_control_plane_refuses_needs_a_new_enrollment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, refusal: Exception
) -> None:
    loop, client, now = make_loop(tmp_path, monkeypatch)
    client.refusal = refusal
    now[0] = T0 + 31 * DAY
    with pytest.raises(AuthError, match=r"and the control plane refused it .*: enroll the node again"):
        loop.renew_if_due()


def test_an_unreachable_control_plane_is_only_that(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    loop, client, now = make_loop(tmp_path, monkeypatch)
    client.refusal = TransportError("cannot connect to https://cp.example: [Errno 111] Connection refused")
    now[0] = T0 + 31 * DAY
    with pytest.raises(TransportError):
        loop.renew_if_due()
