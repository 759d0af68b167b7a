"""A database made by the first schema version upgrades in place, its data intact."""
from __future__ import annotations

import sqlite3

import pytest
from alembic import command
from sqlalchemy import create_engine

from evoprune.db import queries, store
from evoprune.db.models import SCHEMA_HEAD


def _first_schema_db(path, with_version_table: bool):
    engine = create_engine(f"sqlite:///{path}")
    with engine.begin() as conn:
        command.upgrade(store._alembic(conn), "0001")  # the first schema, exactly as it was
    engine.dispose()
    with sqlite3.connect(path) as c:
        c.execute("INSERT INTO evoprune_meta VALUES ('schema_version', '1')")
        c.execute("INSERT INTO runs (id, config, seed, code_version, status, started, note) VALUES "
                  "(1, '{\"proxy\": {\"tasks\": [\"digits-cnn\"]}}', 0, '0.1.0', 'finished', '2026-11-01 10:00:00', '')")
        c.execute("INSERT INTO candidates VALUES (1, 1, 'w_l1', 'w_l1', 'abc', 1, 1, '[]', 0, 0.9, 'full', 1, '', 'l1')")
        c.execute("INSERT INTO evaluations VALUES (1, 1, 'digits-cnn', 'full', 0.9, 0.25, 0.25, 0.3, 'm', 'w', "
                  "'2026-11-01 10:00:01')")
        if not with_version_table:  # made before evoprune used Alembic
            c.execute("DROP TABLE alembic_version")


@pytest.mark.parametrize("with_version_table", [True, False])
def test_first_schema_upgrades_in_place(tmp_path, with_version_table):
    path = tmp_path / "old.db"
    _first_schema_db(path, with_version_table)
    engine = store.connect(f"sqlite:///{path}")
    with sqlite3.connect(path) as c:
        assert c.execute("SELECT version_num FROM alembic_version").fetchone()[0] == SCHEMA_HEAD
        assert "host" in [r[1] for r in c.execute("PRAGMA table_info(runs)")]
        assert c.execute("SELECT count(*) FROM evaluations").fetchone()[0] == 1
    (row,) = queries.top(engine, run=1)
    assert row["expression"] == "w_l1" and row["acc:digits-cnn"] == 0.9 and row["baseline"] == "l1"
    new_run = store.create_run(engine, {"proxy": {"tasks": ["t"]}}, 1, "0.1.0")  # the new schema takes writes
    assert [r["id"] for r in queries.runs(engine)] == [1, new_run]


def test_new_database_is_at_head_and_reconnects(tmp_path):
    url = f"sqlite:///{tmp_path / 'new.db'}"
    store.connect(url)
    store.connect(url)
    with sqlite3.connect(tmp_path / "new.db") as c:
        assert c.execute("SELECT version_num FROM alembic_version").fetchone()[0] == SCHEMA_HEAD


def test_migrations_build_the_schema_the_models_describe(tmp_path):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from evoprune.db.models import Base

    engine = create_engine(f"sqlite:///{tmp_path / 'mig.db'}")
    with engine.begin() as conn:
        command.upgrade(store._alembic(conn), "head")
        diffs = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diffs == [], diffs
