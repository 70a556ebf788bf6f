"""Config dataclasses, overrides and the experiment registry."""

import pytest

from muse_tf import config as config_lib


def test_every_registered_experiment_validates():
    names = config_lib.experiments()
    for required in ("muse", "din", "sim_hard", "sim_soft", "twin", "miss"):
        assert required in names
    for name in names:
        cfg = config_lib.get_experiment(name)
        assert cfg.name == name
        cfg.validate()


def test_muse_defaults_follow_the_paper():
    cfg = config_lib.get_experiment("muse")
    assert cfg.model.gsu == "multimodal"
    assert cfg.model.top_k == 50
    assert cfg.model.short_term_len == 50
    assert sorted(cfg.model.esu) == ["sa_ta", "simtier"]
    assert cfg.model.id_embedding_dim == 16
    assert cfg.train.embedding_learning_rate == 2e-3
    assert cfg.train.dense_learning_rate == 2e-4


def test_ablation_groups_name_registered_experiments():
    for names in config_lib.ABLATIONS.values():
        for name in names:
            config_lib.get_experiment(name)


def test_set_overrides_are_typed():
    cfg = config_lib.resolve("muse", assignments=[
        "model.top_k=20", "model.esu=ta,simtier", "train.dense_learning_rate=1e-3",
        "model.use_user_attributes=false", "data.batch_size=64"])
    assert cfg.model.top_k == 20
    assert cfg.model.esu == ["ta", "simtier"]
    assert cfg.train.dense_learning_rate == pytest.approx(1e-3)
    assert cfg.model.use_user_attributes is False
    assert cfg.data.batch_size == 64


def test_miss_learns_node_rows_by_the_automatic_rule_unless_told():
    assert config_lib.get_experiment("miss_retrieval").retrieval.learned_node_levels == -1
    cfg = config_lib.resolve("miss_retrieval", assignments=["retrieval.learned_node_levels=3"])
    assert cfg.retrieval.learned_node_levels == 3


def test_yaml_file_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  gsu: category\n  esu: [ta]\ntrain:\n  epochs: 3\n")
    cfg = config_lib.resolve("muse", str(path))
    assert (cfg.model.gsu, cfg.model.esu, cfg.train.epochs) == ("category", ["ta"], 3)


def test_registry_entries_are_independent_copies():
    a = config_lib.get_experiment("muse")
    a.model.esu.append("ta")
    assert config_lib.get_experiment("muse").model.esu == ["sa_ta", "simtier"]


@pytest.mark.parametrize("assignment,message", [
    ("model.gsu=bogus", "model.gsu='bogus'"),
    ("model.nope=1", "unknown config field 'model.nope'"),
    ("model.top_k=abc", "model.top_k"),
    ("model.esu=ta,sa_ta", "'ta' or 'sa_ta'"),
    ("model.top_k=0", "model.top_k=0"),
    ("train.strategy=tpu", "train.strategy='tpu'"),
    ("retrieval.learned_node_levels=-2", "retrieval.learned_node_levels=-2 must be >= 0"),
])
def test_bad_overrides_name_the_field(assignment, message):
    with pytest.raises((ValueError, KeyError), match=message.replace("(", r"\(")):
        config_lib.resolve("muse", assignments=[assignment])


def test_unknown_experiment_lists_the_registry():
    with pytest.raises(KeyError, match="registered"):
        config_lib.get_experiment("nope")
