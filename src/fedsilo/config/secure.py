"""The sections of secure aggregation: ``aggregation`` (none, masks, ckks) and ``he``."""

from __future__ import annotations

from typing import Literal

from pydantic.dataclasses import dataclass

from fedsilo.config.schema import SECTION_CONFIG, Bool, Int, Str, setting


@dataclass(frozen=True, config=SECTION_CONFIG)
class HEConfig:
    """Encrypted aggregation (CKKS); keys come from ``fedsilo keys --out DIR``."""

    enabled: Bool = False
    #: key directory: participants open participant.key, the coordinator coordinator.ctx only
    keys: Str = "keys"
    #: processes a participant encrypts in (0: its share of the node's cores, as
    #: runtime.threads; 1: in the rank's own process)
    workers: Int = setting(0, ge=0, le=1024)


@dataclass(frozen=True, config=SECTION_CONFIG)
class AggregationConfig:
    """How the participants' updates are summed (docs/privacy.md, docs/secure-aggregation.md).

    ``secure``: none (plain MPI_Reduce: the coordinator sees each rank's sum), masks
    (pairwise-masked secure aggregation over one MPI_Reduce: nobody short of all other
    participants together learns one site's update; identity keys from ``fedsilo keys
    --identity``), ckks (CKKS encryption, NVIDIA FLARE's trust model: the participants share
    a key, the coordinator adds ciphertexts; same as ``he.enabled: true``).
    """

    secure: Literal["none", "masks", "ckks"] = "none"
    #: a secure round with fewer contributing sites is refused by every participant
    min_contributors: Int = setting(2, ge=2,
                                    why="one contributor's 'sum' is its own update")
    #: masks: directory with public.json and the sites' site-NNN.key (``fedsilo keys --identity``)
    keys: Str = "identity"
    #: masks: neighbours each site masks with; 0 = every other contributor (dense graph),
    #: -1 = the SecAgg+ sparse graph of O(log n) neighbours, k > 0 = k neighbours
    mask_degree: Int = setting(0, ge=-1, why="0: dense, -1: sparse (O(log n)), k > 0: "
                                            "k neighbours")
    #: masks (and runtime.reduce_dtype: fixed): fractional bits of the fixed-point encoding
    #: (resolution 2^-frac_bits)
    frac_bits: Int = setting(32, ge=8, le=52)
