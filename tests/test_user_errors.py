"""Every user mistake gets one line: ``error: ...``, exit status 2, no traceback, nothing written.

The table of config values goes through the same reading and error printing as
``fedkws-train`` in this process; the promises about the process (exit status,
nothing written, Hydra's own folder handling) through the real command.
"""

from __future__ import annotations

import pytest

from commands import run_command
from fedkws.errors import user_errors
from fedkws.spec import from_config
from helpers import cli_env, compose_cfg, error_lines, tiny_dataset_overrides, train_command

# (overrides, a fragment the one error line must contain)
CONFIG_MISTAKES = [
    (["strategy.fraction_train=0"], "strategy.fraction_train=0.0: must be in (0, 1]"),
    (["strategy.fraction_train=1.5"], "strategy.fraction_train=1.5"),
    (["train.batch_size=0"], "train.batch_size=0: must be >= 1"),
    (["optimizer.lr=-0.1"], "optimizer.lr=-0.1: must be a finite number > 0"),
    (["optimizer.lr=fast"], "optimizer.lr='fast': must be a finite number > 0"),
    (["optimizer.lr=inf"], "optimizer.lr=inf: must be a finite number > 0"),
    # Catches: an added key that nothing reads, ignored without a word (Hydra's hint for
    # a misspelt key is to add it with +).
    (["+train.round=5"], "train.round=5: not a key of train (amp, batch_size,"),
    (["+foo=1"], "foo=1: not a key of the config (augment, bn,"),
    (["+dataset.seed=3"], "dataset.seed=3: not a key of dataset (download,"),
    (["+dataset.generate.speaker=9"], "dataset.generate.speaker=9: not a key of dataset.generate"),
    (["seed=1.7"], "seed=1.7: must be an integer"),
    (["+optimizer.betas=[0.9]"], "AdamW refuses these arguments: tuple index out of range"),
    (
        ["+federation.client_resources.num_cpu=1"],
        "federation.client_resources.num_cpu=1: not a key of federation.client_resources",
    ),
    # Catches: an optimiser argument the class refuses, a traceback in every client.
    (["+optimizer.foo=1"], "AdamW refuses these arguments: AdamW.__init__() got an unexpected"),
    (["optimizer=sgd", "optimizer.momentum=-1"], "SGD refuses these arguments: Invalid momentum"),
    (["optimizer._target_=torch.nn.Linear"], "must name an optimiser class"),
    # Catches: ranges every client would fail on (a zero speed factor divides by zero) or
    # that make no sense (a negative volume, a step size that ascends the loss).
    (["augment=full", "augment.speed_range=[0,0]"], "augment.speed_range=[0.0, 0.0]: must be"),
    (["augment.speed_range=[1.1,0.9]"], "low <= high"),
    (["augment.noise_volume=[-1,-2]"], "augment.noise_volume=[-1.0, -2.0]: must be [low, high]"),
    (["strategy=fedadam", "strategy.kwargs.eta=-1"], "strategy.kwargs.eta=-1: must be a finite"),
    (["strategy=fedyogi", "strategy.kwargs.beta_2=1"], "strategy.kwargs.beta_2=1: must be in"),
    (["seed=abc"], "seed='abc': must be an integer"),
    # Catches: "partition: expected non-negative integer", NumPy's words under another key.
    (["seed=-1"], "seed=-1: must be an integer >= 0"),
    (["resume=maybe"], "resume='maybe': true or false"),
    (["partition.local_test_fraction=1.0"], "partition.local_test_fraction=1.0"),
    (["bn=local", "norm=group"], "FedBN needs a model with BatchNorm"),
    (["logger.mode=bogus"], "logger.mode='bogus': must be one of offline, online, disabled"),
    (["bn.eval_modes=[eval,bogus]"], "bn.eval_modes='bogus'"),
    (["federation.client_resources.num_cpus=4"], "Ray could never place a client"),
    (["federation.client_resources.num_gpus=1"], "without CUDA"),
    (["strategy.min_train_clients=9"], "must be <= partition.num_clients"),
    (
        ["strategy=fedadam", "+strategy.kwargs.momentum=0.9"],
        "strategy.kwargs.momentum=0.9: not an argument of FedAdam",
    ),
    # A wrong kind where Flower's constructor takes a number: FedAdam accepts eta='abc' and
    # failed with a TypeError traceback after its first round.
    (
        ["strategy=fedadam", "strategy.kwargs.eta=abc"],
        "strategy.kwargs.eta='abc': must be a number",
    ),
    (
        ["strategy=fedavgm", "strategy.kwargs.server_momentum=true"],
        "strategy.kwargs.server_momentum=True: must be a number",
    ),
    (
        ["strategy=fedprox", "strategy.kwargs.proximal_mu=abc"],
        "strategy.kwargs.proximal_mu='abc': must be a number",
    ),
    (
        ["strategy=flower", "strategy.class_name=Krum", "+strategy.kwargs.num_malicious_nodes=0.5"],
        "strategy.kwargs.num_malicious_nodes=0.5: must be an integer",
    ),
    (  # Catches: 2.0 reaching MultiKrum, which slices with it after the first round.
        [
            "strategy=flower",
            "strategy.class_name=MultiKrum",
            "+strategy.kwargs.num_nodes_to_select=2.0",
        ],
        "strategy.kwargs.num_nodes_to_select=2.0: must be an integer",
    ),
    (["dataset.protocol=50class"], "dataset.protocol='50class'"),
    (["features.kind=wavelet"], "features: Unknown feature kind 'wavelet'"),
    (["train.local_epochs=two"], "train.local_epochs='two'"),
    # Catches: int() quietly truncating 2.5 rounds to 2 (or true to 1).
    (["train.rounds=2.5"], "train.rounds=2.5: must be int"),
    (["train.rounds=true"], "train.rounds=True: must be int"),
    (["federation.actors=1.5"], "federation.actors=1.5: must be int | None"),
    (["federation.actors=0"], "federation.actors=0: must be >= 1, or null"),
    # Catches: two clients under one name in results.json, the plots and W&B.
    (
        ["partition.num_clients=2", "partition.names=[a,a]"],
        "partition.names=['a', 'a']: must be different names",
    ),
    # Catches: Python's "not all arguments converted during string formatting" instead.
    (
        ["model=cnn", "model.channels=[a,b]"],
        "model.channels=['a', 'b']: must be a list of integers >= 1",
    ),
    (["federation.supernodes=0"], "federation.supernodes=0: must be >= 1, auto, or null"),
    (["federation.supernodes=two"], "federation.supernodes='two': must be an integer >= 1, auto"),
    (["federation.supernodes=2.5"], "federation.supernodes=2.5: must be an integer >= 1, auto"),
    (
        ["strategy=cyclic", "federation.supernodes=2"],
        "federation.supernodes=2: must be auto or null with strategy=cyclic",
    ),
    # Catches: the synthetic corpus's sizes reaching the generator (a ValueError traceback,
    # after the run folder was made), or quietly truncated (2.5 speakers, true held out).
    (["dataset.generate.utterances=0"], "dataset.generate.utterances=0: must be an integer >= 1"),
    (["dataset.generate.seed=-1"], "dataset.generate.seed=-1: must be an integer >= 0"),
    (["dataset.generate.speakers=2.5"], "dataset.generate.speakers=2.5: must be an integer >= 3"),
    (
        ["dataset.generate.held_out_speakers=true"],
        "dataset.generate.held_out_speakers=True: must be null (10 % of the speakers) or an",
    ),
    # Catches: generated, then refused for short noise files.
    (
        ["dataset.generate.noise_seconds=0.5"],
        "dataset.generate.noise_seconds=0.5: must be a number of seconds >= 1",
    ),
    # Catches: accepted, and a summary that counted 100 other words where there are 25.
    (
        ["dataset.generate.unknown_words=100"],
        "dataset.generate.unknown_words=100: must be null (all 25 other words) or an integer",
    ),
    (["partition=dirichlet", "partition.alpha=inf"], "partition.alpha=inf: must be > 0 and"),
    # Catches: a second, knock-on line about strategy.min_train_clients.
    (["partition.num_clients=0"], "partition.num_clients=0: must be >= 1"),
    # Catches: torchaudio's IndexError traceback once the features were being computed.
    (["features=mfcc", "features.n_mfcc=0"], "features.n_mfcc=0: must be an integer >= 1"),
    # Catches: "model={...}: cannot build resnet: '<' not supported between ..." (the key
    # not named), and a width of 2.5 taken as 2.
    (["model=resnet", "model.width=abc"], "model.width='abc': must be an integer >= 1"),
    (["model=resnet", "model.width=2.5"], "model.width=2.5: must be an integer >= 1"),
    (["model=resnet", "model.depth=7"], "model.depth=7: must be one of 10, 18, 34, 50"),
    # Catches: a TypeError traceback (a group set to null) and OmegaConf's interpolation
    # tracebacks (a reference that does not resolve), each after the run folder was made.
    (["train=null"], "train=None: must be a mapping of its keys, not null or a value"),
    # Catches: norm.groups=abc as an int() traceback, 2.5 made 2.
    (["norm=group", "norm.groups=2.5"], "norm.groups=2.5: must be an integer >= 1"),
    (["train.rounds=${nope}"], "train.rounds: cannot be resolved (Interpolation key 'nope'"),
    (
        ["train.rounds=${oc.env:FEDKWS_NO_SUCH_VARIABLE}"],
        "train.rounds: cannot be resolved (KeyError raised while resolving interpolation",
    ),
    # Catches: W&B's UsageError / pydantic tracebacks after setup, a run that hung in W&B's
    # finish after a zero init_timeout, and a name that put the run outside outputs/.
    (["logger.mode=offline", "logger.project='a/b?c'"], "logger.project='a/b?c': must be"),
    (["logger.mode=offline", "logger.project=''"], "logger.project='': must be a W&B project name"),
    (["logger.mode=offline", "logger.tags=[" + "x" * 70 + "]"], "logger.tags=['xxx"),
    (["logger.mode=online", "logger.init_timeout=0"], "logger.init_timeout=0.0: must be a"),
    (["name=../escaped"], "name='../escaped': must be a relative folder name"),
    (["name=''"], "name='': must be a relative folder name"),
    # Catches: a run that evaluated nothing (exit 0, no accuracy in results.json).
    (
        ["bn=local", "bn.eval_modes=[recalibrated]"],
        "bn.eval_modes=['recalibrated']: "
        "recalibration does not apply to bn.sync=local, and no other mode is asked: add eval",
    ),
    (
        ["norm=group", "bn.eval_modes=[recalibrated]"],
        "recalibration does not apply to norm=group (no BatchNorm)",
    ),
    # Catches: ValueError tracebacks (and a failed.txt) once the run reached the download.
    (
        ["dataset=speech_commands_v2", "dataset.download.sha256=abc"],
        "dataset.download.sha256='abc': must be null or 64 hexadecimal digits",
    ),
    (
        ["dataset=speech_commands_v2", "dataset.download.version=v0.03"],
        "dataset.download.version='v0.03': must be one of v0.01, v0.02",
    ),
]


