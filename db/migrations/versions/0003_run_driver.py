"""Runs record their driver process, so a run whose driver died shows as interrupted.

Revision ID: 0003
Revises: 0002
"""
import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade():
    # a plain ADD COLUMN (see 0002: a batch rebuild of runs would cascade-delete its rows)
    op.add_column("runs", sa.Column("driver", sa.String(64), nullable=False, server_default=""))


def downgrade():
    op.drop_column("runs", "driver")
