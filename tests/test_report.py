"""`evoprune report`: an HTML page with plots of a real search."""
from __future__ import annotations

from helpers import run


def test_report_writes_a_page_with_plots(searched, tmp_path, capsys):
    db, result = searched
    rc, out, _ = run(capsys, "report", str(result.run_id), "--db", str(db), "-o", str(tmp_path / "rep"))
    assert rc == 0
    page = (tmp_path / "rep" / "index.html").read_text()
    for png in ("fitness.png", "pareto.png"):
        data = (tmp_path / "rep" / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000 and png in page
    assert f"evoprune run {result.run_id}" in page and "Seeded baselines" in page
    assert result.finalists[0].expression in page
    # the plots said "validation accuracy" of a fitness that is the true class's probability
    assert "fitness: true-class probability on val" in page
    from evoprune.db import store
    from evoprune.report import fitness_label

    engine = store.connect(f"sqlite:///{tmp_path / 'other.db'}")  # not the shared search's database
    run_id = store.create_run(engine, {"proxy": {"tasks": ["a", "b"], "score": "accuracy"}}, 0, "test")
    assert fitness_label(engine, run_id) == "fitness: accuracy on val, geometric mean over 2 tasks"
    rc, _, err = run(capsys, "report", "77", "--db", str(db), "-o", str(tmp_path / "x"))
    assert rc == 2 and "no run with ID 77" in err
