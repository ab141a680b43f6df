"""The pydantic schema reads every shipped configuration, and every accepted ``--set``, to
the values the first release's hand-written loader gave (kept as ``_legacy_config`` until
the callers moved over)."""

import subprocess
from pathlib import Path

import pytest

from fedsilo import _legacy_config as legacy
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
]
BAD = [
    ["rounds=1e3"], ["rounds=2.5"], ["rounds=three"], ["train.lr=true"], ["train.lr=-1"],
    ["train.lr=.nan"], ["dp.delta=1"], ["dp.sites.a.delta=0.1"], ["dp.sites.1.accountant=prv"],
    ["dp.enabled=1"], ["runtime.device=yes"], ["model.name=vgg99"], ["model.stem=small"],
    ["strategy.name=nope"], ["strategy.mu=1"], ["data=3"], ["train.epochz=2"],
    ["model.train_layers=0"], ["seed=-1"], ["dp.user.enabled=true", "strategy.name=scaffold"],
    ["he.enabled=true", "aggregation.secure=masks"], ["checkpoint.site_dir=/s"],
    ["dp.enabled=true", "dp.accountant=gdp"], ["dp.noise_multiplier=0.001"],
    ["dp.target_epsilon=1e5"], ["strategy.name=fedprox", "strategy.mu=1e-3x"],
]


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_shipped_configs_load_to_the_same_values(path):
    new, old = load_config(path), legacy.load_config(path)
    assert new.to_dict() == old.to_dict()
    assert dump_config(new) == legacy.dump_config(old)


def test_shipped_configs_are_found():
    assert any(p.name == "pneumoniamnist.yaml" for p in SHIPPED) and len(SHIPPED) >= 5


@pytest.mark.parametrize("overrides", GOOD, ids=" ".join)
def test_overrides_give_the_same_values(overrides):
    new, old = load_config(None, overrides=overrides), legacy.load_config(None,
                                                                          overrides=overrides)
    assert new.to_dict() == old.to_dict()
    assert dump_config(new) == legacy.dump_config(old)


@pytest.mark.parametrize("overrides", BAD, ids=" ".join)
def test_bad_overrides_are_refused_by_both(overrides):
    with pytest.raises(ConfigError) as old:
        legacy.load_config(None, overrides=overrides)
    with pytest.raises(ConfigError) as new:
        load_config(None, overrides=overrides)
    key = str(old.value).split("'")[1] if "'" in str(old.value) else None
    if key and str(old.value).startswith(("config key", "unknown config key")):
        assert f"'{key}'" in str(new.value), (str(old.value), str(new.value))
