"""Nothing heavy before every check has passed: misspelt choices refused at compose time, range
and cross-group rules in one line, the memory estimate from the source's metadata before any
frame is decoded, data.fps capped at the video's rate, and every Pillow image mode read into
correct 8-bit RGB in natural frame order.

Expected values are computed here: pixel conversions from the stored values with the textbook
formulas, processing sizes and frame counts by hand.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import os
import re
import subprocess
import sys
import types
import typing
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import pytest
from hydra import compose, initialize_config_module
from hydra.errors import ConfigCompositionException
from PIL import Image

import vggt4d.frames as frames_module
from vggt4d.cache import Cache
from vggt4d.config import RunConfig, validate
from vggt4d.config.data import ImagesData, SyntheticData, VideoData
from vggt4d.config.masks import MasksConfig
from vggt4d.errors import UserError
from vggt4d.frames import FramesStage, load_images, load_video, probe_clip, to_rgb8
from vggt4d.pipeline import Context, execute, resolve

REPO = Path(__file__).resolve().parents[1]
DATA_GROUPS = {"images": ImagesData, "video": VideoData, "synthetic": SyntheticData}


def _compose(*overrides: str):
    with initialize_config_module("conf", version_base="1.3"):
        return compose("config", overrides=list(overrides))


# --------------------------------------------------------------------------------------------
# every choice-valued setting is refused at compose time
# --------------------------------------------------------------------------------------------


def choice_settings(schema: type, prefix: str = "") -> list[tuple[str, type[enum.Enum], bool]]:
    """(key, enum, is_list) of every enum-typed field under the dataclass ``schema``."""
    hints = typing.get_type_hints(schema)
    found = []
    for field in dataclasses.fields(schema):
        kind = hints[field.name]
        origin = typing.get_origin(kind)
        candidates = typing.get_args(kind) if origin in (list, typing.Union,
                                                         types.UnionType) else (kind,)
        for candidate in candidates:
            if isinstance(candidate, type) and issubclass(candidate, enum.Enum):
                found.append((f"{prefix}{field.name}", candidate, origin is list))
            elif dataclasses.is_dataclass(candidate):
                found += choice_settings(candidate, f"{prefix}{field.name}.")
    return found


CHOICES = [("", *setting) for setting in choice_settings(RunConfig)] + [
    (f"data={group}", *setting) for group, schema in DATA_GROUPS.items()
    for setting in choice_settings(schema, "data.")]


def test_the_walk_finds_the_choice_settings():
    keys = {key for _, key, _, _ in CHOICES}
    assert {"masks.binarize", "gram.window", "maps.fusion", "dtype", "pipeline",
            "latent.encoder"} <= keys
    assert len(keys) >= 25


@pytest.mark.parametrize(("group", "key", "choices", "is_list"), CHOICES,
                         ids=[f"{g}:{k}" if g else k for g, k, _, _ in CHOICES])
def test_a_misspelt_choice_is_refused_at_compose_time_listing_the_choices(
        group, key, choices, is_list):
    value = "[not_a_choice]" if is_list else "not_a_choice"
    with pytest.raises(ConfigCompositionException) as info:
        _compose(*([group] if group else []), f"{key}={value}")
    message = f"{info.value} {info.value.__cause__}"
    assert "not_a_choice" in message
    for choice in choices:  # Hydra takes the member names
        assert choice.name in message, (key, choice.name, message)


@pytest.mark.parametrize("case", ["misspelt_choice", "misspelt_group_option", "bad_syntax"])
def test_the_runner_refuses_a_composition_error_in_one_line_before_anything_is_built(
        tmp_path, case):
    binarize = ", ".join(c.name for c in typing.get_type_hints(MasksConfig)["binarize"])
    override, needle = {
        "misspelt_choice": ("masks.binarize=otsuu", "error: Error merging override "
                            f"masks.binarize=otsuu: Invalid value 'otsuu', expected one of "
                            f"[{binarize}]"),
        "misspelt_group_option": ("data=imagez", "error: In 'config': Could not find "
                                  "'data/imagez' (options: "),
        "bad_syntax": ("bands.deep=[5,", "error: cannot parse override 'bands.deep=[5,': "),
    }[case]
    result = subprocess.run(
        [sys.executable, "-m", "vggt4d.run", override, f"hydra.run.dir={tmp_path / 'job'}",
         f"cache_dir={tmp_path / 'cache'}"],
        cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True,
        timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode == 2 and "Traceback" not in output, output
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]  # one line
    assert result.stderr.startswith(needle), output
    if case == "misspelt_group_option":
        assert all(f" {group}" in output for group in DATA_GROUPS)
    assert "predict" not in output and "DA3 blocks" not in output
    assert not (tmp_path / "job").exists() and not (tmp_path / "cache").exists()


# --------------------------------------------------------------------------------------------
# range and cross-group checks: one line each
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("overrides", "needle"), [
    (["seed=-1"], "seed=-1 must be in [0, 4294967295]"),
    ([f"seed={2**32}"], f"seed={2**32} must be in [0, 4294967295]"),
    (["+unknown_key=1"], "unknown setting 'unknown_key'"),
    (["+masks.binarise=otsu"], "unknown setting 'masks.binarise' (added with '+'): vggt4d has no "
                               "such key; did you mean masks.binarize?"),
    (["pipeline=[]"], "pipeline=[] runs nothing"),
    (["layer_depth=4"], "bands (written for layer_depth=4).deep=[5, 5] is not a band"),
    (["layer_depth=12", "bands.deep=[18,21]"], "deep=[18, 21] is not a band"),
])
def test_bad_settings_are_one_line(overrides, needle):
    with pytest.raises(UserError) as info:
        validate(_compose(*overrides))
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_the_largest_seed_is_accepted():
    assert validate(_compose(f"seed={2**32 - 1}")).seed == 2**32 - 1


# --------------------------------------------------------------------------------------------
# the memory estimate and the frame count come from the metadata, before decoding
# --------------------------------------------------------------------------------------------


def write_video(path: Path, count: int, fps: int, size: tuple[int, int] = (64, 48)) -> Path:
    """``count`` frames of ``size = (W, H)`` at ``fps``, each a distinct grey level."""
    writer = imageio_ffmpeg.write_frames(str(path), size, fps=fps, macro_block_size=1,
                                         quality=9)
    writer.send(None)
    for i in range(count):
        writer.send(np.full((size[1], size[0], 3), (i * 7) % 256, np.uint8))
    writer.close()
    return path


@pytest.fixture
def decode_spy(monkeypatch) -> dict[str, int]:
    """Counts frames pulled from imageio-ffmpeg (the metadata item excluded) and images
    converted to pixels."""
    counts = {"video_frames": 0, "images": 0, "clips": 0}
    read_frames, convert = imageio_ffmpeg.read_frames, frames_module.to_rgb8
    load_clip = frames_module.load_clip

    def counted_read_frames(*args, **kwargs):
        reader = read_frames(*args, **kwargs)
        yield next(reader)
        for frame in reader:
            counts["video_frames"] += 1
            yield frame

    def counted_convert(image):
        counts["images"] += 1
        return convert(image)

    def counted_load_clip(data):
        counts["clips"] += 1
        return load_clip(data)

    monkeypatch.setattr(imageio_ffmpeg, "read_frames", counted_read_frames)
    monkeypatch.setattr(frames_module, "to_rgb8", counted_convert)
    monkeypatch.setattr(frames_module, "load_clip", counted_load_clip)
    return counts


def check_job(tmp_path: Path, *overrides: str) -> None:
    """Run a predict job the runner's way: every stage checked before any runs."""
    from vggt4d.run import STAGES

    run = validate(_compose("model.weights=random", "logger=none", *overrides))
    ctx = Context(run, tmp_path / "job", Cache(tmp_path / "cache"))
    execute(resolve(["predict"], STAGES, run), ctx)


