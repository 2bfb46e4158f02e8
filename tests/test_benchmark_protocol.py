"""Benchmark protocols without running DA3: depth alignments and caps against float64 references
written here, the table's averages against hand-computed ones, the dataset frame source and its
probe against the readers, the protocol configs, the published numbers and the table's W&B run."""

from __future__ import annotations

import importlib.resources
import json
import math
import re
from types import SimpleNamespace

import numpy as np
import pytest
from hydra import compose, initialize_config_module

from vggt4d.benchmark.jobs import parse_sequences, quote, table_names
from vggt4d.benchmark.table import (
    NotScored,
    SequenceResult,
    build_table,
    csv_text,
    markdown,
    sequence_result,
    table_columns,
)
from vggt4d.config import validate
from vggt4d.datasets import read_sequence
from vggt4d.datasets.export import export_synthetic
from vggt4d.datasets.probe import probe_sequence
from vggt4d.errors import UserError
from vggt4d.evaluate import geometry_scores
from vggt4d.frames import GroundTruth
from vggt4d.geometry_metrics import depth_metrics, resize_depth
from vggt4d.synthetic import SyntheticConfig

SOURCED_SETTINGS = {"process_res", "protocol", "bound_th", "depth_alignment", "depth_cap",
                    "depth_clip", "stride", "max_frames", "start", "stop", "associate_with",
                    "max_difference", "pass_name", "annotations"}
"""Protocol values that must carry their source in a comment (on their line or the one above)."""
TABLES = {"davis2016_masks": 20, "davis2017_masks": 30, "sintel_depth": 23, "bonn_depth": 5,
          "kitti_depth": 13, "sintel_pose": 14, "tum_pose": 8}
"""Sequences per published table: DAVIS-2016 val 20, DAVIS-2017 val 30, Sintel training 23 and
its 14 pose sequences, Bonn 5, KITTI depth val 13 drives, TUM fr3 sitting/walking 8."""


# ------------------------------------------------------------------ float64 references


def adam_l1_reference(p, g, lr=1e-4, steps=1000, tol=1e-6, b1=0.9, b2=0.999, eps=1e-8):
    """Adam (Kingma & Ba, with bias correction) on Σ|s·p + t − g| from s = median ratio, t = 0,
    stopping when the loss before a step changes by < tol: MonST3R's align_with_lad2."""
    theta = np.array([np.median(g) / np.median(p), 0.0])
    m, v, previous = np.zeros(2), np.zeros(2), None
    for k in range(1, steps + 1):
        r = theta[0] * p + theta[1] - g
        grad = np.array([np.sum(np.sign(r) * p), np.sum(np.sign(r))])
        m = b1 * m + (1 - b1) * grad
        v = b2 * v + (1 - b2) * grad**2
        theta = theta - lr * (m / (1 - b1**k)) / (np.sqrt(v / (1 - b2**k)) + eps)
        loss = np.sum(np.abs(r))
        if previous is not None and abs(previous - loss) < tol:
            break
        previous = loss
    return theta


def irls_reference(p, g):
    """CUT3R's align_with_scale written as a plain loop."""
    s = np.mean(g) / np.mean(p)
    for _ in range(10):
        w = [1.0 / (abs(s * pi - gi) + 1e-8) for pi, gi in zip(p, g, strict=True)]
        s = sum(wi * pi * gi for wi, pi, gi in zip(w, p, g, strict=True)) / sum(
            wi * pi * pi for wi, pi in zip(w, p, strict=True))
    return max(s, 1e-3)


def scores(pred, gt, s, t, clip=None):
    d = s * pred + t
    if clip is not None:
        d = np.minimum(d, clip)
    floored = np.maximum(d, 1e-5)
    return np.mean(np.abs(d - gt) / gt), np.mean(np.maximum(floored / gt, gt / floored) < 1.25)


# ------------------------------------------------------------------ depth protocol


