"""Alembic, driven from code: the configuration for app/migrations/ and `upgrade`, which the store runs when it
first reaches its database. There is no alembic.ini.
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import Engine, text

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
PG_MIGRATION_LOCK = 0x626C697032  # "blip2": serialises concurrent `upgrade head` of several app processes


def alembic_config():
    """The Alembic configuration for app/migrations/, built in code."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    return cfg


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Bring the database schema to `revision` (Alembic `upgrade`), in one transaction.

    On PostgreSQL an advisory lock makes concurrent starts of several app processes take turns; on SQLite the
    write transaction (BEGIN IMMEDIATE, when the engine is the store's write engine) does the same. Errors are
    Alembic's and SQLAlchemy's own (a database from a newer app raises alembic.util.CommandError); the store turns
    them into messages for the user.
    """
    from alembic import command

    cfg = alembic_config()
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": PG_MIGRATION_LOCK})
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)
