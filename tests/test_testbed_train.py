"""Trainer (tiny model on CPU): runs, resumes bit-exactly, exports; sampler shapes and seeds."""

import json

import pytest
import torch

from pasa.testbed.model import TINY, build_model, load_testbed
from pasa.testbed.sample import sample
from pasa.testbed.train import Trainer, build_parser, main


def _args(out, *extra):
    return build_parser().parse_args(
        ["--out", str(out), "--preset", "tiny", "--batch-size", "2", "--warmup", "2",
         "--log-every", "1", "--device", "cpu", *extra]
    )  # fmt: skip


def test_resume_is_bit_exact(tmp_path):
    straight = Trainer(_args(tmp_path / "a", "--total-steps", "4"))
    losses = [straight.train_step() for _ in range(4)]
    first = Trainer(_args(tmp_path / "b", "--total-steps", "2"))
    first.run()
    second = Trainer(_args(tmp_path / "b", "--total-steps", "4", "--resume"))
    assert second.step == 2
    second.run()
    assert second.step == 4 and second.samples == straight.samples
    for a, b in zip(straight.model.parameters(), second.model.parameters(), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(straight.ema.parameters(), second.ema.parameters(), strict=True):
        assert torch.equal(a, b)
    log = [json.loads(line) for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log] == [1, 2, 3, 4]
    assert [row["loss"] for row in log] == pytest.approx(losses, rel=1e-6)


def test_main_time_budget_and_export(tmp_path):
    out = tmp_path / "run"
    # A zero-minute budget stops before the first step and still saves a resumable state.
    assert main([*_cli(out), "--max-minutes", "0"]) == 0
    assert (out / "state.pt").is_file()
    assert main([*_cli(out), "--total-steps", "3", "--resume", "--export", str(out / "m.safetensors"),
                 "--sizes", "32,16", "--size-weights", "1,1"]) == 0  # fmt: skip
    _model, config, record = load_testbed(out / "m.safetensors")
    assert config == TINY and record["training"]["steps"] == 3
    assert record["training"]["sizes"] == [32, 16]


def _cli(out):
    return ["--out", str(out), "--preset", "tiny", "--batch-size", "2", "--device", "cpu"]


def test_sampler_shape_seed_and_callback():
    model = build_model(TINY).eval()
    seen = []
    a = sample(model, TINY, "a red circle moves left", seed=3, num_steps=3,
               on_step=lambda i, t, x, v: seen.append((i, t, tuple(x.shape))))  # fmt: skip
    b = sample(model, TINY, "a red circle moves left", seed=3, num_steps=3)
    c = sample(model, TINY, "a red circle moves left", seed=4, num_steps=3, guidance=2.0)
    assert a.frames.shape == (3, TINY.frames, TINY.height, TINY.width)
    assert torch.equal(a.frames, b.frames) and not torch.equal(a.frames, c.frames)
    assert [s[0] for s in seen] == [0, 1, 2] and seen[0][1] == 1.0
    assert len(a.steps) == 3 and a.steps[-1].t_next == 0.0
    small = sample(model, TINY, "", seed=0, num_steps=1, frames=2, height=16, width=24)
    assert small.frames.shape == (3, 2, 16, 24)
