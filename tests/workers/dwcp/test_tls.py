"""Optional mutual TLS under DWCP: transfers and tunnels inside it, refusals, settings.

Certificates come from the ``openssl`` CLI once per session: a fleet CA, node certificates for the
sender (``node-a``) and the receiver (``node-b``) naming the node as a DNS subjectAltName, and a
rogue ``node-a`` certificate signed by another CA.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from workers.dwcp import (
    ConfigurationError,
    DWCPServer,
    TLSConfig,
    TLSError,
    TransferError,
    TransferRefused,
    open_tunnel,
    send_file,
    tls_from_environment,
)
from workers.dwcp.tickets import secret_bytes
from workers.dwcp.transport import Channel, ConnectionPool

from .helpers import DEST, SECRET, SOURCE, MiB, sha256_of, write_mixed_file
from .test_tunnel import UnixPeer, connect

REPO = Path(__file__).resolve().parents[3]
# A refusal must come from the handshake, not from a timeout (HANDSHAKE_TIMEOUT_SECONDS is 10).
PROMPT_SECONDS = 5.0


@dataclass(frozen=True)
class NodeFiles:
    cert: Path
    key: Path
    ca: Path

    def config(self) -> TLSConfig:
        return TLSConfig.load(cert=self.cert, key=self.key, ca=self.ca)

    def environment(self) -> dict[str, str]:
        return {"DWCP_TLS_CERT": str(self.cert), "DWCP_TLS_KEY": str(self.key), "DWCP_TLS_CA": str(self.ca)}


@dataclass(frozen=True)
class Certificates:
    ca: Path
    source: NodeFiles  # node-a, signed by the fleet CA
    dest: NodeFiles  # node-b, signed by the fleet CA
    rogue: NodeFiles  # "node-a", signed by another CA


def _openssl(*arguments: str | Path) -> None:
    subprocess.run(["openssl", *map(str, arguments)], check=True, capture_output=True)


def _make_ca(directory: Path, name: str) -> tuple[Path, Path]:
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", key, "-out", cert, "-days", "2", "-subj", f"/CN={name}",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip
    return cert, key


def _make_node(directory: Path, name: str, ca: tuple[Path, Path], file_stem: str) -> NodeFiles:
    cert, key, request = (directory / f"{file_stem}{suffix}" for suffix in (".pem", ".key", ".csr"))
    extensions = directory / f"{file_stem}.ext"
    extensions.write_text(
        f"subjectAltName=DNS:{name}\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth,clientAuth\n"
    )
    _openssl(
        "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", key, "-out", request, "-subj", f"/CN={name}",
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", request, "-CA", ca[0], "-CAkey", ca[1], "-CAcreateserial",
        "-out", cert, "-days", "2", "-extfile", extensions,
    )  # fmt: skip
    return NodeFiles(cert=cert, key=key, ca=ca[0])


@pytest.fixture(scope="session")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    directory = tmp_path_factory.mktemp("pki")
    fleet = _make_ca(directory, "fleet-ca")
    other = _make_ca(directory, "other-ca")
    rogue = _make_node(directory, SOURCE, other, "rogue")
    return Certificates(
        ca=fleet[0],
        source=_make_node(directory, SOURCE, fleet, "source"),
        dest=_make_node(directory, DEST, fleet, "dest"),
        rogue=NodeFiles(cert=rogue.cert, key=rogue.key, ca=fleet[0]),  # trusts the fleet, is not trusted
    )


@pytest.fixture
def tls_server(root: Path, certificates: Certificates) -> Iterator[DWCPServer]:
    with DWCPServer(
        listen="127.0.0.1:0", root=root, node_name=DEST, secret=SECRET, tls=certificates.dest.config()
    ) as running:
        yield running


@pytest.fixture
def tls_pool(certificates: Certificates) -> Iterator[ConnectionPool]:
    pool = ConnectionPool(tls=certificates.source.config())
    yield pool
    pool.close()


def send(
    server: DWCPServer, ticket: Callable[..., str], path: Path, name: str, pool: ConnectionPool
) -> object:
    return send_file(
        path,
        address=server.address_text,
        name=name,
        ticket=ticket(name),
        secret=SECRET,
        source_node=SOURCE,
        streams=4,
        pool=pool,
    )


def assert_still_serves(
    server: DWCPServer, ticket: Callable[..., str], tmp_path: Path, certificates: Certificates
) -> None:
    source = write_mixed_file(tmp_path / "after.img", 3 * MiB, seed=9)
    pool = ConnectionPool(tls=certificates.source.config())
    try:
        send(server, ticket, source, "after.img", pool)
    finally:
        pool.close()
    assert sha256_of(server.root / "after.img") == sha256_of(source)


# -- transfers inside TLS -------------------------------------------------------------------------


def test_a_file_crosses_mutual_tls_intact_on_every_stream(
    tls_server: DWCPServer,
    tls_pool: ConnectionPool,
    root: Path,
    tmp_path: Path,
    ticket: Callable[..., str],
) -> None:
    source = write_mixed_file(tmp_path / "disk.img", 24 * MiB)
    result = send(tls_server, ticket, source, "vms/1/disk.img", tls_pool)
    assert sha256_of(root / "vms/1/disk.img") == sha256_of(source)
    assert result.streams == 4  # type: ignore[attr-defined]
    # The pooled connections are TLS 1.3 ones, reused by a second transfer without a new handshake.
    connects = tls_pool.connects
    send(tls_server, ticket, source, "vms/1/copy.img", tls_pool)
    assert tls_pool.connects == connects and tls_pool.reuses >= 4
    assert sha256_of(root / "vms/1/copy.img") == sha256_of(source)


def test_a_channel_negotiates_tls_1_3_and_knows_both_node_names(
    tls_server: DWCPServer, certificates: Certificates
) -> None:
    channel = Channel.connect(
        tls_server.address, secret_bytes(SECRET), tls=certificates.source.config(), server_name=DEST
    )
    try:
        assert channel.tls is not None and channel.tls.version() == "TLSv1.3"
        assert channel.peer_names == {DEST}
    finally:
        channel.close()


@pytest.mark.parametrize("streams", [1, 4])
def test_a_tunnel_carries_concurrent_traffic_both_ways_over_tls(
    tls_server: DWCPServer,
    tls_pool: ConnectionPool,
    root: Path,
    tmp_path: Path,
    ticket: Callable[..., str],
    streams: int,
) -> None:
    # Random data both ways at once: every channel is written by one thread while another reads it.
    outbound = os.urandom(24 * MiB) + b"text " * 200_000
    inbound = os.urandom(20 * MiB) + bytes(MiB)
    peer = UnixPeer(root / "nbd.sock", inbound)
    tunnel = open_tunnel(
        address=tls_server.address_text,
        local_path=tmp_path / "local.sock",
        ticket=ticket("nbd.sock", kind="tunnel"),
        secret=SECRET,
        source_node=SOURCE,
        streams=streams,
        pool=tls_pool,
    )
    client = connect(tmp_path / "local.sock")

    def write_all() -> None:
        for start in range(0, len(outbound), 200_000):
            client.sendall(outbound[start : start + 200_000])
        client.shutdown(socket.SHUT_WR)

    writer = threading.Thread(target=write_all)
    writer.start()
    received = hashlib.sha256()
    received_bytes = 0
    while data := client.recv(1 << 20):
        received.update(data)
        received_bytes += len(data)
    writer.join()
    result = tunnel.wait(timeout=60)
    peer.thread.join(timeout=10)
    client.close()
    assert (peer.received_bytes, peer.received.hexdigest()) == (
        len(outbound),
        hashlib.sha256(outbound).hexdigest(),
    )
    assert (received_bytes, received.hexdigest()) == (len(inbound), hashlib.sha256(inbound).hexdigest())
    assert result.streams == streams


# -- refusals: clear, prompt, and the server goes on serving ---------------------------------------


def refused(action: Callable[[], object]) -> BaseException:
    started = time.monotonic()
    with pytest.raises(TransferError) as caught:
        action()
    assert time.monotonic() - started < PROMPT_SECONDS
    return caught.value


def test_a_client_without_a_certificate_is_refused(
    tls_server: DWCPServer, tmp_path: Path, ticket: Callable[..., str], certificates: Certificates
) -> None:
    anonymous = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    anonymous.minimum_version = ssl.TLSVersion.TLSv1_3
    anonymous.load_verify_locations(cafile=certificates.ca)
    pool = ConnectionPool(tls=TLSConfig(server_context=anonymous, client_context=anonymous))
    source = write_mixed_file(tmp_path / "disk.img", MiB)
    error = refused(lambda: send(tls_server, ticket, source, "disk.img", pool))
    assert isinstance(error, TLSError)
    assert "requires a client certificate" in str(error)
    assert_still_serves(tls_server, ticket, tmp_path, certificates)


def test_a_client_with_a_certificate_from_another_ca_is_refused(
    tls_server: DWCPServer, tmp_path: Path, ticket: Callable[..., str], certificates: Certificates
) -> None:
    pool = ConnectionPool(tls=certificates.rogue.config())
    source = write_mixed_file(tmp_path / "disk.img", MiB)
    error = refused(lambda: send(tls_server, ticket, source, "disk.img", pool))
    assert isinstance(error, TLSError)
    assert "refused this node's certificate" in str(error)
    assert_still_serves(tls_server, ticket, tmp_path, certificates)


def test_a_plain_client_is_told_the_server_requires_tls(
    tls_server: DWCPServer, tmp_path: Path, ticket: Callable[..., str], certificates: Certificates
) -> None:
    pool = ConnectionPool(tls=None)
    source = write_mixed_file(tmp_path / "disk.img", MiB)
    error = refused(lambda: send(tls_server, ticket, source, "disk.img", pool))
    assert "TLS" in str(error)
    assert_still_serves(tls_server, ticket, tmp_path, certificates)


def test_a_tls_client_is_told_the_server_does_not_speak_tls(
    root: Path, tmp_path: Path, ticket: Callable[..., str], certificates: Certificates
) -> None:
    source = write_mixed_file(tmp_path / "disk.img", MiB)
    with DWCPServer(listen="127.0.0.1:0", root=root, node_name=DEST, secret=SECRET, tls=None) as plain:
        pool = ConnectionPool(tls=certificates.source.config())
        error = refused(lambda: send(plain, ticket, source, "disk.img", pool))
        assert isinstance(error, TLSError)
        assert "without TLS" in str(error)
        plain_pool = ConnectionPool(tls=None)
        send(plain, ticket, source, "plain.img", plain_pool)  # still serving
        plain_pool.close()
    assert sha256_of(root / "plain.img") == sha256_of(source)


def test_a_server_whose_certificate_names_another_node_is_refused_by_the_client(
    root: Path, tmp_path: Path, ticket: Callable[..., str], certificates: Certificates
) -> None:
    # Listening where node-b is expected, but holding node-a's certificate.
    with DWCPServer(
        listen="127.0.0.1:0", root=root, node_name=DEST, secret=SECRET, tls=certificates.source.config()
    ) as impostor:
        pool = ConnectionPool(tls=certificates.source.config())
        source = write_mixed_file(tmp_path / "disk.img", MiB)
        error = refused(lambda: send(impostor, ticket, source, "disk.img", pool))
    assert isinstance(error, TLSError)
    assert "peer certificate refused" in str(error) and DEST in str(error)


def test_a_ticket_for_another_source_node_is_refused_even_with_a_valid_certificate(
    tls_server: DWCPServer, tmp_path: Path, ticket: Callable[..., str], certificates: Certificates
) -> None:
    # node-b's own certificate is valid, but the ticket says the transfer comes from node-a.
    pool = ConnectionPool(tls=certificates.dest.config())
    source = write_mixed_file(tmp_path / "disk.img", MiB)
    error = refused(lambda: send(tls_server, ticket, source, "disk.img", pool))
    assert isinstance(error, TransferRefused) and error.code == "wrong_source_certificate"
    pool.close()
    assert_still_serves(tls_server, ticket, tmp_path, certificates)


def test_tickets_are_still_checked_inside_tls(
    tls_server: DWCPServer, tls_pool: ConnectionPool, tmp_path: Path, ticket: Callable[..., str]
) -> None:
    source = write_mixed_file(tmp_path / "disk.img", MiB)
    forged = ticket("disk.img", secret="another-secret-0123456789")
    with pytest.raises(TransferRefused) as caught:
        send_file(
            source,
            address=tls_server.address_text,
            name="disk.img",
            ticket=forged,
            secret=SECRET,
            source_node=SOURCE,
            pool=tls_pool,
        )
    assert caught.value.code.startswith("ticket_")


# -- settings --------------------------------------------------------------------------------------


def test_no_tls_variables_mean_plain_tcp() -> None:
    assert tls_from_environment({}) is None


@pytest.mark.parametrize("present", [("DWCP_TLS_CERT",), ("DWCP_TLS_CERT", "DWCP_TLS_KEY"), ("DWCP_TLS_CA",)])
def test_a_partial_tls_setting_names_what_is_missing(
    certificates: Certificates, present: tuple[str, ...]
) -> None:
    environ = {name: value for name, value in certificates.dest.environment().items() if name in present}
    with pytest.raises(ConfigurationError) as caught:
        tls_from_environment(environ)
    for name in {"DWCP_TLS_CERT", "DWCP_TLS_KEY", "DWCP_TLS_CA"} - set(present):
        assert name in str(caught.value)


def test_unreadable_or_wrong_tls_files_are_named(certificates: Certificates, tmp_path: Path) -> None:
    environ = certificates.dest.environment() | {"DWCP_TLS_KEY": str(tmp_path / "missing.key")}
    with pytest.raises(ConfigurationError, match=r"DWCP_TLS_KEY=.*missing\.key is not a readable file"):
        tls_from_environment(environ)
    # A key that does not belong to the certificate.
    environ = certificates.dest.environment() | {"DWCP_TLS_KEY": str(certificates.source.key)}
    with pytest.raises(ConfigurationError, match="DWCP_TLS_CERT"):
        tls_from_environment(environ)
    garbage = tmp_path / "ca.pem"
    garbage.write_text("not a certificate\n")
    environ = certificates.dest.environment() | {"DWCP_TLS_CA": str(garbage)}
    with pytest.raises(ConfigurationError, match="DWCP_TLS_CA"):
        tls_from_environment(environ)


def test_servers_and_pools_read_the_environment_by_default(
    root: Path, certificates: Certificates, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What the node worker relies on: it builds its server and uses the default pool unchanged.
    for name, value in certificates.dest.environment().items():
        monkeypatch.setenv(name, value)
    server = DWCPServer(listen="127.0.0.1:0", root=root, node_name=DEST, secret=SECRET)
    assert server.tls is not None
    assert ConnectionPool().tls is not None
    monkeypatch.delenv("DWCP_TLS_KEY")
    with pytest.raises(ConfigurationError, match="DWCP_TLS_KEY missing"):
        DWCPServer(listen="127.0.0.1:0", root=root, node_name=DEST, secret=SECRET)


# -- the CLI ---------------------------------------------------------------------------------------


def cli_environment(files: NodeFiles | None, **overrides: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("DWCP_TLS_")}
    env |= {"PYTHONPATH": str(REPO), "DWCP_SECRET": SECRET} | (files.environment() if files else {})
    return env | overrides


def test_the_cli_serves_and_sends_over_tls_from_the_environment(
    root: Path, tmp_path: Path, certificates: Certificates
) -> None:
    command = [sys.executable, "-m", "workers.dwcp", "serve", "--listen", "127.0.0.1:0", "--root", str(root)]
    server = subprocess.Popen(
        [*command, "--node-name", DEST],
        cwd=REPO,
        env=cli_environment(certificates.dest),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        banner = json.loads(server.stdout.readline())
        assert banner["tls"] is True
        source = write_mixed_file(tmp_path / "disk.img", 5 * MiB)

        def send_as(name: str, files: NodeFiles | None) -> subprocess.CompletedProcess[str]:
            command = [sys.executable, "-m", "workers.dwcp", "send", str(source), "--to", banner["listening"]]
            command += ["--name", name, "--node-name", SOURCE, "--dest-node", DEST]
            env = cli_environment(files)
            return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)

        sent = send_as("disk.img", certificates.source)
        assert sent.returncode == 0, sent.stderr
        assert sha256_of(root / "disk.img") == sha256_of(source)
        plain = send_as("plain.img", None)
        assert plain.returncode == 1 and "TLS" in plain.stderr
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=10)


def test_the_cli_refuses_a_partial_tls_setting_at_start(root: Path, certificates: Certificates) -> None:
    env = cli_environment(certificates.dest)
    del env["DWCP_TLS_CA"]
    completed = subprocess.run(
        [sys.executable, "-m", "workers.dwcp", "serve", "--listen", "127.0.0.1:0", "--root", str(root)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert completed.returncode == 2
    assert "DWCP_TLS_CA missing" in completed.stderr
