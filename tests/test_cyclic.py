"""``strategy=cyclic``: no averaging, the model visits the clients in turn (the 2020 loop).

The epoch cursor is checked against :func:`fedkws.core.loops.train_epochs`'s own
batches; the visit order, the rows each client trains on, each client's optimiser
state, the absence of averaging and resume against short in-process runs.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fedkws.core import loops
from fedkws.core.seeding import seed_model_init
from fedkws.run import run
from fedkws.spec import from_config
from helpers import SMALL_FEDERATION

BASE = [*SMALL_FEDERATION, "federation.backend=inprocess", "train.rounds=2", "model.width=8",
        "train.local_epochs=2", "strategy=cyclic", "bn=params_only"]  # fmt: skip


def _fake_data(n: int) -> SimpleNamespace:
    """Features and labels that name their row: a batch's labels are its rows."""
    return SimpleNamespace(
        features=np.repeat(np.arange(n, dtype=np.float32)[:, None], 2, axis=1),
        labels=np.arange(n, dtype=np.int64),
    )


@pytest.mark.parametrize(("n", "batch_size"), [(37, 8), (33, 8), (16, 16)])
def test_cursor_gives_the_batches_of_train_epochs(n, batch_size):
    # Catches: a visited client whose batches (or random draws) differ from one call of
    # train_epochs, a cursor that loses its place between messages.
    data, rows, epochs = _fake_data(2 * n), np.arange(0, 2 * n, 2), 3
    generator = torch.Generator().manual_seed(7)
    want = [y.tolist() for _, y in loops._epoch_batches(data, rows, epochs, batch_size,
                                                        generator, None, None, None)]  # fmt: skip
    got, state = [], None
    while True:  # one batch per visit, each visit a fresh cursor restored from a state
        cursor = loops.EpochCursor(rows, batch_size, epochs, torch.Generator().manual_seed(7))
        if state is not None:
            cursor.load_state_dict(state)
        if cursor.done:
            break
        left = cursor.batches_left
        got += [y.tolist() for _, y in cursor.batches(data, 1)]
        assert cursor.batches_left == left - 1
        state = {k: v.clone() for k, v in cursor.state_dict().items()}
    assert got == want
    assert torch.equal(cursor.generator.get_state(), generator.get_state())


@pytest.fixture
def wire(monkeypatch):
    """Every train message in order: (pid, tensors sent, tensors replied, reply metrics)."""
    from fedkws.fl.inprocess import InProcessGrid

    log: list[dict] = []
    handle = InProcessGrid._handle

    def recording(self, message):
        reply = handle(self, message)
        if message.metadata.message_type == "train" and not reply.has_error():
            pid = int(self.contexts[message.metadata.dst_node_id].node_config["partition-id"])
            log.append({
                "pid": pid,
                "sent": message.content["model"].to_torch_state_dict(),
                "replied": reply.content["model"].to_torch_state_dict(),
                "metrics": dict(reply.content["metrics"]),
            })  # fmt: skip
        return reply

    monkeypatch.setattr(InProcessGrid, "_handle", recording)
    return log


@pytest.fixture
def batches(monkeypatch):
    """The rows of every training batch, in order (evaluation batches carry no generator)."""
    seen: list[np.ndarray] = []
    real = loops.iterate_batches

    def recording(data, indices, batch_size, generator=None, *args, **kwargs):
        if generator is not None:
            seen.append(np.asarray(indices).copy())
        return real(data, indices, batch_size, generator, *args, **kwargs)

    monkeypatch.setattr(loops, "iterate_batches", recording)
    return seen


def _train_rows(run_dir) -> dict[int, np.ndarray]:
    with np.load(run_dir / "clients.npz") as npz:
        return {pid: npz[f"train_{pid}"] for pid in (0, 1)}


def _owner(rows: dict[int, np.ndarray], batch: np.ndarray) -> int:
    (pid,) = [p for p, r in rows.items() if np.isin(batch, r).all()]
    return pid


