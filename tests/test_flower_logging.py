"""What of Flower's own logging reaches the console of a fedkws run."""

from __future__ import annotations

import logging


def test_flowers_own_lines_are_kept_but_not_the_routine_ones():
    # Catches: every job printing Flower's advice to replace a call fedkws makes on purpose,
    # or every actor's warning that the simulation ended it (the client app's module, which
    # the actors import, drops it); or a filter that swallows Flower's other warnings.
    from flwr.supercore.logger import log, warn_deprecated_feature

    import fedkws.fl.client_app  # noqa: F401 - as an actor process does
    from fedkws.fl.simulation import quiet_flower_logging

    shown: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: shown.append(record.getMessage())
    flwr_log = logging.getLogger("flwr")
    flwr_log.addHandler(handler)  # sees what passes the logger's filters, as Flower's does
    try:
        quiet_flower_logging()
        warn_deprecated_feature("The `run_simulation` function is deprecated")
        log(logging.WARNING, "Manually terminating ClientAppActor")
        log(logging.WARNING, "Actor ran out of memory")
    finally:
        flwr_log.removeHandler(handler)
    assert shown == ["Actor ran out of memory"]


def test_after_an_abort_the_messages_it_cut_off_are_not_reported():
    # Catches: a second Ctrl-C in a sweep whose actors are handed on printing Flower's
    # "An exception was raised when processing a message" lines for the messages the abort
    # cut off, as if something had gone wrong; and a filter that hides errors otherwise.
    from flwr.supercore.logger import log

    from fedkws import lifecycle
    from fedkws.fl.simulation import quiet_flower_logging

    shown: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: shown.append(record.getMessage())
    flwr_log = logging.getLogger("flwr")
    flwr_log.addHandler(handler)
    try:
        quiet_flower_logging()
        log(logging.ERROR, "An exception was raised when processing a message by RayBackend")
        lifecycle._ABORT.set()  # what the second signal's handler sets
        log(logging.ERROR, "An exception was raised when processing a message by RayBackend")
        log(logging.WARNING, "Actor ran out of memory")
    finally:
        lifecycle.reset()
        flwr_log.removeHandler(handler)
    assert shown == [
        "An exception was raised when processing a message by RayBackend",
        "Actor ran out of memory",
    ]


def test_the_headline_shows_a_sweep_folder_name_as_it_is(make_cfg):
    # Catches: `bn.eval_modes=[eval]` in a sweep's folder name read as console markup and
    # dropped from the run's first line (and from its resume and stop lines).
    from types import SimpleNamespace

    import torch
    from rich.console import Console

    from fedkws.run import _headline
    from fedkws.spec import from_config

    run_dir = "/tmp/sweep/bn.eval_modes=[eval],model.channels=[4,4]/seed=0"
    recipe = SimpleNamespace(parts=SimpleNamespace(clients=[0, 1]), model=torch.nn.Linear(2, 2))
    console = Console(record=True, width=400)
    console.print(_headline(from_config(make_cfg([])), recipe, run_dir))
    assert console.export_text().rstrip().endswith(f"-> {run_dir}")
