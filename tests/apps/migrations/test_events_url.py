"""The REST API's events URL: checked like the detail, then a 307 to the streams service."""

import pytest

from apps.migrations.models import Migration
from apps.projects.services import personal_project

pytestmark = pytest.mark.django_db


@pytest.fixture
def migration(user, make_migration) -> Migration:
    return make_migration(user)


def test_the_events_url_redirects_to_the_streams_service_on_the_requests_host(api, user, migration, settings):
    settings.STREAMS_URL = ""
    settings.STREAMS_PORT = 8123
    project = personal_project(user).pk
    url = f"/api/v1/migrations/{migration.pk}/events/?project={project}"
    response = api.get(url, HTTP_ACCEPT="text/event-stream")
    expected = f"http://testserver:8123{url}"  # the query (the project) goes along
    assert response.status_code == 307 and response["Location"] == expected


def test_the_streams_url_setting_wins(api, migration, settings):
    settings.STREAMS_URL = "https://streams.example.org/"
    response = api.get(f"/api/v1/migrations/{migration.pk}/events/")
    assert response.status_code == 307
    assert response["Location"] == f"https://streams.example.org/api/v1/migrations/{migration.pk}/events/"
    assert response.json()["url"] == response["Location"]


def test_another_users_migration_is_not_found_and_no_token_is_refused(other_api, client, migration):
    assert other_api.get(f"/api/v1/migrations/{migration.pk}/events/").status_code == 404
    assert client.get(f"/api/v1/migrations/{migration.pk}/events/").status_code == 401
