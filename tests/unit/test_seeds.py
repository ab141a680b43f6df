"""Every derived seed comes from fedsilo.seeds, with the values recorded runs were made with.

The pinned numbers were computed with the code before the helpers were merged (issue #12):
changing any of them changes training, participation samples or shards, so a recorded run
would no longer reproduce bit for bit.
"""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fedsilo import seeds
from fedsilo.participation import sample_sites
from fedsilo.prep.plan import TEST_STREAM, VAL_STREAM, derive_seed
from fedsilo.training import round_seed


def test_round_seeds_are_pinned():
    assert [round_seed(0, 1, 0), round_seed(7, 3, 2), round_seed(2**63 - 1, 100, 15)] == [
        2918264622725855778, 8034915097316094625, 4952613129528880152]


def test_prep_seeds_are_pinned():
    assert (TEST_STREAM, VAL_STREAM) == (1, 2)
    assert [derive_seed(0, 1), derive_seed(0, 2, 3), derive_seed(12345, 1, 0)] == [
        3964924996, 3842683572, 671067976]


def test_participation_samples_are_pinned():
    assert sample_sites(list(range(10)), fraction=0.3, minimum=1, seed=0,
                        round_index=1) == [1, 2, 7]
    assert sample_sites(list(range(20)), fraction=0.25, minimum=2, seed=42,
                        round_index=7) == [0, 8, 11, 13, 14]
    assert sample_sites([3, 5, 8, 13, 21], fraction=0.4, minimum=1, seed=1, round_index=2) == [5, 8]


@given(seed=st.integers(0, 2**63 - 1), tags=st.lists(st.integers(0, 2**32), max_size=3))
def test_helpers_match_the_formulas_they_replaced(seed, tags):
    state = np.random.SeedSequence([seed, *tags])
    assert seeds.derive_seed(seed, *tags) == int(state.generate_state(1)[0])
    word = state.generate_state(1, np.uint64)[0]
    assert seeds.derive_seed(seed, *tags, bits=63) == int(word >> np.uint64(1))
    assert seeds.derive_seed(seed, *tags, bits=64) == int(word)
    assert (np.random.default_rng(seeds.seed_sequence(seed, *tags)).integers(2**62, size=4).tolist()
            == np.random.default_rng([seed, *tags]).integers(2**62, size=4).tolist())


@given(seed=st.integers(0, 2**63 - 1), bits=st.integers(1, 64))
def test_derived_seeds_fit_their_bits(seed, bits):
    assert 0 <= seeds.derive_seed(seed, 1, 2, bits=bits) < 2**bits


@pytest.mark.parametrize("bits", [0, 65, True, 32.0])
def test_bits_out_of_range_are_refused(bits):
    with pytest.raises(ValueError, match="bits must be in"):
        seeds.derive_seed(0, bits=bits)
