"""Pictures (colormaps, overlays, contact sheets), mp4 writing and the make_all_videos step."""

from __future__ import annotations

from pathlib import Path

import imageio_ffmpeg
import matplotlib
import numpy as np
import pytest
from PIL import Image

from vggt4d.errors import UserError
from vggt4d.videos import find_series, main, make_all_videos
from vggt4d.viz import (
    colorize,
    contact_sheet,
    overlay_mask,
    side_by_side,
    write_png,
    write_video,
)


def read_video(path: Path) -> tuple[tuple[int, int], np.ndarray]:
    """((width, height), (T, H, W, 3) uint8) decoded with imageio-ffmpeg's own reader."""
    reader = imageio_ffmpeg.read_frames(str(path))
    meta = reader.__next__()
    width, height = meta["size"]
    frames = [np.frombuffer(raw, dtype=np.uint8).reshape(height, width, 3) for raw in reader]
    return (width, height), np.stack(frames)


def has_block(image: np.ndarray, colour: tuple[int, int, int], side: int) -> bool:
    """True when ``image`` holds a ``side``×``side`` block of exactly ``colour``."""
    hit = np.all(image == np.asarray(colour, dtype=np.uint8), axis=-1).astype(np.int64)
    integral = np.pad(hit, ((1, 0), (1, 0))).cumsum(0).cumsum(1)
    sums = (integral[side:, side:] - integral[:-side, side:] - integral[side:, :-side]
            + integral[:-side, :-side])
    return bool((sums == side * side).any())


# ---------------------------------------------------------------- colorize


def test_colorize_endpoints_match_matplotlib_jet():
    rgb = colorize(np.array([[0.0, 1.0]]))
    assert rgb.dtype == np.uint8 and rgb.shape == (1, 2, 3)
    jet = matplotlib.colormaps["jet"]
    for column, value in enumerate((0.0, 1.0)):
        expected = np.asarray(jet(value)[:3]) * 255
        assert np.abs(rgb[0, column].astype(float) - expected).max() <= 1.0


def test_colorize_ramp_distinct_colours_nan_black_and_range():
    ramp = np.linspace(0.0, 1.0, 9)[None, :]
    rgb = colorize(ramp)
    assert rgb.dtype == np.uint8 and rgb.shape == (1, 9, 3)
    assert rgb.any()
    colours = {tuple(pixel) for pixel in rgb[0]}
    assert len(colours) == 9

    with_nan = colorize(np.array([[0.5, np.nan]]))
    assert tuple(with_nan[0, 1]) == (0, 0, 0)
    assert with_nan[0, 0].any()

    # vmin/vmax rescale: 5 in [0, 10] is the colour of 0.5 in [0, 1]; outside clips
    assert np.array_equal(colorize(np.array([[5.0]]), vmax=10.0), colorize(np.array([[0.5]])))
    assert np.array_equal(colorize(np.array([[-3.0, 7.0]])), colorize(np.array([[0.0, 1.0]])))


# ---------------------------------------------------------------- overlays


def test_overlay_mask_blends_inside_and_leaves_outside_untouched():
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, size=(20, 24, 3), dtype=np.uint8)
    mask = np.zeros((20, 24), dtype=bool)
    mask[5:15, 6:18] = True
    color, alpha = (10, 200, 40), 0.3

    out = overlay_mask(frame, mask, color=color, alpha=alpha, outline=True)
    assert out.dtype == np.uint8 and out.shape == frame.shape
    assert np.array_equal(out[~mask], frame[~mask])

    expected = np.rint((1 - alpha) * frame.astype(float) + alpha * np.array(color))
    interior = np.zeros_like(mask)
    interior[6:14, 7:17] = True
    assert np.array_equal(out[interior], expected[interior].astype(np.uint8))
    # the 1-px outline: mask pixels next to the outside are the colour itself
    boundary = mask & ~interior
    assert np.all(out[boundary] == np.array(color, dtype=np.uint8))

    plain = overlay_mask(frame, mask, color=color, alpha=alpha, outline=False)
    assert np.array_equal(plain[mask], expected[mask].astype(np.uint8))


def test_side_by_side():
    frame = np.full((28, 42, 3), 100, dtype=np.uint8)
    small = np.zeros((14, 10, 3), dtype=np.uint8)
    joined = side_by_side([frame, small], gap=4)
    assert joined.shape == (28, 42 + 4 + 20, 3)
    assert np.all(joined[:, 42:46] == 255)


# ---------------------------------------------------------------- contact sheet


def distinct_colours(count: int) -> list[tuple[int, int, int]]:
    levels = (40, 110, 180, 235)  # neither black (text) nor white (background)
    grid = [(r, g, b) for r in levels for g in levels for b in levels]
    return grid[:count]


