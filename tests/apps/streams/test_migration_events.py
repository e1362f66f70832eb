"""Migration events through the real streams server (granian ASGI), real Redis pub/sub and PostgreSQL."""

import asyncio
import time
from typing import Any

import httpx
import pytest
from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import connection, transaction
from django.test import Client

from apps.accounts.services import token_create
from apps.migrations.choices import MigrationStatus
from apps.migrations.services.state import locked, transition
from apps.projects.services import project_create
from tests.streams_server import ORIGIN, Reader, server_redis_connections

from .conftest import events_url, publish_progress

pytestmark = pytest.mark.django_db(transaction=True)


def _token(user: Any) -> dict[str, str]:
    return {"Authorization": f"Token {token_create(user=user).secret}"}


def _advance(migration: Any, to: MigrationStatus) -> None:
    """A status change as the control side makes it (run from the test's event loop in a thread)."""
    try:
        with transaction.atomic():
            transition(locked(migration), to, actor="test")
    finally:
        connection.close()  # that thread's own connection, not left open


def test_progress_and_status_changes_arrive_in_order_then_end(streams, user, make_migration):
    migration = make_migration(user)
    publish_progress(migration, percent=5.0, phase="memory")
    headers = _token(user)

    async def scenario() -> list[Any]:
        async with (
            httpx.AsyncClient(timeout=30) as client,
            client.stream("GET", events_url(streams, migration), headers=headers) as response,
        ):
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            reader = Reader(response)
            first = await reader.next()
            assert reader.retry == 2000
            seen = [first]
            for percent in (10.0, 20.0, 30.0):
                publish_progress(migration, percent=percent, rate_bps=1e6)
                seen.append(await reader.next())
            await sync_to_async(_advance)(migration, MigrationStatus.SWITCHING)
            seen.append(await reader.next())
            await sync_to_async(_advance)(migration, MigrationStatus.COMPLETED)
            seen += [await reader.next(), await reader.next(), await reader.next()]
            return seen

    seen = asyncio.run(scenario())
    first, *progress, switching, final, end, closed = seen
    assert first.name == "progress" and first.data["id"] == str(migration.pk) and first.data["percent"] == 5.0
    assert [event.data["percent"] for event in progress] == [10.0, 20.0, 30.0]
    assert progress[-1].data["rate_bps"] == 1e6 and progress[-1].data["status"] == "transferring"
    assert switching.name == "progress" and switching.data["status"] == "switching"
    assert final.name == "progress" and final.data["status"] == "completed"
    assert end.name == "end" and end.data == {"status": "completed", "error": ""}
    assert closed is None  # the server ended the response
    ids = [event.id for event in seen if event is not None]
    assert all(ids) and len(set(ids[:4])) == 4  # each change has an id of its own


def test_a_finished_migration_sends_its_final_state_and_ends(streams, user, make_migration):
    migration = make_migration(user, status="failed")
    headers = _token(user)

    async def scenario() -> list[Any]:
        async with (
            httpx.AsyncClient(timeout=30) as client,
            client.stream("GET", events_url(streams, migration), headers=headers) as response,
        ):
            reader = Reader(response)
            return [await reader.next(), await reader.next(), await reader.next()]

    state, end, closed = asyncio.run(scenario())
    assert state.name == "progress" and state.data["status"] == "failed"
    assert end.name == "end" and end.data["status"] == "failed" and closed is None


