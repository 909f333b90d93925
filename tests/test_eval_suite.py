"""``pasa eval`` on a tiny random testbed checkpoint: one caption x one seed x one density.

Sizes: the tiny model (2 layers, 2 heads) on 8 frames of 64 x 64 pixels, an 8 x 16 x 16 token
grid = 16 PASA blocks of 128 tokens; five Euler steps, so the Sparse-VideoGen-style warm-up is
one dense step and the rest can meet mean density 0.25.
"""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("diffusers")

from pasa.config import PASAConfig
from pasa.eval.generate import JaccardMeter, strategy_hooks
from pasa.eval.strategies import STRATEGIES
from pasa.eval.suite import main, run_suite
from pasa.layout import make_layout

STRATEGY_NAMES = ["pasa", "static_window", "sparse_videogen"]


def test_suite_writes_results(checkpoint, tmp_path):
    md = tmp_path / "docs" / "results.md"
    result = run_suite(
        checkpoint, captions=1, seeds=[0], densities=[0.25], strategies=STRATEGY_NAMES,
        steps=5, size=64, frames=8, out_dir=tmp_path / "out", results_md=md, device="cpu",
        progress=False,
    )  # fmt: skip
    data = json.loads(result.files["results"].read_text())
    assert [r["strategy"] for r in data["runs"]] == STRATEGY_NAMES
    assert len(data["dense"]) == 1 and data["dense"][0]["seed"] == 0
    assert data["settings"]["commit"]  # PASA_COMMIT or the repository's HEAD
    assert data["settings"]["scene style"] == "bold"  # the checkpoint's own (TINY's)
    for row in data["runs"]:
        m = row["metrics"]
        assert m["psnr"] > 0 and -1 <= m["ssim"] <= 1
        assert 0 < m["mean_density"] < 1 and len(m["step_densities"]) == 5
        assert m["plan_jaccard"] is not None and 0 <= m["plan_jaccard"] <= 1
        assert m["seconds"] > 0 and m["metric_seconds"] > 0  # sampling, then its metrics
    pair = data["dense"][0]["pair_seconds"]  # the pair's wall time holds every run's and dense's
    runs = sum(r["metrics"]["seconds"] + r["metrics"]["metric_seconds"] for r in data["runs"])
    assert pair >= runs + data["dense"][0]["seconds"] - 0.01
    by_name = {r["strategy"]: r["metrics"] for r in data["runs"]}
    profile = data["settings"]["budget profile"]  # PASA allocates from one calibration run
    assert profile["file"] == "budget_profile.json" and len(profile["curvatures"]) == 5
    assert (tmp_path / "out" / "budget_profile.json").is_file()
    assert profile["curvatures"][0] is None and all(k > 0 for k in profile["curvatures"][1:])
    assert by_name["static_window"]["plan_jaccard"] == 1.0  # the same plan at every step
    assert by_name["sparse_videogen"]["step_densities"][0] == 1.0  # the dense warm-up
    assert [s["strategy"] for s in data["summary"]] == STRATEGY_NAMES
    for key in ("table", "psnr_plot", "flicker_plot", "tradeoff_plot", "markdown"):
        assert result.files[key].is_file()
    page = md.read_text()
    assert "PASA" in page and "(../out/psnr_vs_density.png)" in page
    assert page.count("\n| ") >= 3 + len(STRATEGY_NAMES)


def test_scene_style_draws_the_captions_in_another_style(checkpoint, tmp_path, capsys):
    from pasa.eval.generate import eval_captions

    result = run_suite(
        checkpoint, captions=1, seeds=[0], densities=[0.25], strategies=["static_window"],
        steps=2, size=64, frames=8, out_dir=tmp_path / "out", device="cpu", progress=False,
        scene_style="few",
    )  # fmt: skip
    data = json.loads(result.files["results"].read_text())
    assert data["captions"] == eval_captions(1, caption_order="scene_first", scene_style="few")
    assert data["settings"]["scene style"] == "few"
    with pytest.raises(SystemExit):  # argparse names the choices
        main(["--checkpoint", str(checkpoint), "--scene-style", "busy"])
    assert "--scene-style" in capsys.readouterr().err


def test_unreachable_density_is_skipped_and_runs_resume(checkpoint, tmp_path, capsys):
    args = [
        "--checkpoint", str(checkpoint), "--caption", "a red circle moves left.",
        "--densities", "0.1", "--strategies", "sparse_videogen", "--steps", "5",
        "--size", "64", "--frames", "8", "--out", str(tmp_path), "--device", "cpu",
        "--no-progress",
    ]  # fmt: skip
    assert main([*args, "--seeds", "0"]) == 0
    data = json.loads((tmp_path / "results.json").read_text())
    (row,) = data["runs"]
    assert "warm-up" in row["skipped"] and "metrics" not in row
    assert "skipped" in (tmp_path / "results_table.md").read_text()
    assert "skipped" in capsys.readouterr().out

    data["dense"][0]["flicker"] = -1.0  # marks the kept pair
    (tmp_path / "results.json").write_text(json.dumps(data))
    assert main([*args, "--seeds", "0", "3", "--resume"]) == 0
    data = json.loads((tmp_path / "results.json").read_text())
    assert [(d["seed"], d["flicker"] == -1.0) for d in data["dense"]] == [(0, True), (3, False)]
    assert [r["seed"] for r in data["runs"]] == [0, 3]
    with pytest.raises(ValueError, match=r"cannot resume .* steps differ"):
        run_suite(
            checkpoint, captions=["a red circle moves left."], seeds=[0], densities=[0.1],
            strategies=["sparse_videogen"], steps=6, size=64, frames=8, out_dir=tmp_path,
            device="cpu", progress=False, resume=True,
        )  # fmt: skip


