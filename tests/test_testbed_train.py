"""Trainer (tiny model on CPU): runs, resumes bit-exactly, exports; the compact state in parts
(codecs, hashes, resume within noise); sampler shapes and seeds."""

import json
import shutil
import statistics

import pytest
import torch

from pasa.testbed.data import clip_indices, make_batch
from pasa.testbed.model import TESTBED, TINY, build_model, count_parameters, load_testbed
from pasa.testbed.sample import sample
from pasa.testbed.state import (
    BLOCK,
    PART_BYTES,
    STATE_BUDGET_BYTES,
    StateError,
    compact_weights_codec,
    decode_fp24,
    decode_log8,
    decode_q8,
    encode_fp24,
    encode_log8,
    encode_q8,
    estimate_state_bytes,
    read_state_parts,
    write_state_parts,
)
from pasa.testbed.train import Trainer, build_parser, lr_at, main


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


def test_ancestral_sampling_is_seeded_and_reduces_to_euler():
    torch.manual_seed(0)
    model = build_model(TINY).eval()
    kw = dict(seed=5, num_steps=4)
    euler = sample(model, TINY, "a red circle", **kw).frames
    assert torch.equal(sample(model, TINY, "a red circle", eta=0.0, **kw).frames, euler)
    # the x0 / noise split with no fresh noise is the Euler step, up to rounding
    near = sample(model, TINY, "a red circle", eta=1e-9, **kw).frames
    assert torch.allclose(near, euler, atol=1e-5)
    a = sample(model, TINY, "a red circle", eta=1.0, **kw).frames
    assert torch.equal(a, sample(model, TINY, "a red circle", eta=1.0, **kw).frames)
    assert not torch.allclose(a, euler, atol=1e-3)
    assert not torch.equal(
        a, sample(model, TINY, "a red circle", eta=1.0, seed=6, num_steps=4).frames
    )
    one = sample(model, TINY, "a red circle", eta=1.0, seed=5, num_steps=1).frames
    assert torch.equal(one, sample(model, TINY, "a red circle", seed=5, num_steps=1).frames)
    with pytest.raises(ValueError, match="eta"):
        sample(model, TINY, "a red circle", eta=1.5, **kw)


# -- the compact state (--state-out / --resume-from) -------------------------------------------


def test_codecs_error_bounds():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3000, generator=gen) * torch.logspace(-6, 0, 3000)
    x[::97] = 0.0
    w = decode_fp24(encode_fp24(x), x.shape)
    assert ((w - x).abs() <= x.abs() * 2.0**-16).all()
    exact = torch.tensor([0.0, 1.0, -2.5, 3.0, 1 / 1024, -(2.0**-100)])  # low 8 bits all zero
    assert torch.equal(decode_fp24(encode_fp24(exact), exact.shape), exact)
    q, s = encode_q8(x)
    err = (decode_q8(q, s, x.shape) - x).abs().view(-1)
    block_max = torch.nn.functional.pad(x.abs(), (0, (-x.numel()) % BLOCK)).view(-1, BLOCK)
    bound = block_max.amax(1).repeat_interleave(BLOCK)[: x.numel()] / 254
    assert (err <= bound * 1.0001).all() and q.dtype == torch.int8 and q.numel() == x.numel()
    v = x.abs()
    c, lo, hi = encode_log8(v)
    back = decode_log8(c, lo, hi, v.shape)
    assert torch.equal(back == 0, v == 0)  # zeros, and only zeros, are exact zeros
    octaves = ((hi - lo) / 254).repeat_interleave(BLOCK)[: v.numel()]
    nz = v > 0
    assert ((back[nz] / v[nz]).log2().abs() <= octaves[nz] / 2 + 1e-5).all()


