"""A table's jobs: composed and checked before launch, finished ones kept, the others launched as
one Hydra multirun of ``python -m vggt4d.run`` (so every launcher works: basic, joblib, Slurm).

Each table is the config ``conf/benchmark/<table>.yaml`` (``+benchmark=<table>``: the dataset,
frame selection, resolution and evaluation settings, and the sequences as the sweep's
``hydra.sweeper.params``). The jobs of a table live in ``<out>/sequences/<sequence>/`` (Hydra's
sweep dir and ``subdir=${data.sequence}``), so a rerun finds them: a sequence is finished when
its folder holds ``metrics.json`` and ``timings.json`` (the runner writes timings last) and its
``.hydra/config.yaml`` equals the config the job would run now, apart from settings that do not
change results (:data:`IGNORED_KEYS`). Finished sequences are not launched again; an unfinished
or outdated folder is removed before its job is relaunched.
"""

from __future__ import annotations

import copy
import importlib.resources
import logging
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from vggt4d.errors import UserError

log = logging.getLogger(__name__)

IGNORED_KEYS = ("cache_dir", "logger", "cluster", "device", "memory_limit_gb")
"""Settings that change where or how a job runs, not its numbers."""
DROPPED_STAGES = ("viz", "latent", "export")
"""Stages that add nothing to a table (pictures, scene tokens, exports): left out of the jobs
unless ``pipeline=`` is given."""
RESULT_FILES = ("metrics.json", "timings.json")
_FAILED_JOB = re.compile(r"^error: job \d+ \((?P<overrides>.*)\) failed: (?P<error>.*)$")


def table_names() -> list[str]:
    """The tables: one per ``conf/benchmark/*.yaml``."""
    folder = importlib.resources.files("conf") / "benchmark"
    return sorted(entry.name[:-5] for entry in folder.iterdir() if entry.name.endswith(".yaml"))


def quote(value: str) -> str:
    """``value`` as a quoted Hydra override string (any character kept)."""
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


def compose(overrides: list[str]) -> DictConfig:
    """The composed config, Hydra's node included, for ``python -m vggt4d.run`` ``overrides``."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    import vggt4d.config  # noqa: F401  (registers the schemas)
    from vggt4d.sweeps import one_line

    try:
        with initialize_config_module("conf", version_base="1.3"):
            return hydra_compose("config", overrides=list(overrides), return_hydra_config=True)
    except (HydraException, OmegaConfBaseException) as err:
        raise UserError(one_line(err)) from None


def task_config(config: DictConfig) -> DictConfig:
    """``config`` without Hydra's node: what a job receives (and saves as .hydra/config.yaml)."""
    task = copy.deepcopy(config)
    with read_write(task), open_dict(task):
        del task["hydra"]
    return task


def comparable(task: DictConfig | dict) -> dict:
    """A job config as a plain dict (interpolations unresolved) without :data:`IGNORED_KEYS`."""
    container = (OmegaConf.to_container(task, resolve=False) if isinstance(task, DictConfig)
                 else copy.deepcopy(task))
    for key in (*IGNORED_KEYS, "hydra"):
        container.pop(key, None)
    return container


@dataclass
class Plan:
    """A table's jobs: the overrides every job shares, the sequences, where they go, and the
    checked config of the first sequence (settings, logger, model)."""

    table: str
    overrides: list[str]
    sequences: list[str]
    out_dir: Path
    run: Any
    """The validated :class:`vggt4d.config.RunConfig` of the first sequence."""
    expected: dict
    """:func:`comparable` config of the first sequence's job."""

    @property
    def sequence_root(self) -> Path:
        return self.out_dir / "sequences"

    def job_dir(self, sequence: str) -> Path:
        return self.sequence_root / sequence

    def expected_for(self, sequence: str) -> dict:
        expected = copy.deepcopy(self.expected)
        expected["data"]["sequence"] = sequence
        return expected