@pytest.mark.parametrize(("overrides", "expected"), CONFIG_MISTAKES, ids=lambda v: str(v))
def test_config_mistake_is_one_line(overrides, expected, tmp_path, capsys):
    cfg = compose_cfg(overrides, tmp_path / "data")
    with pytest.raises(SystemExit) as exited, user_errors():
        from_config(cfg)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert len(error_lines(err)) == 1 and err.count("\n") == 1, err
    assert expected in error_lines(err)[0]
    assert not (tmp_path / "data").exists()


def test_all_problems_of_a_config_are_reported_together(tmp_path):
    """Through the real command: every problem listed, exit 2, nothing written."""
    run_dir = tmp_path / "outputs" / "2026-01-01" / "run"  # Hydra makes all three folders
    out = run_command(
        train_command("train.batch_size=0", "optimizer.lr=-1", "logger.mode=x",
                      f"hydra.run.dir={run_dir}", f"data_dir={tmp_path / 'data'}"),
        capture_output=True, text=True, env=cli_env(), timeout=120,
    )  # fmt: skip
    keys = sorted(line.split("=")[0] for line in error_lines(out.stderr))
    assert out.returncode == 2
    assert keys == ["error: logger.mode", "error: optimizer.lr", "error: train.batch_size"]
    assert "Traceback" not in out.stderr + out.stdout
    # Validation comes before anything is written: no run folder (nor the folders above it
    # that Hydra made for it), no data folder.
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "data").exists()


