"""The ``strategy`` section: a name and that strategy's own options, which the strategy
declares and checks (``Strategy.Options``), found through the registry."""

from __future__ import annotations

from typing import Annotated, Any, Mapping

from pydantic import BeforeValidator
from pydantic.dataclasses import dataclass

from fedsilo.config.plugins import STRATEGIES, StrategySpec
from fedsilo.config.schema import SECTION_CONFIG, Str, setting


def _name_and_options(data: Any) -> Any:
    """The YAML form ``{name: fedprox, mu: 0.01}`` (or the dumped one, with ``options``) as
    ``{name, options}``."""
    if not isinstance(data, Mapping):
        return data
    options = {k: v for k, v in data.items() if k != "name"}
    if "options" in options and isinstance(options["options"], Mapping):
        options = {**options.pop("options"), **options}  # accept the dumped form too
    return {"name": data.get("name", "fedavg"), "options": options}


def spec(name: str) -> StrategySpec:
    """The registered strategy ``name`` (a ConfigError naming the known ones)."""
    spec: StrategySpec = STRATEGIES.get(name)
    return spec


@dataclass(frozen=True, config=SECTION_CONFIG)
class StrategyConfig:
    """Server strategy: ``name`` plus that strategy's own options (validated by it)."""

    name: Str = "fedavg"
    options: Mapping[str, Any] = setting(default_factory=dict)

    def __post_init__(self) -> None:
        options = spec(self.name).validate_options(self.options)
        # keep the coerced values ("1e-3" -> 0.001), so a dump holds numbers
        object.__setattr__(self, "options", {k: getattr(options, k) for k in self.options})


#: the type of ``Config.strategy``: a mapping in the YAML form becomes a StrategyConfig
StrategySection = Annotated[StrategyConfig, BeforeValidator(_name_and_options)]
