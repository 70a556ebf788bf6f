"""The ranking schedule: the validation split of train (by impression or by user),
validation periods, early stopping on validation GAUC with the best weights restored,
metrics.json, and the
fixed-epoch schedule of ``train.validation_share=0``."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import tensorflow as tf

from muse_tf import config as config_lib
from muse_tf import schema
from muse_tf.data import layout, reader
from muse_tf.data.data_dir import DataDir
from muse_tf.data.records import encode_sequence_example
from muse_tf.training import evaluation, runs
from muse_tf.training.ranking import PREDICTIONS_FILE, run_ranking

from .clustered_data import write_vocabularies

SEQ_LEN = 12
SMALL = ["data.batch_size=32", "data.eval_batch_size=256", "model.top_k=4",
         "model.short_term_len=4", "model.num_tiers=4", "model.tower_units=[8]",
         "model.head_dim=4", "model.id_embedding_dim=4", "train.verbose=0",
         "train.export=false"]


# ----------------------------------------------------------------------------- data


def _write_data_dir(path: str, num_users: int = 300, train_per_user: int = 8,
                    test_per_user: int = 2, seed: int = 0) -> str:
    """A Beam-style output directory (records grouped by user, as Beam writes them) with a
    planted signal: a user clicks items of its favourite category (its history's category)
    with probability 0.8, other items with 0.2."""
    rng = np.random.default_rng(seed)
    num_items, num_categories = 60, 6
    items = rng.choice(np.arange(1, 10**9), num_items, replace=False).astype(np.int64)
    categories = np.arange(1, num_categories + 1, dtype=np.int64) * 1000
    item_category = {int(i): int(categories[k % num_categories]) for k, i in enumerate(items)}
    by_category = {int(c): [i for i in items.tolist() if item_category[i] == c]
                   for c in categories}
    records: dict[str, list] = {"train": [], "test": []}
    for u in range(num_users):
        favourite = int(categories[u % num_categories])
        length = int(rng.integers(1, SEQ_LEN + 1))
        hist = [int(x) for x in rng.choice(by_category[favourite], length)]
        user = {schema.USER_ID.name: int(rng.integers(1, 2**62)),
                **{f.name: int(rng.integers(1, 4)) for f in schema.USER_ATTRIBUTES}}
        sequences = {schema.HISTORY_ITEM_ID.name: hist,
                     schema.HISTORY_CATEGORY.name: [item_category[h] for h in hist]}
        for split, count in (("train", train_per_user), ("test", test_per_user)):
            for _ in range(count):
                item = int(items[rng.integers(num_items)])
                p = 0.8 if item_category[item] == favourite else 0.2
                context = {schema.LABEL.name: int(rng.random() < p), **user,
                           schema.ITEM_ID.name: item,
                           schema.ITEM_CATEGORY.name: item_category[item],
                           **{f.name: 1 + item % 5 for f in schema.ITEM_ATTRIBUTES}}
                records[split].append((context, sequences))
    files = {}
    for split, split_records in records.items():
        shards = 2 if split == "train" else 1
        os.makedirs(os.path.join(path, split), exist_ok=True)
        bounds = np.linspace(0, len(split_records), shards + 1).astype(int)
        files[split] = []
        for shard in range(shards):
            name = f"part-{shard:05d}-of-{shards:05d}{layout.RECORD_SUFFIX}"
            with tf.io.TFRecordWriter(os.path.join(path, split, name), "GZIP") as writer:
                for context, sequences in split_records[bounds[shard]:bounds[shard + 1]]:
                    writer.write(encode_sequence_example(context, sequences))
            files[split].append(f"{split}/{name}")
    write_vocabularies(path, records["train"])
    os.makedirs(os.path.join(path, layout.EMBEDDINGS_DIR), exist_ok=True)
    vectors = rng.integers(-60, 61, size=(num_items, schema.MM_EMBEDDING_DIM)).astype(np.int8)
    vectors[:, 0] = np.array([item_category[int(i)] // 1000 * 20 for i in items])  # category
    shard_path = os.path.join(path, layout.EMBEDDINGS_DIR,
                              f"part-00000-of-00001{layout.RECORD_SUFFIX}")
    with tf.io.TFRecordWriter(shard_path, "GZIP") as writer:
        for item_id, vector in zip(items, vectors, strict=True):
            example = tf.train.Example()
            feature = example.features.feature
            feature[layout.EMBEDDING_ID_FEATURE].int64_list.value.append(int(item_id))
            feature[layout.EMBEDDING_BYTES_FEATURE].bytes_list.value.append(vector.tobytes())
            writer.write(example.SerializeToString())
    metadata = {
        "splits": {split: {"rows_read": len(r), "examples_written": len(r), "rows_rejected": 0,
                           "rejected": {}, "rejected_files": [], "files": files[split],
                           "histories_truncated": 0} for split, r in records.items()},
        "options": {"max_seq_len": SEQ_LEN, "min_count": 1}, "max_seq_len": SEQ_LEN,
        "schema": schema.as_dict(), "schema_version": schema.SCHEMA_VERSION,
    }
    with open(layout.metadata_path(path), "w") as f:
        json.dump(metadata, f)
    return path


@pytest.fixture(scope="module")
def users_data_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """300 users, 2,400 train / 600 test impressions (see :func:`_write_data_dir`)."""
    return _write_data_dir(str(tmp_path_factory.mktemp("schedule_data")))


def _user_ids(dataset: tf.data.Dataset) -> np.ndarray:
    return np.concatenate([b[schema.USER_ID.name].numpy() for b in dataset])


class _NoVocabulary(DataDir):
    """A data directory whose vocabularies are missing: counting must read the records."""

    def vocabulary(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        raise FileNotFoundError(name)


# ----------------------------------------------------------------------------- the split


def _user_split(share: float, seed: int) -> reader.ValidationSplit:
    return reader.ValidationSplit(share, seed, unit="user")


def test_user_hash_is_deterministic_near_the_share_and_seeded():
    ids = tf.constant(np.random.default_rng(0).integers(-(2**63), 2**63 - 1, 100_000,
                                                         dtype=np.int64))
    split = _user_split(0.1, seed=7)
    held = split.held_out(ids).numpy()
    assert 0.095 < held.mean() < 0.105
    assert np.array_equal(held, _user_split(0.1, seed=7).held_out(ids).numpy())
    other = _user_split(0.1, seed=8).held_out(ids).numpy()
    assert 0.07 < (held & other).sum() / held.sum() < 0.13  # another seed: other users
    train = split.with_part("train").keeps(ids).numpy()
    assert np.array_equal(train, ~held)
    assert np.array_equal(split.with_part("validation").keeps(ids).numpy(), held)
    with pytest.raises(ValueError, match=r"share in \(0, 1\)"):
        _user_split(0.0, seed=7)
    with pytest.raises(ValueError, match="unit='day' is not one of"):
        reader.ValidationSplit(0.1, 7, unit="day")


def test_user_split_of_a_data_dir_is_disjoint_and_the_counts_add_up(users_data_dir):
    data = DataDir.open(users_data_dir)
    split = _user_split(0.1, seed=7)
    counts = reader.count_split(data, "train", split)
    assert counts.source == "vocabulary"
    by_pass = reader.count_split(_NoVocabulary(data.path, data.metadata), "train", split)
    assert by_pass.source == "pass"
    assert (by_pass.train_examples, by_pass.validation_examples, by_pass.train_users,
            by_pass.validation_users) == (counts.train_examples, counts.validation_examples,
                                          counts.train_users, counts.validation_users)
    assert counts.train_examples + counts.validation_examples == data.num_examples("train")
    assert counts.train_users + counts.validation_users == 300
    assert 0.05 < counts.validation_users / 300 < 0.16

    def read(part: str, **kwargs) -> np.ndarray:
        return _user_ids(reader.make_dataset(data, "train", 64, users=split.with_part(part),
                                             **kwargs))

    validation = read("validation", shuffle=False, deterministic=True)
    train = read("train", shuffle=True, seed=3)
    everything = _user_ids(reader.make_dataset(data, "train", 64, shuffle=False,
                                               deterministic=True))
    assert len(validation) == counts.validation_examples
    assert len(train) == counts.train_examples
    assert not set(validation) & set(train)
    assert set(validation) | set(train) == set(everything)
    assert len(set(validation)) == counts.validation_users
    # The same examples in the same order on every pass.
    assert np.array_equal(validation, read("validation", shuffle=False, deterministic=True))


def _impressions(dataset: tf.data.Dataset) -> list[tuple[int, int, int]]:
    return [(int(u), int(i), int(n)) for b in dataset
            for u, i, n in zip(b[schema.USER_ID.name].numpy(), b[schema.ITEM_ID.name].numpy(),
                               b[schema.HISTORY_LENGTH].numpy(), strict=True)]


def test_impression_split_trains_every_user_and_counts_exactly(users_data_dir):
    data = DataDir.open(users_data_dir)
    split = reader.ValidationSplit(0.1, seed=7)
    assert split.unit == "impression"
    counts = reader.count_split(data, "train", split)
    assert counts.source == "pass"
    assert counts.train_examples + counts.validation_examples == 2400
    assert 0.07 < counts.validation_examples / 2400 < 0.13

    def read(part: str, **kwargs) -> list[tuple[int, int, int]]:
        return _impressions(reader.make_dataset(data, "train", 64, users=split.with_part(part),
                                                **kwargs))

    validation = read("validation", shuffle=False, deterministic=True)
    train = read("train", shuffle=True, seed=3)
    everything = _impressions(reader.make_dataset(data, "train", 64, shuffle=False,
                                                  deterministic=True))
    assert (len(train), len(validation)) == (counts.train_examples, counts.validation_examples)
    assert sorted(train + validation) == sorted(everything)   # nothing lost, nothing twice
    # A user-item pair lands in one part; most validation users are trained on too.
    assert not {(u, i) for u, i, _ in validation} & {(u, i) for u, i, _ in train}
    validation_users = {u for u, _, _ in validation}
    assert len(validation_users) == counts.validation_users
    assert len(validation_users & {u for u, _, _ in train}) > 0.9 * len(validation_users)
    assert counts.train_users == len({u for u, _, _ in train})


def test_a_large_impression_split_is_estimated_from_the_metadata(users_data_dir, monkeypatch):
    monkeypatch.setattr(reader, "EXACT_COUNT_LIMIT", 1000)
    counts = reader.count_split(DataDir.open(users_data_dir), "train",
                                reader.ValidationSplit(0.1, seed=7))
    assert counts.source == "estimate" and counts.train_users is None
    assert (counts.train_examples, counts.validation_examples) == (2160, 240)


# ----------------------------------------------------------------------------- the schedule


def _config(*assignments: str) -> config_lib.ExperimentConfig:
    return config_lib.resolve("din", assignments=list(assignments))


def test_schedule_periods():
    # 99M samples, batches of 256, validation every 2M examples: 50 equal periods per epoch.
    schedule = runs.training_schedule(_config("train.epochs=1"), 99_000_000, 256, True)
    assert schedule.epoch_steps == 386_718
    assert schedule.periods == 50
    assert schedule.periods * schedule.period_steps >= schedule.epoch_steps
    assert (schedule.periods - 1) * schedule.period_steps < schedule.epoch_steps
    assert schedule.examples(1) == schedule.period_steps * 256
    assert schedule.data_epochs(50) == pytest.approx(1.0, abs=1e-3)
    # A 60K set: once per epoch, at most 20 epochs.
    schedule = runs.training_schedule(_config(), 60_000, 256, True)
    assert (schedule.epoch_steps, schedule.period_steps, schedule.periods) == (234, 234, 20)
    # Per epoch when validation_every_examples is 0, and always without validation.
    assert runs.training_schedule(_config("train.validation_every_examples=0"), 99_000_000,
                                  256, True).period_steps == 386_718
    fixed = runs.training_schedule(_config("train.epochs=3"), 99_000_000, 256, False)
    assert (fixed.period_steps, fixed.periods) == (386_718, 3)
    # max_train_steps caps the steps in all.
    capped = runs.training_schedule(_config("train.max_train_steps=5"), 60_000, 256, True)
    assert (capped.period_steps, capped.periods) == (5, 1)
    with pytest.raises(ValueError, match="fewer than one batch"):
        runs.training_schedule(_config(), 100, 256, True)


# ----------------------------------------------------------------------------- early stopping


class _ScriptedModel(tf.keras.Model):
    """Score ``sigmoid(w * x)``; each train step sets ``w`` to the next value of ``script``
    (one step per period), so the validation GAUC of each period is known in advance."""

    def __init__(self, script: list[float]) -> None:
        super().__init__()
        self.script = tf.constant(script, tf.float32)
        self.w = tf.Variable(0.0, name="w")
        self.step_count = tf.Variable(0, trainable=False, name="step_count")

    def call(self, inputs: dict[str, tf.Tensor], training: bool = False) -> tf.Tensor:
        return tf.sigmoid(self.w * inputs["x"])

    def train_step(self, data: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        self.w.assign(self.script[self.step_count])
        self.step_count.assign_add(1)
        return {"loss": tf.abs(self.w)}


def _validation_batches() -> tf.data.Dataset:
    labels = np.array([1, 0, 1, 0, 1, 1, 0, 0], np.float32)
    batch = {schema.USER_ID.name: np.array([5, 5, 5, 5, 9, 9, 9, 9], np.int64),
             schema.ITEM_ID.name: np.arange(8, dtype=np.int64),
             schema.LABEL.name: labels,
             schema.HISTORY_LENGTH: np.zeros(8, np.int32),
             "x": 2 * labels - 1}  # w > 0 ranks every user right (GAUC 1), w < 0 wrong (0)
    return tf.data.Dataset.from_tensor_slices(batch).batch(3)


def _tensorboard_values(log_dir: str, tag: str) -> list[float]:
    values = []
    for name in sorted(tf.io.gfile.glob(os.path.join(log_dir, "events.out.tfevents.*"))):
        for event in tf.compat.v1.train.summary_iterator(name):
            for value in event.summary.value:
                if value.tag == tag:
                    values.append(float(tf.make_ndarray(value.tensor)))
    return values


def test_early_stopping_stops_after_patience_and_restores_the_best_period(tmp_path):
    # Validation GAUC per period: 0, 1, 0.5, 0 -> best period 2; patience 2 stops after 4.
    model = _ScriptedModel([-1.0, 1.0, 0.0, -2.0, 3.0, 4.0])
    model.compile(optimizer="sgd")
    schedule = runs.Schedule(epoch_steps=2, period_steps=1, periods=6, batch_size=4,
                             max_epochs=3)
    validator = runs.ValidationMetrics(_validation_batches(), schedule)
    early = tf.keras.callbacks.EarlyStopping(monitor="val_gauc", mode="max", patience=2,
                                             restore_best_weights=True)
    _, callbacks = runs.fit_callbacks(str(tmp_path), 4, [validator, early],
                                      checkpoint_monitor="val_gauc")
    train = tf.data.Dataset.from_tensors({"x": tf.zeros([4])}).repeat()
    history = model.fit(train, epochs=schedule.periods, steps_per_epoch=1,
                        callbacks=callbacks, verbose=0)
    assert history.history["val_gauc"] == pytest.approx([0.0, 1.0, 0.5, 0.0])
    assert len(history.history["val_auc"]) == len(history.history["val_logloss"]) == 4
    assert early.stopped_epoch == 3 and early.best_epoch == 1
    assert float(model.w.numpy()) == 1.0  # the best period's weights
    assert [r["period"] for r in validator.records] == [1, 2, 3, 4]
    assert [r["epoch"] for r in validator.records] == [0.5, 1.0, 1.5, 2.0]
    assert [r["examples"] for r in validator.records] == [4, 8, 12, 16]
    assert [r["gauc"] for r in validator.records] == pytest.approx([0.0, 1.0, 0.5, 0.0])
    # TensorBoard saw the figures (it runs after the validation callback) ...
    assert _tensorboard_values(os.path.join(str(tmp_path), runs.LOG_DIR, "validation"),
                               "epoch_gauc") == pytest.approx([0.0, 1.0, 0.5, 0.0])
    # ... and only improving periods were checkpointed: the latest is the best.
    latest = tf.train.latest_checkpoint(os.path.join(str(tmp_path), runs.CHECKPOINT_DIR))
    assert latest.endswith("ckpt-02")


def test_an_undefined_validation_gauc_is_a_clear_error(tmp_path):
    batch = {schema.USER_ID.name: np.array([1, 2], np.int64),
             schema.ITEM_ID.name: np.zeros(2, np.int64),
             schema.LABEL.name: np.array([1, 0], np.float32),
             schema.HISTORY_LENGTH: np.zeros(2, np.int32), "x": np.ones(2, np.float32)}
    model = _ScriptedModel([1.0])
    model.compile(optimizer="sgd")
    validator = runs.ValidationMetrics(tf.data.Dataset.from_tensors(batch),
                                       runs.Schedule(1, 1, 1, 2, 1))
    with pytest.raises(ValueError, match="validation GAUC is undefined"):
        model.fit(tf.data.Dataset.from_tensors({"x": tf.zeros([2])}).repeat(), epochs=1,
                  steps_per_epoch=1, callbacks=[validator], verbose=0)


# ----------------------------------------------------------------------------- whole runs


@pytest.mark.slow
def test_default_schedule_validates_stops_early_and_keeps_the_best_weights(users_data_dir,
                                                                         tmp_path):
    from muse_tf.export import ranking as export

    model_dir = str(tmp_path / "run")
    # High learning rates and patience 1 on a small set: validation GAUC peaks early.
    config = config_lib.resolve("din", assignments=[
        *SMALL, "train.patience=1", "train.embedding_learning_rate=0.05",
        "train.dense_learning_rate=0.01", "train.validation_every_examples=1000"])
    result = run_ranking(config, model_dir, users_data_dir)
    with open(os.path.join(model_dir, runs.METRICS_FILE)) as f:
        saved = json.load(f)
    counts = reader.count_split(DataDir.open(users_data_dir), "train",
                                reader.ValidationSplit(0.1, config.data.seed))
    assert (saved["train_examples"], saved["validation_examples"]) == (
        counts.train_examples, counts.validation_examples)
    assert saved["train_examples"] + saved["validation_examples"] == 2400
    assert saved["validation_share"] == 0.1 and saved["split_counted_by"] == "pass"
    assert saved["validation_split"] == "impression"
    assert saved["validation_examples_read"] == counts.validation_examples
    # ~2,160 train examples / 32 = 67 steps per epoch, validated every 1,000 examples: in
    # 3 equal periods of 23 steps (736 examples).
    schedule = saved["schedule"]
    assert schedule["epoch_steps"] == counts.train_examples // 32
    assert schedule["period_steps"] == -(-schedule["epoch_steps"] // 3)
    records = saved["validation"]
    periods = schedule["periods_run"]
    assert [r["period"] for r in records] == list(range(1, periods + 1))
    assert len(saved["train_loss"]) == periods
    assert records[0]["examples"] == schedule["period_steps"] * 32
    assert records[-1]["epoch"] == pytest.approx(periods * schedule["period_steps"]
                                                 / schedule["epoch_steps"])
    assert all(set(r) >= {"gauc", "auc", "logloss", "epoch", "examples"} for r in records)
    gaucs = [r["gauc"] for r in records]
    assert saved["best_period"] == int(np.argmax(gaucs)) + 1
    assert saved["stopped_early"] and periods == saved["best_period"] + 1 < 60
    assert set(saved["test"]) >= {"gauc", "gauc_batch", "auc", "logloss"}
    assert result["test"]["gauc"] == saved["test"]["gauc"]
    # The test predictions come from the best period's weights: those of the latest
    # checkpoint (the only improving periods are saved), which the export restores.
    model, _ = export.restore_ranking_model(model_dir)
    assert tf.train.latest_checkpoint(os.path.join(model_dir, runs.CHECKPOINT_DIR)).endswith(
        f"ckpt-{saved['best_period']:02d}")
    test_ds = reader.make_dataset(DataDir.open(users_data_dir), "test", 256,
                                  max_seq_len=SEQ_LEN, shuffle=False, deterministic=True)
    again = evaluation.predict_split(model, test_ds)
    saved_predictions = np.load(os.path.join(model_dir, PREDICTIONS_FILE))
    np.testing.assert_allclose(again["score"], saved_predictions["score"], atol=1e-5)


@pytest.mark.slow
def test_validation_share_zero_is_the_fixed_epoch_schedule(tiny_data_dir, tmp_path):
    config = config_lib.resolve("din", assignments=[
        *SMALL, "data.batch_size=4", "train.validation_share=0", "train.epochs=2"])
    result = run_ranking(config, str(tmp_path), tiny_data_dir)
    assert result["train_steps_per_epoch"] == 48 // 4  # the whole train split
    assert len(result["train_loss"]) == 2
    assert result["schedule"]["periods_run"] == 2 and "validation" not in result
    names = os.listdir(os.path.join(str(tmp_path), runs.CHECKPOINT_DIR))
    assert {"ckpt-01.index", "ckpt-02.index"} <= set(names)


def test_an_empty_validation_part_is_a_clear_error(tiny_data_dir, tmp_path):
    # 8 users: a share of 1/1000 holds none of them out.
    config = config_lib.resolve("din", assignments=[*SMALL, "train.validation_share=0.001"])
    with pytest.raises(ValueError, match=r"leaves the validation part of the train split "
                                         r"empty: 48 train examples of 8 users, 0 validation"):
        run_ranking(config, str(tmp_path), tiny_data_dir)
