"""Devices: resolution of ``device``, what crosses the wire and what is saved, amp, determinism.

This machine may have no GPU: the CUDA side of the resolution is checked with
``torch.cuda`` patched to report devices, and every device code path that can
run on the CPU is run here (the device argument of every loop, the batches,
the CPU tensors of messages and checkpoints, bf16 autocast, determinism).
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from commands import run_command
from fedkws import checkpoint
from fedkws.core import loops
from fedkws.core.models import bn_layers, build_model
from fedkws.data.augment import AugmentConfig
from fedkws.data.features import FeatureConfig
from fedkws.data.loader import iterate_batches, to_device
from fedkws.errors import user_errors
from fedkws.fl.messages import ClientTask
from fedkws.run import run
from fedkws.spec import from_config
from helpers import cli_env, compose_cfg, error_lines, train_command

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
# model=cnn's adaptive pooling has no deterministic CUDA backward (refused with a GPU).
DETERMINISTIC_MODEL = "model=res8" if torch.cuda.is_available() else "model=cnn"
QUICK_FED = [DETERMINISTIC_MODEL, "train.rounds=2", "train.local_epochs=1", "train.batch_size=16",
             "train.eval_batch_size=64", "partition.num_clients=2",
             "partition.min_partition_size=5", "federation.backend=inprocess"]  # fmt: skip
QUICK_CENTRAL = ["model=cnn", "strategy=central", "train.rounds=2", "train.batch_size=16",
                 "train.eval_batch_size=64"]  # fmt: skip


@pytest.fixture(autouse=True)
def _no_lasting_determinism():
    """A test that turns deterministic algorithms on leaves them as it found them."""
    before = torch.are_deterministic_algorithms_enabled()
    yield
    loops.set_determinism(before)


def _one_error(cfg, capsys) -> str:
    with pytest.raises(SystemExit) as exited, user_errors():
        from_config(cfg)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    lines = error_lines(err)
    assert len(lines) == 1 and err.count("\n") == 1, err
    return lines[0]


@pytest.fixture
def fake_cuda(monkeypatch):
    """``torch.cuda`` reporting two devices (nothing is ever run on them)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


# --------------------------------------------------------------------------- resolution


def test_auto_and_cpu_resolve_to_the_cpu_here(tmp_path):
    expected = "cuda:0" if torch.cuda.is_available() else "cpu"
    assert from_config(compose_cfg([], tmp_path)).device == expected  # default: auto
    assert from_config(compose_cfg(["device=auto"], tmp_path)).device == expected
    spec = from_config(compose_cfg(["device=cpu"], tmp_path))
    assert spec.device == spec.client_device == spec.training_device == "cpu"
    # The device may change on resume: it is not part of what a resume compares.
    assert "device" not in spec.comparable() and spec.resolved["device"] == "cpu"


@NO_CUDA
def test_cuda_without_cuda_is_one_line_through_the_real_command(tmp_path):
    run_dir = tmp_path / "run"
    out = run_command(
        train_command("device=cuda", f"hydra.run.dir={run_dir}", f"data_dir={tmp_path / 'd'}"),
        capture_output=True, text=True, env=cli_env(), timeout=120,
    )  # fmt: skip
    assert out.returncode == 2, out.stderr
    assert error_lines(out.stderr) == [
        "error: device='cuda': CUDA is not available on this machine (device=auto or cpu)"
    ]
    assert "Traceback" not in out.stderr + out.stdout
    assert not run_dir.exists() and not (tmp_path / "d").exists()


@NO_CUDA
@pytest.mark.parametrize("value", ["cuda", "cuda:0", "cuda:3"])
def test_any_cuda_device_without_cuda_is_refused(value, tmp_path, capsys):
    line = _one_error(compose_cfg([f"device={value}"], tmp_path), capsys)
    assert (
        line
        == f"error: device='{value}': CUDA is not available on this machine (device=auto or cpu)"
    )


@pytest.mark.parametrize("value", ["gpu", "cuda:x", "cuda:-1", "0", "cpu:0", "''"])
def test_a_nonsense_device_is_one_line(value, tmp_path, capsys):
    line = _one_error(compose_cfg([f"device={value}"], tmp_path), capsys)
    assert line.startswith("error: device=") and "must be auto, cpu, cuda or cuda:N" in line


def test_cuda_resolution_with_devices(fake_cuda, tmp_path, capsys):
    def spec(*overrides):
        return from_config(compose_cfg(list(overrides), tmp_path))

    assert spec().device == spec("device=cuda").device == "cuda:0"
    assert spec("device=cuda:1").device == "cuda:1"
    assert spec("device=cpu").device == "cpu"
    line = _one_error(compose_cfg(["device=cuda:3"], tmp_path), capsys)
    assert line == "error: device='cuda:3': this machine has 2 CUDA device(s): cuda:0 to cuda:1"


