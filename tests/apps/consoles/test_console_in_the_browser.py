"""End to end, as a user sees it: a running test guest's console page in headless Chromium.

Real parts only: the control worker and two node workers as processes, the test guest under QEMU/TCG,
the streams service as it runs (granian ASGI, ``tests.streams_server``), the page from the live server
with the vendored xterm.js, and keys typed by Selenium into the terminal. The test reads the terminal's
buffer through the page's ``window.novacronConsole``. A screenshot of the page after the typing is
kept under artifacts/ (git-ignored).
"""

import secrets
from pathlib import Path

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver

from apps.migrations.models import Migration
from apps.vms.models import VM
from tests.apps.consoles.browser import NEEDS_CHROMIUM, browser, sign_in, terminal_text, wait_until
from tests.workers.node.conftest import Cluster, wait_for

# The browser fixture; the cluster's and the streams server's come from this directory's conftest.
__all__ = ["browser"]

pytestmark = [
    pytest.mark.integration,
    pytest.mark.qemu,
    pytest.mark.django_db(transaction=True),
    NEEDS_CHROMIUM,
]

ARTIFACTS = Path(__file__).resolve().parents[3] / "artifacts"
BOOT_LINE = "NovaCron test guest"  # the test guest's line on its console before the shell starts
PROMPT = "testguest# "


def _shell_ready(driver: WebDriver) -> bool:
    """The terminal shows the latest boot's prompt (an earlier boot's may be in the scrollback)."""
    text = terminal_text(driver)
    return BOOT_LINE in text and PROMPT in text[text.rfind(BOOT_LINE) :]


def _running_guest(api, node: str, name: str) -> str:
    payload = {"name": name, "image": "testguest", "vcpus": 1, "memory_mb": 128, "disk_gb": 1, "node": node}
    response = api.post("/api/v1/vms/", payload, format="json")
    assert response.status_code == 202, response.json()
    vm_id = str(response.json()["id"])
    wait_for(lambda: VM.objects.get(pk=vm_id).state == "running", 90, "the VM to run")
    return vm_id


def _type_and_see(driver: WebDriver, word: str) -> None:
    """Type ``echo <word>`` and Enter into the terminal; the shell's answer, a line of its own, appears."""
    driver.find_element(By.CSS_SELECTOR, "#terminal .xterm-helper-textarea").send_keys(
        f"echo {word}", Keys.ENTER
    )
    wait_until(
        driver,
        lambda d: word in [line.strip() for line in terminal_text(d).splitlines()],
        60,
        f"the answer {word} in the terminal",
    )


def _open_console(driver: WebDriver, base_url: str, vm_id: str) -> None:
    driver.get(f"{base_url}/vms/{vm_id}/console/")
    wait_until(driver, lambda d: d.find_element(By.ID, "state").text == "connected", 60, "the console")
    wait_until(driver, lambda d: BOOT_LINE in terminal_text(d), 90, "the boot output")
    wait_until(driver, _shell_ready, 90, "the shell's prompt")


def test_a_user_sees_the_boot_types_into_the_shell_and_is_refused_another_users_console(
    cluster: Cluster, api, user, other_user, live_server, browser, launch_streams, settings
):
    settings.STREAMS_URL = launch_streams()
    node = next(iter(cluster.nodes))
    vm_id = _running_guest(api, node, "typed-into")

    sign_in(browser, live_server.url, user)
    _open_console(browser, live_server.url, vm_id)
    assert browser.find_element(By.ID, "node").text == node
    _type_and_see(browser, f"hello-{secrets.token_hex(4)}")
    ARTIFACTS.mkdir(exist_ok=True)
    assert browser.save_screenshot(str(ARTIFACTS / "console.png"))

    sign_in(browser, live_server.url, other_user)
    browser.get(f"{live_server.url}/vms/{vm_id}/console/")
    assert "Not Found" in browser.title
    assert not browser.find_elements(By.ID, "terminal") and "typed-into" not in browser.page_source


