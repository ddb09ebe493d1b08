"""bench.lm runs on the recipe's documents and reports both step times and their ratio (a smoke test: the
times themselves are measured by ``make bench``, never asserted)."""
from bench import lm


def test_lm_bench_rows():
    rows = lm.run(warmup=0, iters=1, samples=20)
    assert [r.unit for r in rows] == ["ms", "ms", "x"]
    assert all(r.value > 0 for r in rows)
    assert abs(rows[2].value - rows[0].value / rows[1].value) < 1e-9
    assert "labelled)" in rows[0].name
