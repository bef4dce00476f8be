from absl import logging

from mm_ads.utils.progress import Progress


def test_logs_the_end_once_and_respects_enabled(monkeypatch):
    lines = []
    monkeypatch.setattr(logging, "info", lambda fmt, *args: lines.append(fmt % args))
    bar = Progress("rows", total=10, every_s=3600)
    bar.add(4)
    assert lines == []  # within the interval, before the end
    bar.add(6)
    bar.done()
    assert len(lines) == 1 and lines[0].startswith("rows: 10/10 (100%)")
    quiet = Progress("rows", total=2, enabled=False)
    quiet.add(2)
    assert len(lines) == 1 and quiet.count == 2
