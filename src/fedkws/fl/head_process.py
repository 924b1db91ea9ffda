"""``ray start --block`` that ends itself once the process that started it is gone.

``python -m fedkws.fl.head_process OWNER_PID start --head --block ...`` runs
Ray's own ``ray`` command with the given arguments, plus one thread that
watches the owner through this process's stdin, a pipe from it:

- ``stop`` on the pipe (:meth:`LocalRayHead.stop
  <fedkws.fl.ray_head.LocalRayHead.stop>`), or the pipe closed without it,
  or a parent other than ``OWNER_PID`` (the owner was killed, even with
  SIGKILL, so nothing of it could clean up): the thread sends this process
  one SIGTERM and ends. ``ray start`` then ends the Ray processes it launched;
  without an owner left, its ``--temp-dir`` is removed too.

One thread sends the only SIGTERM: Ray's handler is not re-entrant, so a stop
and the owner's death at the same moment must not send two.
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import sys
import threading

POLL_S = 0.5


def _watch(owner: int) -> None:
    stdin = sys.stdin.fileno()
    while os.getppid() == owner:
        if select.select([stdin], [], [], POLL_S)[0]:
            os.read(stdin, 64)  # "stop", or b"" when the owner's end is closed: either way
            break
    os.kill(os.getpid(), signal.SIGTERM)


def main(argv: list[str]) -> None:
    """Run ``ray *argv[1:]`` while the process ``argv[0]`` is this one's parent."""
    owner = int(argv[0])
    if os.getppid() != owner:  # already gone before Ray started
        raise SystemExit(1)
    # Until Ray installs its own handler: a SIGTERM still runs the `finally` below.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    threading.Thread(target=_watch, args=(owner,), daemon=True, name="owner-watch").start()
    try:
        from ray.scripts.scripts import main as ray_main

        sys.argv = ["ray", *argv[1:]]
        ray_main()
    finally:
        temp = [a.split("=", 1)[1] for a in argv if a.startswith("--temp-dir=")]
        if os.getppid() != owner and temp:  # nobody is left to remove Ray's folder
            shutil.rmtree(temp[0], ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1:])
