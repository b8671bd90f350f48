"""A real Ray cluster of this machine that stays on loopback, for the Ray tests and benchmarks/ray.py.

`LoopbackCluster` starts a head node (and, on request, more nodes) with `ray start --block`, each
in a process group of its own, and stops exactly those groups by their PID. Everything that keeps
Ray from reaching out is here, in one place (issue 15, measured with Ray 2.60):

- nodes on 127.0.0.2, 127.0.0.3, ...: Ray rewrites 127.0.0.1 / localhost in `--node-ip-address`,
  `--address` and `ray.init` to the machine's outward address, but leaves other loopback addresses;
- `RAY_USAGE_STATS_ENABLED=0` and `--disable-usage-stats`; `--include-dashboard=false`;
- a `HOME` of its own holding `ray_bootstrap_config.yaml` (`provider: {type: local}`), without which
  a dashboard module probes the cloud metadata address (169.254.169.254), and
  `RAY_USAGE_STATS_REPORT_URL` pointing at a closed loopback port;
- a temp dir of its own (`--temp-dir`), removed afterwards.

The environment it builds (`env`) is also what a driver process started by a test must have.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RAY = Path(sys.executable).with_name("ray")
HEAD_IP = "127.0.0.2"
STOP_GRACE_S = 5.0


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on at `host` now."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class LoopbackCluster:
    """A Ray cluster of `ray start` nodes on 127.0.0.x; `address` is what `ray.init` and --ray-address take."""

    def __init__(self, head_cpus: int = 1):
        self.dir = Path(tempfile.mkdtemp(prefix="caption-ray-"))
        self.temp_dir = self.dir / "ray"  # short: Ray's socket paths must fit in 107 bytes
        home = self.dir / "home"
        home.mkdir()
        (home / "ray_bootstrap_config.yaml").write_text("provider: {type: local}\n")
        self.env = {**os.environ, "HOME": str(home), "RAY_USAGE_STATS_ENABLED": "0",
                    "RAY_USAGE_STATS_REPORT_URL": f"http://127.0.0.1:{free_port()}/",  # closed: nothing listens
                    "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
                    # a killed node is noticed in about 3 s, not 30 (the node-failure test waits for it)
                    "RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3",
                    "RAY_health_check_initial_delay_ms": "1000"}
        self.port = free_port(HEAD_IP)
        self.address = f"{HEAD_IP}:{self.port}"
        self.nodes: list[subprocess.Popen] = []
        self._head_cpus = head_cpus

    def start(self) -> LoopbackCluster:
        self._start_node(["--head", f"--port={self.port}", "--include-dashboard=false"], HEAD_IP, self._head_cpus)
        return self

    def add_node(self, cpus: int = 1) -> subprocess.Popen:
        """One more node on the next loopback address, joined to the head; its `ray start` process."""
        ip = f"127.0.0.{2 + len(self.nodes)}"
        return self._start_node([f"--address={self.address}"], ip, cpus)

    def _start_node(self, role: list[str], ip: str, cpus: int) -> subprocess.Popen:
        log = open(self.dir / f"node-{ip}.log", "wb")
        node = subprocess.Popen([str(RAY), "start", *role, f"--node-ip-address={ip}", f"--num-cpus={cpus}",
                                 "--disable-usage-stats", f"--temp-dir={self.temp_dir}", "--block"],
                                env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self.nodes.append(node)
        self._wait_started(ip, node)
        return node

    def _wait_started(self, ip: str, node: subprocess.Popen, timeout_s: float = 60.0) -> None:
        log = self.dir / f"node-{ip}.log"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if node.poll() is not None:
                raise RuntimeError(f"ray start on {ip} exited: {log.read_text(errors='replace')[-2000:]}")
            if "Ray runtime started" in log.read_text(errors="replace"):
                return
            time.sleep(0.2)
        raise RuntimeError(f"ray start on {ip} did not start within {timeout_s} s")

    def kill_node(self, node: subprocess.Popen) -> None:
        """SIGKILL a node's whole process group (its raylet, workers and actors): a machine lost."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(node.pid, signal.SIGKILL)
        node.wait()

    def stop(self) -> None:
        """Stop every node this cluster started, workers first, by their process groups; remove the temp dir."""
        for node in reversed(self.nodes):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(node.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for node in reversed(self.nodes):
            try:
                node.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            with contextlib.suppress(ProcessLookupError):
                os.killpg(node.pid, signal.SIGKILL)  # whatever of the group is left (Ray's --block is slow to go)
            node.wait()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> LoopbackCluster:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
