"""The item index: item id → multimodal vector, and the event streams that keep it fresh.

* `index_table` — item id → (vector, encoder version, timestamp); embedded SQLite default and Redis.
* `load_index_table` — creates an index table from a vector table
  (`python -m mm_ads.serving.index.load_index_table`).
* `events` — durable append-only event log (and Redis Streams) with offsets, plus a polling follower.
* `encoder_service` — new-item events → encoder → vectors in the index table
  (`python -m mm_ads.serving.index.encoder_service`).
* `redis_local` — Redis helpers: a local `redis-server` for tests and tools, URIs with the password redacted.

Imports neither `mm_ads.serving.nearline` nor `mm_ads.serving.server` (docs/architecture.md).
"""
