"""Evaluations say whether the proxy's network diverged (some validation outputs not finite:
those count wrong with probability 0, so the fitness is low for a reason the formula may not
be to blame for).

Revision ID: 0005
Revises: 0004
"""
import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade():
    op.add_column("evaluations", sa.Column("diverged", sa.Boolean(), nullable=True))


def downgrade():
    op.drop_column("evaluations", "diverged")
