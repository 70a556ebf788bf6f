"""Synthetic TAOBAO-MM: the six parquet tables of the real release, with a planted signal.

The output has exactly the on-disk schema of the real files (``muse_tf.schema`` names the
columns; ``shared/data/taobao_mm_demo`` beside the checkout holds real samples), so the
Beam pipeline reads both alike. Run it as::

    python -m muse_tf.data.synthetic --out DIR --users N --items M --seq-len L --seed S \\
        [--samples-per-user K] [--test-fraction F] [--shard-rows R] [--overwrite]

or call :func:`generate`.

Layout (flat; one glob per table, :func:`table_pattern`)::

    DIR/train_samples.parquet             one file when the table has <= shard_rows rows,
    DIR/train_samples-00000.parquet ...   else shards of at most shard_rows rows each
    DIR/test_samples*.parquet
    DIR/train_user_features*.parquet
    DIR/test_user_features*.parquet
    DIR/item_features*.parquet
    DIR/scl_embedding_int8_p90*.parquet
    DIR/generator.json                    parameters, row counts, statistics, file names
    DIR/planted/users*.parquet            ground truth of the planted signal (not TAOBAO-MM;
    DIR/planted/items*.parquet            the table globs never match it)

The glob ``DIR/<stem>*.parquet`` finds every file of a table in both cases (no stem is a
prefix of another).

The planted signal (what the data set tests: a model that searches the *whole* lifelong
history by multimodal similarity should beat one that sees only the newest
:data:`~muse_tf.schema.SHORT_TERM_LEN` behaviours, which should beat random). Every knob is a
field of :class:`SignalConfig`:

* **Interest clusters.** Items belong to latent clusters of varying size. An item's
  embedding is its cluster centroid (a random unit vector) plus isotropic noise of relative
  size ``cluster_spread`` (cos(item, centroid) about 0.65..0.8, cos between two items of a
  cluster about 0.5, of different clusters about 0 +- 0.09), scaled to L2 norm 122, rounded
  and clipped to int8 [-38, 38] (the real table's range and norm).
* **Categories agree with clusters only partly.** Each cluster's items mostly carry one of
  ``categories_per_cluster`` categories (weights 0.6/0.25/0.15); categories are drawn per
  cluster from a shared pool, so one category spans several unrelated clusters; and
  ``category_noise`` of the items get a random category. A category match is ambiguous
  where the embedding is not.
* **Popularity is Zipf-like**: clusters have Zipf popularity (``cluster_zipf_exponent``)
  and items a Zipf popularity within their cluster (``zipf_exponent``); an item's behaviour
  probability is the product.
* **Users** have ``min_interests..max_interests`` persistent interest clusters (drawn by
  cluster popularity, Dirichlet weights). ``old_interest_share`` of the users whose history
  has an old part (behaviours before the newest ``SHORT_TERM_LEN``) of at least
  ``min_old_window`` also have one *old-only* interest: it fills ``old_era_rate`` of the
  behaviours of a random era (30-80% of the old part) and never occurs in the newest
  ``SHORT_TERM_LEN`` behaviours (of the train or the test row). Other behaviours come from
  the persistent interests, plus ``behaviour_noise`` popular items. Histories are oldest
  first; ``full_history_share`` of the users have ``seq_len`` behaviours, the others a
  uniform length in ``[min_history_len, seq_len)``.
* **Impressions.** A target is drawn from one of the user's interests
  (``target_interest_share``; the old-only interest weighs ``old_interest_target_weight``
  against 1 for each persistent one), by popularity (``target_popular_share``), else
  uniformly. P(click) = sigmoid(click_bias + click_affinity_weight * affinity + user bias +
  item bias), where affinity = max over *all* the user's interests, old-only included, of
  cos(target embedding, interest centroid); the user bias comes from attribute ``130_1`` and
  noise, the item bias from noise and attribute ``214``. Click rate is about 26%; the
  oracle AUC (of the true probability) is about 0.84 and is written to ``generator.json``.
  Impressions per user are 1 + negative binomial with mean ``samples_per_user`` (a few
  heavy users, most with a few).
* **Splits.** Each impression is a test one with probability ``test_fraction``. Every user
  has a row in both user tables: the test row's history continues the train row's with up
  to ``test_new_behaviours`` newer behaviours (truncated to the newest ``seq_len``).
* **"p90" embedding table.** The least popular items whose behaviour probabilities sum to
  ``1 - embedding_coverage`` (never a cluster's most popular item) have no embedding and
  are never targets; every target item has one. With long tails that is about half of the
  items, but only ~10% of the behaviours.

Ids are random signed 64-bit values over the whole range, never 0; 0 marks a missing user
attribute. The output is a pure function of the arguments: users are generated in fixed
blocks of :data:`USER_BLOCK` with their own random streams, so ``shard_rows`` only changes
how rows are cut into files, and the same arguments give byte-identical parquet files.
Memory is bounded by one block of users plus the item tables.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from muse_tf import schema

#: File stems of the six TAOBAO-MM tables, as in the real release.
TRAIN_SAMPLES = f"train_{schema.SAMPLES}"
TEST_SAMPLES = f"test_{schema.SAMPLES}"
TRAIN_USER_FEATURES = f"train_{schema.USER_FEATURES}"
TEST_USER_FEATURES = f"test_{schema.USER_FEATURES}"
ITEM_FEATURES = schema.ITEM_FEATURES
EMBEDDINGS = f"{schema.EMBEDDINGS}_int8_p90"
TABLES: tuple[str, ...] = (
    TRAIN_SAMPLES, TEST_SAMPLES, TRAIN_USER_FEATURES, TEST_USER_FEATURES, ITEM_FEATURES,
    EMBEDDINGS)
#: Table stem -> schema table name (``muse_tf.schema`` columns of that table).
SOURCE_TABLE = {
    TRAIN_SAMPLES: schema.SAMPLES, TEST_SAMPLES: schema.SAMPLES,
    TRAIN_USER_FEATURES: schema.USER_FEATURES, TEST_USER_FEATURES: schema.USER_FEATURES,
    ITEM_FEATURES: schema.ITEM_FEATURES, EMBEDDINGS: schema.EMBEDDINGS,
}

GENERATOR_FILE = "generator.json"
PLANTED_DIR = "planted"
PLANTED_USERS = "users"
PLANTED_ITEMS = "items"

#: Users per generation block (fixed: the random streams are per block).
USER_BLOCK = 512
#: L2 norm and int8 clip of the SCL embeddings, as measured on the real table.
EMBEDDING_NORM = 122.0
EMBEDDING_CLIP = 38
#: Cardinality and missing (0) rate of the hashed user attributes ``130_1`` .. ``130_5``.
USER_ATTRIBUTE_CARDINALITY = (8, 3, 400, 30, 50)
USER_ATTRIBUTE_MISSING = (0.02, 0.02, 0.05, 0.05, 0.1)
#: Cardinality of the hashed item attributes ``213`` (brand-like, tied to the cluster) and
#: ``214`` (price-level-like, shifts the click rate a little).
ITEM_ATTRIBUTE_CARDINALITY = (64, 8)
_CATEGORY_WEIGHTS = (0.6, 0.25, 0.15)
_ROW_GROUP_ROWS = 65_536
_ROW_GROUP_BYTES = 64 << 20

_ID_LIST = pa.list_(pa.field("element", pa.int64()))
_LABEL_LIST = pa.list_(pa.field("element", pa.int8()))

#: Ground truth of the planted signal, one row per user / item (``DIR/planted/``).
PLANTED_USERS_SCHEMA = pa.schema([
    (schema.USER_ID.key, pa.int64()),
    ("interest_clusters", pa.list_(pa.int32())),     # persistent interests
    ("old_interest_cluster", pa.int32()),            # -1: no old-only interest
    ("history_len", pa.int64()),                     # train row's history length
    ("test_history_len", pa.int64()),
])
PLANTED_ITEMS_SCHEMA = pa.schema([
    (schema.ITEM_ID.key, pa.int64()),
    ("cluster", pa.int32()),
    ("popularity", pa.float64()),                    # behaviour probability
    ("has_embedding", pa.bool_()),
])


def _arrow_type(key: str) -> pa.DataType:
    if key == schema.LABEL.key:
        return _LABEL_LIST
    if key == schema.EMBEDDING_VECTOR_KEY:
        return _LABEL_LIST
    if key in (schema.HISTORY_ITEM_ID.key, schema.HISTORY_CATEGORY.key):
        return _ID_LIST
    return pa.int64()


def table_schema(stem: str) -> pa.Schema:
    """The arrow schema of table ``stem`` (one of :data:`TABLES`), as in TAOBAO-MM."""
    if stem not in SOURCE_TABLE:
        raise ValueError(f"unknown TAOBAO-MM table {stem!r}; known: {list(TABLES)}")
    return pa.schema([pa.field(key, _arrow_type(key))
                      for key in schema.columns(SOURCE_TABLE[stem])])


def table_pattern(out_dir: str, stem: str) -> str:
    """Glob of every parquet file of table ``stem`` in ``out_dir``."""
    if stem not in SOURCE_TABLE:
        raise ValueError(f"unknown TAOBAO-MM table {stem!r}; known: {list(TABLES)}")
    return os.path.join(out_dir, f"{stem}*.parquet")


@dataclasses.dataclass(frozen=True)
class SignalConfig:
    """Knobs of the planted signal (defaults give the data set the tests check).

    Attributes:
      clusters: latent interest clusters; 0 = ``clip(round(sqrt(items) / 2), 8, 512)``.
      categories: categories; 0 = as many as clusters.
      categories_per_cluster: categories a cluster's items mostly carry (at most 3).
      category_noise: share of items with a uniformly random category.
      cluster_spread: (low, high) relative size of an item's noise around its centroid.
      zipf_exponent: Zipf exponent of item popularity within a cluster.
      cluster_zipf_exponent: Zipf exponent of cluster popularity.
      embedding_coverage: share of behaviour probability covered by the embedding table.
      min_interests, max_interests: persistent interests per user.
      old_interest_share: share of users (with history >= min_old_window + SHORT_TERM_LEN)
        given an old-only interest.
      min_old_window: shortest old part (behaviours before the newest SHORT_TERM_LEN) that
        can hold an old-only interest.
      old_era_rate: share of behaviours inside the old interest's era that belong to it.
      behaviour_noise: share of behaviours that are popular items outside the interests.
      full_history_share: share of users with exactly ``seq_len`` behaviours.
      min_history_len: shortest history of the other users.
      test_new_behaviours: most behaviours a test user row adds to its train row.
      target_interest_share: share of targets drawn from the user's interests.
      target_popular_share: share of targets drawn by popularity (the rest: uniformly).
      old_interest_target_weight: weight of the old-only interest, relative to 1 for each
        persistent one, when an interest target picks its interest.
      click_bias, click_affinity_weight: the click logit's intercept and affinity slope.
      user_bias_std, item_bias_std: noise of the user and item click biases.
      impressions_shape: gamma shape of the impressions-per-user mixture (smaller: heavier
        tail).
    """

    clusters: int = 0
    categories: int = 0
    categories_per_cluster: int = 3
    category_noise: float = 0.1
    cluster_spread: tuple[float, float] = (0.75, 1.15)
    zipf_exponent: float = 0.8
    cluster_zipf_exponent: float = 0.8
    embedding_coverage: float = 0.9
    min_interests: int = 2
    max_interests: int = 3
    old_interest_share: float = 0.4
    min_old_window: int = 50
    old_era_rate: float = 0.5
    behaviour_noise: float = 0.05
    full_history_share: float = 0.7
    min_history_len: int = 5
    test_new_behaviours: int = 8
    target_interest_share: float = 0.4
    target_popular_share: float = 0.4
    old_interest_target_weight: float = 1.5
    click_bias: float = -3.7
    click_affinity_weight: float = 5.0
    user_bias_std: float = 0.25
    item_bias_std: float = 0.3
    impressions_shape: float = 0.6

    def validate(self) -> None:
        """Raises ``ValueError`` naming the first bad field and its value."""
        def bad(name: str, rule: str) -> ValueError:
            return ValueError(f"SignalConfig.{name} must be {rule}, got {getattr(self, name)!r}")

        for name in ("clusters", "categories"):
            if getattr(self, name) < 0:
                raise bad(name, ">= 0 (0 = automatic)")
        if not 1 <= self.categories_per_cluster <= len(_CATEGORY_WEIGHTS):
            raise bad("categories_per_cluster", f"in [1, {len(_CATEGORY_WEIGHTS)}]")
        for name in ("category_noise", "behaviour_noise", "old_interest_share",
                     "full_history_share", "target_interest_share", "target_popular_share"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise bad(name, "in [0, 1]")
        if self.target_interest_share + self.target_popular_share > 1.0:
            raise bad("target_popular_share", "<= 1 - target_interest_share")
        for name in ("embedding_coverage", "old_era_rate"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise bad(name, "in (0, 1]")
        low, high = self.cluster_spread
        if not 0.0 <= low <= high:
            raise bad("cluster_spread", "(low, high) with 0 <= low <= high")
        for name in ("zipf_exponent", "cluster_zipf_exponent", "user_bias_std",
                     "item_bias_std", "click_affinity_weight"):
            if getattr(self, name) < 0:
                raise bad(name, ">= 0")
        if self.old_interest_target_weight <= 0:
            raise bad("old_interest_target_weight", "> 0")
        if not 1 <= self.min_interests <= self.max_interests:
            raise bad("min_interests", f"in [1, max_interests={self.max_interests}]")
        for name in ("min_old_window", "min_history_len"):
            if getattr(self, name) < 1:
                raise bad(name, ">= 1")
        if self.test_new_behaviours < 0:
            raise bad("test_new_behaviours", ">= 0")
        if self.impressions_shape <= 0:
            raise bad("impressions_shape", "> 0")


@dataclasses.dataclass
class _World:
    """Items (indexed in cluster order, by popularity within one) and user vocabularies."""

    ids: np.ndarray             # [items] int64 hashed ids
    cluster: np.ndarray         # [items] int32
    category: np.ndarray        # [items] int64 hashed category ids
    attributes: np.ndarray      # [items, 2] int64 hashed 213, 214
    embedding: np.ndarray       # [items, 128] int8
    has_embedding: np.ndarray   # [items] bool
    popularity: np.ndarray      # [items] float64 behaviour probability (sums to 1)
    bias: np.ndarray            # [items] float64 click-logit bias
    centroids: np.ndarray       # [clusters, 128] float32 unit vectors
    cluster_cdf: np.ndarray     # [clusters] cumulative cluster popularity
    behaviour_cdf: np.ndarray   # [items] cluster index + within-cluster popularity CDF
    target_cdf: np.ndarray      # [items] same, over items with an embedding only
    targetable: np.ndarray      # [n] indices of the items with an embedding
    user_attribute_ids: list[np.ndarray]
    user_attribute_weights: list[np.ndarray]
    age_bias: np.ndarray        # click bias per value of 130_1


def _random_ids(rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` distinct random int64 ids over the whole range, none 0."""
    info = np.iinfo(np.int64)
    ids = rng.integers(info.min, info.max, size=n, dtype=np.int64, endpoint=True)
    while True:
        _, first = np.unique(ids, return_index=True)
        bad = np.ones(n, dtype=bool)
        bad[first] = False
        bad |= ids == 0
        if not bad.any():
            return ids
        ids[bad] = rng.integers(info.min, info.max, size=int(bad.sum()), dtype=np.int64,
                                endpoint=True)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _quantise(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), -EMBEDDING_CLIP, EMBEDDING_CLIP).astype(np.int8)


