"""``python -m pasa.testbed.sample`` on a tiny random checkpoint: guidance, size, bad input."""

import json

import pytest

from pasa.testbed.model import TINY
from pasa.testbed.sample import main


def test_samples_with_guidance_at_another_size(checkpoint, tmp_path):
    out = tmp_path / "samples"
    assert main(["--checkpoint", str(checkpoint), "--captions", "1", "--steps", "2",
                 "--guidance", "3", "--size", "16", "--every", "1", "--out", str(out),
                 "--device", "cpu"]) == 0  # fmt: skip
    index = json.loads((out / "captions.json").read_text())
    assert index["guidance"] == 3.0 and index["size"] == 16
    assert index["samples"][0]["caption"].split(". ")[0].endswith(" shapes")  # scene first
    from PIL import Image

    width, height = Image.open(out / "sample_0.png").size
    assert height == 16 and width == TINY.frames * 16 + (TINY.frames - 1) * 2


@pytest.mark.parametrize("bad", [["--size", "18"], ["--guidance", "0"]])
def test_bad_size_or_guidance_is_refused(checkpoint, tmp_path, bad):
    with pytest.raises(SystemExit) as exc:
        main(["--checkpoint", str(checkpoint), "--out", str(tmp_path / "x"), "--device", "cpu",
              *bad])  # fmt: skip
    assert exc.value.code == 2 and not (tmp_path / "x").exists()
