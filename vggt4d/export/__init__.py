"""Results where the next tool reads them: a Rerun recording and folders for 3-D/4-D trainers.

* :mod:`~vggt4d.export.recording` — ``scene.rrd`` for the Rerun viewer (rerun-sdk);
* :mod:`~vggt4d.export.tum` — the TUM-like RGB-D folder of the AnyDynamics "hooks" script;
* :mod:`~vggt4d.export.colmap` — a COLMAP model (pycolmap) beside images and masks;
* :mod:`~vggt4d.export.nerfstudio` — nerfstudio's ``transforms.json`` with ``mask_path``;
* :mod:`~vggt4d.export.files` — conventions, names, images and masks they share;
* :mod:`~vggt4d.config.export` (``export.*``) and :mod:`~vggt4d.export.stage` (the stage).

The writers are pure functions of plain arrays; only the stage reads a run.
"""
