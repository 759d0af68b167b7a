"""The first schema: runs, generations, candidates, evaluations, metrics.

Revision ID: 0001
"""
import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade():
    op.create_table("evoprune_meta", sa.Column("key", sa.String(64), primary_key=True),
                    sa.Column("value", sa.Text(), nullable=False))
    op.create_table(
        "runs",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("config", sa.JSON(), nullable=False),
        sa.Column("seed", sa.Integer(), nullable=False),
        sa.Column("code_version", sa.String(64), nullable=False),
        sa.Column("status", sa.Enum("running", "finished", "failed", "interrupted", name="runstatus"), nullable=False),
        sa.Column("started", sa.DateTime(), nullable=False),
        sa.Column("ended", sa.DateTime(), nullable=True),
        sa.Column("note", sa.Text(), nullable=False),
    )
    op.create_table(
        "generations",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("run_id", sa.Integer(), sa.ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("index", sa.Integer(), nullable=False),
        *[sa.Column(c, sa.Double(), nullable=False) for c in ("best", "mean", "median", "size_mean", "diversity")],
        sa.Column("evaluations", sa.Integer(), nullable=False),
        sa.Column("cache_hits", sa.Integer(), nullable=False),
        sa.Column("seconds", sa.Double(), nullable=False),
        sa.Column("population", sa.JSON(), nullable=False),
        sa.Column("rng_state", sa.JSON(), nullable=False),
        sa.Column("created", sa.DateTime(), nullable=False),
        sa.UniqueConstraint("run_id", "index"),
    )
    op.create_table(
        "candidates",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("run_id", sa.Integer(), sa.ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("expression", sa.Text(), nullable=False),
        sa.Column("canonical", sa.Text(), nullable=False),
        sa.Column("canonical_hash", sa.String(32), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("depth", sa.Integer(), nullable=False),
        sa.Column("parents", sa.JSON(), nullable=False),
        sa.Column("birth_generation", sa.Integer(), nullable=False),
        sa.Column("fitness", sa.Double(), nullable=False),
        sa.Column("stage", sa.String(16), nullable=False),
        sa.Column("valid", sa.Boolean(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("is_baseline", sa.String(32), nullable=False),
        sa.UniqueConstraint("run_id", "canonical_hash"),
    )
    op.create_index("ix_candidates_fitness", "candidates", ["run_id", "fitness"])
    op.create_table(
        "evaluations",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("candidate_id", sa.Integer(), sa.ForeignKey("candidates.id", ondelete="CASCADE"), nullable=False),
        sa.Column("task", sa.String(128), nullable=False),
        sa.Column("stage", sa.String(16), nullable=False),
        *[sa.Column(c, sa.Double(), nullable=False) for c in ("accuracy", "kept_flops", "kept_params", "seconds")],
        sa.Column("mask", sa.String(32), nullable=False),
        sa.Column("worker", sa.String(128), nullable=False),
        sa.Column("created", sa.DateTime(), nullable=False),
    )
    op.create_index("ix_evaluations_candidate_id", "evaluations", ["candidate_id"])
    op.create_table(
        "metrics",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("name", sa.String(128), nullable=False, unique=True),
        sa.Column("expression", sa.Text(), nullable=False),
        sa.Column("candidate_id", sa.Integer(), sa.ForeignKey("candidates.id", ondelete="SET NULL"), nullable=True),
        sa.Column("created", sa.DateTime(), nullable=False),
    )


def downgrade():
    for t in ("metrics", "evaluations", "candidates", "generations", "runs", "evoprune_meta"):
        op.drop_table(t)
