"""A local Ray head that many simulations attach to, so a sweep pays Ray's start-up once.

Flower's Ray backend starts Ray inside every simulation and shuts it down at the
end (about 10 s per run here). Attached to a running Ray instance instead
(``federation.ray_address``, or ``RAY_ADDRESS``), ``ray.shutdown()`` only
disconnects the driver and the next run attaches in a fraction of a second.
:class:`LocalRayHead` starts such an instance on 127.0.0.1 with ``ray start
--head --block`` (through :mod:`fedkws.fl.head_process`, which ends it if
the process that started it dies without a word) and ends exactly the process
it started (whose exit ends the Ray processes it launched).
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

from fedkws.errors import FederationError

# ray.init() arguments that only mean something when starting Ray: Ray refuses most of them
# when it attaches to a running instance, and ignores the dashboard ones.
HEAD_ONLY_ARGS = (
    "num_cpus", "num_gpus", "resources", "labels", "object_store_memory", "_system_config",
    "include_dashboard", "dashboard_host", "dashboard_port",
)  # fmt: skip


def attach_args(init_args: dict, address: str) -> dict:
    """``init_args`` for attaching to the Ray instance at ``address`` (head-only keys dropped)."""
    kept = {k: v for k, v in init_args.items() if k not in HEAD_ONLY_ARGS}
    kept["address"] = address
    return kept


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """Raise FederationError unless something accepts connections at ``address`` (host:port).

    Attaching ``ray.init`` to an address where no Ray instance runs retries for
    many minutes without a word; a plain TCP connection says so in seconds.
    """
    host, _, port = address.rpartition(":")
    if "://" in address or not host or not port.isdigit():
        return  # "auto", "ray://...": addresses Ray resolves itself
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as err:
        reason = str(err) or type(err).__name__
        raise FederationError(
            f"no Ray instance answers at {address} (federation.ray_address or RAY_ADDRESS): "
            f"{reason}"
        ) from None
    _check_speaks_grpc(address, timeout)


def _check_speaks_grpc(address: str, timeout: float) -> None:
    """Raise FederationError unless ``address`` completes a gRPC handshake, as Ray's GCS does.

    A port that accepts connections and never answers as Ray (the dashboard's 8265,
    another server) would leave ``ray.init`` retrying without end.
    """
    import grpc

    if os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
        return  # a TLS head: no plaintext handshake to try
    # As Ray's own channels: never through http_proxy / grpc_proxy (127.0.0.1 included).
    channel = grpc.insecure_channel(address, options=[("grpc.enable_http_proxy", 0)])
    try:
        grpc.channel_ready_future(channel).result(timeout=timeout)
    except grpc.FutureTimeoutError:
        raise FederationError(
            f"{address} accepts connections but does not answer as a Ray instance within "
            f"{timeout:g} s (federation.ray_address or RAY_ADDRESS): give the head's address "
            "that `ray start --head` prints (port 6379 by default, not the dashboard's 8265)"
        ) from None
    finally:
        channel.close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _ask_to_stop(process: subprocess.Popen) -> None:
    """SIGTERM, sent by the head's own watcher (see head_process) when it has one."""
    try:
        if process.stdin is not None:
            process.stdin.write(b"stop\n")
            process.stdin.close()
            return
    except (BrokenPipeError, OSError):
        pass  # the watcher is gone: send it from here
    process.send_signal(signal.SIGTERM)


class LocalRayHead:
    """One Ray head process on 127.0.0.1, started by :meth:`start`, ended by :meth:`stop`."""

    def __init__(self, num_cpus: float | None = None, num_gpus: float | None = None) -> None:
        self.num_cpus, self.num_gpus = num_cpus, num_gpus
        self.address: str | None = None
        self._process: subprocess.Popen | None = None
        self._log = None
        self._temp_dir: str | None = None

    def start(self, timeout: float = 120.0) -> str:
        """Start the head and return its address (``127.0.0.1:<port>``)."""
        port = _free_port()
        # Its own temp dir: `ray start` records its address there, and one in Ray's default
        # dir would be picked up (and outlive the head) by every later plain ray.init().
        self._temp_dir = tempfile.mkdtemp(prefix="fedkws-ray-")
        # Started through head_process, which ends the head if this process dies
        # without calling stop() (SIGKILL).
        command = [sys.executable, "-m", "fedkws.fl.head_process", str(os.getpid()),
                   "start", "--head", "--block", f"--port={port}",
                   "--node-ip-address=127.0.0.1", "--include-dashboard=false",
                   "--disable-usage-stats", f"--temp-dir={self._temp_dir}"]  # fmt: skip
        if self.num_cpus is not None:
            command.append(f"--num-cpus={int(self.num_cpus)}")
        if self.num_gpus is not None:
            command.append(f"--num-gpus={int(self.num_gpus)}")
        self._log = tempfile.TemporaryFile(mode="w+")
        env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
        env.pop("RAY_ADDRESS", None)
        self._process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=self._log, stderr=subprocess.STDOUT, env=env,
            start_new_session=True,
        )  # fmt: skip
        atexit.register(self.stop)
        deadline = time.monotonic() + timeout
        while "Ray runtime started" not in self._output():
            if self._process.poll() is not None or time.monotonic() > deadline:
                reason = self._output().strip().splitlines()[-1:] or ["no output"]
                self.stop()
                raise FederationError(f"could not start a local Ray head: {reason[0][:300]}")
            time.sleep(0.2)
        self.address = f"127.0.0.1:{port}"
        return self.address

    def _output(self) -> str:
        if self._log is None:
            return ""
        self._log.seek(0)
        return self._log.read()

    def stop(self, grace: float = 20.0) -> None:
        """End the head process this object started (and, through it, its Ray processes).

        A head still running ``grace`` seconds after SIGTERM is killed with its process group.
        """
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            _ask_to_stop(process)
            try:
                process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                # Stuck in its own shutdown: end it and every Ray process it started, which
                # share its session's process group (started with start_new_session).
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._temp_dir is not None:
            shutil.rmtree(self._temp_dir, ignore_errors=True)
            self._temp_dir = None
        self.address = None