def test_scale_shift_is_monst3rs_adam_fit():
    rng = np.random.default_rng(0)
    gt = rng.uniform(1.0, 20.0, size=(3, 9, 11))
    pred = 0.37 * gt + 0.6 + rng.normal(0, 0.05, gt.shape)
    out = depth_metrics(pred, gt, align="scale_shift")
    s, t = adam_l1_reference(pred.ravel(), gt.ravel())
    assert out["scale"] == pytest.approx(s, abs=1e-10)
    assert out["shift"] == pytest.approx(t, abs=1e-10)
    abs_rel, delta = scores(pred.ravel(), gt.ravel(), s, t)
    assert out["abs_rel"] == pytest.approx(abs_rel, abs=1e-10)
    assert out["delta_1.25"] == pytest.approx(delta, abs=1e-12)


def test_scale_shift_moves_little_from_the_median_scale_as_published():
    # g = p + 5 exactly: the L1 optimum is s = 1, t = 5, but 1000 Adam steps of lr 1e-4 leave t
    # within a few tenths of 0: an Adam step is lr·m̂/√v̂, at most lr·(1 − β1)/√(1 − β2) ≈ 3.2 lr
    p = np.linspace(1.0, 3.0, 200).reshape(1, 10, 20)
    out = depth_metrics(p, p + 5.0, align="scale_shift")
    assert 0 < out["shift"] < 1000 * 3.2e-4
    assert out["abs_rel"] > 0.01


def test_scale_is_cut3rs_reweighted_l1_fit():
    rng = np.random.default_rng(1)
    gt = rng.uniform(1.0, 10.0, size=(2, 6, 7))
    pred = gt / 2.5
    outliers = rng.random(gt.shape) < 0.1
    pred[outliers] *= 4.0
    out = depth_metrics(pred, gt, align="scale")
    reference = irls_reference(pred.ravel().tolist(), gt.ravel().tolist())
    assert out["scale"] == pytest.approx(reference, rel=1e-12)
    assert out["scale"] == pytest.approx(2.5, rel=1e-3)  # L1: the outliers barely pull it
    assert out["shift"] == 0.0


def test_cap_and_clip_hand_computed():
    gt = np.array([[[10.0, 60.0, 69.9, 70.0, 80.0]]])
    pred = np.array([[[10.0, 90.0, 69.9, 1.0, 1.0]]])
    # cap 70: only 10, 60, 69.9 count (strictly below); clip 70: 90 -> 70
    out = depth_metrics(pred, gt, align="none", cap=70.0, clip=70.0)
    assert out["pixels"] == 3
    assert out["abs_rel"] == pytest.approx((0 + 10 / 60 + 0) / 3, abs=1e-15)
    assert out["delta_1.25"] == 1.0  # 70 / 60 < 1.25
    unclipped = depth_metrics(pred, gt, align="none", cap=70.0)
    assert unclipped["abs_rel"] == pytest.approx((30 / 60) / 3, abs=1e-15)
    assert unclipped["delta_1.25"] == pytest.approx(2 / 3, abs=1e-15)  # 90 / 60 = 1.5
    assert depth_metrics(pred, gt, align="none")["pixels"] == 5


def test_resize_depth_matches_opencv_inter_cubic():
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(2)
    for (h, w), (height, width) in (((21, 28), (42, 56)), ((84, 112), (42, 56)),
                                    ((15, 20), (37, 53))):
        depth = rng.uniform(1.0, 5.0, size=(2, h, w))
        reference = np.stack([cv2.resize(f, (width, height), interpolation=cv2.INTER_CUBIC)
                              for f in depth])
        # OpenCV tabulates its cubic weights in float32: agreement to ~1e-5 relative
        assert np.abs(resize_depth(depth, (height, width)) - reference).max() < 5e-4


def test_geometry_scores_skip_missing_truth_and_record_the_protocol():
    rng = np.random.default_rng(3)
    depth = rng.uniform(1.0, 5.0, size=(3, 8, 10))
    prediction = SimpleNamespace(depth=depth.astype(np.float32) * 2, extrinsics=None)
    truth = GroundTruth(depth=depth)  # depth only, as KITTI
    out = geometry_scores({"pass1": prediction}, truth, families=["depth", "pose"],
                          alignment="median", cap=None, clip=None, model_name="m")
    assert set(out["pass1"]) == {"depth"}
    assert out["pass1"]["depth"]["abs_rel"] == pytest.approx(0.0, abs=1e-6)
    assert out["protocol"]["depth"]["alignment"] == "median" and "pose" not in out["protocol"]
    masks_only = geometry_scores({"pass1": prediction}, GroundTruth(), families=["depth", "pose"],
                                 alignment="median", cap=None, clip=None, model_name="m")
    assert masks_only["pass1"] == {} and masks_only["protocol"] == {}
    beyond = geometry_scores({"pass1": prediction}, truth, families=["depth"], alignment="none",
                             cap=0.5, clip=None, model_name="m")
    assert "no valid depth pixels" in beyond["pass1"]["depth"]["skipped"]


