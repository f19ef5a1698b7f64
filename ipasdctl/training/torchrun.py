"""`python -m ipasdctl.training.torchrun ARGS`: torchrun (torch.distributed.run) as `train --nproc` starts it.

It ends with the exit status of the worker that failed first, instead of torchrun's ChildFailedError
traceback, and prints that worker's error once (`launcher.report_failure`): its one-line error, its
traceback, or, for a worker killed by a signal (out of memory, say), one line saying so. The other workers'
errors (a peer's death breaks their collectives) are left out.
torchrun's own warnings and error lines ("Sending process ... closing signal", "failed (exitcode: 2)") are
hidden unless LOGLEVEL says otherwise.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Optional


def main(argv: Optional[list[str]] = None) -> int:
    quiet = "LOGLEVEL" not in os.environ
    if quiet:
        os.environ["LOGLEVEL"] = "CRITICAL"  # read when torch's elastic loggers are created by the imports below
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    if quiet:
        del os.environ["LOGLEVEL"]  # not for the workers
        logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)  # the plain getLogger ones
    from .launcher import ERROR_DIR_ENV, report_failure

    folder = os.environ.get(ERROR_DIR_ENV)
    try:
        torchrun(argv)
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        if folder:
            return report_failure(folder, rank, failure.exitcode)
        return 128 - failure.exitcode if failure.exitcode < 0 else failure.exitcode or 1
    except SignalException as exc:
        if folder:
            report_failure(folder, None, 0)
        return 128 + int(exc.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
