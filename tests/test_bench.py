"""The benchmark harness: interleaved timing, figures, failures reported in their row, the CLI front end."""
import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fxforge.bench import (PEERS, SELF_CHECK, Row, System, bench_model, build_all, caption, fxforge_system,
                           fxforge_systems, markdown, outputs, ratios_resolved, run_facts, self_check)
from fxforge.cli import main
from models import ZOO

ROOT = Path(__file__).parent.parent


def _broken(model, example, calib):
    raise RuntimeError("cannot build this one")


def test_rows_have_ratios_sizes_and_errors():
    model, example = ZOO["convbnrelu"]()
    systems = [PEERS[0], System("fxforge fuse → torchscript", fxforge_system(["fuse"], "torchscript")),
               System("broken", _broken, peer=True)]
    rows = bench_model("convbnrelu", model, example, [], systems, rounds=2, sample_ms=2, progress=lambda s: None)
    eager, fx, broken = rows
    assert eager.vs_eager == 1.0 and eager.max_rel_err == 0 and eager.params > fx.params  # BN folded away
    assert fx.median_ms > 0 and fx.min_ms <= fx.median_ms <= fx.max_ms and fx.max_rel_err < 1e-5
    assert fx.flops > 0 and fx.gflops > 0 and 0 < fx.peak_pct < 100 and fx.compile_s > 0
    assert broken.error == "RuntimeError: cannot build this one" and broken.median_ms is None
    table = markdown(rows)
    assert table.count("\n") == 4 and "failed: RuntimeError" in table and "× eager" in table
    low, high = fx.vs_best_peer_interval  # the per-round ratios' median and its interval, in the table
    assert low <= fx.vs_best_peer <= high and f"{fx.vs_best_peer:.2f}× ({low:.2f}–{high:.2f})" in table


def test_held_out_data_gives_quality_columns_and_the_self_check_rebuilds_ort_fp32_last():
    model, example = ZOO["convbnrelu"]()
    held_out = [(torch.randn(*example[0].shape),) for _ in range(3)]
    systems = [PEERS[0], next(s for s in PEERS if s.name == "ort fp32"),
               System("fxforge fuse → onnx", fxforge_system(["fuse"], "onnx"))]
    rows = bench_model("convbnrelu", model, example, [], systems, rounds=2, sample_ms=2, progress=lambda s: None,
                       held_out=held_out, rotate=1, self_check=True)
    assert [r.system for r in rows] == ["eager", "ort fp32", "fxforge fuse → onnx", SELF_CHECK]
    for r in rows:
        assert r.error is None and r.top1 == 1.0 and r.cos_min > 0.9999 and r.cos_mean > 0.9999
    assert "top-1 agreement" in markdown(rows)
    verdict = self_check(rows)
    assert verdict.startswith("self-check convbnrelu batch 2: ort fp32 built early")
    assert verdict.endswith("within noise") or "NOISY" in verdict


def _pair(early: list[float], last: list[float]) -> list[Row]:
    return [Row("m", 1, name, True, statistics.median(t), min(t), max(t), samples_ms=t)
            for name, t in (("ort fp32", early), (SELF_CHECK, last))]


@pytest.mark.parametrize("early, last, verdict", [
    # load drifting between rounds (samples spread 2.5x) but the same in both rows' samples of a round
    ([5.0, 8.0, 12.5, 5.2, 6.0, 9.0, 5.1], [5.1, 8.1, 12.4, 5.2, 6.1, 8.9, 5.0], "within noise"),
    # the same graph 30 % slower in every round: a real gap
    ([5.0, 5.1, 5.0, 5.2, 5.0, 5.1, 5.0], [6.5, 6.6, 6.5, 6.7, 6.5, 6.6, 6.5], "the same graph timed apart"),
    # no pairing left: the per-round ratios themselves scatter over ±40 %
    ([5.0, 7.0, 5.0, 7.0, 5.0, 7.0, 5.0], [7.0, 5.0, 7.0, 5.0, 7.0, 5.0, 5.0], "rounds spread over ±20%"),
])
def test_the_self_check_pairs_the_two_rows_round_by_round(early, last, verdict):
    assert verdict in self_check(_pair(early, last))


