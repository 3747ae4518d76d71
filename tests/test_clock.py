"""Periodic jobs keep their rhythm when they fall behind (``core.clock.next_round``)."""

from __future__ import annotations

import pytest

from core.clock import next_round


@pytest.mark.parametrize(("now", "expected"), [
    (100.0, 110.0),     # on time: the next round one interval on
    (104.0, 110.0),     # the round took a while
    (110.0, 120.0),     # it took exactly one interval: the next is still ahead
    (135.0, 140.0),     # three rounds missed (a suspended process): one round, then on the old rhythm
    (100.0 + 86_400 * 31, 100.0 + 86_400 * 31 + 10),  # the clock moved on by a month
    (95.0, 110.0),      # a clock that went back a little
])
def test_the_next_round_is_the_first_one_still_ahead(now: float, expected: float) -> None:
    assert next_round(100.0, 10.0, now) == expected
