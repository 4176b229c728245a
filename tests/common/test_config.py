import pickle

import pytest

from common.config import ConfigError, FeatureDecl, load_config


def test_defaults_load_and_roundtrip():
    cfg = load_config("conf/default.yaml")
    assert cfg.dataset.kind == "synthetic"
    assert cfg.features.item["tags"] == FeatureDecl(type="multi", sep="|")
    assert cfg.features.item["price"].boundaries == (10.0, 20.0, 50.0, 100.0, 200.0)
    # Workers receive the typed config through pickling.
    assert pickle.loads(pickle.dumps(cfg)) == cfg


def test_overrides_are_typed():
    cfg = load_config("conf/default.yaml", ["ssl.method=cfm", "ssl.alpha=0.5", "train.num_workers=3"])
    assert cfg.ssl.method == "cfm" and cfg.ssl.alpha == 0.5 and cfg.train.num_workers == 3


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("train.bogus=1", "train.bogus"),
        ("bogus.key=1", "bogus"),
        ("train.batch_size=abc", "train.batch_size"),
        ("ssl.method=magic", "ssl.method"),
        ("train.use_gpu=yes please", "train.use_gpu"),
        ("features.item.x={type: bucketized}", "boundaries"),
        ("features.item.item_id=multi", "reserved"),
        ("prepare.split.eval_fraction=1.5", "eval_fraction"),
        ("train.bf16=true", "use_gpu"),
    ],
)
def test_bad_keys_and_values_name_the_key(override, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_config("conf/default.yaml", [override])


def test_hash_is_stable_and_sensitive():
    a = load_config("conf/default.yaml")
    b = load_config("conf/default.yaml")
    c = load_config("conf/default.yaml", ["ssl.alpha=0.9"])
    assert a.hash() == b.hash() != c.hash()


def test_tables_kind_requires_paths():
    with pytest.raises(ConfigError, match="interactions.path"):
        load_config(None, ["dataset.kind=tables"])


def test_missing_file_is_clear(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_feature_name_on_both_sides_is_an_error():
    with pytest.raises(ConfigError, match="both features.item and features.user"):
        load_config("conf/default.yaml", ["features.user.color=categorical"])


def test_float_literals_without_a_dot_are_numbers():
    # PyYAML (YAML 1.1) parses "1e30" as a string; float keys accept it anyway.
    assert load_config("conf/default.yaml", ["train.lr=1e30"]).train.lr == 1e30
    with pytest.raises(ConfigError, match="train.lr"):
        load_config("conf/default.yaml", ["train.lr=fast"])
