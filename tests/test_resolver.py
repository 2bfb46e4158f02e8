"""The stage resolver and the artifact guard, on tiny stand-in stages (independent of the real
ones), and the real pipeline whose evaluation must follow the refinement it scores."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vggt4d.errors import UserError
from vggt4d.pipeline import ArtifactView, Context, UndeclaredArtifact, execute, resolve
from vggt4d.stage import Stage

REPO = Path(__file__).resolve().parents[1]


def stage(name: str, requires=(), optional=(), provides=(), reads_in_run=None,
          check_error: str | None = None) -> type[Stage]:
    """A stand-in stage class that records what it saw into ``ctx.artifacts['trace']``."""

    def check(self, ctx) -> None:
        if check_error:
            raise UserError(check_error)

    def run(self, ctx) -> None:
        seen = {a: ctx.artifacts[a] for a in (*requires, *optional) if a in ctx.artifacts}
        for artifact in reads_in_run or ():
            seen[artifact] = ctx.artifacts[artifact]
        RUNS.append((name, seen))
        for artifact in provides:
            ctx.artifacts[artifact] = f"{artifact} from {name}"

    return type(name, (Stage,), {"name": name, "requires": tuple(requires),
                                 "optional": tuple(optional), "provides": tuple(provides),
                                 "check": check, "run": run})


RUNS: list[tuple[str, dict]] = []


@pytest.fixture(autouse=True)
def _fresh_runs():
    RUNS.clear()


def chain() -> dict[str, type[Stage]]:
    """predict → masks → (refine) → eval, eval reading the refined masks when present; the
    dict's order is the order of ties (as the runner's STAGES)."""
    return {
        "predict": stage("predict", provides=("prediction",)),
        "masks": stage("masks", requires=("prediction",), provides=("masks",)),
        "eval": stage("eval", requires=("masks",), optional=("refined",),
                      provides=("metrics",)),
        "refine": stage("refine", requires=("masks", "prediction"), provides=("refined",)),
        "viz": stage("viz", requires=("masks",)),
    }


def names(stages) -> list[str]:
    return [s.name for s in stages]


def run(requested: list[str], available: dict[str, type[Stage]], tmp_path: Path) -> Context:
    ctx = Context(cfg=None, out_dir=tmp_path, cache=None)
    execute(resolve(requested, available, None), ctx)
    return ctx


def test_a_stage_listed_before_what_it_optionally_reads_runs_after_it(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="vggt4d"):
        ordered = resolve(["predict", "masks", "eval", "refine"], chain(), None)
    assert names(ordered) == ["predict", "masks", "refine", "eval"]
    assert "pipeline: running predict, masks, refine, eval in the order of what each reads" \
        in caplog.text
    run(["predict", "masks", "eval", "refine"], chain(), tmp_path)
    assert RUNS[-1] == ("eval", {"masks": "masks from masks", "refined": "refined from refine"})


def test_required_providers_are_added_and_optional_ones_are_not(tmp_path):
    assert names(resolve(["eval"], chain(), None)) == ["predict", "masks", "eval"]
    run(["eval"], chain(), tmp_path)
    assert RUNS[-1] == ("eval", {"masks": "masks from masks"})  # no refined masks: not asked


def test_ties_keep_the_order_of_the_available_stages():
    assert names(resolve(["viz", "refine", "masks"], chain(), None)) == [
        "predict", "masks", "refine", "viz"]
    assert names(resolve(["refine", "viz", "eval"], chain(), None)) == [
        "predict", "masks", "refine", "eval", "viz"]


def test_a_cycle_is_refused_naming_the_stages():
    available = {"a": stage("a", requires=("y",), provides=("x",)),
                 "b": stage("b", optional=("x",), provides=("y",)),
                 "c": stage("c", provides=("z",))}
    with pytest.raises(UserError) as info:
        resolve(["c", "a"], available, None)
    assert "pipeline stages ['a', 'b'] read each other's results in a circle" in str(info.value)


def test_an_artifact_nobody_provides_is_refused():
    with pytest.raises(UserError, match="stage lonely needs 'nothing', which no stage provides"):
        resolve(["lonely"], {"lonely": stage("lonely", requires=("nothing",))}, None)


def test_every_check_runs_before_any_stage_runs(tmp_path):
    available = {**chain(), "eval": stage("eval", requires=("masks",),
                                          check_error="eval.gt_path: no such folder")}
    with pytest.raises(UserError, match=r"eval\.gt_path"):
        run(["predict", "masks", "eval"], available, tmp_path)
    assert RUNS == []


def test_an_undeclared_read_fails_even_when_the_artifact_exists(tmp_path):
    available = {**chain(), "viz": stage("viz", requires=("masks",), reads_in_run=("prediction",))}
    with pytest.raises(UndeclaredArtifact, match="stage viz reads 'prediction' without declaring"):
        run(["viz"], available, tmp_path)
    assert [name for name, _ in RUNS] == ["predict", "masks"]


def test_the_view_shows_only_declared_artifacts_and_takes_only_provided_ones():
    store = {"prediction": 1, "masks": 2, "metrics": 3}
    viewer = stage("viewer", requires=("masks",), optional=("refined",), provides=("out",))()
    view = ArtifactView(store, viewer, frozenset({"masks", "refined", "out"}))
    assert view["masks"] == 2 and "refined" not in view and dict(view) == {"masks": 2}
    assert len(view) == 1
    with pytest.raises(UndeclaredArtifact, match="asks for 'metrics'"):
        _ = "metrics" in view
    with pytest.raises(UndeclaredArtifact, match="reads 'prediction'"):
        _ = view["prediction"]
    with pytest.raises(UndeclaredArtifact, match="writes 'masks', which it does not provide"):
        view["masks"] = 5
    view["out"] = 7
    assert store["out"] == 7 and store["masks"] == 2


def test_the_runner_scores_the_refined_masks_when_eval_is_listed_before_refine(tmp_path):
    job = tmp_path / "job"
    result = subprocess.run(
        [sys.executable, "-m", "vggt4d.run", f"hydra.run.dir={job}",
         f"cache_dir={tmp_path / 'cache'}", "model=da3-small", "model.weights=random",
         "process_res=42", "data.num_frames=3", "logger=none",
         "pipeline=[predict,gram,maps,masks,eval,refine]"],
        cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"},
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    output = result.stdout + result.stderr
    assert "running predict, gram, maps, masks, refine, eval in the order" in output
    assert output.index("refine:") < output.index("eval (")
    metrics = json.loads((job / "metrics.json").read_text())
    assert len(metrics["refined"]["per_frame"]["J"]) == 3
    coarse, refined = ([np.asarray(Image.open(p)) for p in sorted((job / d).glob("dynamic_*"))]
                       for d in ("masks", "masks_refined"))
    if any((a != b).any() for a, b in zip(coarse, refined, strict=True)):
        assert metrics["refined"]["JM"] != metrics["coarse"]["JM"]
    assert metrics["JM"] == metrics["refined"]["JM"]  # the top-level figures are the last set
