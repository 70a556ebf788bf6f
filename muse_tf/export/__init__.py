"""muse_tf.export: SavedModels for TF Serving.

* :mod:`~muse_tf.export.publish`: versioned directories, the signature description and the
  atomic rename that publishes a finished version;
* :mod:`~muse_tf.export.warmup`: the one writer of ``assets.extra/tf_serving_warmup_requests``
  (TF Serving replays at most 1,000 records);
* :mod:`~muse_tf.export.ranking`: the ranking signature (one user, up to C candidates);
* :mod:`~muse_tf.export.retrieval`: the retrieval signatures (MISS tree, two-tower brute
  force and ScaNN).

``python -m muse_tf.export --model-dir DIR`` exports the latest checkpoint of a ranking run.
"""