def test_batch_visits_alternate_and_cover_each_clients_rows_once_per_epoch(
    make_cfg, tmp_path, wire, batches
):
    # Catches: a visit order other than alice, bob, alice, ...; a client that sees a row
    # twice (or never) in an epoch; averaging; an optimiser restarted at every visit
    # or shared between clients; BatchNorm buffers that reach the server.
    cfg = make_cfg([*BASE, "strategy.visit=batch"])
    spec = from_config(cfg)
    result = run(cfg, tmp_path / "run")
    rows = _train_rows(tmp_path / "run")
    bs = spec.train.batch_size
    assert all(len(r) % bs != 1 for r in rows.values())  # no dropped last batch here
    per_epoch = {p: -(-len(r) // bs) for p, r in rows.items()}
    owners = [_owner(rows, b) for b in batches]
    assert owners == [m["pid"] for m in wire]  # one batch per visit
    for round_ in range(2):
        n = sum(2 * per_epoch[p] for p in rows)
        order, owners = owners[:n], owners[n:]
        turns = 2 * min(per_epoch.values())
        assert order[: 2 * turns] == [0, 1] * turns  # alternating, alice first
        rest = max(rows, key=lambda p: per_epoch[p])
        assert order[2 * turns :] == [rest] * (n - 2 * turns)  # the other one is skipped
        clients = result.rounds[round_].clients
        for pid, own in rows.items():
            assert clients[str(pid)]["visits"] == 2 * per_epoch[pid]
            assert clients[str(pid)]["seen"] == 2 * len(own)
    # Each client's batches, epoch by epoch, are a permutation of its rows.
    for pid, own in rows.items():
        mine = [b for b in batches if _owner(rows, b) == pid]
        for epoch in range(4):
            chunk = np.concatenate(mine[epoch * per_epoch[pid] : (epoch + 1) * per_epoch[pid]])
            assert np.array_equal(np.sort(chunk), np.sort(own)), (pid, epoch)

    # No averaging: every visit starts from what the one before handed on; the round's
    # model is what the last visit handed on; buffers never leave the clients.
    for before, after in zip(wire, wire[1:], strict=False):
        assert all(torch.equal(after["sent"][k], v) for k, v in before["replied"].items())
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["model"]
    assert set(wire[-1]["replied"]) == {n for n, _ in _named_parameters(spec)}
    for key, value in wire[-1]["replied"].items():
        assert torch.equal(state[key], value), key
    seed_model_init(spec.seed)
    initial = _model(spec).state_dict()
    for key in (k for k in state if "running_" in k):
        assert torch.equal(state[key], initial[key]), key

    # One optimiser per client, kept across visits and rounds: AdamW's step count is
    # the number of batches that client trained, its moments its own.
    saved = {p: torch.load(tmp_path / "run" / "client_state" / f"client{p}" /
                           "cyclic_round2.pt", weights_only=True) for p in rows}  # fmt: skip
    for pid in rows:
        steps = sum(r.clients[str(pid)]["batches"] for r in result.rounds)
        assert steps == 4 * per_epoch[pid]
        assert float(saved[pid]["optim/0/step"]) == steps
        assert int(saved[pid]["cursor/round"]) == 2 and int(saved[pid]["cursor/epoch"]) == 2
    assert not torch.equal(saved[0]["optim/0/exp_avg"], saved[1]["optim/0/exp_avg"])
    # Each client's BatchNorm buffers are its own, kept across visits.
    means = [k for k in state if k.endswith("running_mean")]
    assert not torch.equal(saved[0][f"model/{means[0]}"], saved[1][f"model/{means[0]}"])


def _model(spec):
    from fedkws.core.models import build_model

    return build_model(**spec.model.build_args(12))


def _named_parameters(spec):
    return _model(spec).named_parameters()


def test_epoch_visits_go_alice_then_bob_and_keep_the_optimiser(make_cfg, tmp_path, wire):
    cfg = make_cfg([*BASE, "strategy.visit=epoch"])
    result = run(cfg, tmp_path / "run")
    assert [m["pid"] for m in wire] == [0, 1, 0, 1]
    assert all(m["metrics"]["batches_left"] == 0 for m in wire)
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["model"]
    for key, value in wire[-1]["replied"].items():
        assert torch.equal(state[key], value), key
    for pid in (0, 1):
        own = torch.load(tmp_path / "run" / "client_state" / f"client{pid}" / "cyclic_round2.pt",
                         weights_only=True)  # fmt: skip
        steps = sum(r.clients[str(pid)]["batches"] for r in result.rounds)
        assert float(own["optim/0/step"]) == steps > 0


def test_resume_continues_as_the_uninterrupted_run(make_cfg, tmp_path):
    # Catches: a resumed client that restarts its optimiser, its buffers or its cursor.
    overrides = [*BASE, "strategy.visit=batch", "train.local_epochs=1"]
    reference = run(make_cfg(overrides), tmp_path / "reference")
    run(make_cfg([*overrides, "train.stop_after_round=1"]), tmp_path / "resumed")
    resumed = run(make_cfg([*overrides, "resume=true"]), tmp_path / "resumed")
    for a, b in zip(reference.rounds, resumed.rounds, strict=True):
        want = {k: v for k, v in a.metrics.items() if not k.startswith("time/")}
        assert {k: v for k, v in b.metrics.items() if not k.startswith("time/")} == want
    test_keys = [k for k in reference.summary if k.startswith(("test/", "final/"))]
    assert test_keys
    assert {k: resumed.summary[k] for k in test_keys} == {
        k: reference.summary[k] for k in test_keys
    }


def test_resume_without_a_clients_cyclic_state_is_refused(make_cfg, tmp_path):
    # Catches: client_state/ of a cyclic run gone, and its clients silently starting over
    # (fresh optimiser, initial own keys): exit 0, other numbers than the uninterrupted run.
    import shutil

    from fedkws.errors import RunRefused

    run(make_cfg([*BASE, "train.stop_after_round=1"]), tmp_path / "run")
    shutil.rmtree(tmp_path / "run" / "client_state")
    with pytest.raises(RunRefused, match=r"lacks client0/cyclic_round1\.pt.*strategy=cyclic"):
        run(make_cfg([*BASE, "resume=true"]), tmp_path / "run")
