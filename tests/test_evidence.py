"""benchmarks/evidence.py in its smoke mode: a tiny search, its formulas and two baselines on a
tiny suite, the comparison, the proxy fidelity and the tables, all from real runs."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _evidence():
    spec = importlib.util.spec_from_file_location("evidence", ROOT / "benchmarks" / "evidence.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_the_evidence_script_runs_end_to_end_in_smoke_mode(digits_pretrained, cache_dir, tmp_path, capsys):
    ev = _evidence()
    out = tmp_path / "ev"
    state = ev.main(["--budget", "smoke", "--out", str(out), "--cache-dir", str(cache_dir), "--device", "cpu"])
    search = state["searches"]["digits-smoke"]
    assert search["individuals"] == 16 and search["proxy_runs"] > 0 and search["seconds"] > 0
    assert 1 <= len(search["evolved"]) <= 3 and all(e["validation"] for e in search["evolved"])
    c = state["comparison"]
    evolved = [str(e["id"]) for e in search["evolved"]]
    assert c["best_baseline"] in ("baseline:l1", "baseline:bn_scale")
    rows = [json.loads(line) for line in (out / "suite" / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 2 * (len(evolved) + 2)  # cases x seeds x metrics: every run happened
    for m in evolved:
        e = c["metrics"][m]
        assert e["evolved"] and e["verdict"] in ("beats", "ties", "loses to") and sum(e["wins_ties_losses"]) == 2
        assert e["diff_low"] <= e["diff"] <= e["diff_high"]
    f = search["fidelity"]
    assert len(f["metrics"]) == len(evolved) + 2 and -1 <= f["tau"] <= 1
    text = capsys.readouterr().out
    assert "| search |" in text and "Proxy fidelity" in text and (out / "suite.png").stat().st_size > 0
    assert (out / "evidence.md").read_text().strip() == text.strip()
    # a second call resumes: nothing is searched or pruned again
    again = ev.main(["--budget", "smoke", "--out", str(out), "--cache-dir", str(cache_dir), "--device", "cpu"])
    assert again["searches"]["digits-smoke"]["run"] == search["run"]
    assert len((out / "suite" / "results.jsonl").read_text().splitlines()) == len(rows)


def test_a_baseline_a_case_cannot_use_is_not_the_yardstick_and_reads_na():
    """BN scale, n/a on a network without BN, has the higher mean over the cases it ran (its hard
    case is missing): the best baseline is one applied on every case and seed; the evolved
    formula is compared with BN scale where both ran, and the per-case table says n/a."""
    ev = _evidence()

    def row(case, metric, seed, test):
        return {"case": case, "metric": metric, "seed": seed, "test": test, "test_images": 1000}

    rows = [row(c, m, s, t + 0.01 * s) for c, base in ((0, 0.5), (1, 0.9)) for s in (0, 1)
            for m, t in (("7", base + 0.02), ("baseline:l1", base), ("baseline:bn_scale", base + 0.04)) if
            not (c == 0 and m == "baseline:bn_scale")]
    c = ev.compare(rows, ["7"], ["l1", "bn_scale"])
    assert c["best_baseline"] == "baseline:l1"
    assert c["metrics"]["7"]["verdict"] == "beats" and c["metrics"]["7"]["wins_ties_losses"] == [2, 0, 0]
    assert set(c["metrics"]["baseline:bn_scale"]["per_case"]) == {1}
    state = {"machine": "m", "date": "d", "budget": "smoke", "searches": {}, "comparison": c,
             "suite": {"name": "s", "seeds": 2, "cases": ["no BN", "BN"], "baselines": ["l1", "bn_scale"],
                       "not_applicable": [{"case": 0, "case_label": "no BN", "metric": "baseline:bn_scale",
                                           "reason": "constant scores"}],
                       "warnings": ["case 2 (BN): its runs started from 2 different pretrained models"]}}
    text = ev.tables(state)
    assert "| no BN | 52.50% +- 0.71% (+) | 50.50% +- 0.71% | n/a |" in text, text
    assert "n/a: case 1 (no BN), baseline:bn_scale: constant scores" in text
    assert "warning: case 2 (BN): its runs started from 2 different pretrained models" in text
