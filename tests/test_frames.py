"""Frame sources and DA3's preprocessing sizes."""

from __future__ import annotations

import imageio_ffmpeg
import numpy as np
import pytest
from PIL import Image

from vggt4d.config.data import ImagesData, VideoData
from vggt4d.errors import UserError
from vggt4d.frames import load_images, load_video, normalize, processing_size, resize_frames


def _write_images(folder, sizes, fmt="png"):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(
            folder / f"frame_{i:03d}.{fmt}")


@pytest.mark.parametrize(("size", "res", "expected"), [
    ((480, 640), 504, (378, 504)),   # DA3's preprocessing: 640×480 → 504×378, grid 36×27
    ((504, 504), 504, (504, 504)),
    ((210, 280), 280, (210, 280)),
    ((1080, 1920), 504, (280, 504)),  # 283.5 → 284 → nearest multiple 280
    ((100, 1000), 504, (56, 504)),    # 50.4 → 50 → 56 (ties and above round up)
])
def test_processing_size_like_da3(size, res, expected):
    assert processing_size(*size, res) == expected
    assert all(side % 14 == 0 for side in expected)


def test_resize_and_normalize():
    frames = np.full((2, 30, 40, 3), 128, np.uint8)
    resized = resize_frames(frames, (42, 56))
    assert resized.shape == (2, 42, 56, 3)
    images = normalize(resized)
    assert images.shape == (2, 3, 42, 56)
    expected = (128 / 255 - 0.485) / 0.229
    assert np.allclose(images[:, 0].numpy(), expected, atol=1e-5)


def test_images_are_sorted_strided_and_capped(tmp_path):
    _write_images(tmp_path / "clip", [(20, 30)] * 7, fmt="jpg")
    clip = load_images(ImagesData(path=str(tmp_path / "clip"), stride=2, max_frames=3))
    assert clip.names == ["frame_000.jpg", "frame_002.jpg", "frame_004.jpg"]
    assert clip.frames.shape == (3, 20, 30, 3)


def test_frames_of_other_sizes_are_resized_to_the_first(tmp_path, caplog):
    _write_images(tmp_path / "clip", [(20, 30), (40, 60), (20, 30)])
    clip = load_images(ImagesData(path=str(tmp_path / "clip")))
    assert clip.frames.shape == (3, 20, 30, 3)
    assert "differ in size" in caplog.text


def test_bad_image_folders(tmp_path):
    with pytest.raises(UserError, match="no such directory"):
        load_images(ImagesData(path=str(tmp_path / "missing")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no"):
        load_images(ImagesData(path=str(tmp_path / "empty")))
    _write_images(tmp_path / "one", [(20, 30)])
    with pytest.raises(UserError, match=r"at least 2"):
        load_images(ImagesData(path=str(tmp_path / "one")))
    _write_images(tmp_path / "broken", [(20, 30)] * 2)
    (tmp_path / "broken" / "frame_001.png").write_bytes(b"not an image")
    with pytest.raises(UserError, match=r"frame_001\.png"):
        load_images(ImagesData(path=str(tmp_path / "broken")))


def _write_video(path, frames, fps):
    writer = imageio_ffmpeg.write_frames(str(path), frames.shape[2:0:-1], fps=fps,
                                         macro_block_size=1, quality=9)
    writer.send(None)
    for frame in frames:
        writer.send(np.ascontiguousarray(frame))
    writer.close()


def test_video_is_resampled_to_the_requested_fps(tmp_path):
    # 20 frames at 20 fps = 1 s; each frame has its own grey level so order is visible
    levels = np.linspace(10, 240, 20).astype(np.uint8)
    frames = np.repeat(levels[:, None, None, None], 3, axis=-1) * np.ones((1, 32, 48, 1), np.uint8)
    _write_video(tmp_path / "clip.mp4", frames, fps=20)
    clip = load_video(VideoData(path=str(tmp_path / "clip.mp4"), fps=5))
    assert clip.frames.shape[1:] == (32, 48, 3)
    assert abs(len(clip.frames) - 5) <= 1
    means = clip.frames.reshape(len(clip.frames), -1).mean(1)
    assert np.all(np.diff(means) > 0)
    capped = load_video(VideoData(path=str(tmp_path / "clip.mp4"), fps=20, max_frames=4))
    assert len(capped.frames) == 4


def test_undecodable_video_is_one_line(tmp_path):
    (tmp_path / "bad.mp4").write_bytes(b"\x00" * 1000)
    with pytest.raises(UserError, match="cannot decode video") as info:
        load_video(VideoData(path=str(tmp_path / "bad.mp4")))
    assert "\n" not in str(info.value)
    with pytest.raises(UserError, match="no such file"):
        load_video(VideoData(path=str(tmp_path / "none.mp4")))
