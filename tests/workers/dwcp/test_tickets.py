"""Transfer tickets: signed by the control plane, refused when forged, expired, replayed or misaddressed."""

from __future__ import annotations

import logging
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from workers.dwcp import ReplayGuard, TicketError, sign_ticket, verify_ticket

SECRET = "ticket-test-secret-0123456789"


def make(**overrides: object) -> str:
    arguments: dict[str, object] = {
        "secret": SECRET,
        "source_node": "node-a",
        "dest_node": "node-b",
        "kind": "file",
        "target": "vms/1/disk.qcow2",
    }
    arguments.update(overrides)
    return sign_ticket(**arguments)  # type: ignore[arg-type]


def test_a_signed_ticket_verifies_with_its_claims() -> None:
    ticket = verify_ticket(make(transfer_id="t-1"), secret=SECRET, node_name="node-b")
    assert (ticket.transfer_id, ticket.source_node, ticket.dest_node, ticket.kind, ticket.target) == (
        "t-1",
        "node-a",
        "node-b",
        "file",
        "vms/1/disk.qcow2",
    )
    assert ticket.expires_at > time.time()


def test_a_ticket_signed_with_another_secret_is_refused_as_forged(caplog: pytest.LogCaptureFixture) -> None:
    token = make(secret="some-other-secret-987654321")
    with caplog.at_level(logging.WARNING), pytest.raises(TicketError) as refused:
        verify_ticket(token, secret=SECRET, node_name="node-b")
    assert refused.value.reason == "forged"
    assert "forged" in caplog.text


def test_a_ticket_with_edited_claims_is_refused_as_forged() -> None:
    _body, mac = make().split(".")
    other_body, _ = make(target="../../etc/passwd").split(".")
    with pytest.raises(TicketError) as refused:
        verify_ticket(f"{other_body}.{mac}", secret=SECRET, node_name="node-b")
    assert refused.value.reason == "forged"


def test_an_expired_ticket_is_refused() -> None:
    token = make(ttl_seconds=10, now=time.time() - 3600)
    with pytest.raises(TicketError) as refused:
        verify_ticket(token, secret=SECRET, node_name="node-b")
    assert refused.value.reason == "expired"


def test_a_ticket_valid_too_far_ahead_is_refused() -> None:
    token = make(ttl_seconds=3600, now=time.time() + 7200)
    with pytest.raises(TicketError) as refused:
        verify_ticket(token, secret=SECRET, node_name="node-b")
    assert refused.value.reason == "too_long"


def test_a_ticket_for_another_node_is_refused() -> None:
    with pytest.raises(TicketError) as refused:
        verify_ticket(make(), secret=SECRET, node_name="node-c")
    assert refused.value.reason == "wrong_node"


def test_a_replayed_ticket_is_refused_by_the_guard() -> None:
    guard = ReplayGuard()
    token = make()
    verify_ticket(token, secret=SECRET, node_name="node-b", replay_guard=guard)
    with pytest.raises(TicketError) as refused:
        verify_ticket(token, secret=SECRET, node_name="node-b", replay_guard=guard)
    assert refused.value.reason == "replayed"


def test_the_guard_forgets_transfer_ids_once_their_tickets_expired() -> None:
    guard = ReplayGuard()
    ticket = verify_ticket(make(ttl_seconds=1), secret=SECRET, node_name="node-b", replay_guard=guard)
    assert len(guard) == 1
    guard.claim(verify_ticket(make(), secret=SECRET, node_name="node-b"), now=ticket.expires_at + 3600)
    assert len(guard) == 1


def test_signing_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        make(kind="disk")
    with pytest.raises(ValueError):
        make(ttl_seconds=10_000)
    with pytest.raises(TicketError):
        make(secret="short")


@settings(max_examples=200, deadline=None)
@given(token=st.text(max_size=300) | st.binary(max_size=300).map(lambda b: b.hex()))
def test_arbitrary_strings_are_refused_with_a_ticket_error(token: str) -> None:
    with pytest.raises(TicketError):
        verify_ticket(token, secret=SECRET, node_name="node-b")
