"""Clean end of a ``torchrun`` training worker (``configs/multi_gpu_train.json``'s ``finalize``).

With DistributedDataParallel on gloo, ``destroy_process_group()`` does not stop gloo's worker threads:
DDP keeps the process group alive until the process ends, so the threads outlive Python's shutdown. A
thread that touches a tensor while the interpreter is being torn down aborts the process
("terminate called without an active exception", SIGABRT) after all work is done and saved, and
torchrun then reports the whole run as failed (seen here about once in 15-30 CPU runs). A worker that
torchrun started therefore flushes what it wrote and leaves with ``os._exit(0)`` once every rank has
finished, so no interpreter teardown runs beside those threads.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterable
from typing import Any

import torch.distributed as dist
from monai.handlers import TensorBoardHandler

#: set by torchrun in every worker it starts
TORCHRUN_ENV = "TORCHELASTIC_RUN_ID"


def finish_worker(handlers: Iterable[Any] = ()) -> None:
    """Close the handlers' writers, wait for every rank, release the process group and, under
    torchrun, end the process at once with status 0 (see the module docstring for why)."""
    for handler in handlers:
        if isinstance(handler, TensorBoardHandler):
            handler.close()  # flush its event file: os._exit skips the writer's own shutdown
    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # no rank leaves while another still communicates
        dist.destroy_process_group()
    if not os.environ.get(TORCHRUN_ENV):
        return
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
