"""Benchmarks (``make bench``); see :mod:`bench.run`."""

import os

# torch's CPU allocator backs large tensors with transparent huge pages only when this is set
# before torch is imported; without it, first-touch page faults on fresh multi-GB temporaries
# (GridSample on millions of points) cost more than the arithmetic. NumPy does this by default.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
