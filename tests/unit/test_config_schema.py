"""The pydantic schema reads every shipped configuration, and the ``--set`` overrides below,
to the values the first release's hand-written loader (YAML 1.1, PyYAML) gave.

``config_values.json`` holds what that loader dumped for each (``dump_config``, written by
it before it was deleted, issue #25): the dump shows each value and its type (``1`` against
``1.0``, ``'on'`` against ``true``).
"""

import json
import subprocess
from pathlib import Path

import pytest

from fedsilo.config import dump_config, load_config
from fedsilo.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = [ROOT / p for p in subprocess.run(
    ["git", "ls-files", "*.yaml", "*.yml"], cwd=ROOT, capture_output=True, text=True,
    check=True).stdout.split() if not p.endswith("environment.yml")]

GOOD = [
    [], ["rounds=3.0"], ["train.lr=1e-3"], ["train.lr=5E-2"], ["runtime.progress=off"],
    ["runtime.progress=on"], ["runtime.progress=true"], ["model.dp_fix=on"],
    ["model.dp_fix=false"], ["data.in_memory=true"], ["data.in_memory=false"],
    ["data.verify_hashes=no"], ["data.augment.flip=yes", "dp.enabled=on", "dp.augmult=2"],
    ["train.channels_last=true"], ["train.channels_last=auto"], ["train.max_steps=7"],
    ["strategy.name=fedprox", "strategy.mu=1e-3"], ["strategy.name=fedadam", "strategy.tau=1E-4"],
    ["strategy.server_lr=0.5"], ["strategy.name=scaffold"], ["he.enabled=true"],
    ["aggregation.secure=ckks"], ["aggregation.secure=masks", "aggregation.mask_degree=-1"],
    ["dp.enabled=true", "dp.sites.2.target_epsilon=3", "dp.sites.0.noise_multiplier=1.5"],
    ["dp.enabled=true", "dp.noise_multiplier=1.1", "dp.target_epsilon=null"],
    ["dp.user.enabled=true", "dp.user.noise=distributed"], ["model.name=resnet18"],
    ["model.name=tv:resnet50", "model.weights=IMAGENET1K_V2", "model.stem=small"],
    ["model.train_layers=2"], ["model.train_layers=head"], ["checkpoint.site_dir=/s/{site}"],
    ["runtime.hang_timeout_s=600", "runtime.threads=4"], ["seed=9223372036854775807"],
    ["task=segmentation", "model.name=unet", "segmentation.patch_size=64"],
    ["participation.fraction=0.5", "participation.min=2"], ["train.round_deadline_s=30"],
    ["runtime.reduce_dtype=fixed", "aggregation.frac_bits=40"],
]
RECORDED = json.loads((Path(__file__).with_name("config_values.json")).read_text())
#: refused by the first release too; what the message must say
BAD = [
    (["rounds=1e3"], "'rounds' must be an integer, got str '1e3'"),
    (["rounds=2.5"], "'rounds' must be an integer, got float 2.5"),
    (["train.lr=true"], "'train.lr' must be a number, got bool True"),
    (["train.lr=.nan"], "'train.lr' must be > 0"),
    (["dp.delta=1"], "'dp.delta' must be a finite number in (0, 1), got 1"),
    (["dp.sites.a.delta=0.1"], "'dp.sites.a' must be a site index 0..P-1"),
    (["dp.sites.1.accountant=prv"], "unknown config key 'dp.sites.1.accountant'; known keys of "
                                    "'dp.sites.1': delta, max_grad_norm, noise_multiplier, "
                                    "target_epsilon"),
    (["dp.enabled=1"], "'dp.enabled' must be true or false, got int 1"),
    (["runtime.device=yes"], "'runtime.device' must be one of auto, cpu, cuda"),
    (["model.stem=small"], "'model.stem' applies to tv: models only"),
    (["strategy.mu=1"], "unknown config key 'strategy.mu' for strategy 'fedavg'; known: "
                        "server_lr"),
    (["model.train_layers=0"], "'model.train_layers' must be all, head, or a number of blocks"),
    (["model.train_layers=2.5"], "'model.train_layers' must be one of all, head; got 2.5"),
    (["seed=-1"], "'seed' must be in [0, 2^63), got -1 (torch's seed range)"),
    (["runtime.hang_timeout_s=0"], "'runtime.hang_timeout_s' must be in (0, 1e7], got 0"),
    (["he.enabled=true", "aggregation.secure=masks"], "choose one (aggregation.secure)"),
    (["checkpoint.site_dir=/s"], "'checkpoint.site_dir' must name each site's own directory"),
    (["dp.enabled=true", "dp.accountant=gdp"], "'dp.target_epsilon' sets a budget"),
    (["dp.noise_multiplier=0.001"], "'dp.noise_multiplier' must be a finite number in "
                                    "[0.01, 10000], got 0.001 (below, one step"),
    (["dp.target_epsilon=1e5"], "'dp.target_epsilon' must be a finite number in (0, 10000], "
                                "got 100000 (a larger ε promises no privacy"),
    (["dp.user.noise_multiplier=.nan"], "'dp.user.noise_multiplier' must be a finite number "
                                        "in [0.01, 10000], got nan"),
    (["strategy.name=fedprox", "strategy.mu=1e-3x"], "'strategy.mu' must be a number"),
    (["data.augment.flip=maybe"], "'data.augment.flip' must be true or false, got str 'maybe'"),
    (["task=segmentation", "data.augment.flip=true"], "data.augment transforms images alone"),
]


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_shipped_configs_load_to_the_same_values(path):
    assert dump_config(load_config(path)) == RECORDED["files"][path.relative_to(ROOT).as_posix()]


def test_shipped_configs_are_found():
    assert any(p.name == "pneumoniamnist.yaml" for p in SHIPPED) and len(SHIPPED) >= 5
    assert sorted(RECORDED["files"]) == sorted(p.relative_to(ROOT).as_posix() for p in SHIPPED)


@pytest.mark.parametrize("overrides", GOOD, ids=" ".join)
def test_overrides_give_the_same_values(overrides):
    assert dump_config(load_config(None, overrides=overrides)) == \
        RECORDED["overrides"][" ".join(overrides)]


@pytest.mark.parametrize("overrides, message", BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_overrides_name_the_key_and_the_cause(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides=overrides)
    assert message in str(info.value)


def test_a_yaml_file_is_read_as_yaml_1_2(tmp_path):
    """on/off/yes/no are text (a Literal's words as written), 1e-3 a number; boolean keys
    still take the YAML 1.1 words, so a file written for PyYAML loads the same."""
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 1e-3\nruntime:\n  progress: off\ndata:\n  verify_hashes: no\n"
                    "  augment:\n    flip: On\n")
    config = load_config(path)
    assert (config.train.lr, config.runtime.progress) == (0.001, "off")
    assert (config.data.verify_hashes, config.data.augment.flip) == (False, True)
    path.write_text("rounds: 3\nrounds: 4\n")
    with pytest.raises(ConfigError, match="not valid YAML.*duplicate"):
        load_config(path)
    path.write_text("rounds: !!python/object:os.system echo\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)