def test_ratios_are_resolved_once_every_fxforge_row_and_the_self_check_pair_is_within_5_percent():
    rows = {n: Row("m", 1, n, peer) for n, peer in
            [("eager", True), ("ort fp32", True), (SELF_CHECK, False), ("fxforge int8 → onnx", False)]}
    steady = [5.0, 5.1, 5.0, 5.2, 5.0, 5.1, 5.0]
    settled = ratios_resolved(rows)
    samples = {"eager": [20.0] * 7, "ort fp32": steady, SELF_CHECK: steady, "fxforge int8 → onnx": [3.0] * 7}
    assert settled(samples)
    # one stalled round of seven decides the interval: the fxforge row's ratio to ORT fp32 is unresolved
    assert not settled({**samples, "fxforge int8 → onnx": [3.0] * 6 + [6.0]})
    # so is the self-check pair's; eager's own ratio (a peer) is not what the table resolves
    assert not settled({**samples, SELF_CHECK: [*steady[:6], 7.0]})
    assert settled({**samples, "eager": [20.0] * 6 + [40.0]})
    # more rounds: the 90 % interval drops the stalled extremes
    assert settled({**samples, "ort fp32": steady * 2, SELF_CHECK: steady * 2, "eager": [20.0] * 14,
                    "fxforge int8 → onnx": [3.0] * 13 + [6.0]})


def test_systems_without_flops_of_their_own_get_the_models_not_a_compressed_systems():
    """Eager's FLOPs (and its GFLOP/s) were those of the first fxforge row, a compressed graph's when it came first.
    Its params and bytes were counted by a rule of the benchmark's own (``parameters()``, buffers for bytes) beside
    the report's: they are the report's input row, as the FLOPs are."""
    from fxforge.bench import Built, Row, fill_figures
    built = {"fxforge low_rank": Built(lambda xs: xs, 1.0, 300, 1200, flops=400, model_flops=1000,
                                       model_size=(900, 3600)),
             "eager": Built(lambda xs: xs, 0.0)}
    rows = [Row("mlp", 8, "fxforge low_rank", False), Row("mlp", 8, "eager", True)]
    fill_figures(rows, built)
    assert [r.flops for r in rows] == [400, 1000]
    assert [(r.params, r.bytes) for r in rows] == [(300, 1200), (900, 3600)]


def test_every_ort_session_gets_the_same_options():
    import onnxruntime as ort
    model, example = ZOO["mlp"]()
    systems = [next(s for s in PEERS if s.name == "ort fp32"), System("fx", fxforge_system(["fuse"], "onnx"))]
    built, _ = build_all("mlp", model, example, [], systems, progress=lambda s: None)
    assert built["fx"].info["ort_options"]["intra_op_num_threads"] == torch.get_num_threads()
    peer = built["ort fp32"].run.__closure__  # the peer's runner closes over its session
    session = next(c.cell_contents for c in peer if isinstance(c.cell_contents, ort.InferenceSession))
    assert session.get_session_options().intra_op_num_threads == torch.get_num_threads()


def test_ort_systems_make_fresh_sessions_of_the_same_model_for_each_sample():
    import onnxruntime as ort
    model, example = ZOO["mlp"]()
    systems = [PEERS[0], next(s for s in PEERS if s.name == "ort fp32"), System("fx", fxforge_system(["fuse"], "onnx"))]
    built, _ = build_all("mlp", model, example, [], systems, progress=lambda s: None)
    assert built["eager"].rebuild is None  # nothing to rebuild: timed as built
    sessions = lambda run: [c.cell_contents for c in run.__closure__ or ()  # noqa: E731
                            if isinstance(c.cell_contents, ort.InferenceSession)]
    (first,) = sessions(built["ort fp32"].run)
    (again,) = sessions(built["ort fp32"].rebuild())
    assert again is not first and again.get_session_options().intra_op_num_threads == torch.get_num_threads()
    for name in ("ort fp32", "fx"):
        fresh = built[name].rebuild()
        torch.testing.assert_close(outputs(fresh(example)), outputs(built[name].run(example)), rtol=0, atol=0)


def test_tuned_tvm_row_without_a_stored_database_says_so(tmp_path):
    pytest.importorskip("tvm")
    model, example = ZOO["mlp"]()
    tuned = [s for s in fxforge_systems(tuning_db=tmp_path / "none") if s.name == "fxforge fuse → tvm (tuned)"]
    assert len(tuned) == 1 and len(fxforge_systems()) == len(fxforge_systems(tuning_db=tmp_path)) - 2
    (row,) = bench_model("mlp", model, example, [], tuned, rounds=1, sample_ms=2, progress=lambda s: None)
    assert row.error.startswith("TuningError: trials=0 applies a tuning database, but") and row.median_ms is None