# Mistakes Hydra itself finds before fedkws sees a config (it would print several lines
# and a hint about HYDRA_FULL_ERROR, exit 1).
HYDRA_MISTAKES = [
    (["train.round=5"], "error: train.round: not a key of the config (a typo? fedkws-train "
     "--cfg job prints every key)"),
    (["model.stem=light"], "error: model.stem: not a key of the config (a typo? a new "
     "argument is added with +model.stem=light)"),
    (["experiment=nope"], "error: In 'config': Could not find 'experiment/nope'; available "
     "options in 'experiment': augment_ablation, bn_ablation, bn_study, literature, main,"),
    (["train.rounds=[1"], "error: train.rounds=[1: does not parse (no viable alternative"),
    (["-m", "hydra/launcher=nope"], "available options in 'hydra/launcher': basic, "
     "fedkws_parallel, fedkws_slurm"),
    # A sweep is checked before its folder or Ray head exist: every swept value once.
    (["-m", "train.round=1,2"], "error: train.round: not a key of the config"),
    (["-m", "seed=0,1", "model=cnn,nope"], "error: In 'config': Could not find 'model/nope'"),
    (["-m", "seed=0,1", "train.local_epochs=1,0"], "error: train.local_epochs=0: must be >= 1 "
     "(in the sweep's job seed=0 train.local_epochs=0)"),
    # Catches: values that fail only together, found by the job that has both, mid-sweep.
    (["-m", "bn=full,local", "norm=batch,group"], "error: bn.sync='local': FedBN needs a model "
     "with BatchNorm (norm=batch, not group) (in the sweep's job bn=local norm=group)"),
    # Catches: "model.width: not a key" with no word on why (both presets have it).
    (["-m", "experiment=seed_repro,train_mode_caveat", "model.width=8"], "swept, the sweep's "
     "base config is composed without the presets: give the key's group too"),
    # Catches: argparse's 9-line usage text for an option after the overrides.
    (["train.rounds=1", "-m", "seed=0,1"], "options (-m, --cfg, ...) go before the key=value "
     "overrides"),
    # Catches: Hydra's ValueError traceback ("Config group override must be a string").
    (["model=null"], "error: model=null: a config group's choice is the name of one of its "
     "options (conf/model/), not null"),
    # Catches: an internal default (10 rounds) silently used for a deleted key, run or sweep.
    (["~train.rounds"], "error: ~train.rounds: a key of fedkws's config cannot be deleted"),
    (["-m", "seed=0,1", "~train.rounds"], "error: ~train.rounds: a key of fedkws's config "
     "cannot be deleted"),
    # Catches: two jobs whose overrides differ only in an excluded key run in one folder
    # (a parallel sweep lost one's results, exit 0; a sequential one failed mid-sweep).
    (["-m", "progress=true,false"], "error: the sweep's jobs progress=True and "
     "progress=False would both run in seed=0: progress=False is left out of job folder names"),
    # Catches: joblib's "n_jobs == 0 in Parallel has no meaning" traceback.
    (["-m", "seed=0,1", "hydra/launcher=fedkws_parallel", "hydra.launcher.n_jobs=0"],
     "error: hydra.launcher.n_jobs=0: must be the number of jobs at once (>= 1)"),
]  # fmt: skip


