"""The shared Ray head of a sweep: started once, attached to by every job, ended afterwards."""

from __future__ import annotations

import os

from omegaconf import OmegaConf

from fedkws.fl.ray_head import attach_args
from fedkws.train import SweepRay


def test_attaching_drops_what_only_a_new_ray_instance_takes():
    args = {"num_cpus": 2, "num_gpus": 0, "include_dashboard": False, "log_to_driver": True}
    assert attach_args(args, "127.0.0.1:6379") == {
        "log_to_driver": True,
        "address": "127.0.0.1:6379",
    }
    assert args["num_cpus"] == 2  # the caller's dict is left alone


def _sweep_config(**federation):
    fed = {"backend": "ray", "sweep_ray": True, "ray_address": None,
           "ray_init_args": {"num_cpus": 1}, **federation}  # fmt: skip
    return OmegaConf.create(
        {"federation": fed, "strategy": {"name": "fedavg"}, "hydra": {"overrides": {"task": []}}}
    )


def test_a_sweep_starts_one_head_and_ends_it(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    callback = SweepRay()
    callback.on_multirun_start(_sweep_config())
    try:
        process = callback.head._process
        assert process.poll() is None
        assert os.environ["RAY_ADDRESS"] == callback.head.address
        assert callback.head.address.startswith("127.0.0.1:")
    finally:
        callback.on_multirun_end(_sweep_config())
    assert process.poll() is not None  # exactly the process it started has ended
    assert "RAY_ADDRESS" not in os.environ


def test_no_head_when_the_sweep_does_not_need_one(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    for cfg in (
        _sweep_config(backend="inprocess"),
        _sweep_config(sweep_ray=False),
        _sweep_config(ray_address="127.0.0.1:1"),  # the user's own Ray instance
    ):
        callback = SweepRay()
        callback.on_multirun_start(cfg)
        assert callback.head is None and "RAY_ADDRESS" not in os.environ