def test_resume_reuses_the_calibration_profile(checkpoint, tmp_path, monkeypatch):
    import pasa.eval.suite as suite

    kw = dict(
        captions=["a red circle moves left."], densities=[0.25], strategies=["pasa"], steps=4,
        size=64, frames=8, out_dir=tmp_path, device="cpu", progress=False,
    )  # fmt: skip
    first = run_suite(checkpoint, seeds=[0], **kw)
    recorded = (tmp_path / "budget_profile.json").read_text()

    def must_not_calibrate(*args, **kwargs):
        raise AssertionError("resume recorded the profile again")

    monkeypatch.setattr(suite, "calibrate_profile", must_not_calibrate)
    second = run_suite(checkpoint, seeds=[0, 3], resume=True, **kw)
    assert (tmp_path / "budget_profile.json").read_text() == recorded
    assert (
        second.results["settings"]["budget profile"] == first.results["settings"]["budget profile"]
    )
    assert [r["seed"] for r in second.results["runs"]] == [0, 3]


def test_missing_checkpoint_is_a_clear_error(tmp_path, capsys):
    assert main(["--checkpoint", str(tmp_path / "no.safetensors"), "--out", str(tmp_path)]) == 2
    assert "not found" in capsys.readouterr().err


def test_strategy_hooks(tmp_path):
    with pytest.raises(ValueError, match="profile_path"):
        strategy_hooks(STRATEGIES["pasa"], 0.15, 20)  # calibrated: needs the recorded profile
    pasa = strategy_hooks(STRATEGIES["pasa"], 0.15, 20, tmp_path / "p.json")
    assert pasa.budget is None and pasa.config.budget == "profile"
    assert pasa.config.profile_path == str(tmp_path / "p.json")
    assert pasa.config.selection == "top_k" and pasa.config == PASAConfig(
        budget="profile", profile_path=str(tmp_path / "p.json")
    )  # the defaults
    fixed = strategy_hooks(STRATEGIES["pasa_no_curvature"], 0.15, 20, tmp_path / "p.json")
    assert fixed.config.budget == "fixed" and fixed.config.profile_path is None
    warm = strategy_hooks(STRATEGIES["sparse_videogen"], 0.25, 20)
    assert warm.budget.num_steps == 20 and warm.config.temperature == 0.0
    with pytest.raises(ValueError, match="warm-up"):
        strategy_hooks(STRATEGIES["sparse_videogen"], 0.15, 20)
    with pytest.raises(ValueError, match="dense"):
        strategy_hooks(STRATEGIES["dense"], 0.15, 20)
    window = strategy_hooks(STRATEGIES["static_window"], 0.25, 20).plan_provider
    layout = make_layout((8, 16, 16))
    q = torch.zeros(2, layout.seq_len, 3, 8)
    plan = window(layout, 0, 0, q, q)
    assert plan.kv_counts.shape == (2, 3, 16) and window(layout, 5, 1, q, q) is plan


def test_jaccard_meter_compares_consecutive_sparse_steps():
    from pasa.plan import BlockPlan

    layout = make_layout((8, 16, 16))
    eye = torch.eye(16, dtype=torch.bool).expand(1, 1, 16, 16)
    a = BlockPlan.from_dense_mask(eye.contiguous(), layout)
    b = BlockPlan.from_dense_mask((eye | eye.roll(1, -1)).contiguous(), layout)
    meter = JaccardMeter()
    meter(0, 0, 0, a)
    meter(0, 0, 0, b)  # second call of step 0 (uncond under CFG): not a new step
    meter(2, 0, 0, b)  # step 1 was dense
    meter(3, 0, 0, b)
    assert meter.values == [0.5, 1.0] and meter.mean == 0.75


