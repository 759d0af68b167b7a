"""The metrics database (SQLAlchemy models, migrations, writes and read queries); this folder
installs as `evoprune.db`."""
