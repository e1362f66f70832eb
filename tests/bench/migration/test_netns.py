"""bench.migration.netns: a removed namespace takes its processes with it (needs root)."""

import os
import secrets
import subprocess
import time

from bench.migration.netns import remove_namespace, sh


def test_removing_a_namespace_kills_the_daemons_still_running_in_it() -> None:
    netns = f"nctest{secrets.token_hex(3)}"
    sh("ip", "netns", "add", netns)
    try:
        # A daemon as dnsmasq is one: started in the namespace, detached from whoever started it.
        subprocess.run(
            ["ip", "netns", "exec", netns, "setsid", "--fork", "sleep", "600"], check=True, timeout=10
        )
        (pid,) = (int(text) for text in sh("ip", "netns", "pids", netns).stdout.split())
    finally:
        remove_namespace(netns)
    deadline = time.monotonic() + 5
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        time.sleep(0.05)  # SIGKILL is delivered asynchronously; init reaps the orphan
    assert not os.path.exists(f"/proc/{pid}")
    assert netns not in sh("ip", "netns", "list").stdout
