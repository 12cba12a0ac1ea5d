from __future__ import annotations

import json
import math

from arwkv.eval import report
from arwkv.eval.stats import aggregate, bootstrap_stderr_perplexity, mean_stderr, perplexity, retention


def test_binomial_stderr_matches_closed_form():
    values = [1.0] * 30 + [0.0] * 70
    p, n = 0.3, 100
    assert math.isclose(mean_stderr(values), math.sqrt(p * (1 - p) / (n - 1)), rel_tol=1e-12)


def test_perplexity_and_bootstrap():
    lls = [-1.0, -2.0, -3.0, -2.0]
    assert math.isclose(perplexity(lls), math.exp(2.0))
    se = bootstrap_stderr_perplexity(lls * 50, iters=2000)
    # delta method: se(exp(-m)) ≈ exp(-m) · sd/sqrt(n)
    delta = math.exp(2.0) * mean_stderr(lls * 50)
    assert abs(se - delta) / delta < 0.15
    assert aggregate(lls, "perplexity")[0] == perplexity(lls)


def test_retention_math():
    assert math.isclose(retention(0.45, 0.50), 90.0)
    assert math.isclose(retention(20.0, 16.0, higher_is_better=False), 80.0)  # worse perplexity < 100%


def _score(v, hib=True):
    return {"value": v, "stderr": 0.01, "n": 100, "higher_is_better": hib}


def test_report_table_and_json(tmp_path):
    result = {
        "reference": "teacher",
        "config": {"limit": 100, "batch_size": 8, "data_dir": "x"},
        "results": {
            "teacher": {
                "arc_easy": {"acc": _score(0.60)},
                "lambada_openai": {"perplexity": _score(20.0, False)},
            },
            "student": {
                "arc_easy": {"acc": _score(0.54)},
                "lambada_openai": {"perplexity": _score(25.0, False)},
            },
        },
    }
    md, js = report.write(result, tmp_path)
    text = md.read_text()
    assert "| arc_easy | acc | 60.0 ± 1.0 | 54.0 ± 1.0 | 90.0 |" in text
    assert "| lambada_openai | perplexity ↓ | 20.00 ± 0.01 | 25.00 ± 0.01 | 80.0 |" in text
    saved = json.loads(js.read_text())
    assert math.isclose(saved["retention"]["student"]["arc_easy/acc"], 90.0)
