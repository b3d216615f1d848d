"""
The Bloom filter in front of the digest index (iapd.digestfilter): it may say "maybe"
of a key it never took, never "no" of one it took, however many keys it took, in
however many generations, from however many threads.
"""

from __future__ import annotations

import random
import threading

from hypothesis import given, settings
from hypothesis import strategies as st

from iapd import digestfilter
from iapd.digestfilter import DigestFilter

keys_strategy = st.lists(
    st.builds(lambda sensor, digest: sensor + b"\x00" + digest,
              st.sampled_from([b"a.test", b"sensor-with-a-longer-name.example.org"]),
              st.binary(min_size=32, max_size=32)),
    max_size=300,
)


def random_keys(seed: int, count: int) -> list[bytes]:
    rng = random.Random(seed)
    return [b"s%d.test\x00" % (i % 7) + rng.randbytes(32) for i in range(count)]


@settings(max_examples=100, deadline=None)
@given(keys_strategy, st.lists(st.integers(1, 50), min_size=1, max_size=20))
def test_every_key_added_is_reported(keys: list[bytes], cuts: list[int]) -> None:
    f = DigestFilter()
    start = 0
    for size in cuts * (len(keys) // max(1, sum(cuts)) + 1):
        f.add(keys[start:start + size])
        start += size
        if start >= len(keys):
            break
    assert f.might_contain(keys) == [True] * len(keys)


def test_generations_grow_and_keep_every_key(monkeypatch) -> None:
    monkeypatch.setattr(digestfilter, "MIN_CAPACITY", 1000)
    f = DigestFilter()
    keys = random_keys(1, 20_000)
    for start in range(0, len(keys), 777):  # batches straddle the generations' ends
        f.add(keys[start:start + 777])
    assert len(f._generations) == 5  # 1,000 + 2,000 + 4,000 + 8,000 + 16,000 keys
    assert [g.count <= g.capacity for g in f._generations] == [True] * 5
    assert f.count == 20_000
    assert f.might_contain(keys) == [True] * 20_000
    others = f.might_contain(random_keys(2, 20_000))
    # each generation has about 0.8% false positives at capacity, and they add up
    assert sum(others) < 20_000 * 0.05


def test_a_new_key_is_seldom_taken_for_one_it_holds() -> None:
    f = DigestFilter(expected=100_000)
    f.add(random_keys(3, 100_000))
    others = f.might_contain(random_keys(4, 100_000))
    assert sum(others) < 100_000 * 0.02  # 10 bits and 7 positions per key: about 0.8%
    assert f.nbytes == 2 * 2**20  # 1,048,576 keys of room at 10 bits, in a power of two


def test_the_same_body_from_another_sensor_is_only_a_maybe() -> None:
    """The positions come from the digest alone: a twin from another sensor is a false
    positive, which the index then answers."""
    f = DigestFilter()
    f.add([b"a.test\x00" + b"\x01" * 32])
    assert f.might_contain([b"b.test\x00" + b"\x01" * 32, b"a.test\x00" + b"\x02" * 32]) == [True, False]


def test_keys_added_from_two_threads_at_once_are_all_kept() -> None:
    """The store's thread adds the keys it commits while another fills the filter."""
    f = DigestFilter()
    batches = [random_keys(10 + i, 5_000) for i in range(8)]
    go = threading.Event()

    def add(mine: list[list[bytes]]) -> None:
        go.wait(10)
        for batch in mine:
            for start in range(0, len(batch), 100):
                f.add(batch[start:start + 100])

    threads = [threading.Thread(target=add, args=(batches[i::2],)) for i in range(2)]
    for t in threads:
        t.start()
    go.set()
    for t in threads:
        t.join(60)
    everything = [k for batch in batches for k in batch]
    assert f.might_contain(everything) == [True] * len(everything)


def test_nothing_asked_nothing_answered() -> None:
    f = DigestFilter()
    f.add([])
    assert f.might_contain([]) == []
    assert f.count == 0
