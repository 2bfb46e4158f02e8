"""Peak memory of a piece of work, for the tests that memory does not grow with the clip (Linux
``/proc/self``). Each measurement runs in a fresh Python (:func:`in_fresh_process`), so buffers
left by earlier tests are not in its peak."""

from __future__ import annotations

import gc
import subprocess
import sys
import threading
from pathlib import Path

MIB = 2**20


def _status(field: str) -> int:
    row = next(r for r in Path("/proc/self/status").read_text().splitlines()
               if r.startswith(field))
    return int(row.split()[1]) * 1024


def rss_growth(work) -> int:
    """Bytes the peak resident memory rises above the resident memory at the start of
    ``work()`` (the peak is reset through ``/proc/self/clear_refs``)."""
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    base = _status("VmRSS")
    work()
    return _status("VmHWM") - base


def anonymous_peak(work) -> int:
    """Bytes the anonymous memory (``RssAnon``, sampled every millisecond by a thread) rises
    above its level when ``work()`` starts: pages of memory-mapped files, which the system can
    write out, are not counted."""
    gc.collect()
    base, peak, done = _status("RssAnon"), [0], threading.Event()

    def sample() -> None:
        while not done.wait(0.001):
            peak[0] = max(peak[0], _status("RssAnon"))

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    work()
    done.set()
    thread.join()
    return max(peak[0], _status("RssAnon")) - base


def in_fresh_process(module: str, measure: str, *args: object) -> int:
    """``module.measure(*args)`` (arguments given by their ``repr``) in a fresh Python started
    in the repository; returns the number it prints last."""
    call = ", ".join(repr(arg) for arg in args)
    code = f"from {module} import {measure}; print({measure}({call}))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=Path(__file__).parent.parent, timeout=300, check=True)
    return int(done.stdout.split()[-1])
