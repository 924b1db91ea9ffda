"""A run never hangs and never loses work: failures, Ctrl-C, refused starts.

Promises about the process are checked through the real ``fedkws-train`` command.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from commands import run_command
from fedkws import lifecycle
from fedkws.errors import FederationError
from fedkws.fl import client_app
from fedkws.fl.messages import ClientTask
from fedkws.run import run
from helpers import (
    SMALL_FEDERATION,
    cli_env,
    compose_cfg,
    error_lines,
    tiny_dataset_overrides,
    train_command,
)

# --------------------------------------------------------------------------- failing clients


class FailingClient:
    """The real ClientApp, except that one client raises in one round's training."""

    def __init__(self, pid: int, round_: int) -> None:
        self.pid, self.round = pid, round_
        self.real = client_app.app

    def __call__(self, message, context):
        task_fails = message.metadata.message_type == "train" and (
            int(context.node_config["partition-id"]) == self.pid
            and ClientTask.from_record(message.content["config"]).round == self.round
        )
        if task_fails:
            raise RuntimeError("disk on fire")
        return self.real(message, context)


def _fed(make_cfg, *extra):
    overrides = [*SMALL_FEDERATION, "federation.backend=inprocess", "partition.num_clients=3"]
    return make_cfg([*overrides, "train.local_epochs=1", *extra])


def test_a_failing_client_is_recorded_and_the_round_goes_on(make_cfg, tmp_path, monkeypatch):
    monkeypatch.setattr(client_app, "app", FailingClient(pid=1, round_=2))
    result = run(_fed(make_cfg), tmp_path / "run")
    assert [r.round for r in result.rounds] == [1, 2, 3] and result.summary["complete"]
    failures = result.summary["failures"]
    assert len(failures) == 1
    assert failures[0]["pid"] == 1 and failures[0]["round"] == 2
    assert failures[0]["message_type"] == "train" and "disk on fire" in failures[0]["reason"]
    second = result.rounds[1]
    assert second.metrics["clients_failed"] == 1
    assert second.clients["1"] == {"failed": 1.0}
    assert sorted(result.rounds[0].clients) == sorted(result.rounds[2].clients) == ["0", "1", "2"]
    on_disk = json.loads((tmp_path / "run" / "results.json").read_text())
    assert on_disk["summary"]["failures"][0]["reason"] == failures[0]["reason"]


