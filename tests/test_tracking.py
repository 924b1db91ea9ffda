"""results.json, plots and the W&B adapter (offline, read back from disk)."""

from __future__ import annotations

import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2

from fedkws.tracking import Recorder, Result, RoundRecord, WandbLogger, plot_accuracy

_BLOCK = 32768
_HEADER = 7  # ":W&B" + magic (2) + version (1)


def read_wandb_records(path: Path) -> list[wandb_internal_pb2.Record]:
    """Decode a ``.wandb`` file (LevelDB-style log of protobuf records)."""
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
    files = list(tmp_path.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 1
    records = read_wandb_records(files[0])
    history = []
    for rec in records:
        if rec.WhichOneof("record_type") == "history":
            row = {
                item.key or "/".join(item.nested_key): item.value_json for item in rec.history.item
            }
            history.append(row)
    steps = sorted(int(row["_step"]) for row in history)
    assert steps == [1, 2, 3]
    accs = sorted(float(row["val/eval/acc"]) for row in history)
    assert accs == [0.1, 0.2, 0.30000000000000004] or [round(a, 6) for a in accs] == [0.1, 0.2, 0.3]
    runs = [rec.run for rec in records if rec.WhichOneof("record_type") == "run"]
    assert runs and runs[0].run_group == "sweep-a" and runs[0].display_name == "bn=full"
    config_items = {i.key: i.value_json for i in runs[0].config.update}
    for rec in records:
        if rec.WhichOneof("record_type") == "config":
            config_items.update({i.key: i.value_json for i in rec.config.update})
    assert config_items.get("seed") == "7"
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


def test_accuracy_plot_has_one_line_per_mode(tmp_path):
    result = Result(config={}, summary={"num_classes": 12})
    for r in (1, 2):
        result.rounds.append(
            RoundRecord(r, {"val/eval/acc": 0.1, "val/train/acc": 0.6, "train/acc": 0.7}, 1.0)
        )
    path = plot_accuracy(result, tmp_path / "acc.png")
    assert path.read_bytes()[:4] == b"\x89PNG"