def test_where_the_clients_run(fake_cuda, tmp_path, capsys):
    def spec(*overrides):
        return from_config(compose_cfg(list(overrides), tmp_path))

    # Under Ray a client uses the GPU Ray assigned to it ("cuda": index 0 of its
    # CUDA_VISIBLE_DEVICES) only when it reserves one; in process it is the driver's.
    assert spec("device=cuda:1").client_device == "cpu"
    fractional = spec("device=cuda:1", "federation.client_resources.num_gpus=0.25")
    assert fractional.client_device == fractional.training_device == "cuda"
    assert spec("device=cuda:1", "federation.backend=inprocess").client_device == "cuda:1"
    assert spec("device=cuda:1", "strategy=central").training_device == "cuda:1"
    line = _one_error(
        compose_cfg(["device=cpu", "federation.client_resources.num_gpus=0.5"], tmp_path), capsys
    )
    assert "federation.client_resources.num_gpus=0.5: must be 0 with device=cpu" in line


def test_client_task_carries_device_amp_and_determinism():
    task = ClientTask(
        cache_entry="c", feature_key="f", clients_file="x.npz", state_dir="s",
        model={"name": "cnn"}, optimizer_target="torch.optim.SGD", optimizer_kwargs={},
        augment=AugmentConfig(), features=FeatureConfig(),
        bn_sync="full", local_epochs=1, batch_size=8, eval_batch_size=8,
        eval_modes=("eval",), prox_mu=0.0, seed=0, threads=1,
        device="cuda", amp="bf16", deterministic=True,
    )  # fmt: skip
    back = ClientTask.from_record(task.at(3, layer=2).to_record())
    assert (back.device, back.amp, back.deterministic, back.round) == ("cuda", "bf16", True, 3)


# --------------------------------------------------------------------------- amp, determinism


@NO_CUDA
def test_fp16_on_the_cpu_is_one_line(tmp_path, capsys):
    line = _one_error(compose_cfg(["train.amp=fp16"], tmp_path), capsys)
    assert line.startswith(
        "error: train.amp='fp16': float16 autocast with loss scaling is for CUDA"
    )


def test_fp16_with_clients_on_the_cpu_is_refused(fake_cuda, tmp_path, capsys):
    line = _one_error(compose_cfg(["train.amp=fp16"], tmp_path), capsys)  # num_gpus=0
    assert "clients reserve no GPU" in line
    ok = ["train.amp=fp16", "federation.client_resources.num_gpus=0.5"]
    assert from_config(compose_cfg(ok, tmp_path)).train.amp == "fp16"
    assert from_config(compose_cfg(["train.amp=fp16", "strategy=central"], tmp_path))


def test_unknown_amp_is_one_line(tmp_path, capsys):
    line = _one_error(compose_cfg(["train.amp=fp8"], tmp_path), capsys)
    assert line == "error: train.amp='fp8': must be one of none, bf16, fp16"


def test_deterministic_cuda_training_refuses_a_model_without_deterministic_backward(
    fake_cuda, tmp_path, capsys
):
    central = ["strategy=central", "train.deterministic=true"]
    line = _one_error(compose_cfg([*central, "model=cnn"], tmp_path), capsys)
    assert "model=cnn uses AdaptiveAvgPool2d" in line
    assert from_config(compose_cfg([*central, "model=resnet"], tmp_path)).train.deterministic
    # On the CPU (here: the clients, which reserve no GPU) there is nothing to refuse.
    assert from_config(compose_cfg(["train.deterministic=true", "model=cnn"], tmp_path))


def test_set_determinism_switches_and_reports_the_previous_setting():
    assert loops.set_determinism(True) is False
    assert torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.benchmark
    assert loops.set_determinism(False) is True
    assert not torch.are_deterministic_algorithms_enabled()


def test_bf16_autocast_trains_on_the_cpu(data_dir, tiny_root):
    from fedkws.data.cache import DataConfig, prepare

    data = prepare(DataConfig(root=str(tiny_root)), FeatureConfig(), data_dir / "cache", False)
    rows = np.sort(data.split_indices("training"))[::4]  # a quarter: learnt within epochs
    torch.manual_seed(0)
    model = build_model("cnn", num_classes=data.num_classes)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = [
        loops.train_epochs(model, data, rows, 1, 16, opt, torch.Generator().manual_seed(e),
                           device="cpu", amp="bf16").loss
        for e in range(3)
    ]  # fmt: skip
    assert all(np.isfinite(losses)) and losses[-1] < losses[0], losses
    after = model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    # Parameters and BatchNorm statistics stay float32 (and were updated).
    assert all(v.dtype in (torch.float32, torch.int64) for v in after.values())
    _, bn = bn_layers(model)[0]
    assert not torch.equal(before[f"{bn_layers(model)[0][0]}.running_var"], bn.running_var)
    assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())


# --------------------------------------------------------------------------- batches


