"""The online system of paper §5, in three sub-packages (the direction of their imports: docs/architecture.md).

* `index` — the item index: the index table (item id → vector, encoder version, timestamp; SQLite or Redis),
  the event streams (append-only event log or Redis Streams, with offsets and a polling follower), the Redis
  helpers, `python -m mm_ads.serving.index.load_index_table` (an index table from a vector table) and the encoder
  service that fills the table from new-item events (`python -m mm_ads.serving.index.encoder_service`).
* `nearline` — the near-line trainer (`python -m mm_ads.serving.nearline`), the impression event schema and
  the dataset → impression-event replay (`python -m mm_ads.serving.nearline.replay`).
* `server` — the prediction server (`python -m mm_ads.serving.server`): TF Serving's gRPC and REST APIs over
  the latest model version with an atomic hot swap, and ranking by ids with vectors from the index table.

`server` and `nearline` may import `index`; `index` imports neither.
"""

from mm_ads.serving.index.events import EventLog, EventLogError, EventTail, RedisStream, open_stream
from mm_ads.serving.index.index_table import (
    IndexTable,
    IndexTableError,
    RedisIndexTable,
    SQLiteIndexTable,
    load_vector_table_into,
    open_index_table,
)

__all__ = [
    "EventLog",
    "EventLogError",
    "EventTail",
    "IndexTable",
    "IndexTableError",
    "RedisIndexTable",
    "RedisStream",
    "SQLiteIndexTable",
    "load_vector_table_into",
    "open_index_table",
    "open_stream",
]