def test_a_long_video_that_does_not_fit_is_refused_before_decoding(tmp_path, decode_spy):
    video = write_video(tmp_path / "clip.mp4", count=100, fps=25)
    with pytest.raises(UserError) as info:
        check_job(tmp_path, "data=video", f"data.path={video}", "data.fps=25",
                  "process_res=504", "memory_limit_gb=2")
    # 64x48 → longest side 504, 48·504/64 = 378 = 27·14
    assert "da3-small on 100 frames at 504x378 needs about" in str(info.value)
    assert "but 2.0 GiB is available" in str(info.value)
    assert decode_spy == {"video_frames": 0, "images": 0, "clips": 0}
    assert not (tmp_path / "job").exists()


def test_a_huge_process_res_is_refused_before_decoding(tmp_path, decode_spy, caplog):
    folder = tmp_path / "frames"
    folder.mkdir()
    for i in range(2):
        Image.fromarray(np.full((30, 40, 3), 60 * i, np.uint8)).save(folder / f"f{i}.png")
    with pytest.raises(UserError) as info:
        check_job(tmp_path, "data=images", f"data.path={folder}", "process_res=14000",
                  "memory_limit_gb=64")
    # 40x30 → 14000 x 30·14000/40 = 10500 = 750·14
    assert "da3-small on 2 frames at 14000x10500 needs about" in str(info.value)
    assert decode_spy == {"video_frames": 0, "images": 0, "clips": 0}
    assert any("enlarged 350.0x" in r.getMessage() for r in caplog.records)


