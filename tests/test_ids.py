"""``core.ids.new_uuids``: the bulk write path's ids are random version-4 UUIDs, as ``uuid4`` makes them."""

from __future__ import annotations

import uuid

from core.ids import new_uuids


def test_new_uuids_are_distinct_random_version_4_uuids() -> None:
    ids = new_uuids(2_000)
    assert len(ids) == len(set(ids)) == 2_000
    assert all(u.version == 4 and u.variant == uuid.RFC_4122 for u in ids)
    assert all(uuid.UUID(str(u)) == u for u in ids[:10])
    # Every bit outside the version and variant varies across the batch (none is stuck at 0 or 1).
    fixed = (0xF000 << 64) | (0xC000 << 48)
    ones = zeros = 0
    for u in ids:
        ones |= u.int
        zeros |= ~u.int & ((1 << 128) - 1)
    assert ones | fixed == zeros | fixed == (1 << 128) - 1
    assert new_uuids(0) == []
