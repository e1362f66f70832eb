"""Secrets come from the environment only: no secret has a usable default in the production settings,
a node refuses to start without the DWCP key, and Flower's credentials are interpolated, never written.
"""

import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SECRET_WORDS = ("SECRET", "PASSWORD", "TOKEN")
PRODUCTION_SETTINGS = [p for p in (ROOT / "novacron" / "settings").glob("*.py") if p.name != "test.py"]


def _env_calls(path: Path) -> list[tuple[str, ast.expr | None]]:
    calls = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "env" and node.args:
            name = node.args[0]
            if isinstance(name, ast.Constant) and isinstance(name.value, str):
                default = node.args[1] if len(node.args) > 1 else None
                calls.append((name.value, default))
    return calls


def test_no_secret_setting_has_a_non_empty_default():
    found = []
    for path in PRODUCTION_SETTINGS:
        for name, default in _env_calls(path):
            if not any(word in name for word in SECRET_WORDS) or name.startswith("THROTTLE_"):
                continue
            found.append(name)
            literal = ast.literal_eval(default) if default is not None else None
            # Anything literal must be empty, but for the key used only with DEBUG on, marked insecure.
            if isinstance(default, ast.Constant) and literal:
                assert "insecure" in str(literal), f"{path.name}: {name} has a literal default"
    assert {"SECRET_KEY", "DWCP_SECRET", "METRICS_TOKEN", "ALERT_WEBHOOK_SECRET"} <= set(found)


def test_a_node_refuses_to_start_without_the_dwcp_secret(tmp_path: Path):
    env = {key: value for key, value in os.environ.items() if key != "DWCP_SECRET"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "workers.node",
            "--name",
            "nosecret",
            "--data-dir",
            str(tmp_path),
            "--dwcp-listen",
            "127.0.0.1:7999",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "DWCP_SECRET" in result.stderr


def test_flower_credentials_come_from_the_environment():
    for path in (ROOT / "Procfile", ROOT / "compose.yaml"):
        lines = [
            line for line in path.read_text().splitlines() if "flower" in line and "--basic-auth" in line
        ]
        assert lines, f"{path.name}: Flower runs without --basic-auth"
        for line in lines:
            credentials = line.split("--basic-auth=", 1)[1].split()[0]
            assert "$" in credentials, f"{path.name}: Flower password written out: {line}"