def test_stored_tuning_database_schedules_every_minilm_kernel():
    """The database benchmarks/run.py compiles its tuned TVM rows against (for this machine's CPU and TVM, where one
    is stored): every task of the trained MiniLM at 1 × 128, a shape it was tuned for, is found and none is tuned
    again; each found task's best record is no slower than its measured default."""
    pytest.importorskip("tvm")
    import fxforge
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from run import TRAINED, stored_tuning_db
    db = stored_tuning_db()
    if not db.exists():
        pytest.skip(f"no stored tuning database for this machine's target ({db.name})")
    model, example, _ = TRAINED["all_minilm_l6_v2_1x128"][0]()
    cm = fxforge.compile(model, example, passes=["fuse"], backend="tvm", tune={"trials": 0, "db": str(db)},
                         measure_latency=False)
    stats = cm.report.meta["tuning"]
    assert (stats["reused_tasks"], stats["untuned_tasks"], stats["trials"]) == (stats["tasks"], 0, 0)
    found = [t for t in stats["per_task"] if t["best_us"] is not None]  # an embedding's take has no record
    assert len(found) >= stats["tasks"] - 2 and all(t["best_us"] <= t["default_us"] for t in found)
    assert stats["scheduled_functions"] >= len(found)


def test_cli_bench_prints_a_table(capsys):
    assert main(["bench", "models:Mlp", "--input-shape", "4,32", "--rounds", "1",
                 "--systems", "eager;fxforge fuse → torchscript"]) == 0
    out = capsys.readouterr().out
    assert "| models:Mlp | 4 | fxforge fuse → torchscript |" in out
    assert main(["bench", "models:Mlp", "--input-shape", "4,32", "--systems", "eagerr"]) == 2


