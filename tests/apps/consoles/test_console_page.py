"""The console page in headless Chromium (Selenium) and through Django's client: who may open it, the
vendored xterm.js it loads, and the links to it from the admin, the dashboard and the browsable API."""

import httpx
import pytest
from django.test import Client
from selenium.webdriver.common.by import By

from apps.migrations.models import Migration
from apps.projects.models import Membership, Project
from apps.vms.models import VM
from tests.apps.consoles.browser import NEEDS_CHROMIUM, browser, sign_in, terminal_text, wait_until

__all__ = ["browser"]  # a fixture of this module's tests

XTERM = "/static/consoles/vendor/xterm-6.0.0/xterm.js"

pytestmark = pytest.mark.django_db(transaction=True)


def _vm(owner, node, image, *, name: str = "web-1", state: str = "stopped", project=None) -> VM:
    return VM.objects.create(
        owner=owner,
        project=project,
        name=name,
        image=image,
        node=node,
        state=state,
        vcpus=1,
        memory_mb=128,
        disk_gb=1,
    )


@NEEDS_CHROMIUM
def test_the_page_loads_the_vendored_xterm_and_shows_why_the_console_did_not_open(
    live_server, browser, user, node, image
):
    vm = _vm(user, node, image)  # stopped: the ticket endpoint refuses it
    served = httpx.get(f"{live_server.url}{XTERM}")
    assert served.status_code == 200 and b"Terminal" in served.content
    sign_in(browser, live_server.url, user)
    browser.get(f"{live_server.url}/vms/{vm.pk}/console/")
    wait_until(browser, lambda d: d.execute_script("return !!window.novacronConsole"), 20, "the terminal")
    assert browser.execute_script("return typeof Terminal") == "function"
    assert browser.find_elements(By.CSS_SELECTOR, "#terminal .xterm")  # xterm.js drew its terminal
    wait_until(browser, lambda d: d.find_element(By.ID, "state").text == "closed", 20, "the refusal")
    reason = browser.find_element(By.ID, "reason").text  # the API's 409, as it said it
    assert reason == "VM web-1 is stopped: its console can be opened while it runs."
    assert browser.find_element(By.ID, "reconnect").is_displayed()
    assert browser.find_element(By.ID, "node").text == node.name
    assert terminal_text(browser).strip() == ""


@NEEDS_CHROMIUM
def test_another_users_vm_is_refused_in_the_browser(live_server, browser, user, other_user, node, image):
    theirs = _vm(other_user, node, image, name="theirs", state="running")
    sign_in(browser, live_server.url, user)
    browser.get(f"{live_server.url}/vms/{theirs.pk}/console/")
    assert "Not Found" in browser.title or "Not Found" in browser.page_source
    assert not browser.find_elements(By.ID, "terminal")
    assert "theirs" not in browser.page_source


@NEEDS_CHROMIUM
def test_an_anonymous_visitor_signs_in_and_lands_on_the_console_page(
    live_server, browser, make_user, node, image
):
    owner = make_user("carol", password="pw-correct-horse")
    vm = _vm(owner, node, image, name="carols")
    browser.get(f"{live_server.url}/vms/{vm.pk}/console/")
    assert "/api-auth/login/" in browser.current_url
    browser.find_element(By.ID, "id_username").send_keys("carol")
    browser.find_element(By.ID, "id_password").send_keys("pw-correct-horse")
    browser.find_element(By.ID, "id_password").submit()
    wait_until(browser, lambda d: d.current_url.endswith(f"/vms/{vm.pk}/console/"), 20, "the console page")
    assert "carols" in browser.find_element(By.ID, "status-line").text


