"""Progress of long data steps: `what: done/total (pct), rate/s` logged at most every few seconds."""

import time

from absl import logging


class Progress:
    """Counts work done and logs it at most every `every_s`, and once more when it ends.

    The end is logged by `done()`, or by `add()` when the count reaches `total`. Has the `add(n)` method
    that `DatasetWriter.write_ctr(progress=...)` expects.

    Args:
        what: name of the step, e.g. "impressions".
        total: expected count (optional).
        every_s: minimum interval between log lines.
        enabled: False makes it silent (small runs, tests).
    """

    def __init__(self, what, total=None, every_s=5.0, enabled=True):
        self.what = what
        self.total = total
        self.every_s = every_s
        self.enabled = enabled
        self.count = 0
        self._start = time.monotonic()
        self._last = self._start
        self._finished = False

    def add(self, n):
        self.count += int(n)
        now = time.monotonic()
        if self.total and self.count >= self.total:
            self.done()
        elif now - self._last >= self.every_s:
            self._last = now
            self._log(now)

    def done(self):
        if not self._finished:
            self._finished = True
            self._log(time.monotonic())

    def _log(self, now):
        if not self.enabled:
            return
        rate = self.count / max(now - self._start, 1e-9)
        if self.total:
            logging.info("%s: %s/%s (%.0f%%), %.0f/s", self.what, f"{self.count:,}", f"{self.total:,}",
                         100.0 * self.count / self.total, rate)
        else:
            logging.info("%s: %s, %.0f/s", self.what, f"{self.count:,}", rate)