def test_too_few_replies_stop_the_run_with_one_reason(make_cfg, tmp_path, monkeypatch):
    monkeypatch.setattr(client_app, "app", FailingClient(pid=0, round_=2))
    with pytest.raises(FederationError, match="min_train_clients=3.*disk on fire"):
        run(_fed(make_cfg, "strategy.min_train_clients=3"), tmp_path / "run")
    # Round 1 is kept: results.json and the checkpoint of the last complete round.
    rounds = json.loads((tmp_path / "run" / "results.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [1]
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["round"] == 1


def test_a_client_exception_is_reported_by_its_own_line():
    # Catches: the last 300 characters of Ray's and Flower's wrapped traceback as the reason
    # ("ork/main/.venv/lib/python3.11/site-packages/flwr/...") in failed.txt and the report.
    import traceback

    from flwr.clientapp.client_app import ClientAppException
    from ray.exceptions import RayTaskError

    from fedkws.fl.server_app import reason_line

    try:  # as Flower's Ray actor raises it, and Ray hands it to the simulation
        try:
            torch.nn.Linear(2, 2, lr=0.1)
        except TypeError as err:
            raise ClientAppException(str(err)) from err
    except ClientAppException as err:
        wrapped = RayTaskError("ClientAppActor.run", traceback.format_exc(), err)
        ray_error = wrapped.make_dual_exception_instance()
    own = "TypeError: Linear.__init__() got an unexpected keyword argument 'lr'"
    reason = str(type(ray_error)) + ":<'" + str(ray_error) + "'>"  # as Flower words it
    assert reason_line(reason) == own
    plain = ClientAppException("out of\nmemory. Message: later")  # no traceback: its message
    assert (
        reason_line(str(type(plain)) + ":<'" + str(plain) + "'>") == "out of memory. Message: later"
    )
    assert reason_line("x" * 1000) == "..." + "x" * 297


# --------------------------------------------------------------------------- refused starts


def _snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    """Every file's content hash and modification time: a refused run must change neither."""
    return {
        str(p.relative_to(folder)): (hashlib.sha1(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _train(data_dir, tiny_root, run_dir, *overrides, timeout=180):
    command = train_command(
        *tiny_dataset_overrides(data_dir, tiny_root), "model=cnn", "strategy=central",
        "train.rounds=3", f"hydra.run.dir={run_dir}", *overrides,
    )  # fmt: skip
    # Exit status and disk state are what these tests read: a forked command gives both.
    return run_command(command, capture_output=True, text=True, env=cli_env(), timeout=timeout)


@pytest.fixture(scope="module")
def stopped_run(data_dir, tiny_root, tmp_path_factory):
    """A centralised run that stopped on purpose after round 2 of 3."""
    run_dir = tmp_path_factory.mktemp("refused") / "run"
    out = _train(data_dir, tiny_root, run_dir, "train.stop_after_round=2")
    assert out.returncode == 0, out.stderr
    # Catches: a closing "validation accuracy (95 % interval)" line with no intervals, and
    # no word of the stop or of how to go on.
    assert "stopped after round 2 of 3 (train.stop_after_round)" in out.stdout, out.stdout
    assert "accuracy (95 % interval)" not in out.stdout
    return run_dir


REFUSALS = [
    ([], "pass resume=true"),
    (["resume=true", "optimizer.lr=0.5"], "differs from the checkpoint's in optimizer.lr"),
    (["resume=true", "train.rounds=1"], "fewer than the 2 rounds already recorded"),
]


@pytest.mark.parametrize(("overrides", "expected"), REFUSALS, ids=["no-resume", "changed", "fewer"])
def test_refused_run_changes_nothing_on_disk(stopped_run, data_dir, tiny_root, overrides, expected):
    before = _snapshot(stopped_run)
    assert ".hydra/config.yaml" in before and "checkpoint.pt" in before
    out = _train(data_dir, tiny_root, stopped_run, *overrides)
    assert out.returncode == 2, out.stderr
    lines = error_lines(out.stderr)
    assert len(lines) == 1 and expected in lines[0], out.stderr
    assert "Traceback" not in out.stderr
    assert _snapshot(stopped_run) == before


def test_resuming_a_run_at_its_stop_round_changes_nothing(stopped_run, data_dir, tiny_root):
    # Catches: a resume that trains nothing yet rewrites results.json as a stopped run (a
    # finished run with train.rounds raised lost its final evaluation so), and, refused
    # instead, a chunk's command run again after its chunk ending a sweep.
    before = _snapshot(stopped_run)
    out = _train(data_dir, tiny_root, stopped_run, "resume=true", "train.stop_after_round=2")
    assert out.returncode == 0 and not error_lines(out.stderr), out.stderr
    assert "already has 2 round(s) and train.stop_after_round=2: nothing to train" in out.stdout
    assert _snapshot(stopped_run) == before


def test_an_empty_or_folder_checkpoint_is_named_as_such(tmp_path):
    # Catches: "is not a readable fedkws checkpoint ()" for an empty file, and a folder
    # named checkpoint.pt taken for no checkpoint at all.
    from fedkws import checkpoint
    from fedkws.errors import RunRefused

    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / checkpoint.FILENAME).write_bytes(b"")
    with pytest.raises(RunRefused, match=r"not a readable fedkws checkpoint \(an empty file\)"):
        checkpoint.load(tmp_path / "empty")
    (tmp_path / "folder" / checkpoint.FILENAME).mkdir(parents=True)
    with pytest.raises(RunRefused, match="is not a file: not a fedkws checkpoint"):
        checkpoint.load(tmp_path / "folder")
    # Catches: torch's advice to load with weights_only=False (it would run what a foreign
    # file holds) and "failed finding central directory" for a file cut short.
    (tmp_path / "pickle").mkdir()
    (tmp_path / "pickle" / checkpoint.FILENAME).write_bytes(b"\x80\x02" + bytes(range(200)))
    with pytest.raises(RunRefused, match=r"\(not a file of tensors torch reads safely") as got:
        checkpoint.load(tmp_path / "pickle")
    assert "weights_only=False" not in str(got.value) and "weights_only` set" not in str(got.value)
    buf = io.BytesIO()
    torch.save({"a": torch.zeros(100)}, buf)
    torch.save({"a": torch.zeros(100_000)}, large := io.BytesIO())
    for name, cut in (("cut", buf.getvalue()[: len(buf.getvalue()) // 2]),
                      ("cut_at_5000", large.getvalue()[:5000])):  # fmt: skip
        # 5000 bytes: torch's reader fails with "[Errno 22] Invalid argument" (caught).
        (tmp_path / name).mkdir()
        (tmp_path / name / checkpoint.FILENAME).write_bytes(cut)
        with pytest.raises(RunRefused, match=r"\(damaged or cut short: not a complete torch zip"):
            checkpoint.load(tmp_path / name)


def test_corrupt_checkpoint_is_refused(stopped_run, data_dir, tiny_root, tmp_path):
    import shutil

    run_dir = tmp_path / "copy"
    shutil.copytree(stopped_run, run_dir)
    (run_dir / "checkpoint.pt").write_bytes(b"\x00" * 100)
    before = _snapshot(run_dir)
    out = _train(data_dir, tiny_root, run_dir, "resume=true")
    assert out.returncode == 2 and "not a readable fedkws checkpoint" in out.stderr
    assert len(error_lines(out.stderr)) == 1 and "Traceback" not in out.stderr
    assert _snapshot(run_dir) == before


def test_resume_continues_where_it_stopped(stopped_run, data_dir, tiny_root, tmp_path):
    import shutil

    run_dir = tmp_path / "copy"
    shutil.copytree(stopped_run, run_dir)
    out = _train(data_dir, tiny_root, run_dir, "resume=true")
    assert out.returncode == 0, out.stderr
    rounds = json.loads((run_dir / "results.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    # Resuming a complete run again is refused, so its final evaluation is never rewritten.
    before = _snapshot(run_dir)
    out = _train(data_dir, tiny_root, run_dir, "resume=true")
    assert out.returncode == 2 and "already complete" in out.stderr, out.stderr
    assert _snapshot(run_dir) == before


# --------------------------------------------------------------------------- Ctrl-C


def _interrupt_after_round(
    command: list[str], run_dir: Path, round_: int = 1, env=None, signum=signal.SIGINT
):
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env or cli_env())  # fmt: skip
    results = run_dir / "results.json"
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if results.is_file() and f'"round": {round_}' in results.read_text():
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()
        sent = time.monotonic()
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=60)
        return proc.returncode, out, err, time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()


def _check_clean_stop(code, err, seconds, run_dir, signum=signal.SIGINT):
    assert code == 128 + signum, err
    assert seconds < 15, seconds
    assert "Traceback" not in err
    assert "SIGTERM received" not in err  # Ray's own handler would end the process at once
    lines = error_lines(err)
    assert len(lines) == 1 and "interrupted" in lines[0], err
    assert f"completed rounds are kept in {run_dir}" in lines[0]
    kept = torch.load(run_dir / "checkpoint.pt", weights_only=True)["round"]
    recorded = json.loads((run_dir / "results.json").read_text())["rounds"]
    assert kept >= 1 and [r["round"] for r in recorded] == list(range(1, kept + 1))


def test_ctrl_c_stops_a_central_run_cleanly(data_dir, tiny_root, tmp_path):
    run_dir = tmp_path / "run"
    command = train_command(
        *tiny_dataset_overrides(data_dir, tiny_root), "strategy=central", "model=resnet",
        "model.depth=10", "model.width=16", "train.rounds=100", f"hydra.run.dir={run_dir}",
    )  # fmt: skip
    code, _, err, seconds = _interrupt_after_round(command, run_dir)
    _check_clean_stop(code, err, seconds, run_dir)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_the_first_signal_asks_for_a_stop_and_the_second_aborts(signum, capsys):
    """SIGTERM (``kill``, a scheduler's time limit) is a first Ctrl-C; exit 128 + its number.

    End to end through a real run: the Ctrl-C test above, and the slow Ray ones below
    (where Ray's own SIGTERM handler has to be replaced).
    """
    before = signal.getsignal(signum)
    with lifecycle.graceful_interrupts():
        lifecycle.raise_if_stopping()  # nothing asked yet
        os.kill(os.getpid(), signum)
        with pytest.raises(lifecycle.Interrupted):
            lifecycle.raise_if_stopping()
        assert lifecycle.exit_code() == 128 + signum
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signum)
            time.sleep(1)  # the handler runs between bytecodes of this thread
    assert signal.getsignal(signum) is before  # the previous one is back
    assert f"{lifecycle._name(signum)}: stopping after this step" in capsys.readouterr().err


def test_sigterm_is_reclaimed_from_ray_only_during_a_run():
    def foreign(signum, frame):  # what ray.init installs: sys.exit(15)
        raise SystemExit(signum)

    before = signal.signal(signal.SIGTERM, foreign)
    try:
        assert not lifecycle.reclaim_sigterm()  # outside a run: left alone
        assert signal.getsignal(signal.SIGTERM) is foreign
        with lifecycle.graceful_interrupts():
            signal.signal(signal.SIGTERM, foreign)
            assert lifecycle.reclaim_sigterm()
            assert signal.getsignal(signal.SIGTERM) is lifecycle._on_signal
        assert signal.getsignal(signal.SIGTERM) is foreign  # restored as it was before the run
    finally:
        signal.signal(signal.SIGTERM, before)


def test_sigterm_while_ray_starts_is_a_stop_request(monkeypatch, capsys):
    """Ray's own handler, in force during ray.init, would exit 15 with no word."""
    import ray

    from fedkws.fl import simulation

    def init_interrupted(**kwargs):
        raise SystemExit(signal.SIGTERM)  # what Ray's handler does when SIGTERM arrives

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", init_interrupted)
    with lifecycle.graceful_interrupts():
        with pytest.raises(lifecycle.Interrupted):
            simulation._init_ray({})
        assert lifecycle.exit_code() == 128 + signal.SIGTERM
        assert signal.getsignal(signal.SIGTERM) is lifecycle._on_signal
    with pytest.raises(SystemExit):  # outside a run, Ray's exit stands
        simulation._init_ray({})
    assert "SIGTERM: stopping after this step" in capsys.readouterr().err


def _raylets(ray_tmp: str) -> set[int]:
    """The raylets of the Ray instances under ``ray_tmp`` (not another test worker's)."""
    out = subprocess.run(["pgrep", "-f", f"raylet.*{ray_tmp}"], capture_output=True, text=True)
    return {int(p) for p in out.stdout.split()}


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_stops_a_ray_simulation_cleanly(data_dir, tiny_root, tmp_path, signum):
    """Also SIGTERM, which Ray's core worker would otherwise turn into an abrupt exit."""
    import shutil
    import tempfile

    # A short temp root of the run's own (Ray's socket paths are limited to 107 bytes).
    ray_tmp = tempfile.mkdtemp(prefix="fedkws-ray-")
    run_dir = tmp_path / "run"
    command = train_command(
        *tiny_dataset_overrides(data_dir, tiny_root), "model=cnn", "train.rounds=100",
        "federation.backend=ray", f"hydra.run.dir={run_dir}",
    )  # fmt: skip
    try:
        env = {**cli_env(), "RAY_TMPDIR": ray_tmp}
        code, _, err, seconds = _interrupt_after_round(command, run_dir, env=env, signum=signum)
        _check_clean_stop(code, err, seconds, run_dir, signum)
        assert not _raylets(ray_tmp)  # no Ray process left behind
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.mark.slow
def test_sigterm_ends_a_sweep_and_its_shared_ray_head(data_dir, tiny_root, tmp_path):
    """Killed without the graceful stop, the sweep's process left its Ray head running."""
    import shutil
    import tempfile

    temp = tempfile.mkdtemp(prefix="fedkws-t-")  # where the sweep's head keeps its files
    sweep = tmp_path / "sweep"
    command = train_command(
        "-m", *tiny_dataset_overrides(data_dir, tiny_root), "model=cnn", "train.rounds=100",
        "seed=0,1", f"hydra.sweep.dir={sweep}", "hydra.sweep.subdir=job${hydra.job.num}",
    )  # fmt: skip
    try:
        env = {**cli_env(), "TMPDIR": temp}
        env.pop("RAY_ADDRESS", None)
        code, out, err, seconds = _interrupt_after_round(
            command, sweep / "job0", env=env, signum=signal.SIGTERM
        )
        _check_clean_stop(code, err, seconds, sweep / "job0", signal.SIGTERM)
        assert "Ray head for this sweep" in out
        assert not _raylets(temp)  # the head and its processes are gone
        assert not (sweep / "job1").exists()  # the sweep ended with its first job
    finally:
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.slow
def test_a_crashed_simulation_ends_the_process_quickly(data_dir, tiny_root, tmp_path):
    """Ray refuses its start-up arguments: one line with the reason, exit 2, no hang."""
    start = time.monotonic()
    out = subprocess.run(
        train_command(*tiny_dataset_overrides(data_dir, tiny_root), "model=cnn",
                      "+federation.ray_init_args.object_store_memory=10",
                      f"hydra.run.dir={tmp_path / 'run'}"),
        capture_output=True, text=True, env=cli_env(), timeout=120,
    )  # fmt: skip
    assert out.returncode == 2, out.stderr
    lines = error_lines(out.stderr)
    assert len(lines) == 1 and "object store memory" in lines[0], out.stderr
    assert "Traceback" not in out.stderr
    assert time.monotonic() - start < 60


def test_a_stop_requested_for_an_earlier_run_does_not_end_the_next(make_cfg, tmp_path):
    """A crashed simulation sets the stop flag for its own winding-down threads only."""
    from fedkws import lifecycle

    lifecycle.request_stop()
    cfg = make_cfg(["strategy=central", "model=cnn", "train.rounds=2", "bn.eval_modes=[eval]"])
    result = run(cfg, tmp_path / "run")
    assert [r.round for r in result.rounds] == [1, 2] and result.summary["complete"]


def test_resume_on_a_folder_without_a_checkpoint_starts_and_says_so(make_cfg, tmp_path, capsys):
    # Catches: a mistyped folder under resume=true silently giving a fresh run.
    cfg = make_cfg(["strategy=central", "model=cnn", "train.rounds=1", "resume=true"])
    result = run(cfg, tmp_path / "new")
    assert [r.round for r in result.rounds] == [1]
    out = capsys.readouterr().out
    assert f"resume=true: no checkpoint in {tmp_path / 'new'} yet: starting at round 1" in out


def _as_hydras_job(data_dir, tiny_root, run_dir: Path, in_sweep: bool):
    """The tiny dataset's config as Hydra hands it to a job in ``run_dir`` (HydraConfig set;
    the caller clears it)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from fedkws import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=[*tiny_dataset_overrides(data_dir, tiny_root),
                                           f"hydra.run.dir={run_dir}"],
                      return_hydra_config=True)  # fmt: skip
    cfg.hydra.runtime.output_dir = str(run_dir)
    cfg.hydra.mode = RunMode.MULTIRUN if in_sweep else RunMode.RUN
    cfg.hydra.sweep.dir = str(run_dir.parent)
    HydraConfig.instance().set_config(cfg)
    return cfg


def _exit_of_job(cfg, run_dir: Path, in_sweep: bool) -> int:
    """The exit status of fedkws-train's job (it must exit); Hydra's and the stop's state
    cleared after."""
    from hydra.core.hydra_config import HydraConfig

    from fedkws import train as train_module

    try:
        with pytest.raises(SystemExit) as stop:
            train_module._job(cfg, run_dir, in_sweep=in_sweep)
    finally:
        HydraConfig.instance().cfg = None
        lifecycle.reset()
    return stop.value.code


@pytest.mark.parametrize("in_sweep", [False, True])
def test_a_run_that_fails_while_it_stops_is_a_stop_not_a_failure(
    in_sweep, data_dir, tiny_root, tmp_path, monkeypatch, capsys
):
    """SIGTERM to every process of a job (SLURM's time limit) can make the run fail as it
    stops (its Ray clients ended first). Catches: that failure kept as the job's failed.txt
    and, in a sweep, the next job started instead of the sweep ending with the signal."""

    run_dir = tmp_path / "job0"
    cfg = _as_hydras_job(data_dir, tiny_root, run_dir, in_sweep)

    def stopped_then_failed(*_args):
        lifecycle.signalled(signal.SIGTERM)
        raise FederationError("2 of 2 clients failed: actor died")

    monkeypatch.setattr("fedkws.run._train", stopped_then_failed)  # inside the real run()
    assert _exit_of_job(cfg, run_dir, in_sweep) == 128 + signal.SIGTERM
    assert error_lines(capsys.readouterr().err)[-1].startswith("error: interrupted (SIGTERM)")
    assert not (run_dir / "failed.txt").exists()


def test_a_sweeps_folder_is_no_run_folder(make_cfg, tmp_path):
    # Catches: `fedkws-train hydra.run.dir=<a sweep's folder>` writing a run among the
    # sweep's jobs (the sweep's report then shows a cell that is not one of its jobs), and
    # fedkws-prepare replacing a training run's partition.png and data_summary.txt.
    from fedkws.errors import RunRefused
    from fedkws.prepare import _refuse_a_run_folder

    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    with pytest.raises(RunRefused, match="is a sweep's folder"):
        run(make_cfg([*SMALL_FEDERATION, "federation.backend=inprocess"]), sweep)
    assert [p.name for p in sweep.iterdir()] == ["multirun.yaml"]
    with pytest.raises(RunRefused, match="is a sweep's folder"):
        _refuse_a_run_folder(sweep)
    trained = tmp_path / "run"
    trained.mkdir()
    (trained / "results.json").write_text("{}")
    with pytest.raises(RunRefused, match="holds a training run: fedkws-prepare would replace"):
        _refuse_a_run_folder(trained)
    _refuse_a_run_folder(tmp_path / "new")  # a folder of its own: fine


def test_an_unreadable_client_state_file_is_named(tmp_path):
    # Catches: the client's failure of every later round cut off inside torch's advice to
    # load with weights_only=False, without the file's name.
    from types import SimpleNamespace

    task = SimpleNamespace(pid=0, state_dir=str(tmp_path), round=3)
    path = client_app.client_state_file(tmp_path, 1, 2)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"\x80\x02" + bytes(range(200)))
    with pytest.raises(RuntimeError, match=rf"client 1's own state {path} cannot be read \(not"):
        client_app._fedbn_state(task, 1, SimpleNamespace(state={}))


def test_the_closing_lines_show_every_final_accuracy_as_printed():
    # Catches: "[nan, nan]" eaten by rich as markup (an interval that vanished with no
    # word), and a FedBN run ending with no accuracy line at all.
    import io

    from rich.console import Console

    from fedkws.recipes.common import format_final

    def shown(summary):
        out = io.StringIO()
        Console(file=out, width=300, highlight=False).print(format_final(summary))
        return out.getvalue().strip()

    summary = {"eval_batch_size": 64, "final/val/eval/acc": 0.5,
               "final/val/eval/acc_ci95": [0.4, 0.6],
               "final/val/recalibrated/acc": 0.083}  # fmt: skip
    assert shown(summary) == (
        "validation accuracy (95 % interval): eval 0.500 [0.400, 0.600] | recalibrated 0.083"
    )
    fedbn = {"eval_batch_size": 64, "final/fed/eval/acc_mean": 0.7,
             "test/fedbn/eval/acc_mean": 0.65}  # fmt: skip
    assert shown(fedbn).splitlines() == [
        "validation accuracy (each client's model, mean): eval 0.700",
        "test accuracy (each client's model, mean): eval 0.650",
    ]


def test_a_failed_run_says_why_in_its_folder_and_the_next_attempt_clears_it(
    data_dir, tiny_root, tmp_path, monkeypatch
):
    """run() itself (fedkws-train, flwr run's ServerApp and library callers alike) keeps a
    failure's reason as failed.txt for fedkws report, and a later attempt removes it.
    Catches: failed.txt written by the command line only, or left behind a resumed run."""
    from fedkws.run import run

    cfg = compose_cfg(["train.rounds=1"], data_dir, tiny_root)
    run_dir = tmp_path / "run"

    def fails(*_args):
        raise FederationError("2 of 2 clients failed: actor died")

    with monkeypatch.context() as patched:
        patched.setattr("fedkws.run._train", fails)
        with pytest.raises(FederationError):
            run(cfg, run_dir)
    assert (run_dir / "failed.txt").read_text().startswith("2 of 2 clients failed: actor died")
    monkeypatch.setattr("fedkws.run._train", lambda *_args: "trained")
    assert run(cfg, run_dir) == "trained"
    assert not (run_dir / "failed.txt").exists()


def test_changed_data_is_refused_to_a_resume_and_to_the_caveat(make_cfg, tiny_root, tmp_path):
    """A clip deleted from the dataset between two invocations: the resume (its rounds
    would mix two datasets) and the caveat (it would measure the old model on other data)
    are refused, and the run folders stay as they were (an earlier attempt's failed.txt
    included: the refusal comes before the run starts). The fingerprint is of the data,
    not of where it lies: a copy elsewhere, with its own cache entry, has the same one.
    Catches: the resume going on on the changed data (exit 0), and the caveat answering."""
    import shutil

    from fedkws.caveat import caveat
    from fedkws.errors import RunRefused
    from fedkws.recipes.common import load_data
    from fedkws.spec import from_config

    copy = tmp_path / "copy"
    shutil.copytree(tiny_root, copy)
    overrides = ["strategy=central", "train.rounds=2", "dataset.generate=null",
                 f"dataset.root={copy}"]  # fmt: skip
    original = load_data(from_config(make_cfg(["strategy=central"])))
    assert load_data(from_config(make_cfg(overrides))).identity() == original.identity()
    run(make_cfg([*overrides, "train.rounds=1"]), tmp_path / "finished")
    run(make_cfg([*overrides, "train.stop_after_round=1"]), tmp_path / "stopped")
    next(copy.glob("yes/*.wav")).unlink()
    (tmp_path / "stopped" / "failed.txt").write_text("an earlier attempt's failure\n")
    folders = (tmp_path / "finished", tmp_path / "stopped")
    before = {p: p.read_bytes() for f in folders for p in f.rglob("*") if p.is_file()}
    with pytest.raises(RunRefused, match="the dataset is not the one its 1 round"):
        run(make_cfg([*overrides, "resume=true"]), tmp_path / "stopped")
    with pytest.raises(RunRefused, match="caveat of .*: the dataset is not the one"):
        caveat(tmp_path / "finished")
    assert {p: p.read_bytes() for f in folders for p in f.rglob("*") if p.is_file()} == before


def test_ctrl_c_twice_stops_fedkws_prepare_during_generation_in_one_line(tmp_path):
    # Catches: a 69-line KeyboardInterrupt traceback from the generator's process pool (the
    # terminal's Ctrl-C reaches the whole process group, as here).
    command = [str(Path(sys.executable).parent / "fedkws-prepare"), "dataset=synthetic_tiny",
               "dataset.generate.speakers=80", f"data_dir={tmp_path / 'data'}", "progress=false",
               f"hydra.run.dir={tmp_path / 'prepared'}"]  # fmt: skip
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=cli_env(), start_new_session=True)  # fmt: skip
    try:
        for line in proc.stdout:  # the generation has started
            if line.startswith("generating the synthetic dataset"):
                break
        time.sleep(1)
        os.killpg(proc.pid, signal.SIGINT)
        time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130 and "Traceback" not in err, err[-3000:]
    assert error_lines(err) == ["error: interrupted (Ctrl-C)"]


def test_extending_a_finished_run_removes_what_described_its_old_model(
    make_cfg, tmp_path, monkeypatch
):
    # Catches: caveat.md and the final evaluation's files of the 1-round model kept beside
    # the 2-round one (the caveat is never written again by the run).
    run_dir = tmp_path / "run"
    run(make_cfg(["strategy=central", "train.rounds=1"]), run_dir)
    assert (run_dir / "recalibrated_bn.pt").is_file()
    for name in ("caveat.md", "caveat.csv", "confusion_eval.png", "notes.txt",
                 "confusion_my_notes.png", "accuracy.png"):  # fmt: skip
        (run_dir / name).write_text("of the 1-round model\n")
    before = {p.name for p in run_dir.iterdir()}
    extend = make_cfg(["strategy=central", "train.rounds=3", "train.stop_after_round=2",
                       "resume=true"])  # fmt: skip

    def fails(self, round_):
        raise RuntimeError("no new round")

    with monkeypatch.context() as patched:  # catches: removed before a new round was kept
        patched.setattr("fedkws.recipes.central.CentralRecipe.train_round", fails)
        with pytest.raises(RuntimeError):
            run(extend, run_dir)
    assert before <= {p.name for p in run_dir.iterdir()}
    run(extend, run_dir)
    gone = ("confusion_eval.png", "caveat.*", "recalibrated_bn.pt", "accuracy.png")  # plots=false
    assert not [p.name for pattern in gone for p in run_dir.glob(pattern)]
    assert (run_dir / "notes.txt").is_file()  # not fedkws's: left alone
    assert (run_dir / "confusion_my_notes.png").is_file()


def test_a_resume_may_move_the_data_its_fingerprint_recorded(make_cfg, tiny_root, tmp_path):
    # The same data at another path resumes (its fingerprint is checked, not where it lies);
    # a checkpoint without a fingerprint (written before it was recorded) keeps the paths.
    # Catches: a dataset moved to another disk making its runs impossible to resume.
    import shutil

    from fedkws.errors import RunRefused

    first, moved = tmp_path / "first", tmp_path / "moved"
    shutil.copytree(tiny_root, first)
    shutil.copytree(tiny_root, moved)
    common = ["strategy=central", "train.rounds=2", "dataset.generate=null"]
    run(make_cfg([*common, f"dataset.root={first}", "train.stop_after_round=1"]),
        tmp_path / "run")  # fmt: skip
    path = tmp_path / "run" / "checkpoint.pt"
    saved = torch.load(path, weights_only=True)
    old = {k: v for k, v in saved.items() if k != "data"}
    torch.save(old, path)
    with pytest.raises(RunRefused, match="config differs from the checkpoint's in dataset.root"):
        run(make_cfg([*common, f"dataset.root={moved}", "resume=true"]), tmp_path / "run")
    torch.save(saved, path)
    other = make_cfg([*common, f"dataset.root={moved}", "resume=true", "train.local_epochs=2"])
    with pytest.raises(RunRefused, match=r"in train.local_epochs \(only .*, data_dir, cache_dir, "
                       r"dataset.root may change\)"):  # fmt: skip
        run(other, tmp_path / "run")
    resumed = run(make_cfg([*common, f"dataset.root={moved}", "resume=true"]), tmp_path / "run")
    assert [r.round for r in resumed.rounds] == [1, 2] and resumed.summary["complete"]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_while_a_resume_prepares_its_data_ends_the_job_in_one_line(
    signum, data_dir, tiny_root, tmp_path, monkeypatch, capsys
):
    """A resume's checks prepare its data (generation, cache: minutes), before its rounds.
    Catches: a first Ctrl-C or SIGTERM there (SLURM's time limit for a requeued job) lost
    as the run started (or a traceback, or a silent exit 143), not one line and 130/143."""

    run_dir = tmp_path / "job0"
    cfg = _as_hydras_job(data_dir, tiny_root, run_dir, in_sweep=False)

    def signalled_while_preparing(*_args, **_kwargs):
        lifecycle.signalled(signum)  # as the handler does, mid-generation

    monkeypatch.setattr("fedkws.run.preflight", signalled_while_preparing)
    monkeypatch.setattr("fedkws.run.run", lambda *a: pytest.fail("the run started"))
    assert _exit_of_job(cfg, run_dir, in_sweep=False) == 128 + signum
    name = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"
    assert error_lines(capsys.readouterr().err) == [
        f"error: interrupted ({name}); before its first round ended (nothing to resume in "
        f"{run_dir})"
    ]
