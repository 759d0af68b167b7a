"""Evaluations say whether a run's summary made them (the final round's full fine-tunes of
candidates its generations only screened), so that a run extended with `--resume --generations`
continues from what its generations held, as a run started with that many generations would.

Revision ID: 0006
Revises: 0005
"""
import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade():
    op.add_column("evaluations", sa.Column("summary", sa.Boolean(), nullable=True))


def downgrade():
    op.drop_column("evaluations", "summary")