# ------------------------------------------------------------------ tables


def result(name, values, pixels=None, frames=4):
    return SequenceResult(name, frames, values, "pass1", pixels)


def test_depth_average_is_pixel_weighted_and_masks_plain():
    rows = [result("a", {"abs_rel": 0.1, "delta_1.25": 90.0}, pixels=100),
            result("b", {"abs_rel": 0.4, "delta_1.25": 30.0}, pixels=300)]
    record = {"dataset": "sintel", "model": {"name": "m", "weights": "w"}, "protocol": {
        "frames": {"start": 0, "stop": None, "stride": 1, "max_frames": 0}, "process_res": 518,
        "eval": {"depth_alignment": "scale_shift", "depth_cap": 70, "depth_clip": 70}}}
    table = build_table("sintel_depth", rows, {"c": "boom"}, ["depth"], {"rows": []}, record)
    # (0.1·100 + 0.4·300) / 400 = 0.325; (90·100 + 30·300) / 400 = 45
    assert table["average"] == {"abs_rel": pytest.approx(0.325), "delta_1.25": pytest.approx(45),
                                "sequences": 2}
    assert table["failed"] == [{"sequence": "c", "error": "boom"}]
    text = markdown(table)
    assert "| **average** (2) | | **0.3250** | **45.00** |" in text
    assert "- `c`: boom" in text and "scale_shift" in text
    lines = csv_text(table).splitlines()
    assert lines[0].startswith("kind,name,frames,abs_rel,delta_1.25,pixels")
    assert lines[3].startswith("average,2 sequences,,0.325,45.0,")
    assert lines[4].startswith("failed,c,")

    masks = [result("a", {c.key: v for c, v in zip(table_columns(["masks"]), range(6),
                                                     strict=True)}),
             result("b", {c.key: 10.0 for c in table_columns(["masks"])})]
    record["protocol"]["eval"].update(protocol="vggt4d", bound_th=0.008)
    published = {"title": "t", "rows": [{"method": "VGGT4D", "JM": 62.12, "source": "s"}]}
    table = build_table("davis2016_masks", masks, {}, ["masks"], published, record)
    assert table["average"]["JM"] == 5.0 and table["average"]["FD"] == 7.5  # (0 + 10)/2, (5+10)/2
    assert "| VGGT4D | 62.12 | – |" in markdown(table)


def test_sequence_result_reads_the_last_pass_and_refuses_unscored():
    metrics = {"unsupervised": {"area_fraction_per_frame": [0.1, 0.2, 0.3]},
               "geometry": {"protocol": {"pose": {"alignment": "sim3"}},
                            "pass1": {"pose": {"ate": 9.0, "rpe_trans": 9.0, "rpe_rot_deg": 9.0}},
                            "pass2": {"pose": {"ate": 0.5, "rpe_trans": 0.25,
                                               "rpe_rot_deg": 2.0}}}}
    found = sequence_result("s", metrics, ["pose"])
    assert (found.values, found.geometry_pass, found.frames) == (
        {"ate": 0.5, "rpe_trans": 0.25, "rpe_rot_deg": 2.0}, "pass2", 3)
    assert found.protocol == {"pose": {"alignment": "sim3"}}
    metrics["geometry"]["pass2"]["pose"] = {"skipped": "degenerate path"}
    with pytest.raises(NotScored, match="pose not scored: degenerate path"):
        sequence_result("s", metrics, ["pose"])
    with pytest.raises(NotScored, match="no mask scores"):
        sequence_result("s", metrics, ["masks"])
    with pytest.raises(NotScored, match="no depth scores"):
        sequence_result("s", metrics, ["depth"])


