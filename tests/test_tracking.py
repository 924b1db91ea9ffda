"""results.json, plots and the W&B adapter (offline, read back from disk)."""

from __future__ import annotations

import json
import logging
import socket
import struct
from pathlib import Path

import pytest
import wandb
from wandb.proto import wandb_internal_pb2

from fedkws.plots import figure
from fedkws.tracking import Recorder, Result, RoundRecord, WandbLogger, draw_accuracy, plot_accuracy

_BLOCK = 32768
_HEADER = 7  # ":W&B" + magic (2) + version (1)


def read_wandb_records(path: Path) -> list[wandb_internal_pb2.Record]:
    """Decode a ``.wandb`` file (LevelDB-style log of protobuf records).

    W&B 0.31 writes no public file with the group and display name of an
    offline run (no config.yaml or wandb-metadata.json; ``wandb.Api`` needs a
    server), so the run's own log, decoded with W&B's shipped schema, is read.
    """
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    records, pending, pos = [], b"", _HEADER
    while pos + 7 <= len(data):
        left_in_block = _BLOCK - pos % _BLOCK
        if left_in_block < 7:
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        pending += chunk
        if kind in (1, 4):  # FULL or LAST
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(pending)
            records.append(rec)
            pending = b""
    return records


def offline_run(run_dir: Path) -> dict:
    """Group, name, config and history of the one offline run under ``run_dir``."""
    # run.finish() may return before W&B's service has written the log out;
    # teardown waits for it (and makes the next run read the environment afresh).
    wandb.teardown()
    files = list(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 1, files
    records = read_wandb_records(files[0])
    runs = [rec.run for rec in records if rec.WhichOneof("record_type") == "run"]
    assert runs, "no run record"
    config = {i.key: json.loads(i.value_json) for i in runs[0].config.update}
    history = []
    for rec in records:
        kind = rec.WhichOneof("record_type")
        if kind == "config":
            config.update({i.key: json.loads(i.value_json) for i in rec.config.update})
        elif kind == "history":
            history.append(
                {
                    i.key or "/".join(i.nested_key): json.loads(i.value_json)
                    for i in rec.history.item
                }
            )
    return {
        "group": runs[0].run_group,
        "name": runs[0].display_name,
        "id": runs[0].run_id,
        "config": config,
        "history": history,
    }


def test_offline_run_contains_logged_round_metrics(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    logger = WandbLogger(
        mode="offline", project="fedkws-test", config={"seed": 7, "bn": {"sync": "full"}},
        run_dir=tmp_path, group="sweep-a", name="bn=full",
    )  # fmt: skip
    recorder = Recorder(tmp_path, Result(config={"seed": 7}), logger)
    try:
        for r in (1, 2, 3):
            recorder.log_round(RoundRecord(r, {"val/eval/acc": 0.1 * r, "val/train/acc": 0.5}, 1.0))
        recorder.finish({"num_classes": 12, "final/val/eval/acc": 0.3})
    finally:
        logger.finish()
    run = offline_run(tmp_path)
    assert [row["_step"] for row in run["history"]] == [1, 2, 3]
    assert [row["val/eval/acc"] for row in run["history"]] == pytest.approx([0.1, 0.2, 0.3])
    assert (run["group"], run["name"]) == ("sweep-a", "bn=full")
    assert run["config"]["seed"] == 7 and run["config"]["bn"] == {"sync": "full"}
    # results.json is the source of truth and holds the same rounds.
    saved = Result.load(tmp_path / "results.json")
    assert [r.round for r in saved.rounds] == [1, 2, 3]
    assert saved.summary["final/val/eval/acc"] == 0.3


def test_disabled_mode_writes_nothing_but_results(tmp_path):
    logger = WandbLogger(mode="disabled", project="x", config={}, run_dir=tmp_path)
    recorder = Recorder(tmp_path, Result(config={}), logger)
    recorder.log_round(RoundRecord(1, {"val/eval/acc": 0.5}, 1.0))
    recorder.finish({})
    logger.finish()
    assert not (tmp_path / "wandb").exists()
    assert (tmp_path / "results.json").is_file()


def test_wandb_mode_disabled_in_the_environment_wins_over_the_config(tmp_path, monkeypatch):
    # Catches: W&B started (and imported) for a run that its own switch has turned off.
    monkeypatch.setenv("WANDB_MODE", "disabled")
    logger = WandbLogger(mode="offline", project="x", config={}, run_dir=tmp_path)
    assert logger.run is None and logger.mode == "disabled" and logger.run_id is None
    logger.finish()
    assert not (tmp_path / "wandb").exists()


def _three_mode_result() -> Result:
    result = Result(config={}, summary={"num_classes": 12})
    for r in (1, 2, 3):
        metrics = {
            "val/eval/acc": 0.1 * r,
            "val/train/acc": 0.2 * r,
            "val/recalibrated/acc": 0.25 * r,
            "fed/eval/acc_mean": 0.15 * r,
            "fed/eval/acc_std": 0.01,
            "train/acc": 0.3 * r,
            "train/loss": 2.0 / r,
        }
        result.rounds.append(RoundRecord(r, metrics, 1.0))
    return result


def test_accuracy_plot_has_one_line_per_mode(tmp_path):
    # Catches: a mode left out of the plot, loss/std drawn as accuracy, no chance line,
    # curves drawn with the wrong values.
    result = _three_mode_result()
    with figure(tmp_path / "drawn.png") as (_fig, ax):
        draw_accuracy(ax, result)
        labels = [t.get_text() for t in ax.get_legend().get_texts()]
        lines = {line.get_label(): list(line.get_ydata()) for line in ax.get_lines()}
    expected = {
        "val/eval/acc": [0.1, 0.2, 0.3],
        "val/train/acc": [0.2, 0.4, 0.6],
        "val/recalibrated/acc": [0.25, 0.5, 0.75],
        "fed/eval/acc_mean": [0.15, 0.3, 0.45],
        "train/acc": [0.3, 0.6, 0.9],
    }
    assert sorted(labels) == sorted([*expected, "chance"])  # once each
    for label, ys in expected.items():
        assert lines[label] == pytest.approx(ys)
    assert lines["chance"] == pytest.approx([1 / 12, 1 / 12])
    path = plot_accuracy(result, tmp_path / "acc.png")
    assert path == tmp_path / "acc.png" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["acc.png", "drawn.png"]  # no temp left


def test_unknown_logger_mode_names_key_and_choices(tmp_path):
    with pytest.raises(ValueError) as err:
        WandbLogger(mode="ofline", project="x", config={}, run_dir=tmp_path)
    message = str(err.value)
    assert "logger.mode" in message and "ofline" in message
    assert all(mode in message for mode in ("offline", "online", "disabled"))
    assert not (tmp_path / "wandb").exists()


def test_offline_run_has_group_and_name(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    logger = WandbLogger(
        mode="offline", project="fedkws-test", config={"seed": 3}, run_dir=tmp_path,
        group="bn_ablation/12-00-00", name="bn=local,partition=iid/seed=3",
    )  # fmt: skip
    try:
        logger.log({"val/eval/acc": 0.5}, step=1)
    finally:
        logger.finish()
    run = offline_run(tmp_path)
    assert run["group"] == "bn_ablation/12-00-00"
    assert run["name"] == "bn=local,partition=iid/seed=3"
    assert run["config"]["seed"] == 3


def test_unreachable_server_falls_back_to_offline(tmp_path, monkeypatch, caplog):
    # Nothing listens on a bound but unlistened port: every connection is refused.
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    wandb.teardown()  # W&B reads WANDB_* once per process setup: start a fresh one
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)  # never sent anywhere but that port
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    caplog.set_level(logging.WARNING, logger="fedkws.tracking")
    try:
        logger = WandbLogger(
            mode="online", project="fedkws-test", config={"seed": 5}, run_dir=tmp_path,
            group="sweep-b", name="norm=group/seed=5", init_timeout=2,
        )  # fmt: skip
        recorder = Recorder(tmp_path, Result(config={"seed": 5}), logger)
        try:
            for r in (1, 2):
                recorder.log_round(RoundRecord(r, {"val/eval/acc": 0.25 * r}, 1.0))
            recorder.finish({"num_classes": 12, "final/val/eval/acc": 0.5})
        finally:
            logger.finish()
    finally:
        closed.close()
    assert logger.mode == "offline"
    warnings = [r for r in caplog.records if r.name == "fedkws.tracking"]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
    message = warnings[0].getMessage()
    assert "\n" not in message and "offline" in message
    run = offline_run(tmp_path)  # training went on, into an offline run
    assert (run["group"], run["name"]) == ("sweep-b", "norm=group/seed=5")
    assert run["config"]["seed"] == 5
    assert [row["val/eval/acc"] for row in run["history"]] == [0.25, 0.5]
    assert [r.round for r in Result.load(tmp_path / "results.json").rounds] == [1, 2]