def test_the_page_wants_a_login_and_hides_other_projects_vms(client, user, other_user, node, image):
    mine = _vm(user, node, image, name="mine")
    theirs = _vm(other_user, node, image, name="theirs")
    answer = client.get(f"/vms/{mine.pk}/console/")
    assert answer.status_code == 302
    assert answer["Location"] == f"/api-auth/login/?next=/vms/{mine.pk}/console/"
    client.force_login(user)
    page = client.get(f"/vms/{mine.pk}/console/")
    assert page.status_code == 200
    assert XTERM in page.content.decode() and 'id="console-data"' in page.content.decode()
    assert client.get(f"/vms/{theirs.pk}/console/").status_code == 404
    assert client.get("/vms/00000000-0000-0000-0000-000000000000/console/").status_code == 404
    VM.objects.filter(pk=mine.pk).update(state="deleted")
    assert client.get(f"/vms/{mine.pk}/console/").status_code == 404


def test_a_reader_is_told_the_role_is_read_only_and_staff_open_any_vm(make_user, staff, node, image):
    project = Project.objects.create(name="team", **Project.default_quota())
    writer, reader = make_user("writer"), make_user("reader")
    Membership.objects.create(project=project, user=writer, role="member")
    Membership.objects.create(project=project, user=reader, role="reader")
    vm = _vm(writer, node, image, name="shared", project=project)
    as_reader = Client()
    as_reader.force_login(reader)
    page = as_reader.get(f"/vms/{vm.pk}/console/").content.decode()
    assert (
        "read-only role" in page and "<strong>reader</strong>" in page and "<strong>member</strong>" in page
    )
    assert 'id="terminal"' not in page and "console.js" not in page
    for user in (writer, staff):
        browser = Client()
        browser.force_login(user)
        page = browser.get(f"/vms/{vm.pk}/console/").content.decode()
        assert 'id="terminal"' in page and f'"project": {project.pk}' in page


def test_the_admin_dashboard_and_browsable_api_link_to_the_console(staff, node, make_node, image, staff_api):
    vm = _vm(staff, node, image, name="linked", state="running")
    link = f'href="/vms/{vm.pk}/console/"'
    browser = Client()
    browser.force_login(staff)
    assert link in browser.get(f"/admin/vms/vm/{vm.pk}/change/").content.decode()

    Migration.objects.create(vm=vm, source_node=node, dest_node=make_node("elsewhere"), status="transferring")
    data = browser.get("/dashboard/data/").json()
    assert [row["console"] for row in data["migrations"]] == [f"/vms/{vm.pk}/console/"]

    html = browser.get(f"/api/v1/vms/{vm.pk}/", HTTP_ACCEPT="text/html").content.decode()
    assert link in html and "Open this VM's console" in html
    json_answer = staff_api.get(f"/api/v1/vms/{vm.pk}/")
    assert json_answer.status_code == 200 and b"console" not in json_answer.content  # the JSON is unchanged
    assert "console" not in staff_api.options(f"/api/v1/vms/{vm.pk}/").json()["description"]


def test_the_dashboard_form_finds_a_console_by_name_or_id_among_the_vms_one_may_see(
    user, other_user, staff, node, image
):
    mine = _vm(user, node, image, name="db")
    theirs = _vm(other_user, node, image, name="db")
    _vm(other_user, node, image, name="cache")
    as_staff = Client()
    as_staff.force_login(staff)
    assert 'action="/vms/console/"' in as_staff.get("/dashboard/").content.decode()

    as_user = Client()
    as_user.force_login(user)
    assert as_user.get("/vms/console/", {"vm": "db"})["Location"] == f"/vms/{mine.pk}/console/"
    assert as_user.get("/vms/console/", {"vm": str(mine.pk)})["Location"] == f"/vms/{mine.pk}/console/"
    assert as_user.get("/vms/console/", {"vm": "cache"}).status_code == 404  # another project's
    listed = as_staff.get("/vms/console/", {"vm": "db"})
    assert listed.status_code == 200
    assert f"/vms/{mine.pk}/console/" in listed.content.decode()
    assert f"/vms/{theirs.pk}/console/" in listed.content.decode()
    assert Client().get("/vms/console/", {"vm": "db"}).status_code == 302  # to the login
