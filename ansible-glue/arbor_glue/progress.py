"""Progress of a long transfer at -v: a line at most every PROGRESS_EVERY_S
with the bytes moved, the size and the rate, and one at the end. A
transfer shorter than that prints nothing, so short runs at -v read as
vanilla's."""

import time

PROGRESS_EVERY_S = 1.0


def human(n):
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return ("%d %s" % (n, unit)) if unit == "B" else ("%.1f %s" % (n, unit))
        n /= 1024.0
    return "%.1f GiB" % n


class Progress(object):
    def __init__(self, display, host, verb, path, size=None, clock=time.monotonic):
        self.display, self.host, self.verb, self.path, self.size = display, host, verb, path, size
        self.clock = clock
        self.t0 = self.last = clock()
        self.done = 0
        self.said = False

    def _rate(self, now):
        return human(self.done / max(now - self.t0, 1e-6)) + "/s"

    def add(self, n):
        self.done += n
        now = self.clock()
        if now - self.last >= PROGRESS_EVERY_S and self.display.verbosity >= 1:
            self.last = now
            self.said = True
            of = " of %s" % human(self.size) if self.size is not None else ""
            self.display.v("ARBOR %s %s: %s%s, %s" % (self.verb, self.path, human(self.done), of,
                                                      self._rate(now)), host=self.host)

    def end(self):
        now = self.clock()
        if (self.said or now - self.t0 >= PROGRESS_EVERY_S) and self.display.verbosity >= 1:
            self.display.v("ARBOR %s %s: %s in %.1f s, %s" % (self.verb, self.path, human(self.done),
                                                           now - self.t0, self._rate(now)), host=self.host)
