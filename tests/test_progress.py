"""Progress bars written to a file are redrawn rarely; on a terminal, as tqdm does by default."""

import io
import time

from tqdm import tqdm

from selfsup.progress import FILE_INTERVAL_S, bar_options


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def redraws(stream) -> int:
    """Draws of a bar over 0.8 s of updates (tqdm's default: one per 0.1 s)."""
    with tqdm(total=80, file=stream, **bar_options(stream)) as bar:
        for _ in range(80):
            time.sleep(0.01)
            bar.update(1)
    return stream.getvalue().count("\r")


def test_a_bar_written_to_a_file_is_redrawn_rarely():
    assert bar_options(io.StringIO()) == {"mininterval": FILE_INTERVAL_S}
    assert bar_options(Terminal()) == {}
    assert redraws(io.StringIO()) <= 3  # the first draw and the final one
    assert redraws(Terminal()) >= 5  # a terminal keeps tqdm's live redraws