def test_fps_above_the_source_rate_is_capped_with_a_warning(tmp_path, caplog):
    video = write_video(tmp_path / "clip.mp4", count=20, fps=10)
    data = VideoData(path=str(video), fps=40.0)
    assert probe_clip(data, 140).num_frames == 20
    clip = load_video(data)
    assert len(clip.frames) == 20  # each source frame once, none repeated
    levels = clip.frames[:, 0, 0, 0].astype(int)
    np.testing.assert_allclose(levels, [(i * 7) % 256 for i in range(20)], atol=3)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings and all("data.fps=40 is above the video's 10 frames/s: using 10" in w
                            for w in warnings)
    caplog.clear()
    assert probe_clip(VideoData(path=str(video), fps=5.0), 140).num_frames == 10
    assert not caplog.records


def test_a_frame_enlarged_from_a_tiny_image_warns(tmp_path, caplog):
    folder = tmp_path / "tiny"
    folder.mkdir()
    for i in range(2):
        Image.fromarray(np.full((15, 20, 3), 90, np.uint8)).save(folder / f"f{i}.png")
    run = validate(_compose("data=images", f"data.path={folder}", "process_res=140"))
    FramesStage().check(Context(run, tmp_path / "job", Cache(tmp_path / "cache")))
    # 20x15 → 140 x 105 → 112 (105 = 7.5·14 rounds up): 140 / 20 = 7.0
    assert any("frames of 20x15 are enlarged 7.0x to 140x112" in r.getMessage()
               for r in caplog.records if r.levelno == logging.WARNING)


@pytest.mark.parametrize(("override", "needle"), [
    ("viz.cmap=jett", "viz.cmap='jett' is not a matplotlib colour map"),
    ("masks.morph_before=[opn:3]", "masks.morph_before entry 'opn:3' must be op:size"),
    ("device=gpu", "device='gpu' is not a torch device"),
    ("model.hooked_network=da3_metric", "model.hooked_network='da3_metric' does not lead to a DA3 "
                                        "backbone"),
])
def test_free_text_choices_are_refused_before_frames_or_weights(tmp_path, decode_spy, override,
                                                                 needle):
    """Settings whose choices are open (colour maps, morphology specs, devices, a network
    path) are checked up front too."""
    with pytest.raises(UserError, match=re.escape(needle)):
        check_job(tmp_path, override, "process_res=56", "data.num_frames=2")
    assert decode_spy == {"video_frames": 0, "images": 0, "clips": 0}


# --------------------------------------------------------------------------------------------
# every Pillow mode into 8-bit RGB, natural frame order
# --------------------------------------------------------------------------------------------

H, W = 10, 12
RNG = np.random.default_rng(5)


def grey(values: np.ndarray) -> np.ndarray:
    """(H, W) → (H, W, 3) uint8 (the grey level in every channel)."""
    return np.repeat(np.asarray(values, np.uint8)[..., None], 3, axis=2)


def _grey16():
    values = RNG.integers(0, 65536, (H, W)).astype(np.uint16)
    values[0, :3] = [0, 65535, 257 * 100 + 128]  # black, white, a value that rounds up
    # 16-bit → 8-bit keeps the fraction of full scale: round(v · 255 / 65535)
    return Image.fromarray(values), grey(np.round(values * 255.0 / 65535.0))


def _grey32():
    values = RNG.integers(0, 65536, (H, W)).astype(np.int32)
    values[0, 0] = 70000  # beyond 16 bits: white
    return Image.fromarray(values), grey(np.round(np.minimum(values, 65535) * 255.0 / 65535.0))


def _grey_alpha():
    level, alpha = RNG.integers(0, 256, (2, H, W)).astype(np.uint8)
    return Image.fromarray(np.stack([level, alpha], -1), "LA"), grey(level)


def _palette():
    palette = RNG.integers(0, 256, (256, 3)).astype(np.uint8)
    index = RNG.integers(0, 256, (H, W)).astype(np.uint8)
    image = Image.fromarray(index)
    image.putpalette(palette.tobytes())  # an "L" image with a palette becomes "P"
    return image, palette[index]