@pytest.mark.parametrize(("overrides", "expected"), HYDRA_MISTAKES, ids=lambda v: str(v))
def test_hydras_own_mistakes_are_one_line(overrides, expected, tmp_path):
    # Catches: Hydra's multi-line report (exit 1) reaching the user for a typo; a sweep
    # that makes its folder and starts Ray before its first job finds the mistake.
    out = run_command(
        train_command(*overrides, f"hydra.run.dir={tmp_path / 'run'}",
                      f"hydra.sweep.dir={tmp_path / 'sweep'}"),
        capture_output=True, text=True, env=cli_env(), timeout=120,
    )  # fmt: skip
    assert out.returncode == 2
    assert out.stderr.splitlines() == error_lines(out.stderr)
    (line,) = error_lines(out.stderr)
    assert line.startswith(expected) if expected.startswith("error:") else expected in line
    assert "HYDRA_FULL_ERROR" not in out.stderr and not list(tmp_path.iterdir())
    assert "Ray head" not in out.stdout


def test_sweep_samples_are_every_job_of_a_small_sweep(monkeypatch):
    from omegaconf import OmegaConf

    from fedkws import train

    config = OmegaConf.create({"hydra": {
        "overrides": {"task": ["seed=0,1,2", "+model.extra=x", "optimizer.lr=0.1"]},
        "sweeper": {"params": {"seed": "5", "arm": "a,b"}},  # the command line wins
    }})  # fmt: skip
    jobs = [[f"seed={s}", f"arm={a}", "+model.extra=x", "optimizer.lr=0.1"]
            for s in (0, 1, 2) for a in "ab"]  # fmt: skip
    assert train.sweep_samples(config) == jobs
    monkeypatch.setattr(train, "CHECK_EVERY_JOB_UP_TO", 5)  # a larger sweep: a sample
    assert len(train.sweep_samples(config)) == 4


