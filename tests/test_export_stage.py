"""The export stage on a run's artifacts: which inputs it takes, what it writes, what it refuses."""

from __future__ import annotations

import json

import numpy as np
import pycolmap
import pytest
import rerun as rr
import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf
from omegaconf.errors import ValidationError
from PIL import Image

from tests.export_scene import export_scene
from vggt4d.config import validate
from vggt4d.config.export import ExportConfig
from vggt4d.errors import UserError
from vggt4d.export.stage import ExportStage
from vggt4d.masks import DynamicMasks
from vggt4d.pipeline import Context, execute
from vggt4d.predict import Prediction


def run_config(model: str = "da3-small", **export):
    with initialize_config_module("conf", version_base="1.3"):
        run = validate(compose("config", overrides=[f"model={model}"]))
    run.export = ExportConfig(**export)
    return run


def prediction_of(scene, shift: float = 0.0) -> Prediction:
    extrinsics = scene.extrinsics.copy()
    extrinsics[:, :, 3] += shift
    return Prediction(depth=scene.depth, conf=np.full(scene.depth.shape, 2.0, np.float32),
                      extrinsics=extrinsics, intrinsics=scene.intrinsics, frames=scene.frames,
                      grid=(3, 4))


def export(tmp_path, artifacts: dict, **settings) -> Context:
    ctx = Context(cfg=run_config(**settings), out_dir=tmp_path, cache=None,
                  artifacts=dict(artifacts))
    execute([ExportStage()], ctx)
    return ctx


@pytest.fixture
def scene():
    return export_scene(frames=4, width=56, height=42)


def masks_of(binary: np.ndarray) -> DynamicMasks:
    return DynamicMasks(binary.astype(np.float32), binary, {})


def test_every_format_lands_where_its_tools_look(tmp_path, scene):
    ctx = export(tmp_path, {"prediction": prediction_of(scene),
                            "masks": masks_of(scene.dynamic)},
                 formats=["rerun", "tum", "colmap", "nerfstudio"])
    assert ctx.artifacts["export"]["files"] == [
        "scene.rrd", "export/images/", "export/masks/", "export/dynamic_masks/",
        "export/sparse/0/", "export/transforms.json", "export/tum/"]
    assert ctx.artifacts["export"]["sources"] == {"prediction": "pass1", "masks": "coarse"}
    root = tmp_path / "export"
    model = pycolmap.Reconstruction(str(root / "sparse" / "0"))
    names = sorted(image.name for image in model.images.values())
    assert names == [f"frame_{t:04d}.png" for t in range(4)]
    for t, name in enumerate(names):
        np.testing.assert_array_equal(np.asarray(Image.open(root / "images" / name)),
                                      scene.frames[t])
        static = np.asarray(Image.open(root / "masks" / f"{name}.png"))
        np.testing.assert_array_equal(static == 0, scene.dynamic[t])
    transforms = json.loads((root / "transforms.json").read_text())
    for frame in transforms["frames"]:
        assert (root / frame["file_path"]).is_file() and (root / frame["mask_path"]).is_file()
    assert len(np.loadtxt(root / "tum" / "poses.txt")) == 4
    reader = rr.chunk.RrdReader(tmp_path / "scene.rrd")
    entities = {chunk.entity_path for chunk in reader.stream().to_chunks()}
    assert "/world/points/dynamic" in entities and "/world/tokens/color" not in entities


def test_second_pass_refined_masks_and_tokens_are_exported_when_they_ran(tmp_path, scene):
    refined = scene.dynamic.copy()
    refined[:, :, :10] = False
    latent = {"geo_feat": torch.zeros(2, 0), "format_version": 1, "grid_size": 0.1,
              "world_to_enc": torch.eye(4, dtype=torch.float64),
              "position": torch.tensor([[0.0, 0, 3], [1, 0, 4]]),
              "color": torch.tensor([[1.0, 0, 0], [0, 1, 0]]), "dynamic": torch.tensor([0.0, 1])}
    torch.save(latent, tmp_path / "scene_latent.pt")
    ctx = export(tmp_path, {"prediction": prediction_of(scene),
                            "prediction_pass2": prediction_of(scene, shift=0.25),
                            "masks": masks_of(scene.dynamic), "refined_masks": masks_of(refined),
                            "scene_latent": {"tokens": 2}},
                 formats=["rerun", "colmap"], colmap_format="text")
    assert ctx.artifacts["export"]["sources"] == {"prediction": "pass2", "masks": "refined"}
    model = pycolmap.Reconstruction(str(tmp_path / "export" / "sparse" / "0"))
    image = model.find_image_with_name("frame_0002.png")
    np.testing.assert_allclose(image.cam_from_world().matrix(),
                               prediction_of(scene, shift=0.25).extrinsics[2], atol=1e-6)
    dynamic = np.asarray(Image.open(tmp_path / "export" / "dynamic_masks" / "frame_0002.png"))
    np.testing.assert_array_equal(dynamic == 255, refined[2])
    assert (tmp_path / "export" / "sparse" / "0" / "images.txt").is_file()
    assert not (tmp_path / "export" / "tum").exists()
    assert not (tmp_path / "export" / "transforms.json").exists()
    reader = rr.chunk.RrdReader(tmp_path / "scene.rrd")
    tokens = [chunk for chunk in reader.stream().to_chunks()
              if chunk.entity_path == "/world/tokens/color"]
    positions = tokens[0].to_record_batch().column("Points3D:positions").to_pylist()[0]
    np.testing.assert_allclose(positions, [[0, 0, 3], [1, 0, 4]])


def test_models_without_cameras_are_refused_before_anything_runs(tmp_path, scene):
    ctx = Context(cfg=run_config("da3mono-large"), out_dir=tmp_path, cache=None,
                  artifacts={"prediction": prediction_of(scene), "masks": masks_of(scene.dynamic)})
    with pytest.raises(UserError, match="export needs camera poses"):
        execute([ExportStage()], ctx)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("settings", "needle"), [
    ({"formats": []}, "exports nothing"),
    ({"max_points_per_frame": -1}, "must be >= 0"),
    ({"tum_depth_scale": 0.0}, "positive number"),
    ({"tum_depth_scale": float("inf")}, "positive number"),
])
def test_bad_settings_are_one_line(settings, needle):
    with pytest.raises(UserError, match=needle):
        ExportConfig(**settings).check()


def test_the_schema_refuses_unknown_formats():
    schema = OmegaConf.structured(ExportConfig)
    with pytest.raises(ValidationError, match="rerun, tum, colmap, nerfstudio"):
        OmegaConf.merge(schema, {"formats": ["rerun", "ply"]})
    with pytest.raises(ValidationError, match="binary, text"):
        OmegaConf.merge(schema, {"colmap_format": "json"})
    ExportConfig().check()  # the defaults pass
