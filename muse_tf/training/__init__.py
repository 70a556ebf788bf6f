"""muse_tf.training: how a model is trained and evaluated.

* :mod:`~muse_tf.training.step`: the one two-optimizer Keras train step (ID embeddings and
  dense weights, each with its Adam and learning rate) shared by ranking and retrieval;
* :mod:`~muse_tf.training.strategy`: ``tf.distribute`` strategies and the chief;
* :mod:`~muse_tf.training.runs`: what every run shares (model directory, resolved config,
  callbacks, metrics file, summary table);
* :mod:`~muse_tf.training.ranking` / :mod:`~muse_tf.training.retrieval`: the runs;
* :mod:`~muse_tf.training.evaluation`: AUC/GAUC over a split, recall of a retrieval index;
* :mod:`~muse_tf.training.experiment`: one entry for any registered experiment;
* :mod:`~muse_tf.training.comparison`: paper-style comparison and ablation tables.

Nothing is imported here, so importing the train step does not import the runs.
"""