def test_state_parts_round_trip(tmp_path):
    tensors = {"a": torch.randn(700), "b": torch.arange(300, dtype=torch.int8), "c": torch.eye(5)}
    manifest = write_state_parts(tensors, {"step": 7}, tmp_path, part_bytes=1000)
    parts = sorted(tmp_path.glob("state.part*"))
    assert [p.name for p in parts] == [p["name"] for p in manifest["parts"]]
    assert len(parts) == -(-manifest["total_bytes"] // 1000) >= 4
    assert all(p.stat().st_size <= 1000 for p in parts)
    back, read = read_state_parts(tmp_path)
    assert back.keys() == tensors.keys() and read["step"] == 7
    assert all(torch.equal(back[k], v) for k, v in tensors.items())
    # A smaller later save leaves no stale parts behind.
    write_state_parts({"a": torch.zeros(3)}, {"step": 8}, tmp_path, part_bytes=1000)
    assert [p.name for p in tmp_path.glob("state.part*")] == ["state.part00"]
    assert read_state_parts(tmp_path)[1]["step"] == 8


def test_missing_or_corrupt_state_is_named(tmp_path):
    src = tmp_path / "src"
    write_state_parts({"a": torch.randn(1000)}, {"step": 1}, src, part_bytes=1500)

    def damaged(name, change):
        d = tmp_path / name
        shutil.copytree(src, d)
        change(d)
        return d

    def flip(path):
        data = bytearray(path.read_bytes())
        data[10] ^= 0xFF
        path.write_bytes(bytes(data))

    cases = [
        (lambda d: (d / "state.part01").unlink(), r"state\.part01 missing .*lists 3 parts"),
        (lambda d: flip(d / "state.part00"), r"state\.part00 is corrupt"),
        (lambda d: (d / "state.part02").write_bytes(b"x"), r"state\.part02 is corrupt: 1 bytes"),
        (lambda d: (d / "state.manifest.json").unlink(), r"state\.manifest\.json is missing"),
        (lambda d: (d / "state.manifest.json").write_text("{"), "not a readable state manifest"),
    ]
    for i, (change, message) in enumerate(cases):
        with pytest.raises(StateError, match=message):
            read_state_parts(damaged(f"case{i}", change))
    with pytest.raises(StateError, match="no training state"):
        Trainer(_args(tmp_path / "run", "--resume-from", str(tmp_path / "nowhere")))


def test_compact_resume_continues(tmp_path):
    n, k = 12, 6
    straight = Trainer(_args(tmp_path / "a", "--total-steps", str(n)))
    losses = [straight.train_step() for _ in range(n)]
    first = Trainer(_args(tmp_path / "b", "--total-steps", str(n), "--state-weights", "fp24"))
    for _ in range(k):
        first.train_step()
    manifest = first.save_compact(tmp_path / "state")
    assert manifest["codecs"]["weights"] == "fp24" and manifest["data_cursor"]["next_step"] == k
    second = Trainer(_args(tmp_path / "c", "--total-steps", str(n), "--resume-from",
                           str(tmp_path / "state")))  # fmt: skip
    assert (second.step, second.samples) == (k, first.samples)
    for a, b in zip(first.model.parameters(), second.model.parameters(), strict=True):
        assert ((a - b).abs() <= a.abs() * 2.0**-16).all()  # fp24: 16 significant bits
    pairs = zip(
        first.ema.parameters(), second.ema.parameters(), first.model.parameters(), strict=True
    )
    for e, f, w in pairs:  # int8 codes of ema - weights: error <= max |ema - weights| / 254
        assert (e - f).abs().max() <= (e - w).abs().max() / 200
    for p, q in zip(first.model.parameters(), second.model.parameters(), strict=True):
        so, sr = first.opt.state[p], second.opt.state[q]
        assert float(sr["step"]) == k
        assert torch.allclose(sr["exp_avg_sq"], so["exp_avg_sq"], rtol=0.06, atol=0)
    out = second.run()
    assert second.step == n and second.samples == straight.samples
    resumed = [row["loss"] for row in out["log"]]
    noise = statistics.pstdev(losses[k:])
    # measured 1.4e-6 against a step-to-step spread of 0.09; a fresh optimizer gives 7.5e-3
    assert max(abs(a - b) for a, b in zip(resumed, losses[k:], strict=True)) < noise / 1000


@pytest.mark.parametrize(
    ("flag", "value", "field"),
    [
        ("--text-context", "none", "text_context"),
        ("--caption-order", "objects_first", "caption_order"),
        ("--scene-style", "original", "scene_style"),
        ("--prediction", "sample", "prediction"),
    ],
)
def test_state_of_other_captions_is_refused_with_the_flag_to_continue_it(tmp_path, flag, value,
                                                                         field):  # fmt: skip
    first = Trainer(_args(tmp_path / "a", "--total-steps", "1", flag, value))
    first.train_step()
    first.save_compact(tmp_path / "state")
    with pytest.raises(StateError, match=f"pass {flag} {value} to continue it"):
        Trainer(_args(tmp_path / "b", "--resume-from", str(tmp_path / "state")))
    again = Trainer(_args(tmp_path / "c", flag, value, "--resume-from", str(tmp_path / "state")))
    assert again.step == 1 and getattr(again.config, field) == value


def test_a_run_of_objects_first_captions_trains_on_them(tmp_path):
    again = Trainer(_args(tmp_path / "c", "--caption-order", "objects_first", "--scene-style",
                          "original"))  # fmt: skip
    _, text, batch = again.batch_for(1)
    _, captions = make_batch(clip_indices(1, batch_size=batch), data_seed=0, frames=4,
                             height=32, width=32, caption_order="objects_first",
                             scene_style="original")  # fmt: skip
    assert all(c.startswith("a ") for c in captions)
    _, bold = make_batch(clip_indices(1, batch_size=batch), data_seed=0, frames=4, height=32,
                         width=32, caption_order="objects_first")  # fmt: skip
    assert bold != captions  # the style changes the clips, so the captions too
    want, _ = again.text(captions)
    kept = text.flatten(1).abs().sum(1) > 0  # rows not dropped for guidance
    assert kept.any() and torch.equal(text[kept], want[kept])


def test_init_from_warm_starts_a_new_run_on_other_captions(tmp_path):
    old = Trainer(_args(tmp_path / "a", "--total-steps", "2", "--text-context", "none"))
    old.train_step()
    old.train_step()
    old.save_compact(tmp_path / "old")
    new = Trainer(_args(tmp_path / "b", "--total-steps", "4", "--text-context", "bigram",
                        "--init-from", str(tmp_path / "old"), "--state-out",
                        str(tmp_path / "new")))  # fmt: skip
    assert new.step == 0 and new.samples == 0 and not new.opt.state
    assert new.config.text_context == "bigram"
    for e, m, w in zip(old.ema.parameters(), new.model.parameters(), new.ema.parameters(),
                       strict=True):  # fmt: skip
        # model and EMA start at the old EMA (int8 codes of ema - weights)
        assert torch.equal(m, w) and torch.allclose(m, e, rtol=0, atol=1e-3)
    new.run()
    record = json.loads((tmp_path / "new" / "state.manifest.json").read_text())["trained_by"]
    assert record["init_from"]["steps"] == 2 and record["init_from"]["text_context"] == "none"
    # The next call resumes the new run and still records where it started.
    later = Trainer(_args(tmp_path / "c", "--total-steps", "5", "--resume-from",
                          str(tmp_path / "new")))  # fmt: skip
    later.run()
    ckpt = later.export(tmp_path / "t.safetensors")
    training = load_testbed(ckpt)[2]["training"]
    assert training["steps"] == 5 and training["init_from"]["steps"] == 2
    with pytest.raises(ValueError, match="give one"):
        Trainer(_args(tmp_path / "d", "--init-from", str(tmp_path / "old"), "--resume-from",
                      str(tmp_path / "new")))  # fmt: skip
    with pytest.raises(StateError, match="no training state"):
        Trainer(_args(tmp_path / "e", "--init-from", str(tmp_path / "nowhere")))


def test_init_from_a_checkpoint_file_takes_its_bf16_weights_and_record(tmp_path):
    old = Trainer(_args(tmp_path / "a", "--total-steps", "2"))
    old.train_step()
    old.train_step()
    ckpt = old.export(tmp_path / "old.safetensors")
    new = Trainer(_args(tmp_path / "b", "--total-steps", "3", "--init-from", str(ckpt)))
    assert new.step == 0 and not new.opt.state
    for e, m, w in zip(old.ema.parameters(), new.model.parameters(), new.ema.parameters(),
                       strict=True):  # fmt: skip
        assert torch.equal(m, w) and torch.equal(m, e.to(torch.bfloat16).float())
    origin = new.own_record["init_from"]
    assert origin["steps"] == 2 and origin["checkpoint"].startswith("old.safetensors (sha256 ")
    new.run()
    assert (
        load_testbed(new.export(tmp_path / "new.safetensors"))[2]["training"]["init_from"]["steps"]
        == 2
    )
    # A warm start may switch the head to predicting the clean clip: same weights, new meaning.
    switched = Trainer(_args(tmp_path / "s", "--total-steps", "2", "--prediction", "sample",
                             "--init-from", str(ckpt)))  # fmt: skip
    assert switched.config.prediction == "sample" and switched.step == 0
    assert type(switched.model).__name__ == "SamplePredictingWan"
    head = switched.model.proj_out  # its meaning changed: it starts at zero, the rest is kept
    assert not head.weight.any() and not head.bias.any() and not switched.ema.proj_out.weight.any()
    kept = old.ema.blocks[0].ffn.net[2].weight.to(torch.bfloat16).float()
    assert torch.equal(switched.model.blocks[0].ffn.net[2].weight, kept)
    switched.run()
    _, config, record = load_testbed(switched.export(tmp_path / "x.safetensors"))
    assert config.prediction == "sample" and record["training"]["init_from"]["prediction"] == (
        "velocity"
    )
    (tmp_path / "bad.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(StateError, match="unreadable"):
        Trainer(_args(tmp_path / "c", "--init-from", str(tmp_path / "bad.safetensors")))


def test_init_from_another_pixel_factor_keeps_the_token_grid_and_resamples_the_codec(tmp_path):
    old = Trainer(_args(tmp_path / "a", "--total-steps", "2"))  # tiny: 32 px at pixel factor 2
    old.train_step()
    old.save_compact(tmp_path / "old")
    ckpt = old.export(tmp_path / "old.safetensors")
    for source in (ckpt, tmp_path / "old"):  # a checkpoint file or a compact state
        new = Trainer(_args(tmp_path / "b", "--total-steps", "2", "--pixel-factor", "1",
                            "--init-from", str(source)))  # fmt: skip
        assert (new.config.pixel_factor, new.config.height, new.sizes) == (1, 16, [16])
        assert new.config.token_grid() == old.config.token_grid()
        assert new.model.patch_embedding.weight.shape[1] == 3  # one pixel a latent pixel
        kept = old.ema.blocks[0].ffn.net[2].weight
        assert torch.allclose(new.model.blocks[0].ffn.net[2].weight, kept, rtol=0, atol=1e-2)
        new.run()
    ckpt16 = new.export(tmp_path / "new.safetensors")
    config = load_testbed(ckpt16)[1]
    assert (config.pixel_factor, config.height, config.width) == (1, 16, 16)
    with pytest.raises(StateError, match="--pixel-factor 1"):  # a resume must keep the codec
        Trainer(_args(tmp_path / "b", "--resume"))
    new.save_compact(tmp_path / "s16")
    with pytest.raises(StateError, match="--pixel-factor 1"):
        Trainer(_args(tmp_path / "c", "--resume-from", str(tmp_path / "s16")))
    with pytest.raises(SystemExit):
        main([*_cli(tmp_path / "d"), "--pixel-factor", "0", "--max-minutes", "0"])


def test_init_from_adds_a_position_code_at_zero_gain_and_never_drops_it(tmp_path):
    old = Trainer(_args(tmp_path / "a", "--total-steps", "2"))
    old.train_step()
    old.save_compact(tmp_path / "old")
    ckpt = old.export(tmp_path / "old.safetensors")
    for source in (ckpt, tmp_path / "old"):  # a checkpoint file or a compact state
        new = Trainer(_args(tmp_path / "b", "--total-steps", "2", "--position-code",
                            "sinusoidal", "--init-from", str(source)))  # fmt: skip
        assert new.config.position_code == "sinusoidal"
        gain = new.model.patch_embedding.position_gain
        assert not gain.any() and not new.ema.patch_embedding.position_gain.any()
        kept = old.ema.blocks[0].ffn.net[2].weight
        assert torch.allclose(new.model.blocks[0].ffn.net[2].weight, kept, rtol=0, atol=1e-2)
        plain = build_model(TINY).eval()  # the same weights without the code
        plain.load_state_dict({k: v for k, v in new.model.state_dict().items()
                               if k != "patch_embedding.position_gain"})  # fmt: skip
        x, t, text = torch.randn(1, 12, 4, 16, 16), torch.tensor([700.0]), torch.randn(1, 96, 8)
        with torch.no_grad():  # zero gain: the new model computes what the plain one does
            assert torch.equal(new.model.eval()(x, t, text, return_dict=False)[0],
                               plain(x, t, text, return_dict=False)[0])  # fmt: skip
        new.model.train()
        new.run()
        assert new.model.patch_embedding.position_gain.any()  # it trains
    coded = new.export(tmp_path / "coded.safetensors")
    assert load_testbed(coded)[1].position_code == "sinusoidal"
    with pytest.raises(StateError, match="--position-code sinusoidal"):  # a resume keeps it
        Trainer(_args(tmp_path / "b", "--resume"))
    with pytest.raises(StateError, match="cannot drop it"):  # a warm start too
        Trainer(_args(tmp_path / "c", "--init-from", str(coded)))
    again = Trainer(_args(tmp_path / "d", "--position-code", "sinusoidal", "--init-from",
                          str(coded)))  # fmt: skip
    assert torch.equal(again.model.patch_embedding.position_gain,
                       new.ema.patch_embedding.position_gain.to(torch.bfloat16).float())  # fmt: skip


def test_compact_state_at_step_zero_is_lossless(tmp_path):
    # Nothing lossy at step 0: fp32 weights (the tiny state fits), EMA equal to the weights, no
    # optimizer moments yet; the resumed run then matches an uninterrupted one bit for bit.
    assert main([*_cli(tmp_path / "a"), "--max-minutes", "0", "--state-out",
                 str(tmp_path / "s")]) == 0  # fmt: skip
    straight = Trainer(_args(tmp_path / "b", "--total-steps", "3"))
    straight.run()
    resumed = Trainer(_args(tmp_path / "c", "--total-steps", "3", "--resume-from",
                            str(tmp_path / "s")))  # fmt: skip
    resumed.run()
    for a, b in zip(straight.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(straight.ema.parameters(), resumed.ema.parameters(), strict=True):
        assert torch.equal(a, b)


def test_cli_state_out_carries_log_and_export_record(tmp_path):
    st1, st2 = tmp_path / "st1", tmp_path / "st2"
    assert main([*_cli(tmp_path / "m1"), "--total-steps", "3", "--log-every", "1",
                 "--state-out", str(st1)]) == 0  # fmt: skip
    assert main([*_cli(tmp_path / "m2"), "--total-steps", "5", "--log-every", "1",
                 "--resume-from", str(st1), "--state-out", str(st2)]) == 0  # fmt: skip
    rows = [json.loads(line) for line in (st2 / "log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2, 3, 4, 5]
    manifest = json.loads((st2 / "state.manifest.json").read_text())
    assert manifest["step"] == 5 and manifest["trained_by"]["batch_size_per_rank"] == 2
    # Export on another machine without training: the record describes the run, not this call.
    ckpt = tmp_path / "export" / "testbed.safetensors"
    assert main(["--out", str(tmp_path / "m3"), "--preset", "tiny", "--device", "cpu",
                 "--batch-size", "9", "--resume-from", str(st2), "--max-minutes", "0",
                 "--export", str(ckpt)]) == 0  # fmt: skip
    _model, _config, record = load_testbed(ckpt)
    assert record["training"]["steps"] == 5 and record["training"]["batch_size_per_rank"] == 2
    # --resume prefers the warm machine's OUT/state.pt over --resume-from.
    warm = Trainer(_args(tmp_path / "m2", "--resume", "--resume-from", str(st1)))
    assert warm.step == 5 and [row["step"] for row in warm.history] == [1, 2, 3, 4, 5]


def test_full_testbed_state_fits_the_carry_budget():
    model = build_model(TESTBED)
    assert count_parameters(model) == 9_147_840
    assert compact_weights_codec(model, ema=True) == "fp24"
    size = estimate_state_bytes(model, "fp24")
    assert size <= STATE_BUDGET_BYTES and -(-size // PART_BYTES) == 4  # 53.1 MiB in 4 parts


def test_lr_decay_over_the_last_steps_only():
    base = ["--out", "x", "--warmup", "10", "--total-steps", "110"]
    whole = build_parser().parse_args(base)
    tail = build_parser().parse_args([*base, "--decay-steps", "20"])
    assert lr_at(9, whole) == lr_at(9, tail) == whole.lr
    assert lr_at(60, whole) == pytest.approx(whole.lr * 0.55) and lr_at(60, tail) == tail.lr
    assert lr_at(90, tail) == tail.lr and lr_at(100, tail) == pytest.approx(tail.lr * 0.55)
    assert lr_at(110, whole) == lr_at(110, tail) == pytest.approx(whole.lr * 0.1)


def test_prefetched_batches_train_exactly_as_batches_made_in_the_step(tmp_path):
    from pasa.testbed.train import BatchPrefetcher

    plain = Trainer(_args(tmp_path / "a", "--total-steps", "4", "--prefetch", "off"))
    ahead = Trainer(_args(tmp_path / "b", "--total-steps", "4", "--prefetch", "on"))
    log_plain, log_ahead = plain.run()["log"], ahead.run()["log"]
    assert [r["loss"] for r in log_plain] == [r["loss"] for r in log_ahead]
    for p, q in zip(plain.model.parameters(), ahead.model.parameters(), strict=True):
        assert torch.equal(p, q)
    batches = BatchPrefetcher(plain)
    try:
        for step in (0, 1, 3):  # step 2's prefetched batch is dropped, 3 is made on the spot
            got, want = batches.get(step), plain.batch_for(step)
            assert got[2] == want[2] and torch.equal(got[0], want[0])
            assert torch.equal(got[1], want[1])
    finally:
        batches.close()


def test_stall_watchdog_writes_every_threads_stack_and_nothing_without_a_stall(tmp_path):
    import threading
    import time

    from pasa.testbed.train import StallWatchdog

    quiet = StallWatchdog(tmp_path / "quiet.txt", 5.0)
    quiet.arm()
    quiet.arm()  # re-armed in time: no dump
    quiet.close()
    assert not (tmp_path / "quiet.txt").exists()

    stop = threading.Event()
    worker = threading.Thread(target=stop.wait, name="pasa-batch", daemon=True)
    worker.start()
    dog = StallWatchdog(tmp_path / "stall.txt", 0.2)
    dog.arm()
    time.sleep(0.7)  # a "step" that hangs
    dog.close()
    stop.set()
    text = (tmp_path / "stall.txt").read_text()
    assert "Timeout" in text and text.count("Thread 0x") >= 2  # this thread and the worker
    assert "test_stall_watchdog" in text  # where the main thread stood
    StallWatchdog(tmp_path / "off.txt", 0).arm()
    assert not (tmp_path / "off.txt").exists()


def test_a_run_leaves_no_stall_file(tmp_path):
    out = tmp_path / "run"
    Trainer(_args(out, "--total-steps", "2", "--stall-seconds", "60")).run()
    assert (out / "state.pt").is_file() and not list(out.glob("stall-rank*"))


def test_pure_noise_share_sets_that_share_of_times_to_one_and_nothing_else():
    from pasa.testbed.flow import sample_time

    def draw(share):
        return sample_time(4000, generator=torch.Generator().manual_seed(3), shift=3.0,
                           pure_noise_share=share)  # fmt: skip

    plain, some = draw(0.0), draw(0.2)
    assert torch.equal(plain, sample_time(4000, generator=torch.Generator().manual_seed(3),
                                          shift=3.0))  # fmt: skip
    assert (plain < 1).all() and abs(float((some == 1).float().mean()) - 0.2) < 0.03
    assert torch.equal(some[some < 1], plain[some < 1])  # the other times are the same draws
    assert (draw(1.0) == 1).all()
    with pytest.raises(ValueError, match="pure_noise_share"):
        draw(1.5)


def test_trainer_records_its_pure_noise_share_and_refuses_one_out_of_range(tmp_path, capsys):
    trainer = Trainer(_args(tmp_path / "a", "--total-steps", "1", "--pure-noise-share", "0.5"))
    assert trainer._train_record()["pure_noise_share"] == 0.5
    assert trainer.train_step() > 0
    with pytest.raises(SystemExit):
        main([*_cli(tmp_path / "b"), "--pure-noise-share", "2"])
    assert "--pure-noise-share must be in [0, 1]" in capsys.readouterr().err
