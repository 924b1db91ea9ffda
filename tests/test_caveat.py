"""fedkws caveat: train-mode accuracy of one trained model against the evaluation batch."""

from __future__ import annotations

import copy
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

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

    _, data, model = _load(run_dir)
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
    done = subprocess.run(
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
