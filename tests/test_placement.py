"""Where a sweep's work runs on a multi-node cluster, and the storage check that guards it.

The slow tests start a real two-node Ray cluster in subprocesses (``ray start``, token authentication
on, one fake GPU per node) and run the sweep driver against it in another subprocess: the pytest
process may already hold the session's in-process Ray. The second node runs in its own mount
namespace where one folder is a private tmpfs: to that node the folder is what a failed shared mount
leaves, a local folder of the same name.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import psutil
import pytest

from tune.nodes import SharedStorageError, check_shared_storage

REPO = Path(__file__).resolve().parent.parent
RAY_BIN = Path(sys.executable).parent / "ray"
DRIVER = ("import sys; from tune.ablate import main; "
          "sys.exit(main(sys.argv[1:], trial_hooks=['tests.placement_hooks:record']))")
# Waits for both nodes and prints {label: node ID}; each node carries a custom resource "hsae_<label>".
PROBE = """
import json, sys, time, ray
ray.init(address=sys.argv[1], log_to_driver=False)
deadline = time.time() + 90
while len(nodes := [n for n in ray.nodes() if n["Alive"]]) < 2 and time.time() < deadline:
    time.sleep(0.5)
print(json.dumps({k[5:]: n["NodeID"] for n in nodes for k in n["Resources"] if k.startswith("hsae_")}))
"""


def marker_files(*folders: Path) -> list[Path]:
    return [p for f in folders for p in f.glob(".hsae-shared-*")]


# ----------------------------------------------------------------------------------- the check, unit level


def test_storage_check_passes_on_the_session_cluster(ray_session, tmp_path):
    folders = {"results": tmp_path / "r", "cache": tmp_path / "c"}
    alive = [n for n in ray_session.nodes() if n["Alive"]]
    assert check_shared_storage(ray_session, folders) == len(alive) == 1
    assert marker_files(*folders.values()) == []  # the driver's markers are removed again


def test_storage_check_refuses_a_folder_it_cannot_write(ray_session, tmp_path):
    with pytest.raises(SharedStorageError, match=r"the cache folder /proc/hsae-cache is not writable here"):
        check_shared_storage(ray_session, {"results": tmp_path / "r", "cache": "/proc/hsae-cache"})


class FakeRay:
    """The part of Ray the check uses, for nodes whose file systems differ: each alive node reads a path
    through its own ``view`` (None: the node never answers; a view may raise, as Ray does for a task whose
    node died). Every node has the same IP, as on one host."""

    def __init__(self, views: dict[str, Callable[[str], str] | None]) -> None:
        self.views = views

    def nodes(self) -> list[dict[str, Any]]:
        alive = [{"NodeID": nid, "NodeManagerAddress": "10.0.0.5", "Alive": True} for nid in self.views]
        return [*alive, {"NodeID": "f" * 56, "NodeManagerAddress": "10.0.0.5", "Alive": False}]

    def remote(self, **_: Any) -> Callable[[Callable[[str], Any]], Any]:
        fake = self

        class Remote:
            def __init__(self, fn: Callable[[str], Any]) -> None:
                self.fn = fn

            def options(self, scheduling_strategy: Any) -> Any:
                view = fake.views[scheduling_strategy.node_id]
                return type("Bound", (), {"remote": lambda _, path: (self.fn, view, path)})()

        return Remote

    def wait(self, refs: list[Any], num_returns: int, timeout: float) -> tuple[list[Any], list[Any]]:
        return [r for r in refs if r[1] is not None], [r for r in refs if r[1] is None]

    def get(self, ref: Any) -> Any:
        fn, view, path = ref
        return fn(view(path))

    def cancel(self, ref: Any, force: bool) -> None:
        pass


def test_storage_check_names_each_node_that_reads_another_folder(tmp_path):
    shared, local = tmp_path / "shared", tmp_path / "node-b-local"
    # Node b's mount failed: at the shared path it reads its own local folder of the same name.
    a, b, c, d = "a" * 56, "b" * 56, "c" * 56, "d" * 56

    def died(path: str) -> str:
        raise RuntimeError("the node died")

    ray = FakeRay({a: lambda p: p, b: lambda p: p.replace(str(shared), str(local)), c: None, d: died})
    with pytest.raises(SharedStorageError) as err:
        check_shared_storage(ray, {"results": shared / "r", "cache": shared / "c"}, timeout_s=1)
    message = str(err.value)
    assert f"node {b} (10.0.0.5) does not see the results folder {(shared / 'r').resolve()}" in message
    assert f"node {b} (10.0.0.5) does not see the cache folder {(shared / 'c').resolve()}" in message
    assert f"node {c} (10.0.0.5) did not answer the check of the results folder" in message
    assert f"node {d} (10.0.0.5) could not check the cache folder {(shared / 'c').resolve()}: RuntimeError" in message
    assert a not in message and "f" * 56 not in message  # node a sees both; a dead node is not asked
    assert marker_files(shared / "r", shared / "c") == []


# ------------------------------------------------------------------------------ a two-node cluster


@dataclass
class TwoNodes:
    address: str
    env: dict[str, str]  # what the nodes run with; a driver with it carries the cluster's token
    root: Path
    hidden: Path  # a private tmpfs on the second node when ``hides``
    log: Path  # where tests.placement_hooks writes
    ids: dict[str, str]  # "head" / "second" -> node ID
    hides: bool


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def can_hide_a_folder(root: Path) -> bool:
    """Whether this host lets an unprivileged process mount a tmpfs in its own mount namespace."""
    if shutil.which("unshare") is None:
        return False
    probe = root / "probe"
    probe.mkdir()
    cmd = ["unshare", "-Urm", "mount", "-t", "tmpfs", "hsae-probe", str(probe)]
    return subprocess.run(cmd, capture_output=True).returncode == 0


def node_command(label: str, ip: str, port: int, root: Path) -> list[str]:
    # Fixed ports would collide with other Ray instances on this host; the dashboard UI is not needed.
    where = ["--head", f"--port={port}", f"--temp-dir={root / 'ray'}", f"--dashboard-port={free_port()}",
             "--include-dashboard=false"] if label == "head" else [f"--address={ip}:{port}"]
    return [str(RAY_BIN), "start", "--block", *where, f"--node-ip-address={ip}",
            f"--dashboard-agent-listen-port={free_port()}", "--num-cpus=2", "--num-gpus=1",
            f"--object-store-memory={200 * 1024 ** 2}", f"--resources={json.dumps({f'hsae_{label}': 1})}",
            "--disable-usage-stats"]


def start_node(cmd: list[str], env: dict[str, str], log: Path, hide: Path | None) -> subprocess.Popen:
    if hide is not None:  # the node sees an empty tmpfs at ``hide``; the mount dies with its namespace
        cmd = ["unshare", "-Urm", "sh", "-c", 'mount -t tmpfs hsae-not-shared "$0" && exec "$@"', str(hide), *cmd]
    with log.open("w") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def wait_for_log(proc: subprocess.Popen, log: Path, text: str, timeout_s: float = 90) -> None:
    deadline = time.time() + timeout_s
    while text not in log.read_text():
        assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
        time.sleep(0.3)


def stop_cluster(marker: str, procs: list[subprocess.Popen]) -> None:
    """Stop every process this fixture started: the ``ray start`` processes, their descendants, and
    whatever carries the fixture's environment marker (workers whose raylet died first). SIGTERM, then
    SIGKILL: Ray's daemons can take over 10 s to obey SIGTERM. Never ``ray stop``: it would stop every
    Ray on the host, the session's and other users' too."""
    ours = {p.pid: p for p in psutil.process_iter() if process_env(p).get("HSAE_TEST_CLUSTER") == marker}
    for proc in procs:
        try:
            root = psutil.Process(proc.pid)
            ours.update({p.pid: p for p in [root, *root.children(recursive=True)]})
        except psutil.NoSuchProcess:
            pass
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in ours.values():
            try:
                p.send_signal(sig)
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(list(ours.values()), timeout=3)
        ours = {p.pid: p for p in alive}
    for proc in procs:
        proc.wait(timeout=10)  # reaped: no zombie outlives the test
    assert not ours, f"processes left running: {list(ours)}"


def process_env(p: psutil.Process) -> dict[str, str]:
    try:
        return p.environ()
    except (psutil.Error, OSError):
        return {}


@pytest.fixture(scope="module")
def two_nodes() -> Iterator[TwoNodes]:
    from ray._private.services import get_node_ip_address

    root = Path(tempfile.mkdtemp(prefix="hsae-2n-"))  # short: Ray's socket paths live under it
    token = root / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    hidden, log = root / "hidden", root / "placement"
    hidden.mkdir()
    log.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token), RAY_USAGE_STATS_ENABLED="0",
               HSAE_PLACEMENT_LOG=str(log), HSAE_TEST_CLUSTER=str(root),
               PYTHONPATH=os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]))
    ip, port, hides = get_node_ip_address(), free_port(), can_hide_a_folder(root)
    procs: list[subprocess.Popen] = []
    try:
        procs.append(start_node(node_command("head", ip, port, root), {**env, "HSAE_TEST_NODE": "head"},
                                root / "head.log", None))
        wait_for_log(procs[0], root / "head.log", "Ray runtime started")
        procs.append(start_node(node_command("second", ip, port, root), {**env, "HSAE_TEST_NODE": "second"},
                                root / "second.log", hidden if hides else None))
        wait_for_log(procs[1], root / "second.log", "Ray runtime started")
        probe = subprocess.run([sys.executable, "-c", PROBE, f"{ip}:{port}"], env=env, capture_output=True,
                               text=True, timeout=150)
        assert probe.returncode == 0, probe.stderr[-3000:]
        ids = json.loads(probe.stdout.strip().splitlines()[-1])
        assert set(ids) == {"head", "second"}, (ids, (root / "second.log").read_text()[-3000:])
        yield TwoNodes(f"{ip}:{port}", env, root, hidden, log, ids, hides)
    finally:
        stop_cluster(str(root), procs)
        shutil.rmtree(root, ignore_errors=True)


def run_driver(cluster: TwoNodes, out: Path, *args: str, env: dict[str, str] | None = None,
               timeout_s: float = 540) -> subprocess.CompletedProcess:
    argv = ["--profile", "tiny", "--address", cluster.address, "--out", str(out),
            "--cache", str(cluster.root / "cache"), *args]
    return subprocess.run([sys.executable, "-c", DRIVER, *argv], cwd=REPO, env=env or cluster.env,
                          capture_output=True, text=True, timeout=timeout_s)


def hook_records(log: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(log.glob("*.json"))]


def one_relu_space(tmp_path: Path) -> Path:
    space = tmp_path / "one-relu.yaml"
    space.write_text("trials:\n  - variant: relu\n")
    return space


@pytest.mark.slow
def test_server_takes_a_gpu_trials_share_the_other_node_and_every_row_arrives(two_nodes, tmp_path):
    out = two_nodes.root / "results"
    done = run_driver(two_nodes, out, "--space", str(one_relu_space(tmp_path)), "--seeds", "2", "--steps", "20",
                      "--gpus-per-trial", "0.5", "--no-eval")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    records = hook_records(two_nodes.log)
    servers = {json.dumps(r["server"], sort_keys=True) for r in records if "server" in r}
    assert len(servers) == 1, servers  # every trial found the same server actor
    server = json.loads(servers.pop())
    # The server is the one process that holds the language model: a whole GPU of the node it sits on.
    assert server["assigned"] == {"CPU": 1.0, "GPU": 1.0} and len(server["gpu_ids"]) == 1
    assert server["node"] == two_nodes.ids[server["label"]]
    trials = {r["trial"] for r in records}
    assert len(trials) == 2
    for r in records:
        # That node's only GPU is the server's, so each trial must run on the other node, with the half
        # GPU it asked for (both trials fit on that node's one GPU).
        assert r["node"] != server["node"] and r["node"] == two_nodes.ids[r["label"]], r
        assert r["assigned"] == {"CPU": 1.0, "GPU": 0.5} and len(r["gpu_ids"]) == 1, r
    # Before any trial fetched, the shards were on the server's node only: the first trial to look (at its
    # step 0, before its own fetch) finds no copy on its node. Later copies came from the trials' fetches.
    assert any(r["node"] not in shard["nodes"] for r in records if r["step"] == 0 for shard in r["shards"])
    for trial in trials:
        last = max((r for r in records if r["trial"] == trial), key=lambda r: r["step"])
        assert last["step"] > 0  # recorded after the trial fetched its shards
        for shard in last["shards"]:
            # Put by the server's actor on its node, and copied into the trial's node's object store by
            # the trial's fetch: the activations crossed nodes through the object store.
            assert shard["put_by_actor"] == server["actor"], shard
            assert {server["node"], last["node"]} <= set(shard["nodes"]), shard
    rows = pd.read_parquet(out / "trials.parquet").set_index("trial_id")
    assert sorted(rows.index) == sorted(trials)  # the rows written on the non-server node reached the results
    assert (rows["status"] == "completed").all(), rows["status"]


@pytest.mark.slow
def test_sweep_refuses_a_results_folder_one_node_does_not_see(two_nodes, tmp_path):
    if not two_nodes.hides:
        pytest.skip("this host lets no unprivileged process mount in its own namespace (unshare -Urm)")
    out = two_nodes.hidden / "r"
    done = run_driver(two_nodes, out, "--space", str(one_relu_space(tmp_path)), "--steps", "20", "--no-eval",
                      timeout_s=300)
    assert done.returncode == 2, done.stdout[-3000:] + done.stderr[-3000:]
    ip = two_nodes.address.rpartition(":")[0]
    assert f"node {two_nodes.ids['second']} ({ip}) does not see the results folder {out.resolve()}" in done.stderr
    assert two_nodes.ids["head"] not in done.stderr  # the head sees it; the cache is seen by both
    assert "activations ready" not in done.stdout  # refused before the server started
    assert not (out / "trials.parquet").exists()


@pytest.mark.slow
def test_cluster_refuses_a_driver_with_another_token(two_nodes, tmp_path):
    # RAY_AUTH_TOKEN outranks RAY_AUTH_TOKEN_PATH: this driver presents a token the cluster never issued.
    env = {**two_nodes.env, "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    done = run_driver(two_nodes, tmp_path / "r", "--space", str(one_relu_space(tmp_path)), env=env, timeout_s=240)
    assert done.returncode == 2, done.stdout[-3000:] + done.stderr[-3000:]
    assert "cannot connect to a Ray cluster" in done.stderr and "InvalidAuthToken" in done.stderr
