"""The same apps under ``flwr run``: the run config composed in the ServerApp, Flower's runtimes.

The slow tests start a SuperLink of Flower's simulation runtime on 127.0.0.1
(a free port, its own ``FLWR_HOME``), submit runs with ``flwr run`` and end
every process they launched: each carries a marker in its environment (Flower
and Ray pass the environment on to what they start), so the processes left
behind are found by that marker, killed by PID, and fail the test.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
import tomli_w

from fedkws.errors import ConfigError, FederationError
from fedkws.fl.flwr_apps import PROJECT_DIR, compose_config, run_folder
from fedkws.fl.inprocess import InProcessGrid
from fedkws.fl.server_app import FlowerClients
from fedkws.tracking import Result
from helpers import cli_env, error_lines, golden_view, tiny_dataset_overrides, train_command

BIN = Path(sys.executable).parent
ACC_TOL = 1.01 / 48  # one example of the tiny dataset's 48-example validation split
MARK = "FEDKWS_FLWR_TEST"

# Two clients of a small ResNet on the tiny dataset, two rounds.
SMALL = [
    "model=resnet", "model.depth=10", "model.width=8", "train.rounds=2",
    "train.batch_size=16", "train.eval_batch_size=64", "partition.num_clients=2",
    "partition.min_partition_size=5", "bn.eval_modes=[eval,train]", "progress=false",
]  # fmt: skip


# --------------------------------------------------------------------------- the run config


def test_run_config_composes_experiment_then_overrides():
    cfg = compose_config(
        {"experiment": "seed_repro", "overrides": "model.width=8 'name=a b' data_dir=rel"}
    )
    assert cfg.model.width == 8 and cfg.name == "a b"
    assert cfg.strategy.name == "fedavg" and cfg.bn.sync == "params_only"  # the preset
    # Relative paths are the project folder's, whichever folder the SuperLink runs in.
    assert cfg.data_dir == str(PROJECT_DIR / "rel")
    assert cfg.cache_dir == str(PROJECT_DIR / "rel" / "cache")
    assert Path(cfg.dataset.root).is_relative_to(PROJECT_DIR / "rel")


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        ("model=nope", "Could not find 'model/nope'; available options in 'model': "),
        # Catches: Hydra's "Could not override 'no.such.key'. To append ..." where
        # fedkws-train says the same mistake in its own words.
        ("no.such.key=1", "no.such.key: not a key of the config (a typo? fedkws-train --cfg"),
        ("'unclosed", "overrides: No closing quotation"),
    ],
)
def test_run_config_errors_are_config_errors(overrides, words):
    with pytest.raises(ConfigError) as err:
        compose_config({"experiment": "", "overrides": overrides})
    assert "\n" not in str(err.value)
    assert str(err.value).startswith("run config ") and words in str(err.value), str(err.value)


def test_run_folder():
    assert run_folder({"run-dir": "/tmp/x"}, "n") == Path("/tmp/x")
    assert run_folder({"run-dir": "rel"}, "n") == PROJECT_DIR / "rel"
    stamp = time.mktime((2030, 1, 2, 3, 4, 5, 0, 0, -1))
    expected = PROJECT_DIR / "outputs" / "n" / "flwr" / "2030-01-02" / "03-04-05"
    assert run_folder({"run-dir": ""}, "n", now=stamp) == expected


# --------------------------------------------------------------------------- node discovery


def _discover(nodes: int, clients: int, wait_s: float = 0.3) -> FlowerClients:
    from fedkws.fl.client_app import app as client_app

    api = FlowerClients(InProcessGrid(client_app, nodes), clients, task=None, node_wait_s=wait_s)
    api.discover()
    return api


def test_discover_maps_partitions_to_nodes():
    assert sorted(_discover(3, 3).nodes) == [0, 1, 2]


@pytest.mark.parametrize("nodes", [1, 3])
def test_discover_refuses_a_node_count_that_does_not_match(nodes):
    started = time.monotonic()
    with pytest.raises(FederationError, match=f"{nodes} SuperNodes connected.*2 clients"):
        _discover(nodes, 2)
    assert time.monotonic() - started < 5  # an error, not a hang


# --------------------------------------------------------------------------- flwr run


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _marked(token: str) -> list[int]:
    """PIDs of live processes whose environment carries this test's marker."""
    wanted = f"{MARK}={token}".encode()
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if wanted in (proc / "environ").read_bytes().split(b"\0"):
                    found.append(int(proc.name))
            except OSError:
                pass
    return found


