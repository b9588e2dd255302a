"""Config: YAML loading, dotted overrides with type coercion, validation messages, echo."""

import glob
import os

import pytest
import yaml

from megatiny.config import Config, ConfigError, DataConfig, ParallelConfig, TrainConfig

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "..", "launch", "configs")


def test_overrides_are_coerced_to_field_types():
    cfg = Config.from_dict(
        {"model": {"d_model": 64, "n_heads": 4}},
        [
            "train.steps=20",
            "train.lr=1e-3",  # YAML 1.1 reads 1e-3 as a string; the field type makes it a float
            "train.tensorboard=false",
            "train.global_batch_size=null",
            "parallel.tp=2",
            "model.n_layers=3.0",
            "data.path=[0.7, a, 0.3, b]",
            "data.tokenizer=tok",
        ],
    )
    assert cfg.train.steps == 20 and isinstance(cfg.train.steps, int)
    assert cfg.train.lr == pytest.approx(1e-3) and isinstance(cfg.train.lr, float)
    assert cfg.train.tensorboard is False
    assert cfg.train.global_batch_size is None
    assert cfg.parallel.tp == 2
    assert cfg.model.n_layers == 3 and cfg.model.d_model == 64
    assert cfg.data.prefixes() == ["a", "b"]


def test_unknown_key_suggests_closest():
    with pytest.raises(ConfigError, match=r"unknown config key 'train.step'.*'train.steps'"):
        Config.from_dict({}, ["train.step=3"])
    with pytest.raises(ConfigError, match=r"'model.n_layer'.*did you mean 'model.n_layers'"):
        Config.from_dict({"model": {"n_layer": 2}})
    with pytest.raises(ConfigError, match=r"config section 'trian'.*'train'"):
        Config.from_dict({"trian": {"steps": 1}})
    with pytest.raises(ConfigError, match="needs a section"):
        Config.from_dict({}, ["steps=3"])


def test_bad_values_are_reported_with_the_key():
    with pytest.raises(ConfigError, match=r"train.steps='many' is not a valid int"):
        Config.from_dict({}, ["train.steps=many"])
    with pytest.raises(ConfigError, match="nan_policy"):
        Config.from_dict({}, ["train.nan_policy=ignore"])
    with pytest.raises(ValueError, match="n_heads"):
        Config.from_dict({"model": {"d_model": 65, "n_heads": 4}})


def test_world_size_must_match_layout():
    cfg = Config.from_dict({"model": {"d_model": 64, "n_heads": 4}}, ["parallel.tp=2"])
    assert cfg.validate(world_size=4) == 2
    with pytest.raises(ConfigError, match=r"world size 3 is not divisible by tp\*pp\*cp"):
        cfg.validate(world_size=3)
    cfg = Config.from_dict({"model": {"d_model": 64, "n_heads": 4}}, ["parallel.dp=4"])
    with pytest.raises(ConfigError, match=r"parallel.dp=4 but world size 2"):
        cfg.validate(world_size=2)
    cfg = Config.from_dict({"model": {"d_model": 60, "n_heads": 3}}, ["parallel.tp=2"])
    with pytest.raises(ConfigError, match=r"n_heads=3 is not divisible by parallel.tp=2"):
        cfg.validate(world_size=2)


def test_batch_and_sequence_checks():
    t = TrainConfig(micro_batch_size=2, global_batch_size=8)
    assert t.accumulation_steps(dp=2) == 2 and t.accumulation_steps(dp=1) == 4
    with pytest.raises(ConfigError, match="not divisible by micro_batch_size"):
        TrainConfig(micro_batch_size=3, global_batch_size=8).accumulation_steps(dp=1)
    cfg = Config.from_dict({"model": {"max_seq_len": 64}}, ["data.seq_length=128"])
    with pytest.raises(ConfigError, match="exceeds model.max_seq_len"):
        cfg.validate(world_size=1)
    with pytest.raises(ConfigError, match="sequence_parallel=true needs parallel.tp > 1"):
        ParallelConfig(sequence_parallel=True)


def test_missing_data_prefix_is_a_clear_error(tmp_path):
    with pytest.raises(
        ConfigError, match=r"missing .*nope\.bin, .*nope\.idx.*megatiny data tokenize"
    ):
        DataConfig(path=str(tmp_path / "nope")).check_exists()
    with pytest.raises(ConfigError, match="data.path is not set"):
        DataConfig().check_exists()
    with pytest.raises(ConfigError, match="vocab_size=auto needs data.tokenizer"):
        Config.from_dict({"model": {"vocab_size": "auto"}})
    with pytest.raises(ConfigError, match="data.tokenizer .* not found"):
        Config.from_dict({"model": {"vocab_size": "auto"}}, [f"data.tokenizer={tmp_path}/t"])


def test_yaml_round_trip_echo(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"model": {"d_model": 64, "n_heads": 4}, "train": {"steps": 7}}))
    cfg = Config.from_yaml(str(path), ["train.lr=0.01"])
    out = tmp_path / "run" / "config.yaml"
    cfg.save_yaml(str(out))
    again = Config.from_yaml(str(out))
    assert again == cfg and again.train.lr == 0.01 and again.train.steps == 7
    assert not [p for p in os.listdir(out.parent) if ".tmp" in p]
    with pytest.raises(ConfigError, match="not found"):
        Config.from_yaml(str(tmp_path / "missing.yaml"))


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(CONFIG_DIR, "*.yaml"))))
def test_shipped_configs_load(path):
    with open(path) as f:
        auto_vocab = yaml.safe_load(f)["model"].get("vocab_size") == "auto"
    # vocab_size: auto reads data.tokenizer, which only exists after data preparation.
    cfg = Config.from_yaml(
        path, ["model.vocab_size=512", "data.tokenizer=null"] if auto_vocab else []
    )
    world = cfg.parallel.tp * cfg.parallel.pp * cfg.parallel.cp * (cfg.parallel.dp or 1)
    cfg.validate(world_size=world)
    assert cfg.model.num_parameters() > 0


def test_shipped_configs_exist():
    names = {os.path.basename(p) for p in glob.glob(os.path.join(CONFIG_DIR, "*.yaml"))}
    assert {"tiny-cpu.yaml", "gpt2-124m.yaml", "llama-1b.yaml", "llama-7b.yaml"} <= names