def test_tenancy_and_authentication_as_the_rest_api(streams, user, other_user, staff, make_migration):
    migration = make_migration(user)
    url = events_url(streams, migration)
    with httpx.Client(timeout=10) as client:
        anonymous = client.get(url)
        assert anonymous.status_code == 401
        assert anonymous.json() == {"detail": "Authentication credentials were not provided."}
        assert client.get(url, headers={"Authorization": "Token nope"}).json() == {"detail": "Invalid token."}
        other = client.get(url, headers=_token(other_user))
        assert other.status_code == 404 and other.json() == {"detail": "Not found."}
        project = project_create(creator=other_user, name="elsewhere")  # not the user's
        named = client.get(url, params={"project": project.pk}, headers=_token(user))
        assert named.status_code == 404 and "elsewhere" not in named.text
        bad_id = client.get(f"{streams}/api/v1/migrations/not-a-uuid/events/", headers=_token(user))
        assert bad_id.status_code == 404
        assert client.get(f"{streams}/api/v1/vms/", headers=_token(user)).status_code == 404
        assert client.get(f"{streams}/healthz").text == "ok"
    with (
        httpx.Client(timeout=10) as client,
        client.stream("GET", url, headers=_token(staff)) as response,  # staff see all
    ):
        assert response.status_code == 200


def test_a_browser_session_and_cors_for_the_allowed_page_only(streams, user, make_migration):
    migration = make_migration(user, status="completed")
    browser = Client()
    browser.force_login(user)
    cookies = {settings.SESSION_COOKIE_NAME: browser.cookies[settings.SESSION_COOKIE_NAME].value}
    with httpx.Client(timeout=10, cookies=cookies) as client:
        allowed = client.get(events_url(streams, migration), headers={"Origin": ORIGIN})
        assert allowed.status_code == 200 and "event: end" in allowed.text
        assert allowed.headers["access-control-allow-origin"] == ORIGIN
        assert allowed.headers["access-control-allow-credentials"] == "true"
        other = client.get(events_url(streams, migration), headers={"Origin": "http://evil.test"})
        assert "access-control-allow-origin" not in other.headers
        preflight = client.options(events_url(streams, migration), headers={"Origin": ORIGIN})
        assert preflight.status_code == 204
        assert "Authorization" in preflight.headers["access-control-allow-headers"]


