from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cellrna_pipeline.core.errors import InputError
from cellrna_pipeline.defs.partitions import parse_volume_key, volume_key, volume_keys

names = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9.-]{0,20}[A-Za-z0-9]", fullmatch=True).filter(
    lambda s: ".." not in s
)


@given(name=names, t=st.integers(0, 99999))
def test_volume_key_round_trip(name, t):
    assert parse_volume_key(volume_key(name, t)) == (name, t)


def test_volume_keys_are_exactly_the_experiment_timepoints():
    assert volume_keys("e1", 3) == ["e1__t0000", "e1__t0001", "e1__t0002"]


@pytest.mark.parametrize("key", ["e1", "e1__t", "e1__5", "__t0001", "../x__t0001"])
def test_bad_keys(key):
    with pytest.raises(InputError):
        parse_volume_key(key)


def test_negative_timepoint():
    with pytest.raises(InputError):
        volume_key("e1", -1)
