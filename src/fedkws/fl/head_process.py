"""``ray start --block`` that ends itself once the process that started it is gone.

``python -m fedkws.fl.head_process OWNER_PID start --head --block ...`` runs
Ray's own ``ray`` command with the given arguments, plus one thread that
watches the parent: when it is no longer ``OWNER_PID`` (the sweep's process
was killed, even with SIGKILL, so nothing of it could clean up), the thread
sends this process one SIGTERM, the signal :meth:`LocalRayHead.stop
<fedkws.fl.ray_head.LocalRayHead.stop>` sends; ``ray start`` ends the Ray
processes it launched, and its ``--temp-dir`` is removed.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import threading
import time

POLL_S = 0.5


def _watch(owner: int) -> None:
    while os.getppid() == owner:
        time.sleep(POLL_S)
    os.kill(os.getpid(), signal.SIGTERM)


def main(argv: list[str]) -> None:
    """Run ``ray *argv[1:]`` while the process ``argv[0]`` is this one's parent."""
    owner = int(argv[0])
    if os.getppid() != owner:  # already gone before Ray started
        raise SystemExit(1)
    threading.Thread(target=_watch, args=(owner,), daemon=True, name="owner-watch").start()
    from ray.scripts.scripts import main as ray_main

    sys.argv = ["ray", *argv[1:]]
    try:
        ray_main()
    finally:
        temp = [a.split("=", 1)[1] for a in argv if a.startswith("--temp-dir=")]
        if os.getppid() != owner and temp:  # nobody is left to remove Ray's folder
            shutil.rmtree(temp[0], ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1:])