def parse_sequences(value: str) -> list[str]:
    """Sequence names of a Hydra sweep value (``a,b,c``, quoted or not)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import QuotedString

    override = OverridesParser.create().parse_override(f"data.sequence={value}")
    values = list(override.sweep_iterator()) if override.is_sweep_override() else [
        override.value()]
    return [item.text if isinstance(item, QuotedString) else str(item) for item in values]


def _pipeline(run: Any, user_overrides: list[str]) -> list[str]:
    """The jobs' stages: the configured pipeline without :data:`DROPPED_STAGES` (kept when the
    user gives ``pipeline=``), with ``eval`` added when missing."""
    explicit = any(o.split("=", 1)[0].lstrip("+~") == "pipeline" for o in user_overrides)
    stages = [str(stage) for stage in run.pipeline
              if explicit or str(stage) not in DROPPED_STAGES]
    return stages if "eval" in stages else [*stages, "eval"]


def _sequences(hydra_config: DictConfig, run: Any, choice: str | None) -> list[str]:
    if choice == "all":
        from vggt4d.datasets import DATASETS, list_sequences, options_of

        listing = options_of(DATASETS[str(run.data.dataset)].list_sequences)
        options = {k: v for k, v in run.data.options.items() if k in listing}
        return list_sequences(str(run.data.dataset), run.data.root, **options)
    if choice:
        return parse_sequences(choice)
    params = hydra_config.hydra.sweeper.params or {}
    if "data.sequence" not in params:
        raise UserError("this table lists no sequences: give sequences=a,b,... or sequences=all")
    return parse_sequences(str(params["data.sequence"]))


def plan(table: str, root: str, user_overrides: list[str], *, out: str | None = None,
         sequences: str | None = None) -> Plan:
    """Compose and validate ``table``'s jobs (one line on bad input, before anything runs)."""
    from vggt4d.config import validate
    from vggt4d.sweeps import quiet

    if table not in table_names():
        raise UserError(f"unknown table {table!r}: choose one of {', '.join(table_names())}")
    root_path = Path(root).expanduser().absolute()
    if not root_path.is_dir():
        raise UserError(f"root={root}: no such directory (the dataset's folder, README.md "
                        "'Benchmarks against the paper' shows the layouts)")
    base = [f"+benchmark={table}", f"data.root={quote(root_path)}", *user_overrides]
    with quiet():
        first = compose([*base, "data.sequence=_"])
        run = validate(task_config(first))
        overrides = [*base, f"pipeline=[{','.join(_pipeline(run, user_overrides))}]"]
        names = _sequences(first, run, sequences)
        if not names:
            raise UserError(f"no sequences to run for table {table} under {root_path}")
        configured = compose([*overrides, f"data.sequence={quote(names[0])}"])
        run = validate(task_config(configured))
    out_dir = Path(out).expanduser().absolute() if out else (
        Path("outputs") / "benchmarks" / table / run.model.name).absolute()
    return Plan(table, overrides, names, out_dir, run, comparable(task_config(configured)))


def is_finished(plan_: Plan, sequence: str) -> bool:
    """The sequence's job folder holds a complete result made with the plan's settings."""
    job = plan_.job_dir(sequence)
    saved = job / ".hydra" / "config.yaml"
    if not all((job / name).is_file() for name in RESULT_FILES) or not saved.is_file():
        return False
    return comparable(OmegaConf.load(saved)) == plan_.expected_for(sequence)


def sweep_command(plan_: Plan, sequences: list[str]) -> list[str]:
    """``python -m vggt4d.run -m`` over ``sequences`` into ``<out>/sequences/<sequence>``."""
    return [sys.executable, "-m", "vggt4d.run", "-m", *plan_.overrides,
            "data.sequence=" + ",".join(quote(name) for name in sequences),
            f"hydra.sweep.dir={quote(plan_.sequence_root)}",
            "hydra.sweep.subdir=${data.sequence}"]


def launch(plan_: Plan, sequences: list[str]) -> tuple[int, dict[str, str]]:
    """Run the sweep (its output shown as it comes); the exit status and the error line the
    sweeper reported for each failed sequence."""
    for sequence in sequences:
        shutil.rmtree(plan_.job_dir(sequence), ignore_errors=True)
    plan_.sequence_root.mkdir(parents=True, exist_ok=True)
    command = sweep_command(plan_, sequences)
    log.info("benchmark %s: launching %d job(s)", plan_.table, len(sequences))
    errors: dict[str, str] = {}
    with subprocess.Popen(command, stderr=subprocess.PIPE, text=True) as process:
        assert process.stderr is not None
        for line in process.stderr:
            sys.stderr.write(line)
            match = _FAILED_JOB.match(line.rstrip("\n"))
            if match:
                found = re.search(r"data\.sequence=(\S+)", match["overrides"])
                if found:
                    errors[parse_sequences(found[1])[0]] = match["error"]
        status = process.wait()
    return status, errors


def failure_reason(plan_: Plan, sequence: str, reported: dict[str, str]) -> str:
    """Why a sequence has no result: the sweeper's error line, else the last ``error:`` line of
    its run.log, else where to look."""
    if sequence in reported:
        return reported[sequence]
    run_log = plan_.job_dir(sequence) / "run.log"
    if run_log.is_file():
        errors = [line.split("error:", 1)[1].strip()
                  for line in run_log.read_text(encoding="utf-8", errors="replace").splitlines()
                  if "error:" in line]
        if errors:
            return errors[-1]
    return f"no result (see {plan_.job_dir(sequence)})"
