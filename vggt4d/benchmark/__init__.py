"""Benchmarks against the paper: one command per published table.

``python -m vggt4d.benchmark table=<table> root=<dataset folder> [overrides]`` runs the table's
protocol (``conf/benchmark/<table>.yaml``: dataset, sequences, frames, resolution, evaluation
settings, each with its source) as one job per sequence through Hydra's launchers
(:mod:`vggt4d.benchmark.jobs`), then writes the table with the protocol's average and the
published numbers beside it (:mod:`vggt4d.benchmark.table`, ``published.yaml``) and logs it to
W&B (:mod:`vggt4d.benchmark.tracking`). :mod:`vggt4d.benchmark.cli` is the command.
"""

from vggt4d.benchmark.cli import main

__all__ = ["main"]
