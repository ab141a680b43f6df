import pytest

from fedsilo.config import Config, dump_config, load_config
from fedsilo.errors import ConfigError


def test_defaults_validate():
    config = load_config(None)
    assert isinstance(config, Config) and config.strategy.name == "fedavg"


def test_file_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("rounds: 4\ntrain:\n  lr: 0.1\nmodel:\n  name: resnet18\n")
    config = load_config(path, overrides=["train.lr=0.5", "strategy.server_lr=0.7"])
    assert config.rounds == 4 and config.train.lr == 0.5 and config.model.name == "resnet18"
    assert config.strategy.options == {"server_lr": 0.7}


def test_dumped_config_loads_back_identically(tmp_path):
    config = load_config(None, overrides=["rounds=3", "strategy.server_lr=0.5",
                                          "train.max_steps=7"])
    path = tmp_path / "resolved.yaml"
    path.write_text(dump_config(config))
    assert load_config(path) == config


@pytest.mark.parametrize("override, message", [
    ("train.epochz=2", "unknown config key 'train.epochz'"),
    ("bogus=1", "unknown config key 'bogus'"),
    ("rounds=three", "'rounds' must be an integer, got str 'three'"),
    ("rounds=2.5", "'rounds' must be an integer"),
    ("train.lr=-1", "'train.lr' must be > 0"),
    ("train.lr=true", "'train.lr' must be a number"),
    ("train.optimizer=rmsprop", "'train.optimizer' must be one of sgd, adam"),
    ("model.name=vgg99",
     "unknown model 'vgg99'; known: basic_unet, dp_cnn, resnet18, scatter_cnn, "
     "scatter_linear, small_cnn, unet"),
    ("strategy.name=nope", "unknown strategy 'nope'"),
    ("data=3", "'data' must be a mapping"),
    ("rounds", "not of the form key=value"),
    ("data.verify_hashes=maybe", "'data.verify_hashes' must be true or false"),
])
def test_bad_keys_and_values_name_the_key(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides=[override])
    assert message in str(info.value)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("rounds: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(listy)


def test_config_is_frozen():
    config = load_config(None)
    with pytest.raises(Exception):
        config.rounds = 5  # type: ignore[misc]


def test_scientific_notation_is_a_number_for_float_keys(tmp_path):
    # PyYAML (YAML 1.1) reads "1e-3" as a string; users mean 0.001
    assert load_config(None, overrides=["train.lr=1e-3"]).train.lr == 0.001
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 5E-2\n")
    assert load_config(path).train.lr == 0.05
    with pytest.raises(ConfigError, match="must be an integer"):
        load_config(None, overrides=["rounds=1e3"])


def test_on_off_words_survive_yaml_booleans():
    assert load_config(None, overrides=["runtime.progress=off"]).runtime.progress == "off"
    assert load_config(None, overrides=["runtime.progress=on"]).runtime.progress == "on"
    with pytest.raises(ConfigError, match="must be one of auto, cpu, cuda"):
        load_config(None, overrides=["runtime.device=yes"])


def test_lr_decay_schedule():
    from fedsilo.training import round_lr
    config = load_config(None, overrides=["train.lr=0.1", "train.lr_decay=0.5"]).train
    assert [round_lr(config, r) for r in (1, 2, 3)] == [0.1, 0.05, 0.025]
    with pytest.raises(ConfigError, match="'train.lr_decay' must be in"):
        load_config(None, overrides=["train.lr_decay=1.5"])


def test_encryption_refuses_a_nonlinear_strategy():
    import dataclasses

    import pytest

    from fedsilo.config import load_config
    from fedsilo.errors import ConfigError
    from fedsilo.strategies import STRATEGIES, Strategy

    if "test_median" not in STRATEGIES:
        @STRATEGIES.register("test_median")
        class Median(Strategy):  # needs every update: cannot run on an encrypted sum
            name = "test_median"
            linear = False

            @dataclasses.dataclass(frozen=True)
            class Options:
                pass

    assert load_config(None, overrides=["strategy.name=test_median"]).strategy.name == "test_median"
    with pytest.raises(ConfigError, match="strategy 'test_median' needs each participant's update"):
        load_config(None, overrides=["strategy.name=test_median", "he.enabled=true"])
    assert load_config(None, overrides=["he.enabled=true", "he.keys=k"]).he.keys == "k"


def test_user_level_dp_refuses_fednova_normalization():
    """FedNova rescales each clipped update by a data-dependent step count, so the clip
    norm no longer bounds one site's contribution to the noised sum."""
    assert load_config(None, overrides=["train.normalize_steps=true"]).train.normalize_steps
    assert load_config(None, overrides=["dp.user.enabled=true"]).dp.user.enabled
    with pytest.raises(ConfigError, match="dp.user.*train.normalize_steps.*sensitivity"):
        load_config(None, overrides=["dp.user.enabled=true", "train.normalize_steps=true"])


def test_user_level_dp_refuses_strategies_that_send_control_variates() -> None:
    with pytest.raises(ConfigError, match="control-variate change .* leak"):
        load_config(None, overrides=["dp.user.enabled=true", "strategy.name=scaffold"])


@pytest.mark.parametrize("override, message", [
    ("seed=18446744073709551616", "'seed' must be in [0, 2^63)"),
    ("participation.seed=-1", "'participation.seed' must be in [0, 2^63)"),
    ("runtime.threads=100000", "'runtime.threads' must be in [0, 1024]"),
])
def test_numbers_that_crash_a_library_are_refused(override, message):
    """A seed torch cannot take and a thread count that made rank 0 segfault."""
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides=[override])
    assert message in str(info.value)


@pytest.mark.timeout(30)
def test_a_deeply_nested_yaml_is_a_config_error(tmp_path):
    path = tmp_path / "deep.yaml"
    path.write_text("a: " + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(ConfigError, match="nests deeper than a configuration can"):
        load_config(path)


def test_scientific_notation_reaches_strategy_options():
    # one coercer: strategy options read "1e-3" as a number, as train.lr does
    from fedsilo.strategies import build_strategy

    config = load_config(None, overrides=["strategy.name=fedprox", "strategy.mu=1e-3"])
    assert config.strategy.options == {"mu": 0.001}
    config = load_config(None, overrides=["strategy.name=fedadam", "strategy.tau=1E-4"])
    assert build_strategy(config.strategy.name, dict(config.strategy.options)).options.tau == 1e-4
    assert build_strategy("fedprox", {"mu": "1e-3"}).options.mu == 0.001
    with pytest.raises(ConfigError, match="'strategy.mu' must be a number, got str '1e-3x'"):
        build_strategy("fedprox", {"mu": "1e-3x"})


def test_integral_floats_are_integers_everywhere():
    # the same coercion for config keys and strategy options: 3.0 is 3, 2.5 is refused
    assert load_config(None, overrides=["rounds=3.0"]).rounds == 3
    assert type(load_config(None, overrides=["rounds=3.0"]).rounds) is int
