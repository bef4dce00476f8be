"""The prediction server (`python -m mm_ads.serving.server`): TF Serving's gRPC and REST APIs over the latest
CTR model version, with an atomic hot swap, and ranking by ids.

* `prediction_server` — `ServerConfig`, `PredictionServer` and the command line.
* `model_manager` — the versions under the base path, their loading, warm-up and hot swap.
* `grpc_service`, `rest`, `codec` — the two front-ends and their tensor / JSON codecs.
* `ranking` — ranking by ids: vectors from the index table, item features from the catalogue.
* `stats`, `errors` — request counters; the errors and their gRPC / HTTP status codes.

May import `mm_ads.serving.index`, not `mm_ads.serving.nearline` (docs/architecture.md).
"""
