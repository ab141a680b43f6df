"""The shard format: the only part of fedsilo that imports h5py.

A *shard set* is a directory with one HDF5 file per site (``site-000.h5`` ...), a
held-out ``test.h5`` for the coordinator and a ``manifest.json`` describing them.
"""

from fedsilo.shards.check import check_listed_shard, check_shard
from fedsilo.shards.hdf5 import (
    FORMAT_VERSION,
    SPLITS_BY_KIND,
    Shard,
    ShardInfo,
    ShardWriter,
    SplitData,
    file_digest,
    read_shard,
    read_shard_attrs,
    read_split_attrs,
    sha256_file,
    write_shard,
)
from fedsilo.shards.manifest import (
    MANIFEST_FILE,
    TEST_FILE,
    Manifest,
    SiteEntry,
    build_manifest,
    load_manifest,
    site_file_name,
    write_manifest,
)
from fedsilo.shards.masks import MaskReader, read_masks, shard_task
from fedsilo.shards.reader import SplitReader
from fedsilo.shards.stats import PixelStats
from fedsilo.shards.stats import combine as combine_stats
from fedsilo.shards.verify import verify_shard_set

__all__ = [
    "check_listed_shard",
    "FORMAT_VERSION",
    "MANIFEST_FILE",
    "SPLITS_BY_KIND",
    "TEST_FILE",
    "Manifest",
    "MaskReader",
    "PixelStats",
    "Shard",
    "ShardInfo",
    "ShardWriter",
    "SiteEntry",
    "SplitData",
    "SplitReader",
    "build_manifest",
    "check_shard",
    "combine_stats",
    "load_manifest",
    "read_masks",
    "read_shard",
    "read_shard_attrs",
    "read_split_attrs",
    "file_digest",
    "sha256_file",
    "shard_task",
    "site_file_name",
    "verify_shard_set",
    "write_manifest",
    "write_shard",
]