def test_table_w_and_b_run_holds_the_table(tmp_path, monkeypatch):
    from vggt4d.benchmark.table import write_table_files
    from vggt4d.benchmark.tracking import log_table
    from vggt4d.config.logger import LoggerConfig

    for name in ("WANDB_DIR", "WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home"))
    record = {"dataset": "tum", "model": {"name": "m", "weights": "w"}, "protocol": {
        "frames": {"start": 0, "stop": None, "stride": 3, "max_frames": 90},
        "process_res": 518, "eval": {}}}
    rows = [result("x", {"ate": 0.5, "rpe_trans": 0.1, "rpe_rot_deg": 1.0})]
    table = build_table("tum_pose", rows, {"y": "no result"}, ["pose"],
                        {"title": "TUM", "rows": [{"method": "VGGT4D", "ate": 0.016,
                                                   "source": "paper"}]}, record)
    files = write_table_files(table, tmp_path)
    assert files["chart"].read_bytes().startswith(b"\x89PNG")
    assert json.loads(files["json"].read_text())["average"]["ate"] == 0.5
    assert log_table(table, files["chart"], tmp_path, LoggerConfig(kind="none")) is None
    run_dir = log_table(table, files["chart"], tmp_path, LoggerConfig())
    assert run_dir is not None and run_dir.name.startswith("offline-run-")
    saved = next((run_dir / "files" / "media" / "table").rglob("table_*.table.json"))
    logged = json.loads(saved.read_text())
    assert logged["columns"] == ["kind", "sequence", "frames", "ate", "rpe_trans", "rpe_rot_deg",
                                 "note"]
    assert logged["data"][0][:4] == ["sequence", "x", 4, 0.5]
    assert logged["data"][-1][:2] == ["failed", "y"] and logged["data"][-1][-1] == "no result"


# ------------------------------------------------------------------ configs and data files


def compose_config(*overrides, hydra=False):
    with initialize_config_module("conf", version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=hydra)


@pytest.mark.parametrize("table", sorted(TABLES))
def test_every_table_composes_validates_and_lists_its_sequences(table):
    overrides = (f"+benchmark={table}", "data.root=/data", "data.sequence=x")
    params = compose_config(*overrides, hydra=True).hydra.sweeper.params
    names = parse_sequences(str(params["data.sequence"]))
    assert len(names) == len(set(names)) == TABLES[table]
    run = validate(compose_config(*overrides))
    assert run.process_res == 518 and str(run.data.dataset) in table
    assert [str(m) for m in run.eval.metrics] == [table.rsplit("_", 1)[1]]
    text = (importlib.resources.files("conf") / "benchmark" / f"{table}.yaml").read_text()
    lines = text.splitlines()
    for previous, line in zip(["", *lines], lines, strict=False):
        if line.strip().split(":", 1)[0] in SOURCED_SETTINGS:
            assert "#" in line + previous, f"{table}: {line.strip()} has no source comment"


def test_table_names_and_published_numbers_cover_every_table():
    from vggt4d.benchmark.cli import published_rows

    assert table_names() == sorted(TABLES)
    columns = {family: {c.key for c in table_columns([family])}
               for family in ("masks", "depth", "pose")}
    for table in TABLES:
        entry = published_rows(table)
        assert entry["title"]
        family = table.rsplit("_", 1)[1]
        for row in entry["rows"]:
            numbers = set(row) - {"method", "source"}
            assert numbers and numbers <= columns[family], row
            assert "transcribed by secondary sources" in row["source"]
    vggt4d = published_rows("davis2016_masks")["rows"][0]
    assert (vggt4d["method"], vggt4d["JM"], vggt4d["FR"]) == ("VGGT4D", 62.12, 67.49)


def test_quoted_overrides_round_trip():
    for name in ("bmx-trees", "alley_2", "a b", "it's"):
        assert parse_sequences(",".join([quote(name), quote("x")])) == [name, "x"]


# ------------------------------------------------------------------ the dataset frame source


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = tmp_path_factory.mktemp("export")
    manifest = export_synthetic(out, ["davis2017", "sintel", "tum", "kitti"],
                                SyntheticConfig(num_frames=7, width=56, height=42), 1)
    return out, manifest


