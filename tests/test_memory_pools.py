"""Giving back the pages of Python's empty small-object pools (``atrium.observability.memory``,
``track_arenas`` and ``purge_pools``, over the ``_pools`` extension).

Each case runs in an interpreter of its own: the arena allocator is installed once per process and
for good, and resident memory is measured without the test runner's own heap around it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")


# The start of every script: the functions under test and resident memory in MB.
PRELUDE = """
    import gc, json
    from atrium.observability.memory import purge_pools, track_arenas

    def rss() -> float:
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS")
"""


def run(script: str, **env: str) -> dict[str, Any]:
    """Run ``script`` in a fresh interpreter (PYTHONMALLOC and others from ``env``); what it printed last, as JSON."""
    environment = {k: v for k, v in os.environ.items() if k != "PYTHONMALLOC"} | env
    source = textwrap.dedent(PRELUDE) + textwrap.dedent(script)
    done = subprocess.run([sys.executable, "-c", source], cwd=ROOT, env=environment, capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def test_empty_pools_are_given_back_and_the_objects_that_live_on_are_intact() -> None:
    """A burst of small objects, one in 5,000 kept: every arena stays (each holds a survivor), but
    their empty pools' pages go back to the system, and the pools serve again afterwards."""
    figures = run("""
        assert track_arenas()
        burst = [(i, str(i), [i]) for i in range(1_500_000)]
        kept = burst[::5000]
        del burst
        gc.collect()
        before = rss()
        given = purge_pools()
        after = rss()
        for _ in range(3):  # the purged pools serve new objects of any size again
            again = [(i, str(i), [i], {"k": i}) for i in range(600_000)]
            assert all(t[1] == str(t[0]) and t[2] == [t[0]] and t[3]["k"] == t[0] for t in again)
            del again
            gc.collect()
            purge_pools()
        assert all(t[1] == str(t[0]) and t[2] == [t[0]] for t in kept) and len(kept) == 300
        print(json.dumps({"before": before, "after": after, "given": given / 2**20, "last": rss()}))
    """)
    assert figures["given"] > 150, figures  # MB of empty pools' pages
    assert figures["before"] - figures["after"] > 150, figures
    assert figures["last"] < figures["before"] - 100, figures  # reusing them grew nothing back for good


BURSTS = """
    import random
    from atrium.observability import _pools

    rng = random.Random(7)
    kept: list = []
    tails = parked = 0
    for _ in range(4):  # objects of every size class; a random few live on in pools in use
        burst = [(i, str(i) * rng.randint(1, 60), [i] * rng.randint(0, 40), {"k": i}) for i in range(150_000)]
        kept += [burst[j] for j in rng.sample(range(len(burst)), 300)]
        del burst
        gc.collect()
        _, tail, park, _ = _pools.purge()
        tails, parked = tails + tail, parked + park
        churn = [bytes(rng.randint(1, 500)) for _ in range(100_000)]  # the given-back pages serve again
        del churn[::2]
        gc.collect()
        tails += _pools.purge()[1]
        del churn
    for t in kept:
        assert t[1].startswith(str(t[0])) and t[2] == [t[0]] * len(t[2]) and t[3] == {"k": t[0]}
    while kept:  # the survivors die a few at a time: parked arenas' pools empty, rejoin, and go
        rng.shuffle(kept)
        del kept[: rng.randint(50, 400)]
        churn = [("x" * rng.randint(1, 400), i) for i in range(rng.randint(1_000, 100_000))]
        kept += churn[:: rng.randint(500, 5_000)][:20]
        del churn
        gc.collect()
        parked += _pools.purge()[2]
        for t in kept:
            assert t[1].startswith(str(t[0])) if isinstance(t[1], str) else t[0] == "x" * len(t[0])
        if len(kept) < 60:
            kept.clear()
    print(json.dumps({"tails": tails, "parked": parked, "located": _pools.located()}))
"""


def test_pages_past_the_last_live_block_of_a_pool_in_use_are_given_back() -> None:
    figures = run("assert track_arenas()\n" + textwrap.dedent(BURSTS))
    assert figures["tails"] > 100 and figures["parked"] > 0 and figures["located"] == [True, True], figures


def test_the_allocator_s_own_checks_find_nothing_wrong() -> None:
    """The same bursts with CPython's debug hooks on pymalloc (PYTHONMALLOC=pymalloc_debug): every
    block is padded with guard bytes checked when it is freed and reallocated, freed blocks are
    overwritten, and any damage to a block or a pool ends the process with a fatal error."""
    figures = run("assert track_arenas()\n" + textwrap.dedent(BURSTS), PYTHONMALLOC="pymalloc_debug")
    assert figures["tails"] > 0 and figures["parked"] > 0, figures


def test_arenas_a_burst_left_nearly_empty_are_parked_then_unmapped_once_their_pools_empty() -> None:
    """Parked, an arena keeps only its pools in use: its empty pools' first pages go too. Once the
    objects that held it are gone, pymalloc unmaps it as it would any arena whose pools all emptied."""
    figures = run("""
        import os, re, sys
        from atrium.observability import _pools

        def arenas() -> int:  # pymalloc's own count, from sys._debugmallocstats (it writes to fd 2)
            read, write = os.pipe()
            saved = os.dup(2)
            os.dup2(write, 2)
            sys._debugmallocstats()
            os.dup2(saved, 2)
            os.close(write)
            text = b""
            while chunk := os.read(read, 1 << 16):
                text += chunk
            os.close(read)
            return int(re.search(rb"# arenas allocated current\\s+=\\s+(\\d+)", text).group(1))

        assert track_arenas()
        burst = [(i, str(i), [i]) for i in range(1_500_000)]
        kept = burst[::5000]
        del burst
        gc.collect()
        before, held = rss(), arenas()
        _, _, parked, _ = _pools.purge()
        after = rss()
        again = [(i, str(i), [i], {"k": i}) for i in range(600_000)]  # new pools: none of the parked ones
        assert all(t[1] == str(t[0]) and t[3]["k"] == t[0] for t in again)
        del again
        assert all(t[1] == str(t[0]) and t[2] == [t[0]] for t in kept) and len(kept) == 300
        del kept
        gc.collect()
        print(json.dumps({"before": before, "after": after, "held": held, "parked": parked,
                          "left": arenas(), "located": _pools.located()}))
    """)
    assert figures["located"] == [True, True], figures  # obmalloc's arena table and nfp2lasta were found
    assert figures["parked"] > 0.8 * figures["held"] - 20, figures
    assert figures["before"] - figures["after"] > 250, figures  # of about 320 MB
    assert figures["left"] < 0.25 * figures["held"], figures


def test_nothing_is_tracked_when_python_does_not_use_its_own_allocator() -> None:
    figures = run("""
        tracked = track_arenas()
        burst = [str(i) for i in range(200_000)]
        del burst
        print(json.dumps({"tracked": tracked, "given": purge_pools()}))
    """, PYTHONMALLOC="malloc")
    assert figures == {"tracked": False, "given": 0}


def test_the_extension_is_built() -> None:
    """Without it the trimmer gives back glibc's pages only (README, "Memory after load")."""
    from atrium.observability.memory import pools_built

    assert pools_built(), "atrium/observability/_pools.c is not built: run ./dev (pip install -e .)"
