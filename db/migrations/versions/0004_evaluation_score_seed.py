"""Evaluations keep the score their fitness used (when it is not the accuracy) and the data order
they ran with (validation re-scores a formula over several).

Revision ID: 0004
Revises: 0003
"""
import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade():
    op.add_column("evaluations", sa.Column("score", sa.Double(), nullable=True))
    op.add_column("evaluations", sa.Column("seed", sa.Integer(), nullable=True))


def downgrade():
    op.drop_column("evaluations", "seed")
    op.drop_column("evaluations", "score")