class SimulationSuperLink:
    """``flower-superlink --simulation`` on 127.0.0.1 and a ``flwr`` CLI that targets it."""

    def __init__(self, home: Path) -> None:
        self.token, self.port, self.home = uuid.uuid4().hex, _free_port(), home
        home.mkdir(parents=True, exist_ok=True)
        (home / "config.toml").write_text(
            '[superlink]\ndefault = "fedkws"\n\n[superlink.fedkws]\n'
            f'address = "127.0.0.1:{self.port}"\ninsecure = true\n'
        )
        self.env = {
            **cli_env(),
            MARK: self.token,
            "FLWR_HOME": str(home),
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # flower-superexec
        }
        self.log = (home / "superlink.log").open("w")
        self.process = subprocess.Popen(
            [str(BIN / "flower-superlink"), "--insecure", "--simulation",
             "--disable-runtime-dependency-installation", "--host", "127.0.0.1",
             "--port", str(self.port)],
            env=self.env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while not self._healthy():
            assert self.process.poll() is None, (home / "superlink.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "the SuperLink did not come up"
            time.sleep(0.3)

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    def flwr_run(self, run_config: dict, supernodes: int, tmp: Path) -> subprocess.CompletedProcess:
        """``flwr run . fedkws --stream``: returns when the run has ended."""
        config = tmp / f"run-config-{uuid.uuid4().hex[:6]}.toml"
        config.write_text(tomli_w.dumps(run_config))
        command = [str(BIN / "flwr"), "run", ".", "fedkws", "--stream", "-c", str(config),
                   "--federation-config",
                   f"num-supernodes={supernodes} client-resources-num-cpus=1"]  # fmt: skip
        return subprocess.run(
            command, cwd=PROJECT_DIR, env=self.env, capture_output=True, text=True, timeout=420
        )

    def stop(self) -> list[int]:
        """End the SuperLink; kill, by PID, whatever this test launched that is still left."""
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()
        deadline = time.monotonic() + 30
        while (left := _marked(self.token)) and time.monotonic() < deadline:
            time.sleep(0.5)
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        return left


@pytest.fixture(scope="module")
def superlink(tmp_path_factory):
    link = SimulationSuperLink(tmp_path_factory.mktemp("flwr-home"))
    yield link
    left = link.stop()
    assert not left, f"processes left behind (killed): {left}"


@pytest.mark.slow
@pytest.mark.parametrize("shared", [None, 1], ids=["node-per-client", "one-shared-node"])
def test_flwr_run_reproduces_fedkws_train(superlink, data_dir, tiny_root, tmp_path, shared):
    """Same config and seed: ``flwr run .`` (simulation runtime) == ``fedkws-train``.

    ``one-shared-node``: one SuperNode serves both clients (``federation.supernodes=1``).
    """
    overrides = [*tiny_dataset_overrides(data_dir, tiny_root), *SMALL]
    reference = tmp_path / "fedkws-train"
    subprocess.run(
        train_command(*overrides, "federation.backend=inprocess", f"hydra.run.dir={reference}"),
        env=cli_env(), capture_output=True, text=True, check=True, timeout=420,
    )  # fmt: skip
    run_dir = tmp_path / "flwr-run"
    if shared:
        overrides.append(f"federation.supernodes={shared}")
    out = superlink.flwr_run(
        {"experiment": "", "overrides": shlex.join(overrides), "run-dir": str(run_dir)},
        shared or 2,
        tmp_path,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert f"finished -> {run_dir}" in out.stdout, out.stdout[-3000:]
    expected = golden_view(Result.load(reference / "results.json"))
    got = golden_view(Result.load(run_dir / "results.json"))
    assert [r["round"] for r in got["rounds"]] == [1, 2]
    for exp, new in zip(expected["rounds"], got["rounds"], strict=True):
        assert new["clients"] == exp["clients"]  # sampling, examples and the wire: exact
        assert sorted(new["acc"]) == sorted(exp["acc"])
        for key, value in exp["acc"].items():
            assert new["acc"][key] == pytest.approx(value, abs=ACC_TOL), (exp["round"], key)
    assert sorted(got["test"]) == sorted(expected["test"])
    for key, value in expected["test"].items():
        assert got["test"][key] == pytest.approx(value, abs=ACC_TOL), key
    assert (run_dir / "checkpoint.pt").is_file() and (run_dir / ".hydra" / "config.yaml").is_file()


@pytest.mark.slow
def test_flwr_run_user_errors_are_one_line(superlink, data_dir, tiny_root, tmp_path):
    """A bad override, or SuperNodes that do not match the clients: ``error:`` lines, no hang."""
    bad = superlink.flwr_run({"overrides": "model=nope"}, 2, tmp_path)
    assert len(error_lines(bad.stdout)) == 1, bad.stdout[-3000:]
    assert "Could not find 'model/nope'" in bad.stdout and "Traceback" not in bad.stdout
    overrides = shlex.join([*tiny_dataset_overrides(data_dir, tiny_root), *SMALL])
    three = superlink.flwr_run(
        {"overrides": overrides, "run-dir": str(tmp_path / "three")}, 3, tmp_path
    )
    errors = error_lines(three.stdout)
    assert errors and "3 SuperNodes connected, but this configuration has 2 clients" in errors[0]
