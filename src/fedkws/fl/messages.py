"""The typed message a client receives: :class:`ClientTask`, and its Flower record encoding."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from typing import Any

from flwr.app import ConfigRecord

from fedkws.data.augment import AugmentConfig
from fedkws.data.features import FeatureConfig

_RECORD_KEY = "task"


@dataclass(frozen=True)
class ClientTask:
    """What every client needs to train, evaluate or report BatchNorm moments.

    The data is named by path (the memory-mapped cache entry and the client
    index file), never sent: every worker process opens it once. ``device`` is
    where the client computes: ``cpu``, ``cuda`` (under Ray: the GPU Ray
    assigned to the actor, index 0 of its ``CUDA_VISIBLE_DEVICES``) or, in
    process, the driver's ``cuda:N``.
    """

    cache_entry: str
    feature_key: str
    clients_file: str
    state_dir: str  # FedBN: where clients mirror their own BatchNorm state
    model: dict[str, Any]  # build_model keyword arguments
    optimizer_target: str
    optimizer_kwargs: dict[str, Any]
    augment: AugmentConfig
    features: FeatureConfig
    bn_sync: str
    local_epochs: int
    batch_size: int
    eval_batch_size: int
    eval_modes: tuple[str, ...]
    prox_mu: float
    seed: int
    threads: int
    round: int = 0
    layer: int = -1  # BatchNorm layer of a moments query
    bn_frozen: bool = False  # FixBN after the warm-up: train with the global statistics, frozen
    eval_split: str = "local"  # evaluate on: "local" (the client's own test rows) or "testing"
    device: str = "cpu"  # where the client computes (RunSpec.client_device)
    amp: str = "none"  # mixed precision of local training (train.amp)
    deterministic: bool = False  # deterministic algorithms (train.deterministic)
    visit: str = ""  # strategy=cyclic: one visit is "epoch" (local epochs) or "batch"; "" otherwise
    pid: int = -1  # the client, when SuperNodes are fewer than clients; -1: the node's own
    pids: tuple[int, ...] = ()  # a moments query for all these clients at once (shared nodes)

    def at(
        self,
        round_: int,
        layer: int = -1,
        eval_modes: tuple[str, ...] | None = None,
        eval_split: str = "local",
        bn_frozen: bool = False,
    ) -> ClientTask:
        """The same task for one round (and one BatchNorm layer, set of modes, split, FixBN)."""
        modes = self.eval_modes if eval_modes is None else tuple(eval_modes)
        return replace(
            self, round=round_, layer=layer, eval_modes=modes, eval_split=eval_split,
            bn_frozen=bn_frozen,
        )  # fmt: skip

    def to_record(self) -> ConfigRecord:
        """Encode as a Flower ``ConfigRecord`` (one JSON string)."""
        return ConfigRecord({_RECORD_KEY: json.dumps(asdict(self))})

    @classmethod
    def from_record(cls, record: ConfigRecord) -> ClientTask:
        """Decode what :meth:`to_record` wrote."""
        raw = json.loads(str(record[_RECORD_KEY]))
        raw["augment"] = AugmentConfig(**_tuples(raw["augment"]))
        raw["features"] = FeatureConfig(**raw["features"])
        raw["model"] = _tuples(raw["model"])
        raw["eval_modes"] = tuple(raw["eval_modes"])
        raw["pids"] = tuple(raw.get("pids", ()))
        return cls(**raw)


def _tuples(values: dict[str, Any]) -> dict[str, Any]:
    """JSON turns tuples into lists; the dataclasses and models want tuples back."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