def _offset_cdf(weights: np.ndarray, cluster: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Per-cluster CDF shifted by the cluster index: one sorted array for all clusters.

    Item ``i`` of cluster ``c`` gets ``c + cumsum_within(weights)[i] / total_c``, so
    ``searchsorted(cdf, c + u, "right")`` samples cluster ``c``'s items by weight.
    """
    csum = np.cumsum(weights)
    before = np.concatenate([[0.0], csum])[starts][cluster]
    within = csum - before
    ends = np.append(starts[1:], len(weights)) - 1
    total = within[ends][cluster]
    return cluster + within / total


def _build_world(rng: np.random.Generator, items: int, clusters: int, categories: int,
                 cfg: SignalConfig) -> _World:
    dim = schema.MM_EMBEDDING_DIM
    sizes = 2 + rng.multinomial(items - 2 * clusters, rng.dirichlet(np.full(clusters, 3.0)))
    cluster = np.repeat(np.arange(clusters, dtype=np.int32), sizes)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    rank = np.arange(items) - starts[cluster]

    cluster_rank = rng.permutation(clusters)
    cluster_pop = (cluster_rank + 1.0) ** -cfg.cluster_zipf_exponent
    cluster_pop /= cluster_pop.sum()
    within = (rank + 1.0) ** -cfg.zipf_exponent
    within_total = np.bincount(cluster, weights=within, minlength=clusters)
    popularity = cluster_pop[cluster] * within / within_total[cluster]

    # The "p90" table: drop the least popular items covering 1 - coverage of behaviours,
    # never a cluster's most popular item (so every cluster can supply targets).
    order = np.argsort(popularity, kind="stable")
    dropped = order[np.cumsum(popularity[order]) <= 1.0 - cfg.embedding_coverage + 1e-12]
    has_embedding = np.ones(items, dtype=bool)
    has_embedding[dropped] = False
    has_embedding[starts] = True

    centroids = _unit(rng.standard_normal((clusters, dim))).astype(np.float32)
    spread = rng.uniform(*cfg.cluster_spread, size=items)
    embedding = np.empty((items, dim), dtype=np.int8)
    for lo in range(0, items, 65_536):
        hi = min(items, lo + 65_536)
        noise = _unit(rng.standard_normal((hi - lo, dim)))
        vec = _unit(centroids[cluster[lo:hi]] + spread[lo:hi, None] * noise)
        quantised = _quantise(vec * EMBEDDING_NORM)
        # Clipping shortens a few vectors: scale those up once so the norm stays ~122.
        norm = np.linalg.norm(quantised.astype(np.float64), axis=1, keepdims=True)
        embedding[lo:hi] = _quantise(vec * EMBEDDING_NORM ** 2 / norm)

    category_ids = _random_ids(rng, categories)
    k = min(cfg.categories_per_cluster, categories)
    cluster_categories = np.argsort(rng.random((clusters, categories)), axis=1)[:, :k]
    weights = np.asarray(_CATEGORY_WEIGHTS[:k]) / sum(_CATEGORY_WEIGHTS[:k])
    slot = rng.choice(k, size=items, p=weights)
    category = cluster_categories[cluster, slot]
    noisy = rng.random(items) < cfg.category_noise
    category[noisy] = rng.integers(0, categories, size=int(noisy.sum()))

    brand_ids = _random_ids(rng, ITEM_ATTRIBUTE_CARDINALITY[0])
    brand = rng.integers(0, ITEM_ATTRIBUTE_CARDINALITY[0], size=clusters)[cluster]
    off_brand = rng.random(items) < 0.3
    brand[off_brand] = rng.integers(0, ITEM_ATTRIBUTE_CARDINALITY[0], size=int(off_brand.sum()))
    price_ids = _random_ids(rng, ITEM_ATTRIBUTE_CARDINALITY[1])
    price = rng.choice(ITEM_ATTRIBUTE_CARDINALITY[1], size=items,
                       p=rng.dirichlet(np.full(ITEM_ATTRIBUTE_CARDINALITY[1], 2.0)))
    price_bias = rng.normal(0.0, 0.2, size=ITEM_ATTRIBUTE_CARDINALITY[1])
    bias = rng.normal(0.0, cfg.item_bias_std, size=items) + price_bias[price]

    attribute_ids = [_random_ids(rng, n) for n in USER_ATTRIBUTE_CARDINALITY]
    attribute_weights = [rng.dirichlet(np.ones(n)) for n in USER_ATTRIBUTE_CARDINALITY]
    age_bias = rng.normal(0.0, 0.3, size=USER_ATTRIBUTE_CARDINALITY[0])

    return _World(
        ids=_random_ids(rng, items), cluster=cluster, category=category_ids[category],
        attributes=np.stack([brand_ids[brand], price_ids[price]], axis=1),
        embedding=embedding, has_embedding=has_embedding, popularity=popularity, bias=bias,
        centroids=centroids, cluster_cdf=np.cumsum(cluster_pop) / cluster_pop.sum(),
        behaviour_cdf=_offset_cdf(within, cluster, starts),
        target_cdf=_offset_cdf(within * has_embedding, cluster, starts),
        targetable=np.flatnonzero(has_embedding),
        user_attribute_ids=attribute_ids, user_attribute_weights=attribute_weights,
        age_bias=age_bias)


def _sample_in_cluster(cdf: np.ndarray, cluster: np.ndarray, u: np.ndarray) -> np.ndarray:
    # Shrinking u keeps cluster + u below cluster + 1 in floating point.
    return np.searchsorted(cdf, cluster + u * (1.0 - 1e-9), side="right")


def _sample_cluster(cdf: np.ndarray, u: np.ndarray) -> np.ndarray:
    return np.minimum(np.searchsorted(cdf, u, side="right"), len(cdf) - 1)


def _list_array(values: np.ndarray, lengths: np.ndarray, list_type: pa.DataType) -> pa.Array:
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values), type=list_type)


def _window(matrix: np.ndarray, start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """Row-major values of ``matrix[b, start[b]:end[b]]`` for every row ``b``."""
    j = np.arange(matrix.shape[1])
    return matrix[(j >= start[:, None]) & (j < end[:, None])]


@dataclasses.dataclass
class _Stats:
    rows: dict[str, int] = dataclasses.field(default_factory=dict)
    clicks: dict[str, int] = dataclasses.field(default_factory=dict)
    bins: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    behaviours: int = 0
    behaviours_with_embedding: int = 0
    old_interest_users: int = 0
    short_history_users: int = 0
    interest_targets: int = 0
    old_interest_targets: int = 0

    _BINS = 10_000

    def add_labels(self, split: str, prob: np.ndarray, label: np.ndarray) -> None:
        self.rows[split] = self.rows.get(split, 0) + len(label)
        self.clicks[split] = self.clicks.get(split, 0) + int(label.sum())
        b = np.minimum((prob * self._BINS).astype(np.int64), self._BINS - 1)
        hist = np.stack([np.bincount(b[label == 0], minlength=self._BINS),
                         np.bincount(b[label == 1], minlength=self._BINS)])
        self.bins[split] = self.bins.get(split, 0) + hist

    def oracle_auc(self, split: str) -> float | None:
        """AUC of the true click probability (binned): the best any model can reach."""
        if split not in self.bins:
            return None
        neg, pos = self.bins[split].astype(np.float64)
        if neg.sum() == 0 or pos.sum() == 0:
            return None
        below = np.cumsum(neg) - neg
        return float((pos * (below + 0.5 * neg)).sum() / (pos.sum() * neg.sum()))


def _user_block(world: _World, user_ids: np.ndarray, rng: np.random.Generator, *,
                seq_len: int, samples_per_user: float, test_fraction: float,
                cfg: SignalConfig, stats: _Stats) -> dict[str, pa.Table]:
    """Users ``user_ids`` with their histories and impressions, as tables per stem."""
    n = len(user_ids)
    short = schema.SHORT_TERM_LEN
    n_clusters = len(world.centroids)
    max_i = cfg.max_interests

    # User attributes, 0 = missing.
    attributes = []
    age = np.zeros(n, dtype=np.int64)
    for a, (ids, weights, missing) in enumerate(zip(
            world.user_attribute_ids, world.user_attribute_weights, USER_ATTRIBUTE_MISSING,
            strict=True)):
        value = rng.choice(len(ids), size=n, p=weights)
        present = rng.random(n) >= missing
        attributes.append(np.where(present, ids[value], 0))
        if a == 0:
            age = np.where(present, value, -1)
    user_bias = np.where(age >= 0, world.age_bias[np.maximum(age, 0)], 0.0)
    user_bias = user_bias + rng.normal(0.0, cfg.user_bias_std, size=n)

    # History lengths: train rows hold `length`, test rows continue with `extra` more.
    min_len = min(cfg.min_history_len, seq_len)
    length = np.full(n, seq_len, dtype=np.int64)
    is_short = (rng.random(n) >= cfg.full_history_share) & (min_len < seq_len)
    length[is_short] = rng.integers(min_len, seq_len, size=int(is_short.sum()))
    extra = rng.integers(0, cfg.test_new_behaviours + 1, size=n)
    total = length + extra
    width = seq_len + cfg.test_new_behaviours

    # Interests: max_i persistent slots + 1 old-only slot, distinct clusters drawn by
    # popularity (Gumbel top-k).
    log_pop = np.log(np.diff(world.cluster_cdf, prepend=0.0) + 1e-300)
    keys = log_pop[None, :] + rng.gumbel(size=(n, n_clusters))
    interests = np.argsort(-keys, axis=1)[:, :max_i + 1].astype(np.int32)
    n_interests = rng.integers(cfg.min_interests, max_i + 1, size=n)
    weight = rng.gamma(2.0, size=(n, max_i)) * (np.arange(max_i) < n_interests[:, None])
    cum_weight = np.cumsum(weight / weight.sum(axis=1, keepdims=True), axis=1)
    old_window = length - short
    has_old = (rng.random(n) < cfg.old_interest_share) & (old_window >= cfg.min_old_window)
    era_len = np.maximum(1, (old_window * rng.uniform(0.3, 0.8, size=n)).astype(np.int64))
    era_start = (rng.random(n) * np.maximum(old_window - era_len + 1, 1)).astype(np.int64)

    # Behaviours, vectorised over [users, positions].
    pos = np.arange(width)[None, :]
    u_pick = rng.random((n, width))
    slot = np.zeros((n, width), dtype=np.int64)
    for k in range(max_i - 1):
        slot += u_pick >= cum_weight[:, k:k + 1]
    slot = np.minimum(slot, n_interests[:, None] - 1)
    cluster = np.take_along_axis(interests, slot, axis=1)
    in_era = has_old[:, None] & (pos >= era_start[:, None]) & (pos < (era_start + era_len)[:, None])
    old = in_era & (rng.random((n, width)) < cfg.old_era_rate)
    cluster = np.where(old, interests[:, max_i:max_i + 1], cluster)
    noise = rng.random((n, width)) < cfg.behaviour_noise
    noise_cluster = _sample_cluster(world.cluster_cdf, rng.random((n, width)))
    # Noise never lands in the old-only cluster, which stays out of the newest behaviours.
    noise &= ~old & ~(has_old[:, None] & (noise_cluster == interests[:, max_i:max_i + 1]))
    cluster = np.where(noise, noise_cluster, cluster)
    behaviour = _sample_in_cluster(world.behaviour_cdf, cluster, rng.random((n, width)))

    # Impressions: 1 + negative binomial per user; each one is a test one w.p. test_fraction.
    if samples_per_user > 1:
        rate = rng.gamma(cfg.impressions_shape, (samples_per_user - 1) / cfg.impressions_shape,
                         size=n)
        count = 1 + rng.poisson(rate)
    else:
        count = np.ones(n, dtype=np.int64)
    row_user = np.repeat(np.arange(n), count)
    rows = len(row_user)
    is_test = rng.random(rows) < test_fraction
    kind = rng.random(rows)
    from_interest = kind < cfg.target_interest_share
    from_popular = ~from_interest & (kind < cfg.target_interest_share + cfg.target_popular_share)
    slots_valid = np.concatenate(
        [np.arange(max_i)[None, :] < n_interests[:, None], has_old[:, None]], axis=1)
    # Weighted choice of the interest slot: argmax of u ** (1 / weight) picks slot k with
    # probability proportional to its weight.
    slot_weight = np.append(np.ones(max_i), cfg.old_interest_target_weight)
    pick_key = np.where(slots_valid[row_user], rng.random((rows, max_i + 1)) ** (1 / slot_weight),
                        -1.0)
    target_slot = np.argmax(pick_key, axis=1)
    target_cluster = np.where(
        from_interest, interests[row_user, target_slot],
        _sample_cluster(world.cluster_cdf, rng.random(rows)))
    target = _sample_in_cluster(world.target_cdf, target_cluster, rng.random(rows))
    uniform = ~from_interest & ~from_popular
    target = np.where(uniform, world.targetable[
        rng.integers(0, len(world.targetable), size=rows)], target)

    # Clicks: affinity = max cosine of the target to every interest centroid of its user.
    vec = world.embedding[target].astype(np.float32)
    vec /= np.linalg.norm(vec, axis=1, keepdims=True)
    cos = np.einsum("rd,rkd->rk", vec, world.centroids[interests[row_user]])
    affinity = np.where(slots_valid[row_user], cos, -np.inf).max(axis=1)
    logit = (cfg.click_bias + cfg.click_affinity_weight * affinity + user_bias[row_user]
             + world.bias[target])
    prob = 1.0 / (1.0 + np.exp(-logit))
    label = (rng.random(rows) < prob).astype(np.int8)

    stats.behaviours += int(length.sum())
    train_part = pos < length[:, None]
    stats.behaviours_with_embedding += int(world.has_embedding[behaviour][train_part].sum())
    stats.old_interest_users += int(has_old.sum())
    stats.short_history_users += int(is_short.sum())
    stats.interest_targets += int(from_interest.sum())
    stats.old_interest_targets += int((from_interest & (target_slot == max_i)).sum())

    item_key = schema.ITEM_ID.key
    user_key = schema.USER_ID.key
    tables: dict[str, pa.Table] = {}
    for stem, start, end in (
            (TRAIN_USER_FEATURES, np.zeros(n, dtype=np.int64), length),
            (TEST_USER_FEATURES, np.maximum(total - seq_len, 0), total)):
        hist = _window(behaviour, start, end)
        columns = {user_key: pa.array(user_ids)}
        for feature, values in zip(schema.USER_ATTRIBUTES, attributes, strict=True):
            columns[feature.key] = pa.array(values)
        columns[schema.HISTORY_ITEM_ID.key] = _list_array(world.ids[hist], end - start, _ID_LIST)
        columns[schema.HISTORY_CATEGORY.key] = _list_array(
            world.category[hist], end - start, _ID_LIST)
        tables[stem] = pa.table(columns, schema=table_schema(stem))
    for stem, split, mask in ((TRAIN_SAMPLES, "train", ~is_test),
                              (TEST_SAMPLES, "test", is_test)):
        y = label[mask]
        onehot = np.stack([1 - y, y], axis=1).reshape(-1)
        tables[stem] = pa.table({
            schema.LABEL.key: _list_array(onehot, np.full(len(y), 2), _LABEL_LIST),
            user_key: pa.array(user_ids[row_user[mask]]),
            item_key: pa.array(world.ids[target[mask]]),
        }, schema=table_schema(stem))
        stats.add_labels(split, prob[mask], y)
    old_cluster = np.where(has_old, interests[:, max_i], -1).astype(np.int32)
    tables[PLANTED_USERS] = pa.table({
        user_key: pa.array(user_ids),
        "interest_clusters": _list_array(
            interests[:, :max_i][np.arange(max_i)[None, :] < n_interests[:, None]],
            n_interests, pa.list_(pa.int32())),
        "old_interest_cluster": pa.array(old_cluster),
        "history_len": pa.array(length),
        "test_history_len": pa.array(total - np.maximum(total - seq_len, 0)),
    }, schema=PLANTED_USERS_SCHEMA)
    return tables


class ShardedWriter:
    """Writes one table as ``<stem>-NNNNN.parquet`` shards of at most ``shard_rows`` rows;
    a table that fits one shard ends up as ``<stem>.parquet``."""

    def __init__(self, directory: str, stem: str, arrow_schema: pa.Schema, shard_rows: int):
        self._directory = directory
        self._stem = stem
        self._schema = arrow_schema
        self._shard_rows = shard_rows
        self._paths: list[str] = []
        self._writer: pq.ParquetWriter | None = None
        self._in_shard = 0
        self._buffer: list[pa.Table] = []
        self._buffered = 0
        self.rows = 0

    def write(self, table: pa.Table) -> None:
        while table.num_rows:
            room = self._shard_rows - self._in_shard - self._buffered
            part, table = table.slice(0, room), table.slice(room)
            self._buffer.append(part)
            self._buffered += part.num_rows
            full = self._in_shard + self._buffered >= self._shard_rows
            big = sum(t.nbytes for t in self._buffer) >= _ROW_GROUP_BYTES
            if full or big or self._buffered >= _ROW_GROUP_ROWS:
                self._flush()
            if full:
                self._close_shard()

    def _flush(self) -> None:
        if not self._buffer:
            return
        if self._writer is None:
            path = os.path.join(self._directory, f"{self._stem}-{len(self._paths):05d}.parquet")
            self._paths.append(path)
            self._writer = pq.ParquetWriter(path, self._schema, compression="snappy")
        table = pa.concat_tables(self._buffer).combine_chunks()
        self._writer.write_table(table, row_group_size=max(table.num_rows, 1))
        self.rows += table.num_rows
        self._in_shard += table.num_rows
        self._buffer, self._buffered = [], 0

    def _close_shard(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._writer, self._in_shard = None, 0

    def close(self) -> list[str]:
        """Finishes the table; returns its file paths (an empty table still gets a file)."""
        self._flush()
        if not self._paths:
            self._buffer = [self._schema.empty_table()]
            self._flush()
        self._close_shard()
        if len(self._paths) == 1:
            single = os.path.join(self._directory, f"{self._stem}.parquet")
            os.replace(self._paths[0], single)
            self._paths = [single]
        return list(self._paths)


def _check_int(name: str, value: Any, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        rule = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be {rule}, got {value!r}")
    return int(value)


def existing_outputs(out_dir: str) -> list[str]:
    found = [p for stem in TABLES for p in glob.glob(table_pattern(out_dir, stem))]
    found += glob.glob(os.path.join(out_dir, PLANTED_DIR, "*.parquet"))
    if os.path.exists(os.path.join(out_dir, GENERATOR_FILE)):
        found.append(os.path.join(out_dir, GENERATOR_FILE))
    return sorted(found)


def generate(
    out_dir: str,
    *,
    users: int,
    items: int,
    seq_len: int,
    seed: int,
    samples_per_user: float = 10.0,
    test_fraction: float = 0.1,
    shard_rows: int = 100_000,
    signal: SignalConfig | None = None,
    overwrite: bool = False,
) -> dict[str, int]:
    """Writes a synthetic TAOBAO-MM data set to ``out_dir``.

    Args:
      out_dir: output directory (created); see the module docstring for the layout.
      users: number of users (each has a row in both user tables).
      items: number of items (each has an item_features row).
      seq_len: longest behaviour history, at most ``schema.MAX_HISTORY_LEN``.
      seed: random seed; the output is a pure function of all arguments.
      samples_per_user: mean impressions per user (>= 1; train + test).
      test_fraction: probability that an impression goes to the test split.
      shard_rows: most rows per parquet file of any table.
      signal: the planted-signal knobs (:class:`SignalConfig`).
      overwrite: replace an earlier output in ``out_dir`` instead of failing.

    Returns:
      Rows written per table stem (:data:`TABLES`). The same counts, the parameters,
      statistics (click rates, embedding coverage, oracle AUC, ...) and the file names are
      written to ``out_dir/generator.json``.
    """
    cfg = signal or SignalConfig()
    cfg.validate()
    users = _check_int("users", users, 1)
    items = _check_int("items", items, 1)
    seq_len = _check_int("seq_len", seq_len, 1, schema.MAX_HISTORY_LEN)
    seed = _check_int("seed", seed, 0)
    shard_rows = _check_int("shard_rows", shard_rows, 1)
    if not (isinstance(samples_per_user, int | float) and math.isfinite(samples_per_user)
            and samples_per_user >= 1):
        raise ValueError(f"samples_per_user must be a number >= 1, got {samples_per_user!r}")
    if not (isinstance(test_fraction, int | float) and 0.0 <= test_fraction < 1.0):
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction!r}")
    clusters = cfg.clusters or int(np.clip(round(math.sqrt(items) / 2), 8, 512))
    if clusters < cfg.max_interests + 1:
        raise ValueError(f"clusters must be > max_interests={cfg.max_interests} so a user "
                         f"can have an old-only interest, got {clusters}")
    if items < 2 * clusters:
        raise ValueError(f"items must be >= 2 * clusters = {2 * clusters} (two items per "
                         f"latent cluster), got {items}")
    categories = cfg.categories or clusters

    os.makedirs(out_dir, exist_ok=True)
    existing = existing_outputs(out_dir)
    if existing and not overwrite:
        raise FileExistsError(f"{out_dir!r} already holds generator output ({existing[0]!r}, "
                              f"...); pass overwrite=True / --overwrite to replace it")
    for path in existing:
        os.remove(path)
    planted_dir = os.path.join(out_dir, PLANTED_DIR)
    os.makedirs(planted_dir, exist_ok=True)

    world = _build_world(np.random.default_rng(np.random.SeedSequence([seed, 0])),
                              items, clusters, categories, cfg)
    user_ids = _random_ids(np.random.default_rng(np.random.SeedSequence([seed, 1])), users)

    writers = {stem: ShardedWriter(out_dir, stem, table_schema(stem), shard_rows)
               for stem in TABLES}
    writers[PLANTED_USERS] = ShardedWriter(planted_dir, PLANTED_USERS, PLANTED_USERS_SCHEMA,
                                            shard_rows)
    writers[PLANTED_ITEMS] = ShardedWriter(planted_dir, PLANTED_ITEMS, PLANTED_ITEMS_SCHEMA,
                                            shard_rows)
    stats = _Stats()
    for block, lo in enumerate(range(0, users, USER_BLOCK)):
        rng = np.random.default_rng(np.random.SeedSequence([seed, 2, block]))
        tables = _user_block(world, user_ids[lo:lo + USER_BLOCK], rng, seq_len=seq_len,
                             samples_per_user=float(samples_per_user),
                             test_fraction=float(test_fraction), cfg=cfg, stats=stats)
        for stem, table in tables.items():
            writers[stem].write(table)

    order = np.argsort(world.ids, kind="stable")
    item_columns = schema.columns(schema.ITEM_FEATURES)
    writers[ITEM_FEATURES].write(pa.table(
        dict(zip(item_columns, [world.ids[order], world.category[order],
                                *world.attributes[order].T], strict=True)),
        schema=table_schema(ITEM_FEATURES)))
    embedded = order[world.has_embedding[order]]
    dim = schema.MM_EMBEDDING_DIM
    writers[EMBEDDINGS].write(pa.table({
        schema.EMBEDDING_ITEM_KEY: pa.array(world.ids[embedded]),
        schema.EMBEDDING_VECTOR_KEY: _list_array(
            world.embedding[embedded].reshape(-1), np.full(len(embedded), dim),
            _LABEL_LIST),
    }, schema=table_schema(EMBEDDINGS)))
    writers[PLANTED_ITEMS].write(pa.table({
        schema.ITEM_ID.key: world.ids[order], "cluster": world.cluster[order],
        "popularity": world.popularity[order],
        "has_embedding": world.has_embedding[order]},
        schema=PLANTED_ITEMS_SCHEMA))

    files = {stem: writer.close() for stem, writer in writers.items()}
    counts = {stem: writers[stem].rows for stem in TABLES}
    summary = {
        "parameters": {
            "users": users, "items": items, "seq_len": seq_len, "seed": seed,
            "samples_per_user": samples_per_user, "test_fraction": test_fraction,
            "shard_rows": shard_rows, "clusters": clusters, "categories": categories,
            "signal": dataclasses.asdict(cfg),
        },
        "counts": counts,
        "stats": {
            "click_rate": {split: stats.clicks[split] / stats.rows[split]
                           for split in stats.rows if stats.rows[split]},
            "oracle_auc": {split: stats.oracle_auc(split) for split in stats.rows},
            "behaviours": stats.behaviours,
            "behaviour_embedding_coverage":
                stats.behaviours_with_embedding / max(stats.behaviours, 1),
            "items_without_embedding": int((~world.has_embedding).sum()),
            "old_interest_users": stats.old_interest_users,
            "short_history_users": stats.short_history_users,
            "interest_targets": stats.interest_targets,
            "old_interest_targets": stats.old_interest_targets,
        },
        "globs": {stem: f"{stem}*.parquet" for stem in TABLES},
        "files": {stem: [os.path.relpath(p, out_dir) for p in paths]
                  for stem, paths in files.items()},
    }
    with open(os.path.join(out_dir, GENERATOR_FILE), "w") as f:
        json.dump(summary, f, indent=2, sort_keys=True)
        f.write("\n")
    return counts


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m muse_tf.data.synthetic",
        description="Write a synthetic TAOBAO-MM data set (six parquet tables) with a planted "
                    "lifelong multimodal interest signal.")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--users", type=int, required=True)
    parser.add_argument("--items", type=int, required=True)
    parser.add_argument("--seq-len", type=int, required=True,
                        help=f"longest behaviour history (<= {schema.MAX_HISTORY_LEN})")
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--samples-per-user", type=float, default=10.0,
                        help="mean impressions per user, train + test (default 10)")
    parser.add_argument("--test-fraction", type=float, default=0.1,
                        help="probability that an impression is a test one (default 0.1)")
    parser.add_argument("--shard-rows", type=int, default=100_000,
                        help="most rows per parquet file of a table (default 100000)")
    parser.add_argument("--clusters", type=int, default=0,
                        help="latent interest clusters (default: from --items)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an earlier output in --out")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        counts = generate(
            args.out, users=args.users, items=args.items, seq_len=args.seq_len,
            seed=args.seed, samples_per_user=args.samples_per_user,
            test_fraction=args.test_fraction, shard_rows=args.shard_rows,
            signal=SignalConfig(clusters=args.clusters), overwrite=args.overwrite)
    except (ValueError, FileExistsError) as err:
        parser.error(str(err))
    print(json.dumps({"out": args.out, "counts": counts,
                      "seconds": round(time.perf_counter() - start, 2)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
