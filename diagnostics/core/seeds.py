"""The one seed derivation: independent 32-bit seeds for streams named by integers and strings.

Every stream of randomness in taopd (rollout sampling, selection, initialisation, evaluation) takes its seed
from `derive_seed(base, *names)`, so two streams never collide the way `seed + i` does.
"""

from __future__ import annotations

import numpy as np


def derive_seed(*keys: int | str) -> int:
    """A 32-bit seed for the stream named by `keys` (numpy SeedSequence over the keys; a string key counts as the
    little-endian integer of its first 8 UTF-8 bytes). `derive_seed(seed, i)` is stream `i` of `seed`."""
    ints = [k if isinstance(k, int) else int.from_bytes(k.encode()[:8].ljust(8, b"\0"), "little") for k in keys]
    return int(np.random.SeedSequence(ints).generate_state(1, np.uint32)[0])
