"""bench.world reports generation speed and the export in one process against the render workers (a smoke
test: the times themselves are measured by ``make bench``, never asserted)."""
from bench import world


def test_world_bench_rows():
    rows = world.run(n=20, export_n=600)
    assert [r.unit for r in rows] == ["/s", "s", "s", "s", "x"]
    assert all(r.value > 0 for r in rows)
    assert abs(rows[4].value - rows[2].value / rows[3].value) < 1e-9
    assert "600 images" in rows[2].name
