"""Shared command-line plumbing of the data tools: clean exits and signal handling."""

from __future__ import annotations

import signal
import sys


def run_tool(main, argv=None) -> int:
    """Run `main(argv)`; a DataError becomes `error: <message>` on stderr and exit status 1.

    SIGTERM is turned into SystemExit so that cleanup code (finally blocks that delete unfinished
    outputs) runs on `kill` as it does on Ctrl-C.
    """
    from an_megatron.data.arguments import data_error_message
    from an_megatron.data.errors import DataError

    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        main(argv)
    except DataError as error:
        print(f"error: {data_error_message(error)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: unfinished outputs removed", file=sys.stderr)
        return 130
    return 0