def _cmyk():
    cmyk = RNG.integers(0, 256, (H, W, 4)).astype(np.float64)
    c, m, y, k = np.moveaxis(cmyk, -1, 0)
    rgb = np.stack([(255 - x) * (255 - k) / 255 for x in (c, m, y)], -1)
    return Image.fromarray(cmyk.astype(np.uint8), "CMYK"), np.round(rgb)


def _rgba():
    rgba = RNG.integers(0, 256, (H, W, 4)).astype(np.uint8)
    return Image.fromarray(rgba, "RGBA"), rgba[..., :3]


def _one_bit():
    bits = RNG.integers(0, 2, (H, W)).astype(bool)
    return Image.fromarray(bits), grey(bits * 255)


def _float_unit():
    values = RNG.random((H, W)).astype(np.float32)
    values[0, :2] = [0.0, 1.0]
    return Image.fromarray(values), grey(np.round(values.astype(np.float64) * 255))


def _float_wide():
    values = (RNG.random((H, W)) * 300).astype(np.float32)
    return Image.fromarray(values), grey(np.round(np.clip(values.astype(np.float64), 0, 255)))


MODES = {"I;16": _grey16, "I": _grey32, "LA": _grey_alpha, "P": _palette, "CMYK": _cmyk,
         "RGBA": _rgba, "1": _one_bit, "F": _float_unit, "F_wide": _float_wide}
FILES = [("I;16", "png"), ("I;16", "tif"), ("I", "tif"), ("LA", "png"), ("LA", "tif"),
         ("P", "png"), ("CMYK", "tif"), ("CMYK", "jpg"), ("RGBA", "png"), ("RGBA", "tif"),
         ("1", "png"), ("1", "tif"), ("F", "tif"), ("F_wide", "tif")]


@pytest.mark.parametrize(("mode", "suffix"), FILES, ids=[f"{m}.{s}" for m, s in FILES])
def test_every_image_mode_becomes_correct_8bit_rgb(tmp_path, mode, suffix):
    image, expected = MODES[mode]()
    path = tmp_path / f"frame.{suffix}"
    image.save(path, **({"quality": 95} if suffix == "jpg" else {}))
    with Image.open(path) as stored:
        assert stored.mode == mode.split("_")[0]
        if suffix == "jpg":  # lossy: the reference starts from the values JPEG kept
            c, m, y, k = np.moveaxis(np.asarray(stored, np.float64), -1, 0)
            expected = np.round(np.stack([(255 - x) * (255 - k) / 255 for x in (c, m, y)], -1))
        rgb = to_rgb8(stored)
    assert rgb.dtype == np.uint8 and rgb.shape == (H, W, 3)
    np.testing.assert_allclose(rgb.astype(int), np.asarray(expected, int), atol=1)


def test_a_16bit_grey_folder_is_read_as_grey_not_white(tmp_path):
    """The runner's image source on 16-bit PNG frames (all-white frames before)."""
    folder = tmp_path / "frames"
    folder.mkdir()
    expected = []
    for i in range(2):
        image, want = _grey16()
        image.save(folder / f"f{i}.png")
        expected.append(want)
    clip = load_images(ImagesData(path=str(folder)))
    np.testing.assert_allclose(clip.frames.astype(int), np.stack(expected).astype(int), atol=1)
    assert clip.frames.mean() < 200


def test_frames_numbered_without_padding_are_taken_in_numeric_order_with_a_warning(
        tmp_path, caplog):
    folder = tmp_path / "frames"
    folder.mkdir()
    for i in range(1, 12):
        Image.fromarray(np.full((8, 8, 3), i * 20, np.uint8)).save(folder / f"frame_{i}.png")
    clip = load_images(ImagesData(path=str(folder)))
    assert clip.names == [f"frame_{i}.png" for i in range(1, 12)]
    assert clip.frames[:, 0, 0, 0].tolist() == [i * 20 for i in range(1, 12)]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "numeric order" in warnings[0] and "zero-pad" in warnings[0]
    padded = tmp_path / "padded"
    padded.mkdir()
    for i in range(1, 12):
        Image.fromarray(np.full((8, 8, 3), i, np.uint8)).save(padded / f"frame_{i:02d}.png")
    caplog.clear()
    assert load_images(ImagesData(path=str(padded))).names[-1] == "frame_11.png"
    assert not caplog.records
