"""Data: the feature spec, the canonical dataset layout and everything that writes or reads it.

* `spec` — `FeatureSpec`: feature names, dtypes and shapes.
* `dataset` — the dataset layout and its `Manifest`, `DatasetWriter`, readers of its tables.
* `synthetic`, `render` — the synthetic world (`python -m mm_ads.data.synthetic`) and its images and texts.
* `prepare`, `readers` — public data layouts → the dataset layout (`python -m mm_ads.data.prepare`).
* `pipeline` — the tf.data input pipeline with the item → vector join (`VectorJoin`).
* `vectors` — item → vector tables (Parquet with the encoder version in the footer).
"""
