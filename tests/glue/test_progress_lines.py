"""The -v progress of long transfers (arbor_glue/progress.py): a line at
most once a second with bytes, size and rate, one at the end; nothing for
a transfer under a second, or below -v."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "ansible-glue"))
from arbor_glue.progress import Progress, human  # noqa: E402


class Display(object):
    def __init__(self, verbosity):
        self.verbosity = verbosity
        self.lines = []

    def v(self, msg, host=None):
        self.lines.append((host, msg))


class Clock(object):
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_lines_at_most_once_a_second_and_at_the_end():
    d, clock = Display(1), Clock()
    p = Progress(d, "target1", "PUT", "/tmp/big", 40 << 20, clock=clock)
    for _ in range(10):
        clock.t += 0.25
        p.add(4 << 20)
    p.end()
    assert d.lines == [
        ("target1", "ARBOR PUT /tmp/big: 16.0 MiB of 40.0 MiB, 16.0 MiB/s"),
        ("target1", "ARBOR PUT /tmp/big: 32.0 MiB of 40.0 MiB, 16.0 MiB/s"),
        ("target1", "ARBOR PUT /tmp/big: 40.0 MiB in 2.5 s, 16.0 MiB/s"),
    ]


def test_nothing_for_a_short_transfer_or_below_v():
    for verbosity, step in ((1, 0.1), (0, 1.0)):
        d, clock = Display(verbosity), Clock()
        p = Progress(d, "h", "FETCH", "/f", None, clock=clock)
        for _ in range(5):
            clock.t += step
            p.add(1000)
        p.end()
        assert d.lines == [], (verbosity, d.lines)


def test_human_sizes():
    assert [human(n) for n in (0, 1023, 1024, 5 << 20, 3 << 30)] == [
        "0 B", "1023 B", "1.0 KiB", "5.0 MiB", "3.0 GiB"]
