"""Shared test settings: the small federated configuration most federated tests start from.

Kept out of conftest.py so tests import it explicitly.
"""

from __future__ import annotations

CHANCE = 1 / 12

# A ResNet-10 of width 16 on two clients of the tiny dataset: learns within 3 rounds.
SMALL_FEDERATION = [
    "model=resnet",
    "model.depth=10",
    "model.width=16",
    "train.rounds=3",
    "train.local_epochs=2",
    "train.batch_size=16",
    "train.eval_batch_size=64",
    "optimizer.lr=3e-3",
    "partition.num_clients=2",
    "partition.min_partition_size=5",
]

# The golden runs: the three presets that carry the project's claims, shrunk.
GOLDEN = {
    "seed_repro": [
        "experiment=seed_repro", "model.width=8", "train.rounds=2", "train.batch_size=32",
    ],
    "bn_ablation_full_dirichlet": [
        "experiment=bn_ablation", "bn=full", "partition=dirichlet", "partition.alpha=0.3",
        "partition.num_clients=3", "model.width=8", "train.rounds=2",
    ],
    "central": [
        "experiment=seed_repro", "strategy=central", "model.width=8", "train.rounds=2",
        "train.batch_size=32", "bn.eval_modes=[eval,train,recalibrated]",
    ],
}  # fmt: skip


def golden_view(result) -> dict:
    """What the golden test pins of a run: per-round accuracies, sampling, what crossed the wire."""
    rounds = []
    for rec in result.rounds:
        rounds.append(
            {
                "round": rec.round,
                "acc": {
                    k: v
                    for k, v in sorted(rec.metrics.items())
                    if k.endswith(("/acc", "/acc_mean")) and not k.startswith("time/")
                },
                "clients": {
                    pid: {
                        k: info[k]
                        for k in ("num-examples", "keys_received", "bn_keys_received")
                        if k in info
                    }
                    for pid, info in sorted(rec.clients.items())
                },
            }
        )
    test = {
        k: v
        for k, v in sorted(result.summary.items())
        if k.startswith("test/") and k.endswith("/acc")
    }
    return {"rounds": rounds, "test": test}


# --------------------------------------------------------------------------- the real CLI


def tiny_dataset_overrides(data_dir, tiny_root) -> list[str]:
    """Command-line overrides that point ``fedkws-train`` at the session's tiny dataset."""
    from conftest import TINY

    return [
        f"data_dir={data_dir}",
        f"cache_dir={data_dir / 'cache'}",
        f"dataset.root={tiny_root}",
        f"dataset.generate.speakers={TINY['speakers']}",
        f"dataset.generate.utterances={TINY['utterances']}",
        f"dataset.generate.noise_seconds={TINY['noise_seconds']}",
    ]


def cli_env() -> dict[str, str]:
    """The environment of a CLI subprocess: W&B off, telemetry off, this checkout's code."""
    import os

    return {**os.environ, "WANDB_MODE": "disabled", "FLWR_TELEMETRY_ENABLED": "0"}


def train_command(*overrides: str) -> list[str]:
    """``fedkws-train`` with ``overrides``, as a user types it."""
    import sys

    return [sys.executable, "-m", "fedkws.train", *overrides]


def error_lines(stderr: str) -> list[str]:
    """The ``error:`` lines of a command's stderr."""
    return [line for line in stderr.splitlines() if line.startswith("error:")]
