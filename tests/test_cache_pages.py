"""Clients give back the cache pages they read, so a worker serving thousands stays small.

The resident size of a mapping is read from ``/proc/self/smaps`` (the kernel's
count of this process's pages of that file), independently of fedkws.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from fedkws.recipes.common import load_data
from fedkws.run import run
from fedkws.spec import from_config
from helpers import compose_cfg

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="reads /proc/self/smaps"
)


def mapped_bytes(path: Path) -> int:
    """Resident bytes of this process's mappings of the file ``path``."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()
        if head and "-" in head[0] and len(head) >= 5:  # a mapping's header line
            inside = len(head) >= 6 and head[5] == str(path)
        elif inside and head[0] == "Rss:":
            total += int(head[1]) * 1024
    return total


def _features_file(data) -> Path:
    """The feature file of one opened cache (no other feature config maps it)."""
    return (data.path / f"features-{data.feature_key}.npy").resolve()


def test_release_pages_unmaps_what_was_read_and_the_rows_still_read_the_same(data_dir, tiny_root):
    data = load_data(from_config(compose_cfg([], data_dir, tiny_root)))
    features = _features_file(data)
    data.release_pages()
    before = float(np.asarray(data.features, dtype=np.float64).sum())
    assert mapped_bytes(features) >= 0.9 * data.features.nbytes  # every page was read in
    data.release_pages()
    assert mapped_bytes(features) == 0
    # The rows read after the release are the file's, as before it.
    assert float(np.asarray(data.features, dtype=np.float64).sum()) == before


def test_each_client_message_ends_with_no_cache_pages_mapped(make_cfg, tmp_path, monkeypatch):
    # Catches: the ClientApp without its page-releasing mod (a worker keeps every row it read).
    from fedkws.fl.inprocess import InProcessGrid

    cfg = make_cfg(["model=cnn", "model.channels=[4,4]", "federation.backend=inprocess",
                    "train.rounds=1", "partition.num_clients=2",
                    "bn.eval_modes=[eval,recalibrated]"])  # fmt: skip
    data = load_data(from_config(cfg))
    files = [_features_file(data), (data.path / "waves.npy").resolve()]  # evaluation, training
    after: list[tuple[str, int]] = []
    handle = InProcessGrid._handle

    def measured(self, message):
        reply = handle(self, message)
        after.append((message.metadata.message_type, sum(map(mapped_bytes, files))))
        return reply

    monkeypatch.setattr(InProcessGrid, "_handle", measured)
    run(cfg, tmp_path / "run")
    kinds = {kind.split(".")[0] for kind, _ in after}
    assert {"train", "query"} <= kinds, after  # training and recalibration queries both read
    assert all(rss == 0 for _, rss in after), after
