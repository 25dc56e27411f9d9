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


def test_a_stage_that_changed_nothing_is_not_run_again_on_the_validation_data(monkeypatch):
    """Every row ran its graph on all the validation data, an unchanged one too (its graph is the row before's: the
    pass manager checks changed=False)."""
    import torch
    import fxforge
    from fxforge.compiler.quality import Validation

    calls = []  # the graphs measured (compile measures the artifact too)
    measure = Validation.measure
    monkeypatch.setattr(Validation, "measure", lambda self, run: (isinstance(run, torch.fx.GraphModule) and
                                                                   calls.append(run)) or measure(self, run))
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4)).eval()
    x = torch.randn(16, 8)
    cm = fxforge.compile(model, (x[:2],), passes=["fold_constants", "eliminate_dead_code"],
                         validation=[(x,)], verify="off")
    assert len(calls) == 1  # the input row; no pass changed the graph
    rows = cm.report.rows[:3]  # the backend row measures the artifact
    assert all(r.cosine == rows[0].cosine and r.top1 == rows[0].top1 == 1.0 for r in rows)
    cm = fxforge.compile(model, (x[:2],), passes=["fold_constants", "low_rank{rank_ratio=0.25}"], validation=[(x,)],
                         verify="off")
    assert len(calls) == 3 and cm.report.rows[-1].cosine < cm.report.rows[1].cosine