@pytest.mark.parametrize("count", [1, 12, 40])
def test_contact_sheet_draws_every_panel(count):
    height, width = 24, 32
    colours = distinct_colours(count)
    panels = [np.full((height, width, 3), colour, dtype=np.uint8) for colour in colours]
    labels = [f"L{i:02d}" for i in range(count)]
    sheet = contact_sheet(panels, labels, title=f"{count} layers")

    assert sheet.dtype == np.uint8 and sheet.ndim == 3 and sheet.shape[2] == 3
    assert sheet.shape[0] >= height and sheet.shape[1] >= width
    assert sheet.shape[0] * sheet.shape[1] >= count * height * width
    assert sheet.shape[1] <= 4096 and sheet.shape[0] <= 4096
    if count > 1:
        assert sheet.shape[1] >= sheet.shape[0] * 0.8  # roughly landscape
    for colour in colours:
        assert has_block(sheet, colour, side=12), f"panel colour {colour} not drawn"


def test_contact_sheet_rejects_label_mismatch():
    with pytest.raises(ValueError):
        contact_sheet([np.zeros((4, 4, 3), np.uint8)], ["a", "b"], "t")


# ---------------------------------------------------------------- writers


def test_write_png_roundtrip_and_rejects_float(tmp_path):
    image = np.arange(5 * 7 * 3, dtype=np.uint8).reshape(5, 7, 3)
    path = write_png(tmp_path / "sub" / "a.png", image)
    assert np.array_equal(np.asarray(Image.open(path)), image)
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.png"]
    with pytest.raises(ValueError):
        write_png(tmp_path / "b.png", image.astype(np.float32))


@pytest.mark.parametrize(("height", "width"), [(32, 48), (33, 45)])
def test_write_video_roundtrip(tmp_path, height, width):
    levels = [20, 80, 140, 200, 250]
    frames = np.stack([np.full((height, width, 3), level, dtype=np.uint8) for level in levels])
    path = write_video(tmp_path / "clip.mp4", frames, fps=5)

    assert [p.name for p in tmp_path.iterdir()] == ["clip.mp4"]  # no temp files left
    size, decoded = read_video(path)
    assert size == (width + width % 2, height + height % 2)
    assert len(decoded) == len(levels)
    means = decoded.reshape(len(levels), -1).mean(axis=1)
    assert np.all(np.diff(means) > 0)
    assert np.abs(means - np.array(levels)).max() < 8


# ---------------------------------------------------------------- make_all_videos


def save_grey(path: Path, level: int, size: tuple[int, int] = (20, 16)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), level, dtype=np.uint8)).save(path)


def test_make_all_videos_one_mp4_per_series(tmp_path, capsys):
    # frame numbers 2, 9, 10: numeric order, not name order
    for frame, level in ((2, 30), (10, 220), (9, 120)):
        save_grey(tmp_path / f"layer_05_frame{frame}_similarity.png", level)
    for frame in range(2):
        save_grey(tmp_path / f"layer_06_frame{frame:03d}_mask.png", 60 + 100 * frame)
    save_grey(tmp_path / "layer_07_frame000_alone.png", 50)  # one frame: skipped
    save_grey(tmp_path / "summary.png", 50)  # not a series
    for frame in range(2):  # earlier output: ignored
        save_grey(tmp_path / "videos" / f"old_frame{frame:03d}_x.png", 50)

    series = find_series(tmp_path)
    assert set(series) == {("layer_05", "similarity"), ("layer_06", "mask")}

    written = make_all_videos(tmp_path, fps=4, progress=False)
    names = sorted(p.name for p in (tmp_path / "videos").glob("*.mp4"))
    assert names == ["layer_05_similarity.mp4", "layer_06_mask.mp4"]
    assert sorted(p.name for p in written) == names
    assert not [p for p in (tmp_path / "videos").iterdir() if p.suffix != ".mp4"
                and p.is_file() and not p.name.endswith(".png")]

    _, similarity = read_video(tmp_path / "videos" / "layer_05_similarity.mp4")
    assert len(similarity) == 3
    assert np.all(np.diff(similarity.reshape(3, -1).mean(axis=1)) > 0)
    _, mask = read_video(tmp_path / "videos" / "layer_06_mask.mp4")
    assert len(mask) == 2

    out = tmp_path / "elsewhere"
    assert main([str(tmp_path), "--fps", "5", "--out", str(out)]) == 0
    printed = capsys.readouterr().out.split()
    assert sorted(Path(p).name for p in printed) == names
    assert sorted(p.name for p in out.iterdir()) == names


def test_main_on_empty_or_missing_folder(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and len(err.strip().splitlines()) == 1
    assert "Traceback" not in err

    assert main([str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and len(err.strip().splitlines()) == 1

    with pytest.raises(UserError):
        make_all_videos(tmp_path, progress=False)
