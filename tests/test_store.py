"""The store's rules: a screen result never replaces a full one; transfer results attach to the
candidate named or to the newest one with the same formula."""
from __future__ import annotations

from dataclasses import replace

from evoprune.db import store
from evoprune.records import CandidateRecord, FitnessRecord, TaskResult, TransferRecord


def _row(stage: str, fitness: float, h: str = "h1", expression: str = "w_l1") -> CandidateRecord:
    rec = FitnessRecord(expression, stage, fitness, True, "", {"t": TaskResult(fitness, 0.5, 0.5, 0.1, "m")}, 0.1, "w")
    return CandidateRecord(expression, expression, h, 1, 1, (), 0, rec)


def test_a_screen_result_never_replaces_a_full_one(tmp_path):
    engine = store.connect(f"sqlite:///{tmp_path / 's.db'}")
    run = store.create_run(engine, {}, 0, "test")
    store.record_candidates(engine, run, [_row("screen", 0.4)])
    store.record_candidates(engine, run, [_row("full", 0.7)])
    store.record_candidates(engine, run, [_row("screen", 0.9)])  # a later screen, even a better one
    (c,) = store.candidate_records(engine, run)
    assert (c.record.stage, c.record.fitness) == ("full", 0.7)
    (orm,) = store.candidates(engine, run)
    assert sorted(e.stage for e in orm.evaluations) == ["full", "screen"]  # the late screen was not stored
    store.record_candidates(engine, run, [_row("full", 0.6)])  # a new full result replaces the old one
    assert store.candidate_records(engine, run)[0].record.fitness == 0.6


def test_transfer_results_attach_to_the_named_or_newest_matching_candidate(tmp_path):
    engine = store.connect(f"sqlite:///{tmp_path / 't.db'}")
    for seed in (0, 1):
        run = store.create_run(engine, {}, seed, "test")
        store.record_candidates(engine, run, [_row("full", 0.5)])
    first, newest = (store.candidate_records(engine, r)[0].id for r in (1, 2))
    t = TransferRecord(task="t", accuracy=0.8, kept_flops=0.3, kept_params=0.3, seconds=1.0, mask="m", host="h")
    assert store.record_transfer(engine, None, "h1", t)[0] == newest
    assert store.record_transfer(engine, first, "ignored", t)[0] == first
    assert store.record_transfer(engine, None, "no-such-formula", t) is None
    assert store.record_transfer(engine, 999, "h1", t) is None
    # the same report again (a suite killed between storing a run and noting it): stored once
    again = store.record_transfer(engine, first, "ignored", t)
    assert again == store.record_transfer(engine, first, "ignored", t)
    other = store.record_transfer(engine, first, "ignored", replace(t, seed=1))  # another seed's run: stored
    assert other[1] != again[1]
    (orm,) = store.candidates(engine, 1)  # run 1 holds `first`
    assert sorted(str(e.seed) for e in orm.evaluations if e.stage == "transfer") == ["1", "None"]
