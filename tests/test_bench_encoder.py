"""The encoder-regime benchmark's pure parts: stability count, differences, verdicts, table."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

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


def test_stability_lines_follow_the_benchmark_order_of_patterns():
    # the saved JSON sorts its keys ("0.5", "0.9", "2:4"); the report keeps 0.5, 2:4, 0.9
    stab = {p: {"runs": 5, "same": 5} for p in sorted(be.PATTERNS)}
    result = {"ffn": {"rows": [_row("ffn", "0.5", 64, 1.75)], "stability": stab, "busy": []}}
    claims = [v["claim"] for v in be.verdicts(result) if "same choices" in v["claim"]]
    assert claims == [f"ffn {p}: the same choices in every convert run" for p in be.PATTERNS]


@pytest.mark.parametrize(
    "make, args, message",
    [
        (lambda d: d, ["--report-only"], "is not allowed; allowed: a .json file path"),
        (lambda d: d / "r.txt", ["--report-only"], "is not allowed; allowed: a .json file path"),
        (lambda d: d / "missing" / "r.json", ["--report-only"], "no such directory"),
        (lambda d: d / "r.json", ["--report-only"], "does not exist; run the benchmark first"),
        (lambda d: _write(d / "r.json", "{not json"), ["--report-only"], "is not a results file"),
        (lambda d: _write(d / "r.json", "[1, 2]"), ["--report-only"], "not a JSON object"),
        (lambda d: d / "r.json", ["--runs", "0"], "--runs 0 is not allowed; allowed: 1..20"),
        (lambda d: d / "r.json", ["--patterns", "0.7"], "--patterns 0.7 is not allowed"),
    ],
)
def test_bad_arguments_stop_before_any_work_with_one_line(tmp_path, capsys, make, args, message):
    path = make(tmp_path)
    with pytest.raises(SystemExit) as exc:
        be.main(["--json", str(path), *args])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and "Traceback" not in "\n".join(err)
    assert not any(p.suffix == ".md" for p in tmp_path.rglob("*"))  # nothing written


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path
