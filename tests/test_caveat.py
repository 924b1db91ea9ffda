"""fedkws caveat: train-mode accuracy of one trained model against the evaluation batch."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from commands import run_command
from fedkws.caveat import caveat
from fedkws.run import run
from helpers import SMALL_FEDERATION, cli_env, error_lines

BASE = [*SMALL_FEDERATION, "federation.backend=inprocess", "train.rounds=1",
        "train.local_epochs=1", "bn=params_only", "logger=disabled"]  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir, tiny_root):
    from helpers import compose_cfg

    run_dir = tmp_path_factory.mktemp("caveat") / "run"
    run(compose_cfg(BASE, data_dir, tiny_root), run_dir)
    return run_dir


def _train_mode_class_sorted(run_dir, batch: int) -> float:
    # Independent of fedkws's loops: the split sorted by (label, row), cut into batches of
    # ``batch``, each through BatchNorm layers in training mode (a copy: nothing updated).
    from fedkws.caveat import _load

    _, data, model, _ = _load(run_dir)
    rows = np.asarray(data.split_indices("validation"))
    rows = rows[np.lexsort((rows, data.labels[rows]))]
    net = copy.deepcopy(model).eval()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.train()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(rows), batch):
            chunk = rows[start : start + batch]
            logits = net(torch.from_numpy(np.asarray(data.features[chunk])))
            correct += int((logits.argmax(1).numpy() == data.labels[chunk]).sum())
    return correct / len(rows)


def test_caveat_table_and_files(trained):
    text = caveat(trained, (1, 4, 4096))
    for name in ("caveat.md", "caveat.csv", "caveat.png"):
        assert (trained / name).stat().st_size > 0
    rows = {}
    for line in (trained / "caveat.csv").read_text().splitlines()[1:]:
        mode, order, batch, acc = line.split(",")
        rows[(mode, order, int(batch))] = float(acc)
    # Eval mode does not depend on the batch.
    evals = {rows[("eval", "shuffled", b)] for b in (1, 4, 4096)}
    assert len(evals) == 1
    # One batch holding every example: the order cannot matter, and it equals the
    # independent one-batch train-mode pass.
    want = _train_mode_class_sorted(trained, 4096)
    assert rows[("train", "shuffled", 4096)] == pytest.approx(want, abs=1e-6)
    assert rows[("train", "class-sorted", 4096)] == pytest.approx(want, abs=1e-6)
    # Batches of 4 drawn from one class at a time (catches batches that mix the classes).
    want = _train_mode_class_sorted(trained, 4)
    assert rows[("train", "class-sorted", 4)] == pytest.approx(want, abs=1e-6)
    assert "batch 4096" in text


def test_caveat_on_a_folder_that_is_not_a_run(tmp_path):
    done = run_command(
        [sys.executable, "-m", "fedkws.cli", "caveat", str(tmp_path)],
        capture_output=True, text=True, env=cli_env(),
    )  # fmt: skip
    assert done.returncode == 2
    assert len(error_lines(done.stderr)) == 1 and "not a finished fedkws run" in done.stderr


def test_caveat_that_cannot_write_its_files_says_which(trained, tmp_path):
    # Catches: an IsADirectoryError traceback naming a temp file.
    import shutil

    from fedkws.errors import ConfigError

    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    (run_dir / "caveat.md").unlink(missing_ok=True)  # written by the other test, if it ran
    (run_dir / "caveat.md").mkdir()
    with pytest.raises(ConfigError, match=f"cannot write {run_dir / 'caveat.md'}: Is a directory"):
        caveat(run_dir, (4,))
    with pytest.raises(ConfigError, match="is a file; give the run's folder"):
        caveat(run_dir / "results.json", (4,))


def _edited_copy(trained, tmp_path, edit) -> Path:
    """A copy of the trained run whose results.json config is changed by ``edit(config)``."""
    import json
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    for name in ("caveat.md", "caveat.csv", "caveat.png"):
        (run_dir / name).unlink(missing_ok=True)
    results = json.loads((run_dir / "results.json").read_text())
    edit(results["config"])
    (run_dir / "results.json").write_text(json.dumps(results))
    return run_dir


def test_caveat_refuses_what_it_cannot_measure(trained, tmp_path):
    # Catches: FedBN's untrained global BatchNorm reported as "eval (running statistics)",
    # and a size-mismatch RuntimeError traceback when results.json and checkpoint.pt differ.
    from fedkws.errors import ConfigError

    fedbn = _edited_copy(trained, tmp_path / "a", lambda c: c["bn"].update(sync="local"))
    with pytest.raises(ConfigError, match="ran FedBN .*never left the clients"):
        caveat(fedbn, (4,))
    wider = _edited_copy(trained, tmp_path / "b", lambda c: c["model"].update(width=32))
    with pytest.raises(ConfigError, match="checkpoint.pt does not fit the model results.json"):
        caveat(wider, (4,))
    for run_dir in (fedbn, wider):
        assert not (run_dir / "caveat.md").exists()

    # A centralised run with bn=silo trained its own BatchNorm: measured, labelled plainly.
    def centralised_silo(config):
        config["bn"]["sync"], config["strategy"]["name"] = "silo", "central"

    central = _edited_copy(trained, tmp_path / "c", centralised_silo)
    assert "| eval (running statistics) |" in caveat(central, (4,))


def test_caveat_reads_relative_data_paths_from_where_the_run_started(
    trained, tmp_path, data_dir, monkeypatch
):
    # Catches: a run started with data_dir=data, read by a caveat run elsewhere, generating
    # (or downloading) the dataset again in the caveat's working folder.
    started = data_dir.parent

    def relative(c):
        for node, key in ((c, "data_dir"), (c, "cache_dir"), (c["dataset"], "root")):
            node[key] = str(Path(node[key]).relative_to(started))

    run_dir = _edited_copy(trained, tmp_path / "rel", relative)
    (run_dir / ".hydra").mkdir(exist_ok=True)
    (run_dir / ".hydra" / "hydra.yaml").write_text(f"hydra:\n  runtime:\n    cwd: {started}\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert caveat(run_dir, (4,)).splitlines()[2:] == caveat(trained, (4,)).splitlines()[2:]
    assert list(elsewhere.iterdir()) == []
    # Started in a folder that is gone (a run copied from elsewhere): paths as they are.
    (run_dir / ".hydra" / "hydra.yaml").write_text("hydra:\n  runtime:\n    cwd: /gone\n")
    monkeypatch.chdir(started)
    assert caveat(run_dir, (4,)).splitlines()[2:] == caveat(trained, (4,)).splitlines()[2:]


def test_caveat_says_when_the_run_is_not_finished(trained, tmp_path):
    more = _edited_copy(trained, tmp_path, lambda c: c["train"].update(rounds=5))
    first = caveat(more, (4,)).splitlines()[0]
    assert first.endswith("the model of round 1 of 5: the run is not finished)")
    assert "not finished" not in caveat(trained, (4,)).splitlines()[0]


def test_caveat_of_a_feature_shift_run_hears_its_channels(tmp_path, data_dir, tiny_root):
    # Catches: the clean validation features evaluated, not the channel-shifted ones the
    # run was validated on.
    from fedkws.caveat import _load
    from fedkws.recipes.common import load_data
    from fedkws.spec import from_config
    from helpers import compose_cfg

    cfg = compose_cfg([*BASE, "partition.channels=2"], data_dir, tiny_root)
    cfg.cache_dir = str(tmp_path / "cache")  # its channel variant not in the shared cache
    run(cfg, tmp_path / "run")
    _, heard, _, _ = _load(tmp_path / "run")
    clean = load_data(from_config(cfg))
    rows = np.sort(clean.split_indices("validation"))
    assert heard.feature_key != clean.feature_key
    assert not np.allclose(np.asarray(heard.features[rows]), np.asarray(clean.features[rows]))
