"""Converters from source datasets into fedsilo shard sets (thin over fedsilo.shards)."""
