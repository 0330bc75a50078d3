"""Alembic environment for the app's history database.

There is no alembic.ini: `app.store.upgrade(engine)` builds the configuration in code and passes an open connection
(in a transaction) as `config.attributes["connection"]`. To write a new revision after changing the models in
app/store.py, from the repository root:

    python -c "from alembic import command; from app.store import alembic_config; \
command.revision(alembic_config(), message='what changed', autogenerate=False)"

then fill in upgrade()/downgrade() by hand (op.batch_alter_table for SQLite) and extend tests/test_store.py's
migration test with a database at the previous revision.
"""

from alembic import context

from app.store import Base

config = context.config
connection = config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations through app.store.upgrade(engine); offline (--sql) mode is not supported")

context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=connection.dialect.name == "sqlite",  # SQLite cannot ALTER most things: copy-and-move
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