def _server_connections(application: str) -> int:
    """The streams server's connections to the test database (by their application_name)."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND application_name = %s",
            [application],
        )
        found = int(cursor.fetchone()[0])
    connection.close()  # (called in a thread of the test's event loop)
    return found


def test_fifty_open_streams_hold_no_database_connection_and_share_one_pubsub(
    launch_streams, user, make_migration
):
    base = launch_streams(STREAMS_MAX_PER_USER="100", APPLICATION_NAME="streams-fifty")
    migrations = [make_migration(user, name=f"vm-{index}") for index in range(5)]
    headers = _token(user)

    async def scenario() -> tuple[int, tuple[int, int], list[Any]]:
        async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=100)) as client:
            opened = [
                client.stream("GET", events_url(base, migrations[index % 5]), headers=headers)
                for index in range(50)
            ]
            responses = await asyncio.gather(*(stream.__aenter__() for stream in opened))
            readers = [Reader(response) for response in responses]
            assert {response.status_code for response in responses} == {200}
            await asyncio.gather(*(reader.next() for reader in readers))  # each has its state
            database = await sync_to_async(_server_connections)("streams-fifty")
            connections = server_redis_connections(launch_streams, base)
            for migration in migrations:
                publish_progress(migration, percent=50.0)
            got = await asyncio.gather(*(reader.next() for reader in readers))
            for stream in opened:
                await stream.__aexit__(None, None, None)
            return database, connections, got

    database, (redis_total, redis_subscribed), got = asyncio.run(scenario())
    assert database <= 2  # the server's pool (DB_POOL_MAX=2), not one per stream
    # One pub/sub connection; the opening reads' pool of 2; django-redis's (token memos) in Django's thread.
    assert redis_subscribed == 1 and redis_total <= 4
    assert all(event.name == "progress" and event.data["percent"] == 50.0 for event in got)
    deadline = time.monotonic() + 10  # the clients left: the server drops its subscriptions
    while server_redis_connections(launch_streams, base)[1] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert server_redis_connections(launch_streams, base)[1] == 0


def test_last_event_id_resumes_without_resending_what_the_client_has(streams, user, make_migration):
    migration = make_migration(user)
    publish_progress(migration, percent=40.0)
    url = events_url(streams, migration)
    headers = _token(user)

    async def scenario() -> tuple[Any, Any, Any]:
        async with httpx.AsyncClient(timeout=30) as client:
            async with client.stream("GET", url, headers=headers) as response:
                first = await Reader(response).next()
            resumed_headers = {**headers, "Last-Event-ID": str(first.id)}
            async with client.stream("GET", url, headers=resumed_headers) as response:
                reader = Reader(response)
                publish_progress(migration, percent=45.0)
                resumed = await reader.next()
            stale = {**headers, "Last-Event-ID": "0-0"}
            async with client.stream("GET", url, headers=stale) as response:
                again = await Reader(response).next()
            return first, resumed, again

    first, resumed, again = asyncio.run(scenario())
    assert first.data["percent"] == 40.0
    assert resumed.data["percent"] == 45.0 and resumed.id != first.id  # the 40 % state was not sent again
    assert again.data["percent"] == 45.0 and again.id == resumed.id


def test_keepalives_and_the_longest_life_of_a_stream(launch_streams, user, make_migration):
    base = launch_streams(STREAMS_MAX_SECONDS="3")
    migration = make_migration(user)
    headers = _token(user)

    async def scenario() -> tuple[Reader, Any, Any]:
        async with (
            httpx.AsyncClient(timeout=30) as client,
            client.stream("GET", events_url(base, migration), headers=headers) as response,
        ):
            reader = Reader(response)
            return reader, await reader.next(), await reader.next(timeout=10)

    reader, state, closed = asyncio.run(scenario())
    assert state.name == "progress" and closed is None  # closed after 3 s, without an end
    assert reader.comments.count("keepalive") >= 1


def test_too_many_streams_answer_429(launch_streams, user, other_user, make_migration):
    base = launch_streams(STREAMS_MAX_PER_USER="2", STREAMS_MAX_PER_PROCESS="3")
    migration, theirs = make_migration(user), make_migration(other_user, name="theirs")
    mine, others = _token(user), _token(other_user)

    async def scenario() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=30) as client:
            held = [
                client.stream("GET", events_url(base, migration), headers=mine),
                client.stream("GET", events_url(base, migration), headers=mine),
                client.stream("GET", events_url(base, theirs), headers=others),
            ]
            readers = [Reader(await held[0].__aenter__()), Reader(await held[1].__aenter__())]
            await asyncio.gather(*(reader.next() for reader in readers))
            refused_user = await client.get(events_url(base, migration), headers=mine)
            readers.append(Reader(await held[2].__aenter__()))
            await readers[-1].next()
            refused_process = await client.get(events_url(base, theirs), headers=others)
            for stream in held:
                await stream.__aexit__(None, None, None)
            return [refused_user, refused_process]

    refused_user, refused_process = asyncio.run(scenario())
    assert refused_user.status_code == 429 and "streams open" in refused_user.json()["detail"]
    assert refused_process.status_code == 429 and "this server" in refused_process.json()["detail"]
    assert refused_user.headers["retry-after"] == "10"


FORECAST_REASON = "dirty rate 1.0 MiB/s, effective rate 5.0 MiB/s: about 1 more pass(es)"


def test_the_sse_events_carry_the_forecast(streams, user, make_migration):
    migration = make_migration(user)
    publish_progress(migration, percent=50.0, phase="memory", converging="unknown", eta_seconds="")
    headers = _token(user)

    async def scenario() -> list:
        async with (
            httpx.AsyncClient(timeout=30) as client,
            client.stream("GET", events_url(streams, migration), headers=headers) as response,
        ):
            reader = Reader(response)
            first = await reader.next()
            publish_progress(
                migration, percent=55.0, eta_seconds=8.25, converging="yes", converging_reason=FORECAST_REASON
            )
            return [first, await reader.next()]

    first, second = asyncio.run(scenario())
    assert (first.data["converging"], first.data["eta_seconds"], first.data["converging_reason"]) == (
        "unknown",
        None,
        "",
    )
    assert (second.data["converging"], second.data["eta_seconds"], second.data["converging_reason"]) == (
        "yes",
        8.25,
        FORECAST_REASON,
    )
