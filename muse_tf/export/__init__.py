"""muse_tf.export: SavedModels for TF Serving.

* :mod:`~muse_tf.export.names`: where a run writes its exports and the served model names;
* :mod:`~muse_tf.export.signatures`: the input/output specs of the ranking and retrieval
  signatures, from the schema;
* :mod:`~muse_tf.export.requests`: the one builder of request inputs for those signatures
  (warm-up files, the serving client, the pipeline and the benchmark all use it);
* :mod:`~muse_tf.export.publish`: versioned directories, the signature description and the
  atomic rename that publishes a finished version;
* :mod:`~muse_tf.export.warmup`: the one writer of ``assets.extra/tf_serving_warmup_requests``
  (TF Serving replays at most 1,000 records);
* :mod:`~muse_tf.export.ranking`: the ranking export (one user, up to C candidates);
* :mod:`~muse_tf.export.retrieval`: the retrieval exports (MISS tree, two-tower brute force
  and ScaNN).

``python -m muse_tf.export --model-dir DIR`` exports the latest checkpoint of a ranking run.
"""
