"""``python -m vggt4d.benchmark``: see :mod:`vggt4d.benchmark.cli`."""

from vggt4d.benchmark.cli import main

raise SystemExit(main())
