"""Paper-style comparisons (``python -m muse_tf.compare compare|ablation|retrieval``).

``compare`` trains and evaluates each named experiment on the same Beam output directory and
writes a markdown table (AUC, GAUC, Δ GAUC vs the baseline, ``din`` by default) and PNG plots
of the relative GAUC gain over the baseline by 9 user groups of history length and by 9
item-popularity groups (MUSE paper, Fig. 6). Relative gain of a group =
``GAUC_model / GAUC_baseline - 1`` over that group's test samples.
``ablation table1|table2|table3`` does the same for the paper's ablation tables.
``retrieval`` prints recall@N and queries/s of the MISS tree, the two-tower model
(brute force and ScaNN) and popularity.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from muse_tf import config as config_lib
from muse_tf import metrics as metrics_lib
from muse_tf import schema
from muse_tf.data.data_dir import DataDir
from muse_tf.embeddings.arrays import sorted_positions
from muse_tf.training.evaluation import RECALL_CUTOFFS
from muse_tf.training.experiment import run_experiment
from muse_tf.training.ranking import PREDICTIONS_FILE

NUM_GROUPS = 9


def quantile_groups(values: np.ndarray, num_groups: int = NUM_GROUPS) -> np.ndarray:
    """Group index in ``[0, num_groups)``: equal-size groups by the rank of ``values``.

    Ties are split by position (a stable sort), so every group has ``len / num_groups``
    samples even when most values are equal (e.g. most histories at the maximum length).
    """
    if len(values) == 0:
        return np.zeros(0, np.int64)
    ranks = np.empty(len(values), np.int64)
    ranks[np.argsort(values, kind="stable")] = np.arange(len(values))
    return (ranks * num_groups // len(values)).astype(np.int64)


def group_gauc(predictions: dict[str, np.ndarray], groups: np.ndarray,
               num_groups: int = NUM_GROUPS) -> np.ndarray:
    """GAUC of each group's samples (NaN where a group has no two-class user)."""
    out = np.full(num_groups, np.nan)
    for g in range(num_groups):
        keep = groups == g
        if not keep.any():
            continue
        try:
            out[g] = metrics_lib.gauc(predictions[schema.USER_ID.name][keep],
                                      predictions[schema.LABEL.name][keep],
                                      predictions["score"][keep])
        except ValueError:
            out[g] = np.nan
    return out


def item_popularity(data: DataDir, item_ids: np.ndarray) -> np.ndarray:
    """Train occurrences of each item (0 for items not in the train vocabulary)."""
    ids, counts = data.vocabulary(schema.ITEM_ID.vocabulary)
    order = np.argsort(ids, kind="stable")
    positions, found = sorted_positions(ids[order], item_ids)
    return np.where(found, counts[order][positions] if len(ids) else 0, 0)


def _load_predictions(model_dir: str) -> dict[str, np.ndarray]:
    with np.load(os.path.join(model_dir, PREDICTIONS_FILE)) as data:
        return {k: data[k] for k in data.files}


def compare(data_dir: str | DataDir, names: Sequence[str], out_dir: str,
            baseline: str = "din", assignments: Sequence[str] = (),
            title: str = "comparison") -> str:
    """Train/evaluate ``names`` (+ the baseline), write table + plots; returns the markdown."""
    data = DataDir.open(data_dir)
    names = list(dict.fromkeys([baseline, *names]))
    os.makedirs(out_dir, exist_ok=True)
    results: dict[str, dict[str, Any]] = {}
    for name in names:
        config = config_lib.resolve(name, assignments=[*assignments, "train.export=false"])
        model_dir = os.path.join(out_dir, name)
        print(f"== {name}: {config_lib.experiments()[name]}", flush=True)
        results[name] = run_experiment(config, model_dir, data)

    base = results[baseline]["test"]
    lines = [f"### {title}", "",
             "| experiment | AUC | GAUC | Δ GAUC vs " + baseline + " | logloss | train ex/s |",
             "|---|---|---|---|---|---|"]
    for name in names:
        t = results[name]["test"]
        lines.append(f"| {name} | {t['auc']:.4f} | {t['gauc']:.4f} | "
                     f"{t['gauc'] - base['gauc']:+.4f} | {t['logloss']:.4f} | "
                     f"{results[name]['train_examples_per_sec']:.0f} |")
    table = "\n".join(lines)

    groups = _group_gains(data, out_dir, names, baseline)
    with open(os.path.join(out_dir, "groups.json"), "w") as f:
        json.dump(groups, f, indent=2)
    _plot(groups, out_dir, baseline)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2, default=float)
    return table


