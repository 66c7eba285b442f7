"""``kvtier server``: the pool's rules, the CLI, the socket and segment files, and hostile or dying clients.

The pool is tested directly (pure bookkeeping); everything else runs a real server subprocess
(``node_server_proc``) and talks to it with the wire protocol itself, no mocks.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest
from node_server_proc import NodeServerProcess

from kvtier.storage_backends import node_protocol as proto
from kvtier.storage_backends.node_pool import NodePool
from kvtier.storage_backends.node_segments import remove_stale_segments

MiB = 2**20


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """A short folder for sockets (a Unix socket path must stay under 108 bytes; pytest's tmp_path may not)."""
    folder = Path(tempfile.mkdtemp(prefix="kvn-", dir="/tmp"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def _connect(path: str | Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(5)
    sock.connect(str(path))
    return sock


def _ask(sock: socket.socket, op: str, **fields: object) -> dict:
    proto.send(sock, {"op": op, **fields})
    reply = proto.FrameReader(sock).read(time.monotonic() + 5)  # one answer is outstanding: nothing more to buffer
    assert reply is not None and reply["ok"] is True, reply
    return reply


def _stats(path: str | Path) -> dict:
    with _connect(path) as sock:
        return _ask(sock, proto.STATS)["stats"]


def _wait_for(predicate, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def _my_segments() -> set[str]:
    uid = os.getuid()
    return {n for n in os.listdir(proto.SHM_DIR) if (m := proto.SEGMENT_RE.fullmatch(n)) and int(m.group(1)) == uid}


# -- the pool ------------------------------------------------------------------------------------------------------


def test_pool_lru_multi_slot_and_no_eviction_for_nothing() -> None:
    pool = NodePool(num_slots=4, slot_bytes=100)
    assert pool.reserve(1, [("a", 150), ("b", 100)]) == [[0, 1], [2]]  # 150 bytes take two slots
    assert pool.commit(1, ["a", "b"]) == 2 and pool.contains(["a", "b", "c"]) == 2
    lease, entries = pool.get(2, ["a"])  # a is read (and so the most recent): b is the LRU victim
    assert entries == [([0, 1], 150)]
    assert pool.reserve(1, [("c", 200)]) == [[2, 3]]  # one free slot + b's
    assert pool.commit(1, ["c"]) == 1 and pool.contains(["b"]) == 0 and pool.stats()["evicted_chunks"] == 1
    assert pool.reserve(1, [("d", 400)]) == [None]  # would need a, which a lease holds: nothing is evicted
    assert pool.contains(["a"]) == 1 and pool.contains(["c"]) == 1
    assert pool.reserve(1, [("e", 401)]) == [None]  # larger than the pool
    pool.release(2, [lease])
    assert pool.reserve(1, [("d", 400)]) == [[0, 1, 2, 3]]
    assert pool.stats()["entries"] == 0


def test_pool_delete_under_a_lease_frees_at_release_and_owners_are_dropped() -> None:
    pool = NodePool(num_slots=2, slot_bytes=10)
    pool.reserve(1, [("a", 10)])
    pool.commit(1, ["a"])
    lease, _ = pool.get(7, ["a"])
    assert pool.delete(["a"]) == 1 and pool.stats()["free_slots"] == 1  # still read: not reusable yet
    pool.release(8, [lease])  # another owner's release is ignored
    assert pool.stats()["free_slots"] == 1
    pool.release(7, [lease])
    assert pool.stats()["free_slots"] == 2
    pool.reserve(3, [("x", 10)])
    pool.get(3, ["nothing"])  # no hit: no lease
    pool.reserve(4, [("y", 10)])
    pool.commit(4, ["y"])
    pool.get(3, ["y"])
    assert pool.drop_owner(3) == (1, 1)
    assert pool.stats()["leases"] == 0 and pool.stats()["reservations"] == 0 and pool.stats()["free_slots"] == 1


def test_pool_places_a_chunk_in_adjacent_slots_inside_one_segment_when_it_can() -> None:
    pool = NodePool(num_slots=8, slot_bytes=10, slots_per_segment=4)
    assert pool.reserve(1, [(k, 10) for k in "abcdefgh"]) == [[i] for i in range(8)]
    pool.commit(1, list("abcdefgh"))
    pool.delete(["b", "d", "e", "g", "h"])  # free: 1, 3 | 4, 6, 7
    assert pool.reserve(1, [("two", 20)]) == [[6, 7]]  # 3 and 4 are adjacent but in two segments
    assert pool.reserve(1, [("three", 30)]) == [[1, 3, 4]]  # no run of three: the lowest free ones
    assert pool.stats()["free_slots"] == 0


def test_pool_holds_do_not_expire_and_end_with_release_or_their_connection() -> None:
    now = [0.0]
    pool = NodePool(num_slots=2, slot_bytes=10, lease_timeout_s=5, clock=lambda: now[0])
    pool.reserve(1, [("a", 10), ("b", 10)])
    pool.commit(1, ["a", "b"])
    held, _ = pool.get(2, ["a"], hold=True)
    pool.get(3, ["b"], hold=True)
    now[0] = 1000.0
    assert pool.delete(["a", "b"]) == 2
    stats = pool.stats()
    assert stats["holds"] == 2 and stats["expired_leases"] == 0 and stats["free_slots"] == 0
    pool.release(2, [held])
    assert pool.drop_owner(3) == (1, 0)
    assert pool.stats()["holds"] == 0 and pool.stats()["free_slots"] == 2


def test_pool_plain_leases_expire_reservations_only_with_their_connection() -> None:
    """A reservation that expired could go to another writer while the first, resumed, still copies
    into it: reservations end by commit or with their connection, never by time."""
    now = [0.0]
    pool = NodePool(num_slots=2, slot_bytes=10, lease_timeout_s=5, clock=lambda: now[0])
    pool.reserve(1, [("a", 10)])
    pool.commit(1, ["a"])
    pool.get(1, ["a"])
    pool.reserve(1, [("b", 10)])
    now[0] = 6.0
    assert pool.reserve(2, [("c", 10)]) == [[0]]  # a's lease expired (a is evicted), b's slot stays reserved
    assert pool.commit(1, ["b"]) == 1
    stats = pool.stats()
    assert stats["leases"] == 0 and stats["expired_leases"] == 1 and stats["reservations"] == 1
    assert pool.drop_owner(2) == (0, 1) and pool.stats()["free_slots"] == 1


# -- the command ---------------------------------------------------------------------------------------------------


def _cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvtier.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_server_help_names_every_option() -> None:
    done = _cli("server", "--help")
    assert done.returncode == 0
    for option in ("--socket", "--max-bytes", "--slot-bytes", "--lease-timeout-s", "4GiB", "1MiB", "XDG_RUNTIME_DIR"):
        assert option in done.stdout, option


@pytest.mark.parametrize(("args", "named"), [
    (["--max-bytes", "lots"], "--max-bytes 'lots'"),
    (["--slot-bytes", "0"], "--slot-bytes '0'"),
    (["--max-bytes", "1MiB", "--slot-bytes", "2MiB"], "--max-bytes"),
    (["--slot-bytes", "2GiB"], "segment size"),
    (["--lease-timeout-s", "soon"], "--lease-timeout-s 'soon'"),
    (["--lease-timeout-s", "0"], "--lease-timeout-s 0"),
])
def test_bad_option_values_exit_2_naming_them(args: list[str], named: str, sock_dir: Path) -> None:
    done = _cli("server", "--socket", str(sock_dir / "s"), *args)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("error: ") and named in done.stderr and done.stdout == ""
    assert not (sock_dir / "s").exists()


def test_ready_line_modes_and_clean_exit(sock_dir: Path) -> None:
    path = sock_dir / "run" / "node.sock"
    before = _my_segments()
    with NodeServerProcess(path, max_bytes="3MiB", slot_bytes="512KiB") as srv:
        assert srv.ready_line == f"kvtier server: ready on {path} (3MiB in 6 slots of 512KiB)"
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600 and stat.S_ISSOCK(os.stat(path).st_mode)
        assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
        hello = _ask(_connect(path), proto.HELLO)
        names = [name for name, _ in hello["segments"]]
        assert all(f"-{os.getuid()}-{srv.pid}-" in n for n in names)
        for name in names:
            assert stat.S_IMODE(os.stat(os.path.join(proto.SHM_DIR, name)).st_mode) == 0o600
        assert sum(size for _, size in hello["segments"]) == 3 * MiB
    assert not path.exists() and _my_segments() == before  # SIGTERM: socket and segments removed


def test_sigint_cleans_up_too_and_default_socket_follows_xdg(sock_dir: Path) -> None:
    env = {**os.environ, "XDG_RUNTIME_DIR": str(sock_dir)}
    proc = subprocess.Popen([sys.executable, "-m", "kvtier.cli", "server", "--max-bytes", "2MiB"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith(f"kvtier server: ready on {sock_dir}/kvtier/node.sock"), proc.stderr.read()
        assert stat.S_IMODE(os.stat(sock_dir / "kvtier").st_mode) == 0o700
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0
    finally:
        proc.kill()
        proc.wait()
    assert not (sock_dir / "kvtier" / "node.sock").exists()
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("XDG_RUNTIME_DIR", raising=False)
        mp.setenv("HOME", str(sock_dir))
        assert proto.default_socket_path() == f"{sock_dir}/.cache/kvtier/run/node.sock"
        mp.setenv("XDG_RUNTIME_DIR", str(sock_dir / "absent"))
        assert proto.default_socket_path() == f"{sock_dir}/.cache/kvtier/run/node.sock"


def test_second_server_refused_stale_socket_replaced(sock_dir: Path) -> None:
    path = sock_dir / "node.sock"
    srv = NodeServerProcess(path, max_bytes="2MiB").start()
    try:
        done = _cli("server", "--socket", str(path), "--max-bytes", "2MiB")
        assert done.returncode == 1 and "another kvtier server is running on" in done.stderr
        srv.kill()  # the socket file stays behind, nobody answers on it
        assert path.exists()
        srv.start()  # a new server replaces it
        assert _stats(path)["pid"] == srv.pid
    finally:
        srv.stop()
    path.write_text("not a socket")
    done = _cli("server", "--socket", str(path), "--max-bytes", "2MiB")
    assert done.returncode == 1 and "is not a socket" in done.stderr and path.read_text() == "not a socket"


def test_stale_segments_of_dead_servers_are_removed_live_ones_kept(sock_dir: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = Path(proto.SHM_DIR, proto.segment_name(os.getuid(), dead.pid, "0badf00d", 0))
    stale.write_bytes(b"x" * 4096)
    other_user = Path(proto.SHM_DIR, proto.segment_name(os.getuid() + 1, dead.pid, "0badf00d", 0))
    other_user.write_bytes(b"x")
    try:
        with NodeServerProcess(sock_dir / "a.sock", max_bytes="2MiB") as live:
            live_names = {n for n, _ in _ask(_connect(live.socket_path), proto.HELLO)["segments"]}
            assert not stale.exists()  # removed when the server started
            assert other_user.exists()  # not this uid's: never touched
            stale.write_bytes(b"x")
            assert stale.name in remove_stale_segments()  # what a second server start does
            assert live_names <= set(os.listdir(proto.SHM_DIR))  # the live server's are locked: kept
    finally:
        stale.unlink(missing_ok=True)
        other_user.unlink(missing_ok=True)


# -- clients that break the protocol or die ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server() -> Iterator[NodeServerProcess]:
    folder = tempfile.mkdtemp(prefix="kvn-", dir="/tmp")
    with NodeServerProcess(Path(folder) / "node.sock", max_bytes="16MiB",
                           extra_args=["--lease-timeout-s", "1"]) as srv:
        yield srv
    shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.parametrize("frame", [
    b"\x00\x00\x00\x05garbage",  # not msgpack
    struct.pack(">I", 2**31) + b"x",  # an oversized length
    struct.pack(">I", 0),  # an empty frame
    proto.HEADER.pack(3) + msgpack.packb([1, 2]),  # msgpack, but not a map
    proto.pack({"op": "format-disk"}),  # an unknown request
    proto.pack({"op": "get", "keys": "k" * 10}),  # keys that are not a list
    proto.pack({"op": "reserve", "items": [["k", -5]]}),  # a negative size
    proto.pack({"op": "reserve", "items": [["k", 1.5]]}),  # a size that is not an integer
    proto.HEADER.pack(20001) + b"\x91" * 20000 + b"\x00",  # arrays nested 20000 deep
])
def test_hostile_frames_close_that_connection_only(server: NodeServerProcess, frame: bytes) -> None:
    bystander = _connect(server.socket_path)
    _ask(bystander, proto.HELLO)
    with _connect(server.socket_path) as sock:
        try:
            sock.sendall(frame)
            assert sock.recv(1) == b""  # closed without an answer
        except ConnectionResetError:
            pass
    assert _ask(bystander, proto.CONTAINS, keys=["a"])["count"] == 0  # the server and others go on
    assert server.proc.poll() is None


def test_absurd_sizes_are_refused_not_fatal(server: NodeServerProcess) -> None:
    with _connect(server.socket_path) as sock:
        assert _ask(sock, proto.RESERVE, items=[["huge", 2**64 - 1], ["ok", 10]])["slots"][0] is None
        assert _ask(sock, proto.GET, keys=["x" * proto.MAX_KEY_LEN])["entries"] == [None]


def test_frame_reader_splits_joined_frames_and_joins_split_ones() -> None:
    ours, peer = socket.socketpair()
    with ours, peer:
        reader = proto.FrameReader(ours)
        first, second = proto.pack({"op": "a"}), proto.pack({"op": "b", "keys": ["k" * 200] * 300})
        peer.sendall(first + second[:7])  # one frame and the start of the next in one write
        assert reader.read(time.monotonic() + 5) == {"op": "a"}
        for i in range(7, len(second), 4096):
            peer.sendall(second[i : i + 4096])
        assert reader.read(time.monotonic() + 5)["op"] == "b"
        peer.sendall(first[:3])
        with pytest.raises(TimeoutError):
            reader.read(body_timeout_s=0.2)  # a frame begun and not finished in time
        peer.close()
        with pytest.raises(ConnectionResetError):
            reader.read(time.monotonic() + 5)  # the stream ends mid-frame


def test_frame_reader_clean_end_deadline_and_bad_length() -> None:
    ours, peer = socket.socketpair()
    with ours, peer:
        reader = proto.FrameReader(ours)
        with pytest.raises(TimeoutError):
            reader.read(time.monotonic() + 0.1)  # nothing comes
        peer.sendall(proto.HEADER.pack(proto.MAX_FRAME + 1))
        with pytest.raises(proto.ProtocolError, match="out of range"):
            reader.read(time.monotonic() + 5)
    ours, peer = socket.socketpair()
    with ours:
        peer.close()
        assert proto.FrameReader(ours).read(time.monotonic() + 5) is None  # closed between frames


def test_requests_in_one_write_are_answered_in_order(server: NodeServerProcess) -> None:
    with _connect(server.socket_path) as sock:
        _ask(sock, proto.RESERVE, items=[["joined", 100]])
        _ask(sock, proto.COMMIT, keys=["joined"])
        lease = _ask(sock, proto.GET, keys=["joined"], hold=True)["lease"]
        sock.sendall(proto.pack({"op": proto.RELEASE, "leases": [lease]})  # one-way: no answer
                     + proto.pack({"op": proto.CONTAINS, "keys": ["joined", "absent"]})
                     + proto.pack({"op": proto.STATS}))
        reader = proto.FrameReader(sock)
        assert reader.read(time.monotonic() + 5)["count"] == 1
        assert reader.read(time.monotonic() + 5)["stats"]["leases"] == 0  # the release came first


def test_a_stalled_half_frame_does_not_block_others(server: NodeServerProcess) -> None:
    with _connect(server.socket_path) as stalled:
        stalled.sendall(proto.HEADER.pack(100) + b"\x81")  # a header and one byte, then nothing
        assert _stats(server.socket_path)["num_slots"] == 16


def test_lease_expiry_frees_slots(server: NodeServerProcess) -> None:
    with _connect(server.socket_path) as sock:
        _ask(sock, proto.RESERVE, items=[["lease-x", 100]])
        _ask(sock, proto.COMMIT, keys=["lease-x"])
        lease = _ask(sock, proto.GET, keys=["lease-x"])["lease"]
        assert lease is not None and _stats(server.socket_path)["leases"] >= 1
        assert _wait_for(lambda: _stats(server.socket_path)["leases"] == 0, 5)  # 1 s lease timeout
        proto.send(sock, {"op": proto.RELEASE, "leases": [lease]})  # late: harmless
        _ask(sock, proto.DELETE, keys=["lease-x"])
        assert _stats(server.socket_path)["expired_leases"] >= 1


CLIENT = textwrap.dedent("""
    import socket, sys, time
    from kvtier.storage_backends import node_protocol as proto
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(sys.argv[1])
    reader = proto.FrameReader(sock)
    def ask(op, **kw):
        proto.send(sock, {"op": op, **kw})
        return reader.read()
    ask("reserve", items=[["held-a", 3000000]])
    ask("commit", keys=["held-a"])
    ask("get", keys=["held-a"])              # a read lease, never released
    ask("reserve", items=[["held-b", 2000000]])  # a reservation, never committed
    print("holding", flush=True)
    time.sleep(60)
""")


def test_a_killed_client_loses_its_leases_and_reservations(sock_dir: Path) -> None:
    with NodeServerProcess(sock_dir / "n.sock", max_bytes="8MiB") as srv:
        client = subprocess.Popen([sys.executable, "-c", CLIENT, srv.socket_path], stdout=subprocess.PIPE, text=True)
        try:
            assert client.stdout.readline().strip() == "holding"
            stats = _stats(srv.socket_path)
            assert stats["leases"] == 1 and stats["reservations"] == 1 and stats["free_slots"] == 8 - 3 - 2
            client.send_signal(signal.SIGKILL)
            client.wait(timeout=10)
        finally:
            client.kill()
            client.wait()
        assert _wait_for(lambda: _stats(srv.socket_path)["reservations"] == 0)
        stats = _stats(srv.socket_path)
        assert stats["leases"] == 0 and stats["dropped_leases"] == 1 and stats["dropped_reservations"] == 1
        assert stats["free_slots"] == 8 - 3 and stats["entries"] == 1  # the committed chunk stays cached
        assert "freed" in srv.log()
