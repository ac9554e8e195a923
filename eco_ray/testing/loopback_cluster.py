"""A real multi-node Ray cluster on one machine: one head and worker nodes on loopback, each its own raylet.

Every node is a ``ray start --block`` process in its own process group, with its own temp dir, ports and
logical CPUs (so several nodes can share two physical cores). It is built like the shipped KubeRay clusters:
a head with no CPUs for tasks (only the GCS, the dashboard for job submission, and actors that ask for no
CPU), worker nodes that do the work, and Ray token authentication on. The token lives only in the
environment of the processes this starts (``RAY_AUTH_TOKEN``), never on disk.

Two traps this avoids:
- ``ray.init()`` with no address joins the newest cluster recorded in ``<temp dir>/ray_current_cluster``;
  started with the default temp dir (``/tmp/ray``), a test cluster would capture every later local run on
  the machine. Each node here has its own temp dir, so nothing is written to ``/tmp/ray``.
- ``ray stop`` stops every Ray node on the machine. A node is lost here by SIGKILL to its raylet's PID
  (what a preempted or OOM-killed pod looks like to the cluster); the cluster is torn down by the process
  groups it started.

Used by tests/test_multinode.py and by ``scripts/loopback-cluster`` (a cluster to try the cluster path by hand).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

RESOURCE_PREFIX = "loopback-node-"  # every node has one unit of its own resource: pins work to it, names it
OBJECT_STORE_BYTES = 200 * 1024 * 1024  # per node; Ray's default (30% of RAM each) would overcommit /dev/shm
WORKER_PORTS_PER_NODE = 400
START_TRIES = 3  # per worker node


class ClusterUnavailable(RuntimeError):
    """``ray start`` cannot run a cluster here (no ray executable, not Linux, a node that never came up)."""


class NodeStartFailed(ClusterUnavailable):
    """A node's ``ray start`` exited before the node was up."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _children() -> dict[int, list[int]]:
    """ppid -> pids, from /proc (Linux)."""
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        tree.setdefault(ppid, []).append(int(entry))
    return tree


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def descendants(pid: int) -> list[int]:
    tree, out, todo = _children(), [], [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


@dataclass
class Node:
    name: str
    num_cpus: int
    head: bool
    temp_dir: Path
    log: Path
    proc: subprocess.Popen
    killed_at: float | None = None
    ports: dict = field(default_factory=dict)
    node_id: str | None = None  # Ray's, once the cluster has shown the node alive
    starts: int = 1  # tries of `ray start` it took

    @property
    def running(self) -> bool:
        return self.proc.poll() is None and self.killed_at is None


class LoopbackCluster:
    """Start with :meth:`start` (the head and the given worker nodes), lose a node with :meth:`kill_node`, add
    one with :meth:`add_node`, tear everything down with :meth:`shutdown` (or use it as a context manager).

    ``token``: the cluster's auth token (``RAY_AUTH_TOKEN``); ``env``: more environment for every node (what a
    pod's spec would set: tracking URIs, secrets); ``health_check_s``: how often the GCS checks a raylet, five
    missed checks mark the node dead (Ray's default is 3 s: a lost node shows after ~15 s).
    """

    def __init__(self, root: str | Path, *, token: str, env: dict | None = None, health_check_s: float = 1.0,
                 object_store_bytes: int = OBJECT_STORE_BYTES):
        if not sys.platform.startswith("linux"):
            raise ClusterUnavailable("a loopback cluster needs Linux (/proc to find each node's raylet)")
        self.ray = shutil.which("ray", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
        if self.ray is None:
            raise ClusterUnavailable("no `ray` executable next to this Python or on PATH")
        if not token:
            raise ValueError("a loopback cluster runs with token authentication: give it a token")
        self.root = Path(root)
        self.token, self.extra_env = token, dict(env or {})
        self.health_check_ms = int(health_check_s * 1000)
        self.object_store_bytes = object_store_bytes
        self.nodes: dict[str, Node] = {}
        self.gcs_port = self.dashboard_port = None
        self._lock = threading.Lock()  # nodes may be added from several threads (replacements while work runs)
        # each node its own worker-port range, and each cluster its own block of ranges (below the ephemeral ports)
        self._next_worker_port = 20000 + (os.getpid() % 10) * 1000

    # --------------------------------------------------------------------------------------- addresses
    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def client_env(self, base: dict | None = None) -> dict:
        """The environment of a driver or CLI (``ray job submit``, ``eco-ray --address``) talking to it."""
        env = {**(os.environ if base is None else base), **self.extra_env}
        env.update(RAY_ADDRESS=self.address, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token,
                   RAY_ENABLE_UV_RUN_RUNTIME_ENV="0")
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        return env

    def _node_env(self) -> dict:
        env = self.client_env()
        env.pop("RAY_ADDRESS")
        # read by the GCS (on the head): how quickly a node whose raylet stopped answering is declared dead
        env.update(RAY_health_check_period_ms=str(self.health_check_ms), RAY_health_check_timeout_ms=str(
            self.health_check_ms), RAY_health_check_failure_threshold="5")
        return env

    # ------------------------------------------------------------------------------------------ nodes
    def start(self, workers: dict[str, int], timeout: float = 120) -> "LoopbackCluster":
        """The head (0 CPUs) and one worker node per ``{name: logical CPUs}``; returns once all are alive."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.gcs_port, self.dashboard_port = _free_port(), _free_port()
        head_args = ["--head", f"--port={self.gcs_port}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                     f"--dashboard-port={self.dashboard_port}", f"--ray-client-server-port={_free_port()}"]
        try:
            self._start_node("head", 0, head_args, timeout)
            for name, cpus in workers.items():
                self._start_worker(name, cpus, timeout)
            self.wait_for_nodes(len(workers) + 1, timeout)
        except BaseException:
            self.shutdown()
            raise
        return self

    def add_node(self, name: str, num_cpus: int, timeout: float = 120) -> Node:
        """Another worker node (a replacement for a lost one, or more capacity); returns once it is alive."""
        node = self._start_worker(name, num_cpus, timeout)
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                if name in self.alive():
                    return node
            except OSError:
                pass
            time.sleep(0.5)
        raise ClusterUnavailable(f"node {name!r} started but the cluster does not show it alive")

    def _start_worker(self, name: str, num_cpus: int, timeout: float) -> Node:
        """A worker node, started again (as Kubernetes restarts a pod that failed) when its ``ray start`` gives up:
        Ray waits a fixed 30 s for a new raylet to register with the GCS, which a loaded machine can exceed.
        ``Node.starts`` counts the tries."""
        for start in range(1, START_TRIES + 1):
            try:
                node = self._start_node(name, num_cpus, [f"--address={self.address}"], timeout)
            except NodeStartFailed:
                self._forget_failed(name)
                if start == START_TRIES:
                    raise
                continue
            node.starts = start
            return node
        raise AssertionError("unreachable")

    def _forget_failed(self, name: str) -> None:
        """Remove every trace of a node whose ``ray start`` failed, so a new try starts clean: its processes (found
        by its temp dir: a raylet outlives the ``ray start`` that gave up on it), its temp dir, and its entry in
        the GCS (a raylet that registered late is shown dead before the name is used again)."""
        with self._lock:
            node = self.nodes.pop(name)
        marker = str(node.temp_dir).encode()
        for entry in os.listdir("/proc"):
            if entry.isdigit() and int(entry) != os.getpid():
                try:
                    args = Path(f"/proc/{entry}/cmdline").read_bytes()
                    if marker + b"/" in args or marker + b"\0" in args:
                        os.kill(int(entry), signal.SIGKILL)
                except OSError:
                    continue
        self._kill_group(node)
        shutil.rmtree(node.temp_dir, ignore_errors=True)
        node.log.replace(node.log.with_suffix(f".failed-{time.time():.0f}.log"))  # kept for the post-mortem
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if name not in self.alive():
                    return
            except Exception:  # noqa: BLE001 - the dashboard busy or restarting: ask again
                pass
            time.sleep(0.5)
        raise ClusterUnavailable(f"node {name!r} failed to start and the cluster still shows it alive after 60 s")

    def _start_node(self, name: str, num_cpus: int, role_args: list[str], timeout: float) -> Node:
        with self._lock:
            if name in self.nodes:
                raise ValueError(f"a node named {name!r} exists already")
            lo, self._next_worker_port = self._next_worker_port, self._next_worker_port + WORKER_PORTS_PER_NODE
        # short paths: Ray's unix sockets live under the temp dir (a socket path is at most 107 bytes)
        temp_dir = Path(f"/tmp/eco-lc-{os.getpid()}-{self.gcs_port}-{name}")
        log = self.root / f"node-{name}.log"
        ports = {"node-manager-port": _free_port(), "object-manager-port": _free_port(),
                 "dashboard-agent-listen-port": _free_port(), "dashboard-agent-grpc-port": _free_port(),
                 "runtime-env-agent-port": _free_port(), "metrics-export-port": _free_port(),
                 "min-worker-port": lo, "max-worker-port": lo + WORKER_PORTS_PER_NODE - 1}
        args = [self.ray, "start", "--block", *role_args, f"--num-cpus={int(num_cpus)}", "--num-gpus=0",
                f"--resources={json.dumps({RESOURCE_PREFIX + name: 1})}", f"--temp-dir={temp_dir}",
                f"--object-store-memory={self.object_store_bytes}", "--disable-usage-stats",
                *(f"--{k}={v}" for k, v in ports.items())]
        with open(log, "wb") as out:
            proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=self._node_env(),
                                    start_new_session=True, cwd=self.root)
        node = Node(name, int(num_cpus), name == "head", temp_dir, log, proc, ports=ports)
        with self._lock:
            self.nodes[name] = node
        deadline = time.time() + timeout
        while time.time() < deadline:
            if proc.poll() is not None:
                raise NodeStartFailed(f"`ray start` of node {name!r} exited with {proc.returncode}: "
                                      f"{self._tail(log)}")
            if node.head and not _listening(self.gcs_port):
                time.sleep(0.2)
                continue
            if b"Ray runtime started" in log.read_bytes():
                return node
            time.sleep(0.2)
        raise ClusterUnavailable(f"node {name!r} did not start within {timeout:.0f} s: {self._tail(log)}")

    @staticmethod
    def _tail(log: Path) -> str:
        lines = log.read_text(errors="replace").strip().splitlines()
        return " | ".join(lines[-3:]) if lines else "(no output)"

    def state(self, resource: str, **filters) -> list[dict]:
        """Rows of the State API (``nodes``, ``actors``, ``tasks``, ...) matching ``filters`` (key=value), over HTTP
        with the token in the request. Not through ``ray.util.state``: Ray's clients read the auth mode and token
        from the environment once per process and cache them, and this process may not be a Ray client."""
        import urllib.parse
        import urllib.request

        query = [("limit", "10000"), ("detail", "true")]
        for key, value in filters.items():
            query += [("filter_keys", key), ("filter_predicates", "="), ("filter_values", str(value))]
        req = urllib.request.Request(f"{self.dashboard_url}/api/v0/{resource}?{urllib.parse.urlencode(query)}",
                                     headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())["data"]["result"]["result"]

    def alive(self) -> dict[str, str]:
        """Node name -> Ray node id, for the nodes the GCS holds alive."""
        out = {}
        for n in self.state("nodes", state="ALIVE"):
            names = [r[len(RESOURCE_PREFIX):] for r in (n.get("resources_total") or {})
                     if r.startswith(RESOURCE_PREFIX)]
            if names:
                out[names[0]] = n["node_id"]
                if names[0] in self.nodes:
                    self.nodes[names[0]].node_id = n["node_id"]
        return out

    def wait_for_nodes(self, count: int, timeout: float = 120) -> dict[str, str]:
        deadline, seen = time.time() + timeout, {}
        while time.time() < deadline:
            try:
                seen = self.alive()
            except Exception:  # the dashboard is still starting
                seen = {}
            if len(seen) == count:
                return seen
            time.sleep(0.5)
        raise ClusterUnavailable(f"{count} nodes expected alive, the cluster shows {sorted(seen)}")

    def kill_node(self, name: str, wait_dead: bool = True, timeout: float = 60) -> float:
        """Lose node ``name`` as a preempted pod is lost: SIGKILL to its raylet, then to every other process of the
        node (its workers, agents and ``ray start``). Returns the seconds until the GCS showed it dead (0 if not
        waited for)."""
        node = self.nodes[name]
        # every process of the node, found before anything dies: the raylet starts its workers in their own
        # process groups, and once it is gone they are orphans no one can trace back to the node
        processes = descendants(node.proc.pid)
        pid = next((p for p in processes if _comm(p) == "raylet"), None)
        if pid is None:
            raise ClusterUnavailable(f"node {name!r} has no raylet process")
        node_id = node.node_id  # known from when it came up: nothing stands between the decision and the kill
        t0 = time.time()
        os.kill(pid, signal.SIGKILL)
        node.killed_at = t0
        for other in processes:  # the rest of the pod dies with it: its workers, agents and `ray start`
            try:
                os.kill(other, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._kill_group(node)
        if not wait_dead or node_id is None:
            return 0.0
        while time.time() - t0 < timeout:
            if node_id not in self.alive().values():
                return time.time() - t0
            time.sleep(0.25)
        raise ClusterUnavailable(f"node {name!r} was killed but the cluster still shows it alive after {timeout} s")

    @staticmethod
    def _kill_group(node: Node) -> None:
        try:
            os.killpg(node.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            node.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass

    def shutdown(self) -> None:
        """Every node's process group, workers first, by the PIDs this started; then their temp dirs."""
        for node in sorted(self.nodes.values(), key=lambda n: n.head):
            # workers a raylet started put themselves in their own sessions: kill every descendant too
            for pid in descendants(node.proc.pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self._kill_group(node)
            shutil.rmtree(node.temp_dir, ignore_errors=True)

    def __enter__(self) -> "LoopbackCluster":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


# ---------------------------------------------------------------------------------------------- by hand
NODES_FILE = "nodes.json"  # name -> PID of its `ray start --block` (no secret: the token stays in the environment)


def _write_nodes(cluster: LoopbackCluster) -> None:
    doc = {"address": cluster.address, "dashboard": cluster.dashboard_url,
           "nodes": {n.name: n.proc.pid for n in cluster.nodes.values() if n.running}}
    (cluster.root / NODES_FILE).write_text(json.dumps(doc, indent=2))


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="scripts/loopback-cluster", description=(
        "A real multi-node Ray cluster on this machine, built like the KubeRay one: a head with no CPUs, worker "
        "nodes with logical CPUs, token authentication (the token is $RAY_AUTH_TOKEN). `up` runs in the "
        "foreground until Ctrl-C (or SIGTERM), which stops every node it started; `kill-node` loses one node as "
        "a preempted pod is lost (SIGKILL to its raylet and every other process of the node)."))
    sub = p.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start the cluster and keep it up until Ctrl-C")
    up.add_argument("--root", default="loopback-cluster", help="directory for the node logs and nodes.json")
    up.add_argument("--workers", type=int, default=2, help="worker nodes (default 2)")
    up.add_argument("--cpus", type=int, default=1, help="logical CPUs per worker node (default 1)")
    kill = sub.add_parser("kill-node", help="lose one worker node of a running `up`")
    kill.add_argument("name", help="the node's name (n1, n2, ...; see ROOT/nodes.json)")
    kill.add_argument("--root", default="loopback-cluster")
    args = p.parse_args(argv)
    if args.command == "kill-node":
        try:
            pid = json.loads((Path(args.root) / NODES_FILE).read_text())["nodes"][args.name]
        except (OSError, ValueError, KeyError):
            print(f"loopback-cluster: no running node {args.name!r} in {Path(args.root) / NODES_FILE}", file=sys.stderr)
            return 2
        processes = descendants(pid)
        raylet = next((q for q in processes if _comm(q) == "raylet"), None)
        if raylet is None:
            print(f"loopback-cluster: node {args.name!r} (pid {pid}) has no raylet: lost already?", file=sys.stderr)
            return 1
        for q in [raylet, *processes, pid]:
            try:
                os.kill(q, signal.SIGKILL)
            except ProcessLookupError:
                pass
        print(f"node {args.name} lost (raylet {raylet} killed)")
        return 0
    token = os.environ.get("RAY_AUTH_TOKEN")
    if not token:
        print("loopback-cluster: set RAY_AUTH_TOKEN first, e.g. export RAY_AUTH_TOKEN=$(openssl rand -hex 16): the "
              "cluster and every client use it, and it is never written to disk", file=sys.stderr)
        return 2
    try:
        cluster = LoopbackCluster(args.root, token=token).start({f"n{i + 1}": args.cpus for i in range(args.workers)})
    except ClusterUnavailable as e:
        print(f"loopback-cluster: {e}", file=sys.stderr)
        return 1
    def stop(signum, frame):  # a terminal closed or a `kill`: stop the nodes as Ctrl-C does
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGHUP, stop)
    try:
        _write_nodes(cluster)
        print(f"cluster up: head (0 CPUs) + {args.workers} worker nodes x {args.cpus} CPUs; logs in {cluster.root}\n"
              f"  export RAY_ADDRESS={cluster.address} RAY_AUTH_MODE=token   # and RAY_AUTH_TOKEN as set\n"
              f"  eco-ray train --address {cluster.address} ...\n"
              f"  ray job submit --address {cluster.dashboard_url} -- eco-ray pipeline ...\n"
              f"  scripts/loopback-cluster kill-node n1 --root {cluster.root}\n"
              "Ctrl-C stops every node.", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        cluster.shutdown()
        (cluster.root / NODES_FILE).unlink(missing_ok=True)
    return 0