def test_tradeoff_plot_merges_results_files_and_names_a_bad_one(tmp_path):
    """``python -m pasa.eval.report`` draws the runs of several results files; a strategy in
    two files keeps the first file's runs; a file that is not suite results exits naming it."""
    from pasa.eval.report import main as report_main
    from pasa.eval.report import merged_runs

    def run(strategy, density, psnr):
        metrics = {"psnr": psnr, "flicker_excess": 0.01, "mean_density": density}
        return {"strategy": strategy, "density": density, "caption": 0, "seed": 0,
                "metrics": metrics}  # fmt: skip

    first = tmp_path / "a.json"
    second = tmp_path / "b.json"
    first.write_text(json.dumps({"runs": [run("pasa", 0.1, 15.0), run("pasa", 0.25, 20.0)]}))
    second.write_text(
        json.dumps({"runs": [run("pasa", 0.1, 1.0), run("static_window", 0.1, 13.0)]})
    )
    runs = merged_runs([first, second])
    assert [(r["strategy"], r["metrics"]["psnr"]) for r in runs] == [
        ("pasa", 15.0), ("pasa", 20.0), ("static_window", 13.0)
    ]  # fmt: skip
    only = merged_runs([second, first], only=["pasa"])
    assert [(r["strategy"], r["metrics"]["psnr"]) for r in only] == [("pasa", 1.0)]
    out = tmp_path / "tradeoff.png"
    assert report_main([str(first), str(second), "--tradeoff", str(out)]) == 0
    assert (
        report_main([str(first), str(second), "--tradeoff", str(out), "--strategies", "pasa"]) == 0
    )
    assert out.read_bytes()[:4] == b"\x89PNG"
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(SystemExit, match=r"bad\.json: not a suite results file"):
        report_main([str(bad), "--tradeoff", str(out)])


def test_suite_over_two_devices_matches_one(checkpoint, tmp_path):
    """Two processes (both on the CPU here), one calibration profile: the merged results are
    those of a one-device run, pair for pair, and a resumed run keeps every finished pair."""
    from pasa.eval.parallel import deal, run_suite_parallel

    kw = dict(
        captions=["a red circle moves left.", "a blue square on a green background."],
        seeds=[0, 5], densities=[0.25], strategies=["pasa", "static_window"], steps=4,
        size=64, frames=8, progress=False,
    )  # fmt: skip
    one = run_suite(checkpoint, out_dir=tmp_path / "one", device="cpu", **kw)
    two = run_suite_parallel(checkpoint, devices=["cpu", "cpu"], out_dir=tmp_path / "two", **kw)
    assert deal([(0, 0), (0, 5), (1, 0), (1, 5)], 2) == [[(0, 0), (1, 0)], [(0, 5), (1, 5)]]
    a, b = one.results, two.results
    assert [(d["caption"], d["seed"]) for d in b["dense"]] == [(0, 0), (0, 5), (1, 0), (1, 5)]
    assert [(d["caption"], d["seed"]) for d in a["dense"]] == [(0, 0), (0, 5), (1, 0), (1, 5)]
    for x, y in zip(a["runs"], b["runs"], strict=True):
        assert (x["caption"], x["seed"], x["strategy"]) == (y["caption"], y["seed"], y["strategy"])
        assert x["metrics"]["psnr"] == pytest.approx(y["metrics"]["psnr"], abs=1e-6)
        assert x["metrics"]["step_densities"] == y["metrics"]["step_densities"]
    assert b["settings"]["budget profile"] == a["settings"]["budget profile"]
    assert b["settings"]["device"] == "cpu x 2"
    assert (tmp_path / "two" / "shards" / "1" / "results.json").is_file()
    for key in ("table", "markdown", "psnr_plot"):
        assert two.files[key].is_file()
    merged = json.loads((tmp_path / "two" / "results.json").read_text())
    assert merged["summary"] == b["summary"]

    # a cut-off run: share 1 lost its results; resuming on one extra device redoes only those
    import shutil

    shutil.rmtree(tmp_path / "two" / "shards" / "1")
    (tmp_path / "two" / "results.json").unlink()
    again = run_suite_parallel(
        checkpoint, devices=["cpu", "cpu", "cpu"], out_dir=tmp_path / "two", resume=True, **kw
    )
    assert [(d["caption"], d["seed"]) for d in again.results["dense"]] == [
        (0, 0), (0, 5), (1, 0), (1, 5)
    ]  # fmt: skip
    assert len(again.results["runs"]) == 8
    redone = json.loads((tmp_path / "two" / "shards" / "0" / "results.json").read_text())
    assert [(d["caption"], d["seed"]) for d in redone["dense"]] == [(0, 0), (1, 0), (0, 5)]


def test_suite_devices_and_profile_errors(checkpoint, tmp_path, capsys):
    from pasa.eval.parallel import merge_results, resolve_devices

    assert resolve_devices(["cpu", "cuda:1"]) == ["cpu", "cuda:1"]
    args = ["--checkpoint", str(checkpoint), "--out", str(tmp_path), "--no-progress"]
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            resolve_devices(["all"])
        assert main([*args, "--devices", "all"]) == 2
        assert "no CUDA device" in capsys.readouterr().err
    assert main([*args, "--budget-profile", str(tmp_path / "none.json"), "--device", "cpu"]) == 2
    assert "budget profile not found" in capsys.readouterr().err
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "results.json").write_text("{")
    with pytest.raises(ValueError, match="unreadable"):
        merge_results([tmp_path / "a" / "results.json"], ["cpu"])
