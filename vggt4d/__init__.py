"""vggt4d: dynamic masks from DA3 attention (VGGT4D on Depth Anything 3) and 4-D scene tokens."""

import os

# DA3 prints INFO lines (FFN type, reference view choice) from its own logger on every build and
# forward; keep its errors only unless the user asks for more.
os.environ.setdefault("DA3_LOG_LEVEL", "ERROR")

__version__ = "0.1.0"
