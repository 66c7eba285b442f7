"""A real Redis Cluster for tests: ``redis-server --cluster-enabled yes`` nodes joined by ``redis-cli``.

Masters (and optionally one replica each) on free loopback ports, a short ``cluster-node-timeout``
so failures are detected and replicas promoted within a few seconds, and
``cluster-require-full-coverage no`` unless asked otherwise, so the masters that are still up keep
serving their slots while one is down. ``kill`` crashes a node (SIGKILL), ``restart`` brings it back
on the same port with its ``nodes.conf`` (so it rejoins with its old identity, without data);
``pause`` stops a node (SIGSTOP: it accepts connections but answers nothing) and ``resume`` lets it go on.
``close`` kills every node and removes their folders; nothing is left behind even when creation fails.
"""

from __future__ import annotations

import datetime
import ipaddress
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import redis
from redis_server import RedisServer, TlsFiles, free_port

REDIS_CLI = "redis-cli"


def make_cluster_tls_files(folder: str | Path) -> TlsFiles:
    """A throwaway CA and one node certificate valid as TLS server and client: the cluster bus
    always asks the connecting node for a client certificate (``tls-auth-clients`` does not apply)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    folder, now = Path(folder), datetime.datetime.now(datetime.timezone.utc)

    def cert(name: str, key, issuer: x509.Name | None, signer, ca: bool) -> x509.Certificate:
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        b = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer or subject)
             .public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if not ca:
            b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(
                ipaddress.ip_address("127.0.0.1"))]), critical=False).add_extension(x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        return b.sign(signer, hashes.SHA256())

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_cert = cert("kvtier cluster test CA", ca_key, None, ca_key, ca=True)
    files = TlsFiles(ca=str(folder / "ca.pem"), cert=str(folder / "node.pem"), key=str(folder / "node.key"))
    Path(files.ca).write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    Path(files.cert).write_bytes(cert("127.0.0.1", key, ca_cert.subject, ca_key, ca=False)
                                 .public_bytes(serialization.Encoding.PEM))
    Path(files.key).write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))
    return files


@dataclass(frozen=True)
class NodeInfo:
    """One line of ``CLUSTER NODES`` that matters to tests."""

    node_id: str
    port: int
    master: bool
    master_id: str | None  # for a replica: the id of its master
    failed: bool
    slots: int  # how many slots it serves


class RedisCluster:
    """``masters`` masters with ``replicas`` replicas each, all on 127.0.0.1."""

    def __init__(self, masters: int = 3, replicas: int = 0, password: str | None = None,
                 tls: TlsFiles | None = None, node_timeout_ms: int = 500, full_coverage: bool = False,
                 ready_timeout_s: float = 30.0) -> None:
        self.masters, self.replicas = masters, replicas
        self.password, self.tls = password, tls
        self.ready_timeout_s = ready_timeout_s
        args = ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", str(node_timeout_ms),
                "--cluster-require-full-coverage", "yes" if full_coverage else "no",
                # replicas sync at once (the default waits 5 s) and may always take over
                "--repl-diskless-sync-delay", "0", "--cluster-replica-validity-factor", "0"]
        if password:
            args += ["--masterauth", password]
        if tls:
            args += ["--tls-cluster", "yes", "--tls-replication", "yes"]
        # The cluster bus gets its own free port (the default, port + 10000, may be taken or > 65535).
        self.nodes = [RedisServer(password=password, tls=tls, extra_args=(*args, "--cluster-port", str(free_port())))
                      for _ in range(masters * (1 + replicas))]

    # --- URLs and clients -------------------------------------------------------------------------

    def url(self, seeds: int | None = None) -> str:
        """``redis+cluster://`` (``rediss+cluster://`` with TLS) naming the first ``seeds`` nodes."""
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        hosts = ",".join(f"127.0.0.1:{n.port}" for n in self.nodes[: seeds or len(self.nodes)])
        if self.tls:
            return f"rediss+cluster://{auth}{hosts}?ssl_cert_reqs=required&ssl_ca_certs={quote(self.tls.ca)}"
        return f"redis+cluster://{auth}{hosts}"

    def node(self, port: int) -> RedisServer:
        return next(n for n in self.nodes if n.port == port)

    def client(self) -> redis.RedisCluster:
        """A plain redis-py cluster client for checks the backend does not offer."""
        kwargs = {"password": self.password, "socket_timeout": 5, "socket_connect_timeout": 2}
        if self.tls:
            kwargs |= {"ssl": True, "ssl_ca_certs": self.tls.ca}
        live = next(n for n in self.nodes if n.proc is not None)
        return redis.RedisCluster(host="127.0.0.1", port=live.port, require_full_coverage=False, **kwargs)

    # --- life cycle -------------------------------------------------------------------------------

    def start(self) -> RedisCluster:
        try:
            for node in self.nodes:
                node.start()
            cmd = [REDIS_CLI, "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in self.nodes),
                   "--cluster-replicas", str(self.replicas), "--cluster-yes", *self._cli_auth()]
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
            if done.returncode != 0:
                raise RuntimeError(f"redis-cli --cluster create failed:\n{done.stdout[-3000:]}\n{done.stderr[-2000:]}")
            self.wait_ok()
            return self
        except BaseException:
            self.close()
            raise

    def _cli_auth(self) -> list[str]:
        args = ["-a", self.password, "--no-auth-warning"] if self.password else []
        if self.tls:
            args += ["--tls", "--cacert", self.tls.ca]
        return args

    def wait_ok(self, timeout_s: float | None = None) -> None:
        """Until every running node says ``cluster_state:ok`` and they agree on the masters."""
        deadline = time.monotonic() + (timeout_s or self.ready_timeout_s)
        while True:
            views = []
            try:
                for node in self.nodes:
                    if node.proc is None:
                        continue
                    with node.client() as c:
                        info = c.execute_command("CLUSTER", "INFO")
                        info = info.decode() if isinstance(info, bytes) else str(info)
                        synced = c.info("replication").get("master_link_status", "up") == "up"
                        views.append(("cluster_state:ok" in info and synced,
                                      sorted((n.port, n.slots) for n in self._parse(c) if n.master and n.slots)))
                if views and all(ok for ok, _ in views) and all(v == views[0][1] for _, v in views):
                    if sum(slots for _, slots in views[0][1]) == 16384:
                        return
            except redis.RedisError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"cluster not ok after {timeout_s or self.ready_timeout_s} s: {views}")
            time.sleep(0.05)

    def topology(self) -> list[NodeInfo]:
        """``CLUSTER NODES`` as seen by a running node."""
        live = next(n for n in self.nodes if n.proc is not None)
        with live.client() as c:
            return self._parse(c)

    @staticmethod
    def _parse(c: redis.Redis) -> list[NodeInfo]:
        raw = c.execute_command("CLUSTER", "NODES")
        if isinstance(raw, dict):  # redis-py parses the reply into {addr: fields}
            lines = [f"{v['node_id']} {addr} {v['flags']} {v['master_id']} 0 0 0 "
                     f"{'connected' if v['connected'] else 'disconnected'} "
                     + " ".join("-".join(map(str, s)) for s in v.get("slots", [])) for addr, v in raw.items()]
        else:
            lines = (raw.decode() if isinstance(raw, bytes) else raw).splitlines()
        nodes = []
        for line in lines:
            fields = line.split()
            port = int(fields[1].split("@")[0].rsplit(":", 1)[1])
            flags = fields[2].split(",")
            slots = 0
            for spec in fields[8:]:
                if spec.startswith("["):
                    continue  # a slot being migrated
                lo, _, hi = spec.partition("-")
                slots += int(hi or lo) - int(lo) + 1
            nodes.append(NodeInfo(fields[0], port, "master" in flags,
                                  None if fields[3] == "-" else fields[3], "fail" in flags, slots))
        return nodes

    def master_ports(self) -> list[int]:
        return sorted(n.port for n in self.topology() if n.master and n.slots and not n.failed)

    def master_of(self, key: str) -> int:
        """The port of the master that serves ``key`` now."""
        with self.client() as c:
            node = c.get_node_from_key(key)
            return node.port

    def replicas_of(self, port: int) -> list[int]:
        nodes = self.topology()
        master = next(n for n in nodes if n.port == port)
        return sorted(n.port for n in nodes if n.master_id == master.node_id)

    def kill(self, port: int) -> None:
        """SIGKILL one node, like a crash."""
        self.node(port).stop()

    def pause(self, port: int) -> None:
        """SIGSTOP one node: a stalled master (longer than the node timeout, the others mark it failed)."""
        self.node(port).pause()

    def resume(self, port: int) -> None:
        """SIGCONT a paused node; it is a master again once the others see it answer."""
        self.node(port).resume()

    def restart(self, port: int) -> None:
        """Start a killed node again on its port; it rejoins with its old nodes.conf (no data)."""
        self.node(port).start()

    def wait_failover(self, replicas: list[int], timeout_s: float = 20.0) -> int:
        """Until one of ``replicas`` (of a killed master) serves slots; returns its port."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                heirs = [n.port for n in self.topology() if n.port in replicas and n.master and n.slots]
                if heirs:
                    self.wait_ok(timeout_s=max(1.0, deadline - time.monotonic()))
                    return heirs[0]
            except redis.RedisError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"none of the replicas {replicas} took over")

    def close(self) -> None:
        for node in self.nodes:
            node.close()

    def __enter__(self) -> RedisCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()
