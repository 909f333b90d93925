"""``pasa demo`` on a tiny random testbed checkpoint: every file written, errors clear.

Sizes: the tiny model (2 layers, 2 heads) on 8 frames of 64 x 64 pixels, an 8 x 16 x 16 token
grid = 16 PASA blocks of 128 tokens (density 0.25 keeps about four per row); four Euler steps,
the fewest for the online budget to leave its dense warm-up.
"""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("cv2")

from pasa.testbed.model import TINY, CheckpointError
from pasa.testbed.video_demo import demo_settings, main, run_video_demo


def test_demo_writes_everything(checkpoint, tmp_path):
    imageio = pytest.importorskip("imageio.v2")
    pytest.importorskip("imageio_ffmpeg")

    result = run_video_demo(
        checkpoint, tmp_path, caption="a red circle moves left. the camera stays still.",
        seed=1, density=0.25, frames=8, size=64, steps=4, device="cpu", progress=False,
    )  # fmt: skip
    names = {p.name for p in result.files.values()}
    assert names == {
        "dense.mp4", "pasa.mp4", "side_by_side.mp4", "density_curvature.png", "metrics.json"
    }  # fmt: skip
    for path in result.files.values():
        assert path.is_file() and path.stat().st_size > 0
    dense = imageio.mimread(result.files["dense"])
    assert len(dense) == 8 and dense[0].shape == (64, 64, 3)
    both = imageio.mimread(result.files["side_by_side"])
    assert len(both) == 8 and both[0].shape[1] == 2 * both[0].shape[0] - 2 * 24  # two halves
    data = json.loads(result.files["metrics"].read_text())
    assert data["clip"] == {"frames": 8, "size": 64, "steps": 4, "height": 64, "width": 64}
    assert data["seed"] == 1 and data["training"] == {"steps": 0}
    assert data["device"] == "cpu" and data["commit"]
    m = data["metrics"]
    for key in ("psnr", "ssim", "flicker", "flicker_reference", "warp_error", "mean_density"):
        assert isinstance(m[key], float)
    assert len(data["report"]["steps"]) == 4
    budget = [s["density"] for s in data["report"]["steps"]]
    assert sum(budget) / 4 == pytest.approx(0.25)  # the online budget keeps the mean
    assert data["timings"]["total_s"] > 0
    assert "PASA" in result.table and "dense" in result.table


def test_cpu_defaults_fit_the_checkpoint():
    from pasa.testbed.model import TESTBED

    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    kw = dict(size=None, frames=None, steps=None)
    assert demo_settings(TESTBED, cpu, **kw) == {"frames": 16, "size": 128, "steps": 20}
    assert demo_settings(TESTBED, gpu, **kw) == {"frames": 16, "size": 256, "steps": 20}
    assert demo_settings(TINY, cpu, **kw) == {"frames": 4, "size": 32, "steps": 20}
    with pytest.raises(ValueError, match="multiple of 4"):
        demo_settings(TINY, cpu, size=30, frames=None, steps=None)


def test_missing_or_corrupt_checkpoint(checkpoint, tmp_path, capsys):
    with pytest.raises(CheckpointError, match="not found"):
        run_video_demo(tmp_path / "none.safetensors", tmp_path, device="cpu", progress=False)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(checkpoint.read_bytes()[:1000])
    assert main(["--checkpoint", str(broken), "--out", str(tmp_path), "--device", "cpu"]) == 2
    assert "pasa demo:" in capsys.readouterr().err
    assert not (tmp_path / "metrics.json").exists()


def test_missing_dependency_is_named(monkeypatch, tmp_path, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "cv2" else real(name, *a)
    )
    assert main(["--out", str(tmp_path), "--device", "cpu"]) == 2
    assert "cv2: pip install 'pasa[diffusers,eval]'" in capsys.readouterr().err


def test_mp4_through_opencv_without_imageio_ffmpeg(monkeypatch, tmp_path):
    """Without the ffmpeg wheel the clip is written by OpenCV and reads back frame for frame."""
    import importlib.util

    import cv2
    import numpy as np

    from pasa.testbed.video_demo import write_mp4

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "imageio_ffmpeg" else real(name, *a),
    )
    frames = np.zeros((6, 32, 48, 3), dtype=np.uint8)
    for i in range(6):
        frames[i, :, 8 * i : 8 * i + 8, 0] = 255  # a red bar moving right
    path = write_mp4(tmp_path / "clip.mp4", frames)
    capture = cv2.VideoCapture(str(path))
    read = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        read.append(frame)
    capture.release()
    assert len(read) == 6 and read[0].shape == (32, 48, 3)
    red = [int(np.argmax(f[:, :, 2].mean(0))) // 8 for f in read]  # BGR: red is channel 2
    assert red == list(range(6))


def test_demo_takes_the_tail_to_use(checkpoint, tmp_path, monkeypatch):
    # --approximate reaches PASA's config (and the metrics JSON); "none" means exact blocks only.
    from pasa.testbed import video_demo

    seen = []
    real = video_demo.run_video_demo

    def spy(*args, **kwargs):
        seen.append(kwargs["approximate"])
        return real(*args, **kwargs)

    monkeypatch.setattr(video_demo, "run_video_demo", spy)
    common = ["--checkpoint", str(checkpoint), "--device", "cpu", "--no-progress", "--size", "64",
              "--frames", "8", "--steps", "4", "--density", "0.25"]  # fmt: skip
    assert main([*common, "--out", str(tmp_path / "p"), "--approximate", "principal"]) == 0
    assert main([*common, "--out", str(tmp_path / "n"), "--approximate", "none"]) == 0
    assert seen == ["principal", False]
    data = json.loads((tmp_path / "p" / "metrics.json").read_text())
    assert data["pasa_config"]["approximate"] == "principal"
    assert isinstance(data["metrics"]["psnr"], float)
    with pytest.raises(SystemExit):
        main([*common, "--out", str(tmp_path / "x"), "--approximate", "linear"])
