"""
A Bloom filter in front of the digest index: most alerts are new, and a filter in
memory says so without asking LevelDB.

A LevelDB lookup of a digest that is not there costs 4-9 us of C (the memtable, then a
table of every level), and plyvel lets the GIL go for it and must then win it back
from the reactor: some 10 us of the store thread per alert, the largest part of its
wall time at 1 KiB.  The filter answers a whole batch in a few numpy operations (about
0.2-0.3 us per digest, the GIL held), and only the digests it may hold, the
retransmissions and about 1% of the rest, go on to LevelDB.  16 sensors, 1 KiB, 4
interleaved rounds: 46,885 -> 49,521 alerts/s, 26.0 -> 24.2 us of manager CPU per alert.

A Bloom filter can say "maybe" of a digest it was never given, never "no" of one it
was: so it is only ever asked whether an alert is new, and every key written to the
index is added to it first.  The bit positions are taken from the SHA-256 in the key
(its last 32 octets), already uniform; the sensor name is left out, so the same body
from two sensors is a false positive, answered by LevelDB as before.

The filter grows in generations, each twice the size of the last, so that nothing
needs to be known in advance and nothing is rehashed: 10 to 60 bits per stored alert
(1.2-7 MiB per million), depending on how full the newest generation is.
"""

from __future__ import annotations

import threading
from typing import Sequence

import numpy as np

BITS_PER_KEY = 10
HASHES = 7
"""With 10 bits per key, 7 positions make about 0.8% false positives per generation."""
MIN_CAPACITY = 1 << 20
DIGEST = 32


class _Generation:
    __slots__ = ("bits", "capacity", "count", "mask")

    def __init__(self, capacity: int) -> None:
        size = 1 << max(16, (capacity * BITS_PER_KEY - 1).bit_length())  # a power of two: positions by masking
        self.bits = np.zeros(size // 8, dtype=np.uint8)
        self.mask = np.uint64(size - 1)
        self.capacity = capacity
        self.count = 0

    def positions(self, h1: np.ndarray, h2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The octet and the bit (0-7) of each of the HASHES positions of each key (double hashing)."""
        steps = np.arange(HASHES, dtype=np.uint64)
        where = (h1[:, None] + steps[None, :] * h2[:, None]) & self.mask
        return where >> np.uint64(3), (where & np.uint64(7)).astype(np.uint8)

    def add(self, h1: np.ndarray, h2: np.ndarray) -> None:
        octets, bits = self.positions(h1, h2)
        octets, bits = octets.ravel(), bits.ravel()
        # Two positions of one batch may share an octet, and neither bit may be lost: an
        # indexed |= with repeated indices keeps only one of their results.  One pass
        # per bit: within it, repeated octets all get the same bit, whichever result is
        # kept.  (np.bitwise_or.at does the same, slower: 0.59 against 0.32 us per key
        # on Debian's numpy 1.24.)
        for bit in range(8):
            self.bits[octets[bits == bit]] |= np.uint8(1 << bit)
        self.count += len(h1)

    def holds(self, h1: np.ndarray, h2: np.ndarray) -> np.ndarray:
        octets, bits = self.positions(h1, h2)
        return np.all((self.bits[octets] >> bits) & np.uint8(1), axis=1)


def _hashes(keys: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray]:
    digests = np.frombuffer(b"".join([key[-DIGEST:] for key in keys]), dtype="<u8").reshape(-1, 4)
    return digests[:, 0], digests[:, 1] | np.uint64(1)  # an odd step visits distinct positions


class DigestFilter:
    """
    The keys of the digest index, as a Bloom filter: L{might_contain} is False only for
    a key never added.  L{add} may be called from two threads (the store's, and the one
    filling the filter from the index at open); it is serialised.

    The thread that fills it says how that went: C{full} once every key of the index is
    in it, C{damage} when the index could not be read (LevelDB's message), C{failed}
    when anything else stopped it.
    """

    def __init__(self, expected: int = 0) -> None:
        self._lock = threading.Lock()
        self._generations = [_Generation(max(MIN_CAPACITY, expected))]
        self.full = False
        self.damage: str | None = None
        self.failed = False

    def add(self, keys: Sequence[bytes]) -> None:
        if not keys:
            return
        with self._lock:
            start = 0
            while start < len(keys):
                newest = self._generations[-1]
                if newest.count >= newest.capacity:
                    newest = _Generation(newest.capacity * 2)
                    self._generations.append(newest)
                chunk = keys[start:start + newest.capacity - newest.count]
                newest.add(*_hashes(chunk))
                start += len(chunk)

    def might_contain(self, keys: Sequence[bytes]) -> list[bool]:
        """For each key, False when it was never added; True when it may have been."""
        if not keys:
            return []
        with self._lock:
            h1, h2 = _hashes(keys)
            found = self._generations[0].holds(h1, h2)
            for generation in self._generations[1:]:
                found |= generation.holds(h1, h2)
        return found.tolist()

    @property
    def count(self) -> int:
        """Keys added (a key added twice counts twice)."""
        return sum(g.count for g in self._generations)

    @property
    def nbytes(self) -> int:
        return sum(g.bits.nbytes for g in self._generations)