def test_the_console_stays_usable_while_its_vm_live_migrates(
    cluster: Cluster, api, user, live_server, browser, launch_streams, settings
):
    settings.STREAMS_URL = launch_streams()
    source, dest = list(cluster.nodes)
    vm_id = _running_guest(api, source, "mover")
    sign_in(browser, live_server.url, user)
    _open_console(browser, live_server.url, vm_id)
    _type_and_see(browser, f"before-{secrets.token_hex(4)}")

    response = api.post(f"/api/v1/vms/{vm_id}/migrate/", {"dest_node": dest, "mode": "live"}, format="json")
    assert response.status_code == 202, response.json()
    migration_id = response.json()["id"]
    wait_for(
        lambda: Migration.objects.get(pk=migration_id).status in ("completed", "failed", "cancelled"),
        180,
        "the migration to end",
    )
    assert Migration.objects.get(pk=migration_id).status == "completed"
    wait_until(
        browser, lambda d: d.find_element(By.ID, "node").text == dest, 60, "the page to show the new node"
    )
    wait_until(browser, lambda d: d.find_element(By.ID, "state").text == "connected", 60, "the console again")
    statuses = [state for state, _ in browser.execute_script("return window.novacronConsole.statuses")]
    assert statuses[-2:] == ["reconnecting", "connected"], statuses  # the switch, shown on the page
    _type_and_see(browser, f"after-{secrets.token_hex(4)}")


def test_reconnect_once_the_vm_runs_a_long_paste_goes_in_pieces_and_a_deleted_vm_closes_the_page(
    cluster: Cluster, api, user, live_server, browser, launch_streams, settings
):
    settings.STREAMS_URL = launch_streams()
    vm_id = _running_guest(api, next(iter(cluster.nodes)), "restarted")
    assert api.post(f"/api/v1/vms/{vm_id}/stop/").status_code == 202
    wait_for(lambda: VM.objects.get(pk=vm_id).state == "stopped", 60, "the VM to stop")
    sign_in(browser, live_server.url, user)
    browser.get(f"{live_server.url}/vms/{vm_id}/console/")  # stopped: the API's 409
    wait_until(browser, lambda d: d.find_element(By.ID, "state").text == "closed", 30, "the refusal")
    assert "console can be opened while it runs" in browser.find_element(By.ID, "reason").text
    assert api.post(f"/api/v1/vms/{vm_id}/start/").status_code == 202
    wait_for(lambda: VM.objects.get(pk=vm_id).state == "running", 90, "the VM to run again")
    browser.find_element(By.ID, "reconnect").click()
    wait_until(browser, lambda d: d.find_element(By.ID, "state").text == "connected", 60, "the console")
    wait_until(browser, _shell_ready, 90, "the shell's prompt after the restart")

    # 10 000 bytes of no-op lines and an echo in one paste: the page sends them as messages of at most
    # 4096 bytes (the server closes the console on a larger one, 1009) and the shell runs them all.
    word = f"pasted-{secrets.token_hex(4)}"
    lines = "(': ' + 'x'.repeat(97) + '\\n').repeat(100)"
    browser.execute_script(f"window.novacronConsole.terminal.paste({lines} + 'echo {word}\\n');")
    wait_until(
        browser,
        lambda d: word in [line.strip() for line in terminal_text(d).splitlines()],
        120,
        f"the answer {word} after the paste",
    )
    assert browser.find_element(By.ID, "state").text == "connected"

    assert api.delete(f"/api/v1/vms/{vm_id}/").status_code == 202
    wait_until(browser, lambda d: d.find_element(By.ID, "state").text == "closed", 90, "the console to close")
    assert browser.find_element(By.ID, "reason").text == "the VM was deleted", terminal_text(browser)[-300:]
    assert browser.find_element(By.ID, "reconnect").is_displayed()
