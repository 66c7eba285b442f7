"""A real ``redis-server`` for tests: started on a free loopback port, crashable and restartable.

Nothing is mocked: the fault tests kill the process (SIGKILL, like a crash) and start it again on
the same port, so a client must reconnect by itself, or stop it (SIGSTOP: the kernel still accepts
connections, but nothing answers, as with a wedged host) and let it go on. Optional
``--requirepass`` and TLS.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import redis
from process_pause import pause_process, resume_process

REDIS_SERVER = shutil.which("redis-server")


@dataclass(frozen=True)
class TlsFiles:
    """PEM paths of a CA and a server certificate it signed (valid for 127.0.0.1 and localhost)."""

    ca: str
    cert: str
    key: str


def make_tls_files(folder: str | Path) -> TlsFiles:
    """Generate a throwaway CA and a server certificate in ``folder`` (needs ``cryptography``)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder = Path(folder)
    now = datetime.datetime.now(datetime.timezone.utc)

    def build(subject: str, issuer: x509.Name | None, key, signer, ca: bool) -> x509.Certificate:
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
        b = (
            x509.CertificateBuilder().subject_name(name).issuer_name(issuer or name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if ca:
            b = b.add_extension(
                x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                              data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                              encipher_only=False, decipher_only=False), critical=True,
            ).add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        else:
            b = b.add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ), critical=False,
            ).add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        return b.sign(signer, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = build("kvtier test CA", None, ca_key, ca_key, ca=True)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = build("127.0.0.1", ca_cert.subject, key, ca_key, ca=False)
    files = TlsFiles(ca=str(folder / "ca.pem"), cert=str(folder / "server.pem"), key=str(folder / "server.key"))
    Path(files.ca).write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    Path(files.cert).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    Path(files.key).write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return files


def redis_supports_tls() -> bool:
    """Whether this redis-server was built with TLS (it rejects ``--tls-port`` otherwise)."""
    if REDIS_SERVER is None:
        return False
    probe = subprocess.run(
        [REDIS_SERVER, "--port", "0", "--tls-port", "0", "--save", ""], capture_output=True, text=True, timeout=10
    )
    return "Bad directive" not in probe.stdout + probe.stderr and "not supported" not in probe.stdout + probe.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """One redis-server subprocess. ``stop()`` kills it like a crash, ``start()`` brings it back
    on the same port; ``close()`` (also at context exit) kills it and removes its folder."""

    def __init__(self, password: str | None = None, tls: TlsFiles | None = None, extra_args: tuple[str, ...] = (),
                 start_timeout_s: float = 10.0) -> None:
        if REDIS_SERVER is None:
            raise RuntimeError("redis-server is not installed")
        self.password = password
        self.tls = tls
        self.extra_args = extra_args
        self.start_timeout_s = start_timeout_s
        self.dir = tempfile.mkdtemp(prefix="kvtier-redis-")
        self.port = 0
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        if self.tls:
            return f"rediss://{auth}127.0.0.1:{self.port}/0?ssl_cert_reqs=required&ssl_ca_certs={quote(self.tls.ca)}"
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def client(self, **kwargs) -> redis.Redis:
        """A plain redis-py client for checks the backend does not offer (TTL, DEBUG SLEEP)."""
        return redis.Redis.from_url(self.url, socket_timeout=10, socket_connect_timeout=2, **kwargs)

    def _args(self) -> list[str]:
        args = [REDIS_SERVER, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--enable-debug-command", "yes", "--dir", self.dir, "--logfile", "", "--protected-mode", "no"]
        if self.tls:
            args += ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", self.tls.cert,
                     "--tls-key-file", self.tls.key, "--tls-ca-cert-file", self.tls.ca, "--tls-auth-clients", "no"]
        else:
            args += ["--port", str(self.port)]
        if self.password:
            args += ["--requirepass", self.password]
        return args + list(self.extra_args)

    def start(self) -> RedisServer:
        """Start (or restart, on the same port) and wait until it answers PING."""
        if self.proc is not None and self.proc.poll() is None:
            return self
        for attempt in range(3):
            first = self.port == 0
            if first:
                self.port = free_port()
            log_path = os.path.join(self.dir, "server.log")
            with open(log_path, "wb") as log:
                self.proc = subprocess.Popen(self._args(), stdout=log, stderr=subprocess.STDOUT, cwd=self.dir)
            if self._wait_ready():
                return self
            output = Path(log_path).read_text(errors="replace")
            self._kill()
            if first and "Address already in use" in output and attempt < 2:
                self.port = 0  # someone took the port between our probe and the server's bind
                continue
            raise RuntimeError(f"redis-server did not start on port {self.port}:\n{output[-4000:]}")
        raise AssertionError("unreachable")

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + self.start_timeout_s
        with self.client() as probe:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    return False
                try:
                    if probe.ping():
                        return True
                except redis.RedisError:
                    pass
                time.sleep(0.02)
        return False

    def stop(self) -> None:
        """Kill -9, like a crash (no shutdown, no save)."""
        self._kill()

    def pause(self) -> None:
        """SIGSTOP: connections are still accepted (by the kernel) but no command is answered."""
        if self.proc is not None:
            pause_process(self.proc.pid)

    def resume(self) -> None:
        """SIGCONT after :meth:`pause`: the server answers what was sent meanwhile and goes on."""
        if self.proc is not None:
            resume_process(self.proc.pid)

    def _kill(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)
            self.proc = None

    def close(self) -> None:
        self._kill()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()