def _group_gains(data: DataDir, out_dir: str, names: Sequence[str],
                 baseline: str) -> dict[str, Any]:
    predictions = {name: _load_predictions(os.path.join(out_dir, name)) for name in names}
    ref = predictions[baseline]
    by_length = quantile_groups(ref[schema.HISTORY_LENGTH].astype(np.float64))
    popularity = item_popularity(data, ref[schema.ITEM_ID.name])
    by_popularity = quantile_groups(popularity.astype(np.float64))
    out: dict[str, Any] = {"groups": NUM_GROUPS, "history_length": {}, "item_popularity": {}}
    for key, groups in (("history_length", by_length), ("item_popularity", by_popularity)):
        base = group_gauc(ref, groups)
        for name in names:
            if len(predictions[name]["score"]) != len(ref["score"]):
                raise ValueError(f"{name} scored {len(predictions[name]['score'])} test "
                                 f"samples, {baseline} {len(ref['score'])}: not comparable")
            gains = group_gauc(predictions[name], groups) / base - 1.0
            out[key][name] = [None if np.isnan(g) else float(g) for g in gains]
    return out


def _plot(groups: dict[str, Any], out_dir: str, baseline: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for key, label in (("history_length", "user group by history length (short → long)"),
                       ("item_popularity", "item group by popularity (tail → head)")):
        fig, ax = plt.subplots(figsize=(7, 4))
        for name, gains in groups[key].items():
            if name == baseline:
                continue
            values = [np.nan if g is None else 100 * g for g in gains]
            ax.plot(range(1, NUM_GROUPS + 1), values, marker="o", label=name)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xlabel(label)
        ax.set_ylabel(f"relative GAUC gain over {baseline} (%)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, f"gauc_gain_by_{key}.png"), dpi=100)
        plt.close(fig)


def _cell(value: Any, fmt: str) -> str:
    return "—" if value is None else format(value, fmt)


def format_table(rows: Mapping[str, Mapping[str, Any]]) -> str:
    """Markdown table: one row per method, from a ``metrics.json``-style ``test`` section
    (``recall@N`` keys, optional ``queries_per_sec``; ``None`` prints as —)."""
    header = "| method | " + " | ".join(f"recall@{n}" for n in RECALL_CUTOFFS) + " | queries/s |"
    lines = [header, "|---" * (len(RECALL_CUTOFFS) + 2) + "|"]
    for method, test in rows.items():
        recalls = " | ".join(_cell(test.get(f"recall@{n}"), ".4f") for n in RECALL_CUTOFFS)
        lines.append(f"| {method} | {recalls} | {_cell(test.get('queries_per_sec'), '.0f')} |")
    return "\n".join(lines)


def retrieval_compare(data_dir: str | DataDir, out_dir: str,
                      assignments: Sequence[str] = ()) -> str:
    """Runs both retrieval experiments on ``data_dir`` (``assignments``: ``key=value``
    overrides applied to both); returns the markdown table."""
    data = DataDir.open(data_dir)
    os.makedirs(out_dir, exist_ok=True)
    results: dict[str, dict[str, Any]] = {}
    for name in ("miss_retrieval", "two_tower"):
        config = config_lib.resolve(name, assignments=assignments)
        print(f"== {name}: {config_lib.experiments()[name]}", flush=True)
        results[name] = run_experiment(config, os.path.join(out_dir, name), data)
    miss, two_tower = results["miss_retrieval"]["test"], results["two_tower"]["test"]
    rows = {"MISS tree beam search": miss, "two-tower brute force": two_tower}
    if "error" in two_tower.get("scann", {}):
        rows["two-tower ScaNN (unavailable: " + two_tower["scann"]["error"] + ")"] = {}
    else:
        rows["two-tower ScaNN"] = two_tower["scann"]
    rows["popularity"] = miss["popularity"]
    table = "\n".join([
        "### Retrieval comparison", "",
        f"{miss['queries']} clicked test impressions; catalogue of "
        f"{results['miss_retrieval']['index']['items']} items (tree depth "
        f"{results['miss_retrieval']['index']['depth']}, beam width "
        f"{results['miss_retrieval']['index']['beam_width']}).", "",
        format_table(rows)])
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2, default=float)
    return table
