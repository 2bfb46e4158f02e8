"""vggt4d: dynamic masks from DA3 attention (VGGT4D on Depth Anything 3) and 4-D scene tokens."""

import os

# DA3 prints INFO lines (FFN type, reference view choice) from its own logger on every build and
# forward; keep its errors only unless the user asks for more.
os.environ.setdefault("DA3_LOG_LEVEL", "ERROR")

# torch's CPU allocator backs large tensors with transparent huge pages only when this is set
# before torch is imported; without it, first-touch page faults on fresh multi-GB temporaries
# (GridSample on millions of points) cost more than the arithmetic. NumPy does this by default.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

__version__ = "0.2.0"
