"""Errors where people look: under torchrun, a failure is printed once (by rank 0) and handed to
torchrun's own error reporting, so the root-cause block at the bottom of its failure summary
carries megatiny's message instead of "To enable traceback see: ...".

torchrun (torch.distributed.elastic) gives every worker a `TORCHELASTIC_ERROR_FILE`; the JSON a
worker writes there (what `torch.distributed.elastic.multiprocessing.errors.record` writes for an
uncaught exception) is what the summary prints as that rank's traceback.
"""

from __future__ import annotations

import json
import os
import sys
import time


def fail(message: str, code: int) -> int:
    """Print `message` on rank 0 (or without torchrun) and record it for torchrun; returns `code`.

    Other ranks stay quiet: the failures reported this way are the same on every rank (config
    checks, run-directory and checkpoint agreement, a non-finite reduced loss). They also linger
    two seconds before exiting, so that rank 0's failure, which carries the message, is the first
    torchrun sees (its root cause is the earliest failure, timed in whole seconds; torchrun
    stops the lingering ranks once rank 0 has failed)."""
    if os.environ.get("RANK", "0") != "0":
        if os.environ.get("TORCHELASTIC_ERROR_FILE"):
            time.sleep(2.0)
        return code
    print(message, file=sys.stderr, flush=True)
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        record = {"message": message, "extraInfo": {"py_callstack": message,
                                                    "timestamp": str(int(time.time()))}}  # fmt: skip
        try:
            with open(path, "w", encoding="utf-8") as f:
                json.dump({"message": record}, f)
        except OSError:
            pass  # the message is printed above; torchrun just shows less
    return code
