"""A private certificate authority for tests of TLS front ends, made with the openssl command line."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class PrivateCa:
    """PEM files: the CA, a server certificate for 127.0.0.1 and its key, and a client certificate and key."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def private_ca(folder: Path) -> PrivateCa:
    """A CA in `folder`, and a server certificate (subjectAltName IP:127.0.0.1) and a client
    certificate signed by it, each with an unencrypted RSA key."""
    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True, timeout=60)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
            "-days", "2", "-subj", "/CN=loadgen test CA")
    for name, extension in (("server", "subjectAltName=IP:127.0.0.1\n"),
                            ("client", "extendedKeyUsage=clientAuth\n")):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                "-subj", f"/CN={'127.0.0.1' if name == 'server' else 'loadgen test client'}")
        (folder / f"{name}.cnf").write_text(extension)
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.cnf")
    return PrivateCa(folder / "ca.pem", folder / "server.pem", folder / "server.key", folder / "client.pem",
                     folder / "client.key")
