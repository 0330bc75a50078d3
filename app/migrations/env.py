"""Alembic environment for the app's history database.

There is no alembic.ini: `app.migrate.upgrade(engine)` builds the configuration in code and passes an open connection
(in a transaction) as `config.attributes["connection"]`. To write a new revision after changing the models in
app/tables.py, from the repository root:

    python -c "from alembic import command; from app.migrate import alembic_config; \
command.revision(alembic_config(), message='what changed', autogenerate=False)"

then fill in upgrade()/downgrade() by hand (op.batch_alter_table for SQLite) and extend tests/app/test_store.py's
migration tests with a database at the previous revision.
"""

from alembic import context

from app.tables import Base

config = context.config
connection = config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations through app.migrate.upgrade(engine); offline (--sql) mode is not supported")

context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=connection.dialect.name == "sqlite",  # SQLite cannot ALTER most things: copy-and-move
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
