"""The online system of paper §5: index table, event streams, encoder service, near-line trainer, prediction server.

* `index_table` — item id → (vector, encoder version, timestamp); embedded SQLite default and Redis;
  `python -m mm_ads.serving.load_index_table` creates one from a vector table (`load_index_table`).
* `events` — durable append-only event log (and Redis Streams) with offsets, plus a polling follower.
* `impressions`, `nearline`, `replay` — the impression event schema, the near-line trainer
  (`python -m mm_ads.serving.nearline`) and the dataset → impression-event replay (`python -m mm_ads.serving.replay`).
* `server` — the prediction server (`python -m mm_ads.serving.server`): TF Serving's gRPC and REST APIs over
  the latest model version with an atomic hot swap (`model_manager`, `grpc_service`, `rest`, `codec`), and
  ranking by ids with vectors from the index table (`ranking`).
"""

from mm_ads.serving.events import EventLog, EventLogError, EventTail, RedisStream, open_stream
from mm_ads.serving.index_table import (
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
