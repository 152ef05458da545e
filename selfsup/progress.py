"""Progress bars that suit where the output goes.

On a terminal tqdm redraws one line in place ten times a second. Written to a file (a batch
job's log, ``nohup``, CI) every redraw is kept, and a day-long run leaves a log of megabytes of
carriage returns; there a bar is redrawn every ``FILE_INTERVAL_S`` seconds instead.
"""

from __future__ import annotations

import sys
from typing import Any

FILE_INTERVAL_S = 30.0


def bar_options(stream: Any = None) -> dict[str, Any]:
    """Extra ``tqdm`` keyword arguments for output to ``stream`` (default: stderr, tqdm's)."""
    stream = sys.stderr if stream is None else stream
    try:
        interactive = stream.isatty()
    except (AttributeError, ValueError):  # closed or replaced streams
        interactive = False
    return {} if interactive else {"mininterval": FILE_INTERVAL_S}