def test_sweep_samples_use_every_swept_value_once_beside_the_first_of_the_others(monkeypatch):
    from omegaconf import OmegaConf

    from fedkws import train
    from fedkws.train import sweep_samples

    monkeypatch.setattr(train, "CHECK_EVERY_JOB_UP_TO", 1)
    config = OmegaConf.create({"hydra": {
        "overrides": {"task": ["seed=0,1,2", "+model.extra=x", "optimizer.lr=0.1"]},
        "sweeper": {"params": {"seed": "5", "arm": "a,b"}},  # the command line wins
    }})  # fmt: skip
    assert sweep_samples(config) == [
        ["seed=0", "arm=a", "+model.extra=x", "optimizer.lr=0.1"],
        ["seed=1", "arm=a", "+model.extra=x", "optimizer.lr=0.1"],
        ["seed=2", "arm=a", "+model.extra=x", "optimizer.lr=0.1"],
        ["seed=0", "arm=b", "+model.extra=x", "optimizer.lr=0.1"],
    ]
    interval = OmegaConf.create(
        {"hydra": {"overrides": {"task": ["optimizer.lr=interval(0.1,1)"]}}}
    )
    assert sweep_samples(interval) == []  # cannot be listed: each job checks itself


def _tiny(data_dir, tiny_root, *overrides):
    return train_command(*tiny_dataset_overrides(data_dir, tiny_root), "model=cnn", *overrides)


