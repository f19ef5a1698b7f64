"""`python -m ipasdctl.torchrun ARGS`: torchrun (torch.distributed.run) as `train --nproc` starts it.

It ends with the failed worker's exit status instead of torchrun's ChildFailedError traceback: each worker
has already left its one-line error for the launcher (`distributed.hand_error_to_launcher`). torchrun's own
warnings and error lines ("Sending process ... closing signal", "failed (exitcode: 2)") are
hidden unless LOGLEVEL says otherwise: a failing worker prints its own error or traceback.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Optional


def main(argv: Optional[list[str]] = None) -> int:
    if "LOGLEVEL" not in os.environ:  # workers report their own errors
        os.environ["LOGLEVEL"] = "CRITICAL"  # read when torch's elastic loggers are created, below
        logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)  # the plain getLogger ones
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    try:
        torchrun(argv)
    except ChildFailedError as exc:
        code = exc.get_first_failure()[1].exitcode
        return code if code > 0 else (128 - code if code < 0 else 1)  # -N: killed by signal N
    except SignalException as exc:
        return 128 + int(exc.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
