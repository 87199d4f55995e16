"""The encoder-regime benchmark's pure parts: stability count, differences, verdicts, table."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_encoder as be  # noqa: E402


def _sig(*plans: str) -> list[tuple[str, str, str]]:
    return [(str(i), "sparse", p) for i, p in enumerate(plans)]


def test_stable_runs_counts_the_most_common_choice():
    a, b = _sig("rows 1+: pairs", "rows 1-1: csr; rows 2+: pairs"), _sig("rows 1+: pairs", "rows 1+: pairs")
    assert be.stable_runs([a, a, a]) == 3
    assert be.stable_runs([a, b, a, b, b]) == 3
    assert be.stable_runs([]) == 0
    assert be.differences([a, b, a]) == [
        '1: ["sparse", "rows 1+: pairs"] (1) | ["sparse", "rows 1-1: csr; rows 2+: pairs"] (2)'
    ]
    assert be.differences([a, a]) == []


def _row(part, pattern, rows, speedup):
    target = be.TARGETS.get((part, pattern, rows))
    return {
        "part": part,
        "pattern": pattern,
        "rows": rows,
        "dense_ms": 10.0,
        "sparse_ms": 10.0 / speedup,
        "speedup": speedup,
        "dense_gflops": 200.0,
        "useful_gflops": 150.0,
        "density": 0.5,
        "target": target,
    }


def test_verdicts_by_hand():
    result = {
        "ffn": {
            "rows": [_row("ffn", "0.5", 64, 1.75), _row("ffn", "0.5", 512, 1.2), _row("ffn", "0.5", 1, 0.9)],
            "stability": {"0.5": {"runs": 5, "same": 4}},
            "busy": [],
        },
        "minilm": {
            "rows": [{"sentences": 1, "tokens": 128, "dense": 2.0, "sparse": 1.0, "speedup": 2.0, "min_cosine": 1.0}]
        },
    }
    lines = {v["claim"]: v for v in be.verdicts(result)}
    assert lines["ffn 0.5, 64 rows: >= 1.7x"]["held"] is True
    assert lines["ffn 0.5, 512 rows: >= 1.3x"] == {
        "claim": "ffn 0.5, 512 rows: >= 1.3x",
        "measured": "1.20x",
        "held": False,
    }
    assert lines["ffn: never slower than dense"]["held"] is False  # 0.9x at one row
    assert "0.5 at 1: 0.90x" in lines["ffn: never slower than dense"]["measured"]
    assert lines["ffn 0.5: the same choices in every convert run"] == {
        "claim": "ffn 0.5: the same choices in every convert run",
        "measured": "4 of 5",
        "held": False,
    }
    assert lines["MiniLM forward: never slower than dense"]["held"] is True
    table = be.format_markdown({**result, "machine": {"cpu": "X", "cores": 2, "torch_threads": 2, "torch": "t"}})
    assert "| 0.5 | 64 | 10.00 | 5.71 | 1.75x | 200 | 150 | >= 1.7x |" in table
    assert "| ffn 0.5, 512 rows: >= 1.3x | 1.20x | no |" in table


def test_choices_signature_uses_the_per_row_plan():
    class D:
        def __init__(self, name, fmt, plan):
            self.name, self.format, self.plan, self.action = name, fmt, plan, "sparse"

    class R:
        layers = [D("0", "csr+pairs+gelu", "rows 1-1: csr; rows 2+: pairs")]

    other = type("R2", (), {"layers": [D("0", "pairs+csr+gelu", "rows 1-1: csr; rows 2+: pairs")]})
    # which of the two formats is stored first does not change what runs
    assert be.choices_signature(R) == be.choices_signature(other)