def test_a_file_where_a_folder_is_expected(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    for override in (f"cache_dir={blocker}", f"hydra.run.dir={blocker}"):
        out = run_command(
            train_command(override, f"data_dir={tmp_path / 'data'}"),
            capture_output=True, text=True, env=cli_env(), timeout=120,
        )  # fmt: skip
        assert out.returncode == 2, (override, out.stderr)
        assert len(error_lines(out.stderr)) == 1 and "Traceback" not in out.stderr, out.stderr
        assert str(blocker) in error_lines(out.stderr)[0]
    assert blocker.read_text() == "not a folder"


def test_a_folder_that_cannot_be_made(tmp_path):
    # Catches: Hydra's FileNotFoundError traceback for a run or sweep folder under /proc,
    # where os.access says yes to root but no folder can be made.
    for args in (
        ["hydra.run.dir=/proc/fedkws-nope"],
        ["-m", "seed=0,1", "hydra.sweep.dir=/proc/fedkws-nope"],
    ):
        command = train_command(*args, f"data_dir={tmp_path / 'data'}")
        out = run_command(command, capture_output=True, text=True, env=cli_env(), timeout=120)
        assert out.returncode == 2, (args, out.stderr)
        lines = error_lines(out.stderr)
        # root: "no folder can be made in /proc (...)"; anyone else: "/proc is not writable"
        assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
        assert lines[0].startswith(f"error: {args[-1].split('=')[0]}='/proc/fedkws-nope': ")


@pytest.mark.parametrize("module", ["fedkws.train", "fedkws.prepare"])
def test_a_dataset_root_that_cannot_be_made(tmp_path, module):
    # Catches: a FileNotFoundError traceback from the dataset's lock file beside the root.
    import sys

    command = [sys.executable, "-m", module, "dataset.root=/proc/fedkws-nope",
               f"data_dir={tmp_path / 'data'}", f"hydra.run.dir={tmp_path / 'run'}"]  # fmt: skip
    out = run_command(command, capture_output=True, text=True, env=cli_env(), timeout=120)
    assert out.returncode == 2, out.stderr
    lines = error_lines(out.stderr)
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    assert lines[0].startswith("error: dataset.root='/proc/fedkws-nope': ")
    assert not (tmp_path / "run").exists()


def test_an_empty_run_or_sweep_folder_is_refused(tmp_path):
    # Catches: `hydra.run.dir=$RUN` with RUN unset writing the run into the current folder.
    for args in (["hydra.run.dir="], ["-m", "seed=0,1", "hydra.sweep.dir="]):
        command = train_command(*args, f"data_dir={tmp_path / 'data'}")
        out = run_command(command, capture_output=True, text=True, env=cli_env(), timeout=120,
                          cwd=tmp_path)  # fmt: skip
        assert out.returncode == 2, (args, out.stderr)
        lines = error_lines(out.stderr)
        assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
        key = args[-1].rstrip("=")
        assert lines[0] == f"error: {key}='': must name a folder (an unset shell variable?)"
        assert list(tmp_path.iterdir()) == [], args


@pytest.mark.parametrize("launcher", ["basic", "fedkws_parallel"])
def test_a_file_where_a_jobs_folder_goes(tmp_path, launcher):
    # Catches: Hydra's FileExistsError / NotADirectoryError traceback (the parallel launcher:
    # joblib's re-raised one) when a job's folder, or a folder above it, is a file.
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "job0").write_text("not a folder")
    command = train_command(
        "-m", "seed=0,1", "strategy=central", f"hydra/launcher={launcher}",
        f"hydra.sweep.dir={sweep}", "hydra.sweep.subdir=job${hydra.job.num}/run",
        f"data_dir={tmp_path / 'data'}",
    )  # fmt: skip
    out = run_command(command, capture_output=True, text=True, env=cli_env(), timeout=120)
    assert out.returncode == 2, out.stderr
    lines = error_lines(out.stderr)
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    assert lines[0].startswith(f"error: cannot make the job's folder {sweep / 'job0' / 'run'}: ")
    assert f"{sweep / 'job0'} is a file" in lines[0]
    assert (sweep / "job0").read_text() == "not a folder"


