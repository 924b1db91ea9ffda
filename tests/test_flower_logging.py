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
