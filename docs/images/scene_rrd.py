"""Make ``docs/images/scene_rrd.png``: ``scene.rrd`` of the synthetic scene, as Rerun shows it.

The recording holds the scene's ground truth (depth, cameras and dynamic masks; the soft map is
the mask itself), written by :func:`vggt4d.export.recording.write_recording` with its default
20 000 points per frame; the picture is taken by Rerun's headless viewer (its experimental
``ViewerClient``) at frame 6. Without a GPU the viewer needs a software Vulkan driver: on Debian
``apt-get install mesa-vulkan-drivers libvulkan1`` (Mesa's lavapipe).

    .venv/bin/python docs/images/scene_rrd.py [OUT_DIR]
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

LAVAPIPE = Path("/usr/share/vulkan/icd.d/lvp_icd.x86_64.json")
FRAME = 6


def main(out_dir: Path) -> None:
    from PIL import Image
    from rerun.experimental import ViewerClient

    from vggt4d.export.recording import write_recording
    from vggt4d.synthetic import SyntheticConfig, render_scene

    scene = render_scene(SyntheticConfig())
    recording = out_dir / "scene.rrd"
    write_recording(recording, scene.frames, scene.depth, scene.extrinsics, scene.intrinsics,
                    scene.dynamic_masks, scene.dynamic_masks.astype("float32"))
    if LAVAPIPE.is_file():
        os.environ.setdefault("VK_ICD_FILENAMES", str(LAVAPIPE))
    os.environ.setdefault("XDG_RUNTIME_DIR", tempfile.gettempdir())
    os.environ["RUST_LOG"] = "error"  # no log toasts over the views
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    viewer = ViewerClient.spawn(headless=True, port=9877, hide_welcome_screen=True)
    try:
        viewer.open(str(recording.resolve()))
        time.sleep(3)
        viewer.set_time("frame", sequence=FRAME, play_state="paused")
        time.sleep(3)
        shot = out_dir / "scene_rrd_full.png"
        viewer.save_screenshot(str(shot.resolve()))
    finally:
        viewer.quit()
    picture = Image.open(shot).convert("RGB")
    picture.thumbnail((1280, 720))
    picture.save(out_dir / "scene_rrd.png", optimize=True)
    shot.unlink()


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent)