def test_a_dangling_link_for_the_run_folder(tmp_path):
    # Catches: Hydra's FileExistsError traceback, then a message about the sweep's folders
    # for a single run.
    link = tmp_path / "run"
    link.symlink_to(tmp_path / "nowhere")
    command = train_command(f"hydra.run.dir={link}", f"data_dir={tmp_path / 'data'}")
    out = run_command(command, capture_output=True, text=True, env=cli_env(), timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert error_lines(out.stderr) == [
        f"error: hydra.run.dir='{link}': {link} is a link to {tmp_path / 'nowhere'}, which "
        "does not exist"
    ]


def test_dataset_without_background_noise(tmp_path, tiny_root):
    """The 12-class protocol needs _background_noise_ for its silence class."""
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(tiny_root, root, ignore=shutil.ignore_patterns("_background_noise_"))
    out = run_command(
        train_command("dataset.generate=null", f"dataset.root={root}",
                      f"cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={tmp_path / 'run'}"),
        capture_output=True, text=True, env=cli_env(), timeout=120,
    )  # fmt: skip
    assert out.returncode == 2, out.stderr
    lines = error_lines(out.stderr)
    assert len(lines) == 1 and "_background_noise_" in lines[0], out.stderr
    assert "Traceback" not in out.stderr


def test_the_slurm_launcher_on_a_machine_without_slurm_is_one_line(tmp_path):
    # Catches: submitit's "Could not detect srun" traceback after the sweep's Ray head had
    # started; without the extra, Hydra's "could not load" line with no word of the extra.
    out = run_command(
        train_command("-m", "hydra/launcher=fedkws_slurm", "seed=0,1",
                      f"hydra.sweep.dir={tmp_path / 'sweep'}"),
        capture_output=True, text=True, env=cli_env(), timeout=120,
    )  # fmt: skip
    assert out.returncode == 2 and out.stderr.splitlines() == error_lines(out.stderr)
    (line,) = error_lines(out.stderr)
    try:
        import hydra_plugins.hydra_submitit_launcher  # noqa: F401
    except ImportError:
        assert "pip install -e '.[slurm]'" in line
    else:
        assert "this machine has no SLURM" in line
    assert "Ray head" not in out.stdout and not list(tmp_path.iterdir())


def test_a_slurm_sweep_starts_no_shared_ray_head():
    # Catches: a head on the submitting machine, at 127.0.0.1, that no job on a node can reach.
    from omegaconf import OmegaConf

    from fedkws.train import SweepRay

    config = OmegaConf.create({
        "federation": {"backend": "ray", "sweep_ray": True},
        "hydra": {"launcher": {"_target_":
                  "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"},
                  "overrides": {"task": ["seed=0,1"]}},
    })  # fmt: skip
    callback = SweepRay()
    callback.on_multirun_start(config)
    assert callback.head is None


def test_only_hydras_own_folder_mkdir_is_read_as_the_run_folder(tmp_path):
    # Catches: a mkdir failing inside the run (its cache, its dataset) reported as
    # "cannot make the run's folder <that path>".
    from fedkws.errors import _job_folder_error

    blocker = tmp_path / "a_file"
    blocker.write_text("")

    def run_job(task=None):  # the frame Hydra's run_job makes, calling mkdir itself or not
        if task is not None:
            return task()
        return (blocker / "run").mkdir(parents=True, exist_ok=True)

    def the_runs_own_work():
        return (blocker / "cache").mkdir(parents=True, exist_ok=True)

    for call, expected in ((run_job, True), (lambda: run_job(the_runs_own_work), False)):
        with pytest.raises(OSError) as err:
            call()
        line = _job_folder_error(err.value)
        assert (line is not None) is expected, line
    assert line is None


def test_a_constructor_argument_may_be_deleted_a_config_key_not():
    # `~strategy.kwargs.eta` hands the argument back to Flower's default, `~optimizer.X` to
    # torch's: allowed.
    from fedkws.errors import ConfigError
    from fedkws.train import refuse_deleted_keys

    refuse_deleted_keys(["~strategy.kwargs.eta", "~optimizer.weight_decay", "seed=1"])
    for key in ("train.rounds", "logger", "strategy.name", "optimizer._target_"):
        with pytest.raises(ConfigError, match=f"~{key}: a key of fedkws's config cannot be"):
            refuse_deleted_keys([f"~{key}"])


def test_a_sweep_preset_without_multirun_says_it_runs_once(tmp_path):
    # Catches: `fedkws-train experiment=main` quietly running one unswept job.
    out = run_command(
        train_command("experiment=main", "train.rounds=0", f"hydra.run.dir={tmp_path / 'r'}"),
        capture_output=True, text=True, env=cli_env(), timeout=120,
    )  # fmt: skip
    assert out.returncode == 2
    assert out.stderr.splitlines() == [
        "note: experiment=main is a sweep (arm swept); without -m this is one run of its "
        "base config (add -m for the sweep)",
        "error: train.rounds=0: must be >= 1",
    ]
    # The swept key set on the command line: that is the run asked for, nothing to say.
    out = run_command(
        train_command("experiment=main", "arm=group", "train.rounds=0",
                      f"hydra.run.dir={tmp_path / 'r'}"),
        capture_output=True, text=True, env=cli_env(), timeout=120,
    )  # fmt: skip
    assert out.stderr.splitlines() == ["error: train.rounds=0: must be >= 1"]


def test_the_usage_hint_is_for_overrides_after_an_option_only(capsys):
    import argparse

    from fedkws.errors import _one_line_usage_errors

    for argv, hint in ((["a=1", "-m", "b=2,3"], True), (["--foo=1"], False)):
        parser = argparse.ArgumentParser(prog="fedkws-train")
        parser.add_argument("-m", action="store_true")
        parser.add_argument("overrides", nargs="*")
        with pytest.raises(SystemExit):
            _one_line_usage_errors(parser).parse_args(argv)
        (line,) = capsys.readouterr().err.splitlines()
        assert line.startswith("error: fedkws-train: unrecognized arguments: ")
        assert ("go before the key=value overrides" in line) == hint, line


def test_a_run_folder_in_use_is_refused_to_a_second_run(tmp_path):
    # Catches: two runs started into one folder (two commands; two jobs of a parallel sweep)
    # both writing there, the later one's files replacing the other's, exit 0.
    from fedkws.errors import RunRefused
    from fedkws.fileio import folder_in_use

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with folder_in_use(run_dir, RunRefused), folder_in_use(run_dir, RunRefused):  # re-entrant
        out = run_command(
            train_command("train.rounds=1", f"hydra.run.dir={run_dir}",
                          f"data_dir={tmp_path / 'data'}"),
            capture_output=True, text=True, env=cli_env(), timeout=120,
        )  # fmt: skip
    assert out.returncode == 2, out.stderr[-2000:]
    assert error_lines(out.stderr) == [
        f"error: {run_dir}: another fedkws run is writing into this folder"
    ]
    assert list(run_dir.iterdir()) == [] and not (tmp_path / "data").exists()
    with folder_in_use(run_dir, RunRefused):  # released: taken again
        pass


def test_logger_and_name_checks_leave_what_worked(tmp_path):
    # W&B's rules only where W&B runs; a nested name (outputs/study/arm1) stays allowed.
    from fedkws.spec import from_config

    cfg = compose_cfg(["logger.project='a:b'", "name=study/arm1"], tmp_path / "data")
    assert from_config(cfg).name == "study/arm1"


def test_a_folder_that_cannot_be_locked_is_used_unlocked(tmp_path, monkeypatch):
    # Catches: every run refused as "another fedkws run is writing" where flock on a folder
    # fails for another reason (NFS: EBADF, a mount without locks: ENOLCK).
    import errno

    from fedkws import fileio
    from fedkws.errors import RunRefused

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fileio.fcntl, "flock", no_locks)
    with fileio.folder_in_use(tmp_path, RunRefused):
        pass


def test_a_device_mistake_is_listed_with_the_others(tmp_path):
    # Catches: `device=cuda` (no CUDA here) said alone, the config's other mistakes unsaid.
    import torch

    from fedkws.errors import ConfigError
    from fedkws.spec import from_config

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: device=cuda is no mistake here")
    cfg = compose_cfg(["device=cuda", "train.batch_size=0"], tmp_path / "data")
    with pytest.raises(ConfigError) as refused:
        from_config(cfg)
    lines = str(refused.value).splitlines()
    assert len(lines) == 2 and lines[0].startswith("train.batch_size=0: must be >= 1")
    assert lines[1].startswith("device='cuda': CUDA is not available on this machine")
