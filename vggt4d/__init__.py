"""vggt4d: dynamic masks from DA3 attention (VGGT4D on Depth Anything 3) and 4-D scene tokens."""

import ctypes
import os
import sys

# DA3 prints INFO lines (FFN type, reference view choice) from its own logger on every build and
# forward; keep its errors only unless the user asks for more.
os.environ.setdefault("DA3_LOG_LEVEL", "ERROR")

# torch's CPU allocator backs large tensors with transparent huge pages only when this is set
# before torch is imported; without it, first-touch page faults on fresh multi-GB temporaries
# (GridSample on millions of points) cost more than the arithmetic. NumPy does this by default.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


def _one_malloc_arena() -> None:
    """Let every thread allocate from glibc's main arena (``MALLOC_ARENA_MAX=1``, unless the user
    set it). By default each thread that allocates gets an arena of its own and keeps there what
    it frees: the two threads drawing pictures held ~90 MiB more at 1,024 frames than at 64
    (bench ``long_video``), with one arena the peak stays flat at the same speed."""
    if "MALLOC_ARENA_MAX" in os.environ or not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (musl): nothing to set
        return
    m_arena_max = -8  # glibc's M_ARENA_MAX
    libc.mallopt(m_arena_max, 1)


_one_malloc_arena()

__version__ = "0.2.0"
