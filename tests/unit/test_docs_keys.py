"""docs/training.md lists every config key with its default: the block is the dump of the
default ``Config``, so a key added to config.py without the docs fails here.

No default depends on the machine: ``runtime.device: auto`` and ``runtime.threads: 0`` are
resolved at start-up, not when the defaults are built, so the dump is the same everywhere.
"""

import re
from pathlib import Path

import yaml

from fedsilo.config import Config, dump_config, load_config

DOC = Path(__file__).resolve().parents[2] / "docs" / "training.md"
HEADING = "All keys and their defaults:"


def documented_block() -> str:
    text = DOC.read_text()
    assert HEADING in text, f"{DOC.name} lost the sentence {HEADING!r}"
    match = re.compile(r"```yaml\n(.*?)```\n", re.DOTALL).search(text, text.index(HEADING))
    assert match, f"no ```yaml block after {HEADING!r} in {DOC.name}"
    return match.group(1)


def key_paths(node, prefix=""):
    """Every key of a nested mapping as a dotted path, in document order."""
    paths = []
    for key, value in node.items():
        paths.append(f"{prefix}{key}")
        if isinstance(value, dict):
            paths += key_paths(value, f"{prefix}{key}.")
    return paths


def without_comments(block: str) -> str:
    lines = (re.sub(r"\s+#.*$", "", line).rstrip() for line in block.splitlines())
    return "".join(line + "\n" for line in lines if line and not line.lstrip().startswith("#"))


def test_the_default_config_is_what_load_config_gives():
    assert Config() == load_config(None)


def test_the_documented_keys_are_the_default_config():
    documented = yaml.safe_load(documented_block())
    default = Config().to_dict()
    assert key_paths(documented) == key_paths(default)  # every key, in the dump's order
    assert documented == default  # and its default value


def test_the_documented_block_is_the_dump_plus_comments():
    # the same text as `dump_config`, so `1e-5` (a string to PyYAML) cannot slip in either
    assert without_comments(documented_block()) == dump_config(Config())