def _run_benchmark(out: Path, *extra: str) -> dict:
    cmd = [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--out", str(out), *extra]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stderr[-2000:]
    (md,) = out.glob("*.md")
    assert "| mobilenet_v2 | 1 | eager |" in md.read_text() or "| mobilenet_v2_imagenet | 1 | eager |" in md.read_text()
    assert (out / "latency_vs_error.png").stat().st_size > 1000 and (out / "speedup.png").exists()
    return json.loads(next(out.glob("*.json")).read_text())


def test_quick_benchmark_smoke(tmp_path):
    """CI's smoke run of benchmarks/run.py: quick mode on one CNN, one round, two systems."""
    data = _run_benchmark(tmp_path, "--models", "mobilenet_v2", "--batches", "1", "--rounds", "1",
                          "--systems", "eager;fxforge fuse → torchscript")
    assert [r["system"] for r in data["rows"]] == ["eager", "fxforge fuse → torchscript"]
    assert all(r["error"] is None and r["median_ms"] > 0 for r in data["rows"])


def test_compile_time_benchmark_times_one_compile_in_a_fresh_process_with_its_stages():
    """benchmarks/compile_time.py's unit of work: one compile in a child process, its seconds and fxforge's stages."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / "compile_time.py"), "--child", "resnet18",
           "fxforge fuse → torchscript", "1"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["s"] > 0
    assert set(result["stages"]) == {"trace", "passes", "backend", "artifact_check"}
    assert sum(result["stages"].values()) <= result["s"] + 0.05  # stages are rounded to 0.01 s



def test_int8_floor_grids_replace_every_activation_pair_and_clip_only_past_their_ranges():
    """benchmarks/int8_floor.py's graphs: per-channel grids spanning the data converge on the float-activation
    graph as bits grow; ranges from other data clip what passes them."""
    import math

    import fxforge
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from int8_floor import activation_pairs, channel_ranges, replaced
    model, (example,) = ZOO["convbnrelu"]()
    torch.manual_seed(1)
    calibration = [(torch.randn_like(example),) for _ in range(4)]
    gm = fxforge.compile(model, (example,), passes=["fuse", "insert_qdq", "calibrate"], backend="eager",
                         calibration=calibration, max_drop=math.inf).graph_module
    fresh = (3 * torch.randn_like(example),)  # values past the calibration ranges
    float_acts = replaced(gm, None)
    assert len(activation_pairs(gm)) >= 3 and not activation_pairs(float_acts)
    ref = float_acts(*fresh)[0]

    def error(graph):
        return float((graph(*fresh)[0] - ref).norm() / ref.norm())
    spanning = channel_ranges(gm, [*calibration, fresh])
    e8, e16 = error(replaced(gm, spanning, 8)), error(replaced(gm, spanning, 16))
    assert e16 < 1e-3 and e8 > 30 * e16  # 256× finer steps
    assert error(replaced(gm, channel_ranges(gm, calibration), 16)) > 30 * e16

@pytest.mark.slow
def test_full_quick_benchmark(tmp_path):
    data = _run_benchmark(tmp_path)
    assert {r["model"] for r in data["trained"]} == {"mobilenet_v2_imagenet", "all_minilm_l6_v2",
                                                    "all_minilm_l6_v2_1x128", "digits_cnn_wide"}
    assert all(r["cos_mean"] is not None for r in data["trained"] if r["error"] is None) and data["self_checks"]


def test_cli_bench_lists_without_a_model_names_what_it_skips_and_writes_plots(capsys, tmp_path):
    assert main(["bench", "--list"]) == 0
    assert "fxforge int8 → onnx" in capsys.readouterr().out
    assert main(["bench", "models:Mlp", "--input-shape", "4,32", "--systems", "eager;fxforge int8 -> onnx"]) == 2
    assert "need calibration data: give --calibration" in capsys.readouterr().err
    assert main(["bench", "models:Mlp", "--input-shape", "4,32", "--rounds", "1", "--out", str(tmp_path),
                 "--systems", "eager;fxforge fuse -> torchscript;tvm untuned"]) == 0
    captured = capsys.readouterr()
    assert "| models:Mlp | 4 | fxforge fuse → torchscript |" in captured.out  # ASCII -> accepted
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [r["system"] for r in rows] == ["eager", "tvm untuned", "fxforge fuse → torchscript"] or \
        {r["system"] for r in rows} == {"eager", "tvm untuned", "fxforge fuse → torchscript"}
    for name in ("latency_vs_error.png", "speedup.png"):
        assert (tmp_path / name).stat().st_size > 5000
    assert main(["bench", "models:Mlp"]) == 2
    assert "needs MODULE:FACTORY and --input-shape" in capsys.readouterr().err
    assert main(["bench", "models:Mlp", "--input-shape", "4,32", "--out", str(tmp_path / "speedup.png")]) == 2
    assert capsys.readouterr().err.strip().endswith("speedup.png is a file, not a directory")


def test_cli_bench_without_calibration_skips_every_system_whose_pipeline_reads_it_and_says_why(capsys, monkeypatch):
    """Which systems need calibration data is asked of their pipelines' passes, not guessed from their names:
    ``compress`` (low_rank) and ``int8_dynamic`` (smooth_quant) need it too; ORT's dynamic quantization does not."""
    import fxforge.bench
    assert main(["bench", "models:Mlp", "--input-shape", "4,32", "--systems", "eager;fxforge compress -> onnx"]) == 2
    assert ("system(s) ['fxforge compress → onnx'] need calibration data: give --calibration"
            in capsys.readouterr().err)
    timed = []
    monkeypatch.setattr(fxforge.bench, "bench_model", lambda name, model, example, calib, systems, **k:
                        timed.extend(s.name for s in systems) or [])
    assert main(["bench", "models:Mlp", "--input-shape", "4,32"]) == 0
    note = capsys.readouterr().err
    skipped = {"ort int8 (quantize_static)", "fxforge int8 → onnx", "fxforge int8 → onnx (static batch)",
               "fxforge int8 → onnx (max_drop 0.03)", "fxforge int8_dynamic → onnx", "fxforge compress → onnx",
               "fxforge compress+int8 → onnx", "fxforge all → onnx"}
    assert note.startswith(f"note: skipping {len(skipped)} system(s) that read calibration data, without "
                           "--calibration: ")
    assert "fxforge compress → onnx (low_rank)" in note and "fxforge int8_dynamic → onnx (smooth_quant)" in note
    assert "ort int8 (quantize_static) (quantize_static)" in note
    assert timed and not skipped & set(timed) and "ort int8 (quantize_dynamic)" in timed
    assert set(timed) | skipped == {s.name for s in PEERS + fxforge_systems()}


def test_the_caption_names_machine_threads_and_date_or_says_they_were_not_recorded():
    facts = run_facts()
    assert caption(facts) == f"{facts['machine']}, {torch.get_num_threads()} threads, {facts['date']}"
    assert caption({"machine": "amd-epyc-2c"}) == "amd-epyc-2c, threads not recorded, date not recorded"


def test_benchmark_plots_are_redrawn_from_a_results_json_without_timing(tmp_path):
    results = ROOT / "benchmarks" / "results" / "amd-epyc-2c.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--replot", str(results),
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "wrote" in done.stdout and "self-check" not in done.stdout  # nothing was timed
    for name in ("latency_vs_error.png", "speedup.png"):
        assert (tmp_path / name).stat().st_size > 5000


def test_validation_reaches_only_the_budgeted_systems_and_their_budget():
    """build_all hands ``validation`` to systems marked budgeted (fxforge's int8 rows), whose accuracy budget then
    measures on it instead of holding out calibration batches; the other systems are built as before."""
    model, example = ZOO["convbnrelu"]()
    calib = [(torch.randn_like(example[0]),) for _ in range(4)]
    validation = [(torch.randn_like(example[0]),) for _ in range(2)]
    seen = {}

    def spy(name):
        def build(model, example, calib, **more):
            seen[name] = more
            return PEERS[0].build(model, example, calib)
        return build

    systems = [System("plain", spy("plain")), System("budgeted", spy("budgeted"), budgeted=True)]
    build_all("convbnrelu", model, example, calib, systems, progress=lambda s: None, validation=validation)
    assert seen == {"plain": {}, "budgeted": {"validation": validation}}
    assert {s.name for s in fxforge_systems() if s.budgeted} == {
        "fxforge int8 → onnx", "fxforge int8 → onnx (static batch)", "fxforge int8 → onnx (max_drop 0.03)",
        "fxforge int8_dynamic → onnx", "fxforge compress+int8 → onnx", "fxforge all → onnx"}
    import fxforge
    captured = {}
    real = fxforge.compile
    try:
        fxforge.compile = lambda *a, **k: captured.update(k) or real(*a, **k)
        fxforge_system(["int8"], "eager")(model, example, calib, validation=validation)
    finally:
        fxforge.compile = real
    assert captured["validation"] is validation and captured["calibration"] is calib


def test_a_failing_system_gets_a_row_with_the_first_line_of_its_error_without_colour_codes():
    def build(model, example, calib):
        raise RuntimeError("\n\x1b[96mThis is step 3/3\x1b[0m of exporting the model.\nTraceback details")

    model, example = ZOO["mlp"]()
    _, rows = build_all("mlp", model, example, [], [System("broken", build)], progress=lambda _: None)
    assert rows["broken"].error == "RuntimeError: This is step 3/3 of exporting the model."


def test_plots_name_failed_systems_and_colour_each_system_alike_in_both(tmp_path, monkeypatch):
    """A failed system is named under its panel and in the legend (it has no point to draw); each system keeps
    one colour in both plots; the caption is the figure's title; an error of 0 sits at the labelled 1e-9; the
    error bars span min to max."""
    import matplotlib.figure
    from fxforge.bench import ZERO_ERROR, Row, plot
    figures = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: figures.append(fig))
    rows = [Row("m", 1, "eager", True, 2.0, 1.9, 2.2, 1.0, max_rel_err=0.0),
            Row("m", 1, "fxforge fuse → onnx", False, 1.0, 0.9, 1.1, 2.0, max_rel_err=1e-6),
            Row("m", 1, "ort fp32", True, error="ConversionError: no")]
    plot(rows, tmp_path, "cpu-2c, 2 threads, 2026-12-02")
    scatter, bars = figures
    assert scatter._suptitle.get_text() == "cpu-2c, 2 threads, 2026-12-02"
    assert scatter.axes[0].get_xlabel().endswith("\nfailed: ort fp32")
    legends = [{t.get_text(): h for t, h in zip(f.legends[0].get_texts(), f.legends[0].legend_handles)}
               for f in figures]
    assert "ort fp32 (failed)" in legends[0] and "ort fp32 (failed)" in legends[1]
    colour = lambda h: tuple(h.get_color() if hasattr(h, "get_marker") else h.get_facecolor())[:3]
    for name in ("fxforge fuse → onnx", "ort fp32 (failed)"):
        assert colour(legends[0][name]) == colour(legends[1][name])
    ax = scatter.axes[0]  # an error of exactly 0 is drawn where the axis says so, and labelled "0"
    assert "0 drawn at 1e-9" in ax.get_xlabel() and [(t.get_text(), t.xy[0]) for t in ax.texts] == [("0", ZERO_ERROR)]
    spans = {tuple(c.lines[0].get_xdata()): c.lines[2][0].get_segments()[0].tolist() for c in ax.containers}
    assert spans == {(ZERO_ERROR,): [[ZERO_ERROR, 1.9], [ZERO_ERROR, 2.2]], (1e-6,): [[1e-6, 0.9], [1e-6, 1.1]]}


def test_an_onnx_peers_size_is_its_constants_as_fxforges_is():
    """The ORT int8 peers' size was the whole file's length (graph and names too), fxforge's its constants."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    from fxforge.bench import _constant_bytes
    weight = numpy_helper.from_array(np.ones((4, 3), dtype=np.int8), "w")
    graph = helper.make_graph([helper.make_node("Identity", ["w"], ["y"], name="a_long_node_name" * 20)], "g", [],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.INT8, [4, 3])], [weight])
    model = helper.make_model(graph).SerializeToString()
    assert _constant_bytes(model) == 12 < len(model)
