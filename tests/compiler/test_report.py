"""The report's table: a stage's long spec is clipped in the table and kept whole in the JSON."""
import json

import pytest

from fxforge.compiler.report import STAGE_WIDTH, Report, StageRow


def test_a_long_stage_spec_is_clipped_in_the_table_and_whole_in_json():
    spec = "insert_qdq{skip=(" + ", ".join(f"'conv2d_{i}'" for i in range(47)) + ")}"
    report = Report([StageRow("input", True, 0.0, 3, 10, 40, 100), StageRow(spec, False, 0.1, 5, 10, 40, 100)])
    lines = str(report).splitlines()
    row = next(line for line in lines if line.startswith("insert_qdq"))
    assert row.startswith(spec[:STAGE_WIDTH - 1] + "…") and spec not in str(report)
    assert max(len(line) for line in lines) < 2 * STAGE_WIDTH + 80
    assert spec in [r["stage"] for r in json.loads(report.to_json())["rows"]]


def test_the_json_is_strict_where_numbers_are_infinite():
    """report.json held `Infinity` (max_drop=math.inf, an infinite error), which strict JSON parsers refuse."""
    report = Report([StageRow("input", True, 0.0, 1, 1, 4, 0, max_rel_err=float("inf"))],
                    {"budget": {"max_drop": float("inf"), "tries": {0: float("nan")}}})
    text = report.to_json()
    assert "Infinity" not in text and "NaN" not in text
    loaded = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard constant {c}"))
    assert loaded["meta"]["budget"]["max_drop"] == "inf" and loaded["rows"][0]["max_rel_err"] == "inf"


def test_a_stage_that_changed_nothing_is_not_run_again_on_the_validation_data():
    """Every row ran its graph on all the validation data, an unchanged one too (its graph is the row before's:
    the pass manager checks changed=False); Validation.measure keeps what it measured by the graph's content."""
    import torch
    import fxforge

    runs = []
    hook = torch.nn.modules.module.register_module_forward_pre_hook(
        lambda module, args: runs.append(1) if isinstance(module, torch.fx.GraphModule) and args
        and getattr(args[0], "shape", (0,))[0] == 16 else None)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4)).eval()
    x = torch.randn(16, 8)
    try:
        counts = []
        for passes in ([], ["fold_constants", "eliminate_dead_code"], ["fold_constants", "low_rank{rank_ratio=0.25}"]):
            runs.clear()
            cm = fxforge.compile(model, (x[:2],), passes=passes, validation=[(x,)], verify="off")
            counts.append(len(runs))
    finally:
        hook.remove()
    assert counts[0] == counts[1] < counts[2]  # the unchanged stages ran nothing; the split ran once more
    assert cm.report.rows[-2].cosine < cm.report.rows[1].cosine == 1.0