def test_cpu_batches_are_not_copied_again(data_dir, tiny_root):
    from fedkws.data.cache import DataConfig, prepare

    t = torch.arange(6.0)
    assert to_device(t, "cpu") is t and to_device(t, None) is t
    assert to_device(t, torch.device("cpu")) is t
    data = prepare(DataConfig(root=str(tiny_root)), FeatureConfig(), data_dir / "cache", False)
    rows = data.split_indices("validation")
    for (xa, ya), (xb, yb) in zip(
        iterate_batches(data, rows, 16), iterate_batches(data, rows, 16, device="cpu"), strict=True
    ):
        assert torch.equal(xa, xb) and torch.equal(ya, yb) and xb.device.type == "cpu"


def test_to_cpu_reaches_nested_tensors():
    nested = {"a": torch.ones(2), "b": [torch.zeros(1), {"c": (torch.ones(1), 3)}], "d": "x"}
    out = checkpoint.to_cpu(nested)
    assert out["d"] == "x" and out["b"][1]["c"][1] == 3
    assert torch.equal(out["b"][1]["c"][0], torch.ones(1))


# --------------------------------------------------------------------------- runs


def _all_tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _all_tensors(v)
    elif isinstance(value, list | tuple):
        for v in value:
            yield from _all_tensors(v)


def test_central_bf16_run_records_the_device_and_saves_cpu_tensors(make_cfg, tmp_path, capsys):
    cfg = make_cfg([*QUICK_CENTRAL, "train.amp=bf16"])
    device = from_config(cfg).device  # auto: "cpu" on a machine without CUDA
    name = loops.device_name(device)
    result = run(cfg, tmp_path / "run")
    assert f"device: {device} ({name}); amp=bf16, deterministic=False" in capsys.readouterr().out
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["config"]["device"] == "auto"  # as configured; resolved beside it
    assert saved["config"]["device_resolved"] == {"device": device, "name": name}
    assert (saved["summary"]["device"], saved["summary"]["device_name"]) == (device, name)
    assert all(np.isfinite(r.metrics["train/loss"]) for r in result.rounds)
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    tensors = list(_all_tensors(ckpt["model"])) + list(_all_tensors(ckpt["optimizer"]))
    assert tensors and all(t.device.type == "cpu" for t in tensors)
    stats = torch.load(tmp_path / "run" / "recalibrated_bn.pt", weights_only=True)
    assert all(t.device.type == "cpu" for t in stats.values())


@pytest.fixture
def messages(monkeypatch):
    """Every ArrayRecord the in-process grid carries, both ways, decoded."""
    from fedkws.fl.inprocess import InProcessGrid

    seen: list[dict[str, torch.Tensor]] = []
    handle = InProcessGrid._handle

    def recording(self, message):
        reply = handle(self, message)
        for content in (message.content, None if reply.has_error() else reply.content):
            for name in ("model", "moments"):
                if content is not None and name in content:
                    seen.append(content[name].to_torch_state_dict())
        return reply

    monkeypatch.setattr(InProcessGrid, "_handle", recording)
    return seen


def _metrics(result):
    return [
        {k: v for k, v in r.metrics.items() if not k.startswith("time/")} for r in result.rounds
    ]


def test_deterministic_federated_runs_agree_and_messages_hold_cpu_tensors(
    make_cfg, tmp_path, messages
):
    overrides = [*QUICK_FED, "train.deterministic=true", "bn.eval_modes=[eval,recalibrated]"]
    first = run(make_cfg(overrides), tmp_path / "a")
    assert not torch.are_deterministic_algorithms_enabled()  # restored after the run
    kinds = {frozenset(m) for m in messages}
    assert frozenset({"count", "sum", "sumsq"}) in kinds  # moments replies were seen
    assert len(kinds) > 1 and all(t.device.type == "cpu" for m in messages for t in m.values())
    second = run(make_cfg(overrides), tmp_path / "b")
    assert _metrics(first) == _metrics(second)
    assert {k: v for k, v in first.summary.items() if k.startswith("test/")} == {
        k: v for k, v in second.summary.items() if k.startswith("test/")
    }
    saved = json.loads((tmp_path / "a" / "results.json").read_text())
    assert saved["config"]["device_resolved"]["clients"] == from_config(make_cfg(overrides)).device
    ckpt = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)
    assert all(t.device.type == "cpu" for t in _all_tensors(ckpt["model"]))


def test_cpu_only_clients_keep_rays_accelerator_override_off(monkeypatch):
    """No GPU requested: Ray is told not to touch accelerator variables; with GPUs it sets
    each actor's CUDA_VISIBLE_DEVICES itself. fedkws never sets that variable."""
    import flwr.simulation

    from fedkws.fl import simulation

    calls = []
    monkeypatch.setattr(flwr.simulation, "run_simulation", lambda **kw: calls.append(kw))
    monkeypatch.setattr(simulation, "_init_ray", lambda init_args: None)  # no Ray started here
    for gpus, expected in ((0.25, None), (0.0, "0")):
        monkeypatch.delenv("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", raising=False)
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "7")
        simulation._run_ray(lambda grid: None, None, 2, {"num_cpus": 1, "num_gpus": gpus}, {}, {})
        assert calls[-1]["backend_config"]["client_resources"]["num_gpus"] == gpus
        assert os.environ.get("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO") == expected
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "7"
