"""``python -m tests.gated_worker GATE [worker args]``: ``python -m qpipeline.worker`` whose every
``Engine.generate`` waits, once its image is made, until the file ``GATE`` exists.

The worker test uses it to hold a job "in hand" for as long as it needs (its health, a SIGTERM
mid-job) without relying on a job being slow enough on the machine running the test.
"""

import sys
import time
from pathlib import Path

from qpipeline import worker
from qpipeline.engine import Engine

gate = Path(sys.argv.pop(1))
_generate = Engine.generate


def _gated_generate(self, *args, **kwargs):
    image = _generate(self, *args, **kwargs)
    while not gate.exists():
        time.sleep(0.05)
    return image


Engine.generate = _gated_generate

if __name__ == "__main__":
    sys.exit(worker.main())
