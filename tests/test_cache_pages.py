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


def mapped_bytes(folder: Path) -> int:
    """Resident bytes of this process's mappings of files under ``folder``."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()
        if head and "-" in head[0] and len(head) >= 5:  # a mapping's header line
            inside = len(head) >= 6 and head[5].startswith(str(folder))
        elif inside and head[0] == "Rss:":
            total += int(head[1]) * 1024
    return total


def test_release_pages_unmaps_what_was_read_and_the_rows_still_read_the_same(data_dir, tiny_root):
    data = load_data(from_config(compose_cfg([], data_dir, tiny_root)))
    entry = data.path.resolve()
    data.release_pages()
    before = float(np.asarray(data.features, dtype=np.float64).sum())
    size = data.features.nbytes
    assert mapped_bytes(entry) >= 0.9 * size  # every page of the file was read in
    data.release_pages()
    assert mapped_bytes(entry) == 0
    # Catches: pages dropped in a way that loses data (a private or writable mapping).
    assert float(np.asarray(data.features, dtype=np.float64).sum()) == before


def test_each_client_message_ends_with_no_cache_pages_mapped(make_cfg, tmp_path, monkeypatch):
    # Catches: the ClientApp without its page-releasing mod (a worker keeps every row it read).
    from fedkws.fl.inprocess import InProcessGrid

    cfg = make_cfg(["model=cnn", "model.channels=[4,4]", "federation.backend=inprocess",
                    "train.rounds=1", "partition.num_clients=2",
                    "bn.eval_modes=[eval,recalibrated]"])  # fmt: skip
    entry = load_data(from_config(cfg)).path.resolve()
    after: list[tuple[str, int]] = []
    handle = InProcessGrid._handle

    def measured(self, message):
        reply = handle(self, message)
        after.append((message.metadata.message_type, mapped_bytes(entry)))
        return reply

    monkeypatch.setattr(InProcessGrid, "_handle", measured)
    run(cfg, tmp_path / "run")
    kinds = {kind.split(".")[0] for kind, _ in after}
    assert {"train", "query"} <= kinds, after  # training and recalibration queries both read
    assert all(rss == 0 for _, rss in after), after
