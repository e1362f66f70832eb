"""Optional TLS: mutual authentication by the fleet CA, the same transfers on top."""

from __future__ import annotations

import shutil
import ssl
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from workers.dwcp import DWCPServer, RemoteProtocolError, TLSConfig, send_file
from workers.dwcp.transport import Channel, ConnectionPool

from .helpers import DEST, SECRET, SOURCE, MiB, sha256_of, write_mixed_file

pytestmark = pytest.mark.skipif(
    not shutil.which("openssl"), reason="needs the openssl CLI to make certificates"
)
EC_KEY = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]


def openssl(*arguments: str) -> None:
    subprocess.run(["openssl", *arguments], check=True, capture_output=True)


def make_ca(directory: Path, name: str) -> tuple[Path, Path]:
    key, cert = directory / f"{name}-ca.key", directory / f"{name}-ca.pem"
    openssl(
        "req", "-x509", *EC_KEY, "-days", "2", "-subj", f"/CN={name}", "-keyout", str(key), "-out", str(cert)
    )
    return cert, key


def issue(directory: Path, name: str, ca: tuple[Path, Path]) -> TLSConfig:
    key, request, cert = directory / f"{name}.key", directory / f"{name}.csr", directory / f"{name}.pem"
    openssl("req", "-new", *EC_KEY, "-subj", f"/CN={name}", "-keyout", str(key), "-out", str(request))
    openssl(
        "x509", "-req", "-in", str(request), "-CA", str(ca[0]), "-CAkey", str(ca[1]), "-CAcreateserial",
        "-days", "2", "-out", str(cert),
    )  # fmt: skip
    return TLSConfig(cert_file=str(cert), key_file=str(key), ca_file=str(ca[0]))


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> dict[str, TLSConfig]:
    directory = tmp_path_factory.mktemp("pki")
    ca = make_ca(directory, "fleet")
    rogue_ca = make_ca(directory, "rogue")
    return {
        "server": issue(directory, DEST, ca),
        "client": issue(directory, SOURCE, ca),
        "rogue": issue(directory, "intruder", rogue_ca),
    }


@pytest.fixture
def tls_server(root: Path, fleet: dict[str, TLSConfig]) -> Iterator[DWCPServer]:
    with DWCPServer(
        listen="127.0.0.1:0", root=root, node_name=DEST, secret=SECRET, tls=fleet["server"]
    ) as running:
        yield running


def test_a_file_travels_over_mutually_authenticated_tls_and_connections_are_reused(
    tls_server: DWCPServer,
    root: Path,
    tmp_path: Path,
    ticket: Callable[..., str],
    fleet: dict[str, TLSConfig],
    pool: ConnectionPool,
) -> None:
    source = write_mixed_file(tmp_path / "disk.img", 6 * MiB)
    for name in ("one.img", "two.img"):
        send_file(
            source,
            address=tls_server.address_text,
            name=name,
            ticket=ticket(name),
            secret=SECRET,
            source_node=SOURCE,
            streams=2,
            tls=fleet["client"],
            pool=pool,
        )
        assert sha256_of(root / name) == sha256_of(source)
    assert (pool.connects, pool.reuses) == (2, 2)


def test_peers_without_a_fleet_certificate_are_refused(
    tls_server: DWCPServer, fleet: dict[str, TLSConfig]
) -> None:
    with pytest.raises((ssl.SSLError, ConnectionError)):
        Channel.connect(tls_server.address, SECRET.encode(), tls=fleet["rogue"])
    with pytest.raises((OSError, RemoteProtocolError)):  # plain TCP at a TLS server
        Channel.connect(tls_server.address, SECRET.encode(), timeout=2)
    member = Channel.connect(tls_server.address, SECRET.encode(), tls=fleet["client"])
    assert member.reusable()
    member.close()
