"""PURE: which shard owns which meter, and a shard's index from its host name.

Every instance gets the same device list and computes the same owner for each meter, so
there is nothing to coordinate: rendezvous (highest random weight) hashing. Each meter
ranks the shards by a hash of (devid, shard) and the highest wins. Going from N to N+1
shards moves only the meters the new shard wins, about 1/(N+1) of them; the others keep
their owner, whose weight did not change.

The hash is part of the contract (README "Shards"): tools outside the bridge compute it too.
"""

from __future__ import annotations

import hashlib
import re

# A StatefulSet's pod is <name>-<ordinal>: smartmac-bridge-2 is shard 2.
_ORDINAL = re.compile(r"-([0-9]+)$")  # ASCII digits only, as in the reserved bridge-<digits>


def weight(devid: str, index: int) -> int:
    """The rendezvous weight of shard `index` for the meter `devid`."""
    return int.from_bytes(hashlib.sha256(f"{devid}/{index}".encode()).digest()[:8], "big")


def owner(devid: str, count: int) -> int:
    """The shard in 0..count-1 that serves the meter: the largest weight, ties to the smaller."""
    if count == 1:
        return 0
    # max() keeps the first of equal keys: the smaller index.
    return max(range(count), key=lambda index: weight(devid, index))


def index_from_host(hostname: str) -> int | None:
    """The trailing "-<n>" of a host name (`smartmac-bridge-2` -> 2), else None."""
    match = _ORDINAL.search(hostname.split(".")[0])
    return int(match.group(1)) if match else None
