"""Runs record the machine their driver ran on; evaluations are indexed by task.

Revision ID: 0002
Revises: 0001
"""
import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade():
    # a plain ADD COLUMN: a batch "copy and move" of runs would, with foreign keys on,
    # cascade-delete every generation and candidate of every run
    op.add_column("runs", sa.Column("host", sa.String(255), nullable=False, server_default=""))
    op.create_index("ix_evaluations_task_stage", "evaluations", ["task", "stage"])


def downgrade():
    op.drop_index("ix_evaluations_task_stage", "evaluations")
    op.drop_column("runs", "host")
