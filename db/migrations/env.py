"""Alembic environment: run by evoprune.db.store.upgrade on an open connection (no alembic.ini)."""
from alembic import context

from evoprune.db.models import Base

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=Base.metadata)
with context.begin_transaction():
    context.run_migrations()