@pytest.mark.parametrize("selection", [{}, {"start": 1, "stop": 6, "stride": 2},
                                       {"stride": 3, "max_frames": 2}])
def test_probe_counts_what_the_reader_reads(exported, selection):
    out, manifest = exported
    for dataset, entry in manifest["datasets"].items():
        root, name = out / entry["root"], entry["sequences"][0]
        probed = probe_sequence(dataset, root, name, **selection, **entry["options"])
        sequence = read_sequence(dataset, root, name, **selection, **entry["options"])
        assert probed.num_frames == len(sequence.frames), dataset
        assert probed.size == sequence.frames.shape[1:3] == (42, 56), dataset


def test_probe_errors_are_one_line(exported):
    out = exported[0]
    with pytest.raises(UserError, match="not found"):
        probe_sequence("sintel", out / "sintel", "nope")
    with pytest.raises(UserError, match="picks no frame"):
        probe_sequence("sintel", out / "sintel", "synthetic_0", start=50)
    with pytest.raises(UserError, match="no option 'bogus'"):
        probe_sequence("sintel", out / "sintel", "synthetic_0", bogus=1)


def test_dataset_source_loads_only_the_truth_the_dataset_has(exported):
    from vggt4d.frames import load_clip, probe_clip

    out, manifest = exported
    expected = {"davis2017": {"dynamic_masks", "void_masks"},
                "sintel": {"depth", "intrinsics", "extrinsics"},
                "tum": {"depth", "intrinsics", "extrinsics"}, "kitti": {"depth", "intrinsics"}}
    for dataset, entry in manifest["datasets"].items():
        options = [f"+data.options.{k}={json.dumps(v)}" for k, v in entry["options"].items()]
        run = validate(compose_config("data=dataset", f"data.dataset={dataset}",
                                      f"data.root={out / entry['root']}",
                                      f"data.sequence={entry['sequences'][0]}", "data.stride=2",
                                      *options))
        clip = load_clip(run.data)
        present = {key for key, value in vars(clip.ground_truth).items() if value is not None}
        assert present == expected[dataset], dataset
        assert len(clip.frames) == probe_clip(run.data, 56).num_frames == 4


@pytest.mark.parametrize("overrides, needle", [
    (["data.start=5", "data.stop=5"], "need 0 <= start < stop"),
    (["data.stride=0"], "data.stride=0 must be >= 1"),
    (["+data.options.pass_nam=final"], "data.options.pass_nam: sintel has no such option"),
])
def test_dataset_source_refuses_bad_settings(overrides, needle):
    config = compose_config("data=dataset", "data.dataset=sintel", "data.root=/r",
                            "data.sequence=s", *overrides)
    with pytest.raises(UserError, match=re.escape(needle)):
        validate(config)


def test_unknown_dataset_is_refused_at_compose_time():
    with pytest.raises(Exception) as caught:  # Hydra's composition error wraps the cause
        compose_config("data=dataset", "data.dataset=nyu", "data.root=/r", "data.sequence=s")
    chain = f"{caught.value} {caught.value.__cause__}"
    assert "nyu" in chain and "davis2016" in chain


def test_nan_depth_and_math_are_consistent():
    gt = np.full((1, 2, 2), np.nan)
    gt[0, 0, 0] = 2.0
    out = depth_metrics(np.full((1, 2, 2), 4.0), gt)
    assert out["pixels"] == 1 and out["scale"] == 0.5 and math.isclose(out["abs_rel"], 0.0)


@pytest.mark.parametrize("argv, needle", [
    (["root=/tmp"], "give table=..."),
    (["table=nope", "root=/tmp"], "unknown table 'nope': choose one of bonn_depth"),
    (["table=sintel_depth", "root=/no/such/folder"], "root=/no/such/folder: no such directory"),
    (["table=sintel_depth", "root=/tmp", "eval.depth_cap=-1"], "eval.depth_cap=-1.0 must be"),
    (["table=sintel_depth", "root=/tmp", "eval.depth_alignment=mean"], "eval.depth_alignment"),
])
def test_benchmark_command_refuses_bad_input_with_one_line(argv, needle, capsys):
    from vggt4d.benchmark import cli

    assert cli.main(argv) == cli.EXIT_USER_ERROR
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0], errors
