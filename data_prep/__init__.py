"""Converters from source datasets into fedsilo shard sets (thin over fedsilo.shards).

This folder stays at the top of the repository and is installed as ``fedsilo.prep``
(``package-dir`` in pyproject.toml); import it under that name only.
"""
