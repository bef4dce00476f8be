r"""Replays a dataset's CTR impressions into an event stream as impression events.

`python -m mm_ads.serving.nearline.replay --data_dir=DIR --stream=EVENT_LOG [--split=train] [--rate=0] [--limit=0]`

Reads `ctr/<split>` of a canonical dataset in its stored order (no shuffling), turns every impression into an
impression event (`mm_ads.serving.nearline.impressions`: the FeatureSpec's stored features by name, `type`, and `ts` =
the time it is appended) and appends them to the stream in chunks of `--chunk` (one fsync per chunk),
`--rate` events/s at most (0 = as fast as possible). The near-line trainer and the online demo read the stream.
"""

import os
import sys
import time

from absl import app, flags, logging

from mm_ads.serving.index.redis_local import redact_uri


def impression_rows(data_dir, split="train", batch_size=1024, limit=0):
    """Yields `{stored feature: numpy [n, ...]}` batches of a dataset's impressions, in stored order."""
    from mm_ads.data.dataset import Manifest
    from mm_ads.data.pipeline import make_ctr_dataset
    from mm_ads.data.spec import FeatureSpec

    spec = Manifest.load(data_dir).spec
    if spec is None:
        raise ValueError(f"Dataset {data_dir} has no FeatureSpec: it holds no CTR impressions")
    base = FeatureSpec([f for f in spec if f.role != "vector"], spec.seq_len, 0)
    left = limit or None
    for features, label in make_ctr_dataset(data_dir, split, batch_size, spec=base):
        rows = {k: v.numpy() for k, v in features.items()}
        rows[base.label] = label.numpy()
        if left is not None:
            rows = {k: v[:left] for k, v in rows.items()}
            left -= len(rows[base.label])
        yield rows
        if left is not None and left <= 0:
            return


def replay(data_dir, stream, split="train", rate=0.0, limit=0, chunk=256, stop_event=None):
    """Appends the impressions of `data_dir`'s `split` to `stream` as impression events.

    Args:
        data_dir: a canonical dataset directory.
        stream: an open stream (`mm_ads.serving.index.events`: `append(records) -> offsets`) or its path / URI.
        split: the `ctr` split to replay.
        rate: at most this many events per second (0 = no limit).
        limit: replay at most this many impressions (0 = all).
        chunk: events per `append` call (one fsync each); with a rate, at most a tenth of a second's worth.
        stop_event: a `threading.Event` that stops the replay early.

    Returns:
        `{"events", "first_offset", "last_offset", "seconds"}`.
    """
    from mm_ads.data.dataset import Manifest
    from mm_ads.serving.index.events import open_stream
    from mm_ads.serving.nearline.impressions import ImpressionSchema

    if rate < 0 or chunk < 1 or limit < 0:
        raise ValueError(f"rate must be >= 0, chunk >= 1 and limit >= 0, got {rate}, {chunk}, {limit}")
    owned = isinstance(stream, (str, os.PathLike))
    log = open_stream(os.fspath(stream)) if owned else stream
    schema = ImpressionSchema(Manifest.load(data_dir).spec)
    if rate:
        chunk = max(1, min(chunk, int(rate / 10)))
    start = time.monotonic()
    sent, first, last = 0, None, None
    try:
        for rows in impression_rows(data_dir, split, limit=limit):
            n = len(rows[schema.label])
            for lo in range(0, n, chunk):
                if stop_event is not None and stop_event.is_set():
                    return _summary(sent, first, last, start)
                hi = min(n, lo + chunk)
                if rate:
                    wait = start + sent / rate - time.monotonic()
                    if wait > 0:
                        time.sleep(wait)
                now = time.time()
                records = [schema.to_record({k: v[i] for k, v in rows.items()}, now) for i in range(lo, hi)]
                offsets = log.append(records)
                first = offsets[0] if first is None else first
                last = offsets[-1]
                sent += len(records)
    finally:
        if owned:
            log.close()
    return _summary(sent, first, last, start)


def _summary(sent, first, last, start):
    return {"events": sent, "first_offset": first, "last_offset": last, "seconds": round(time.monotonic() - start, 3)}


def _define_flags():
    # defined by the program only: a library import must not clash with other modules' flags (e.g. data_dir)
    return {
        "data_dir": flags.DEFINE_string("data_dir", None, "A canonical dataset directory (manifest.json inside)."),
        "stream": flags.DEFINE_string("stream", None,
                                      "The event stream: an event-log path or redis://host:port/db?stream=NAME."),
        "split": flags.DEFINE_string("split", "train", "Which ctr split to replay."),
        "rate": flags.DEFINE_float("rate", 0.0, "At most this many events per second (0 = as fast as possible)."),
        "limit": flags.DEFINE_integer("limit", 0, "Replay at most this many impressions (0 = all)."),
        "chunk": flags.DEFINE_integer("chunk", 256, "Events per append (one fsync each)."),
    }


def main(argv, holders):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    v = {name: holder.value for name, holder in holders.items()}
    if not v["data_dir"] or not v["stream"]:
        raise app.UsageError("--data_dir and --stream are required")
    result = replay(v["data_dir"], v["stream"], v["split"], v["rate"], v["limit"], v["chunk"])
    logging.info("replayed %s", result)
    print(f"{result['events']} impression events → {redact_uri(v['stream'])} (offsets {result['first_offset']}.."
          f"{result['last_offset']}, {result['seconds']} s)")


if __name__ == "__main__":
    _holders = _define_flags()
    app.run(lambda argv: main(argv, _holders), argv=sys.argv)
