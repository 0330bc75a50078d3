"""Messages may have status 'interrupted': a reply that was still streaming when the app stopped (crash, kill -9).

The store marks such rows when it next starts, keeping the text saved so far. Only the CHECK constraint on
messages.status changes; no row does.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-09
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

OLD = "status IN ('pending', 'streaming', 'done', 'stopped', 'error')"
NEW = "status IN ('pending', 'streaming', 'done', 'stopped', 'error', 'interrupted')"


def upgrade() -> None:
    _replace_status_check(NEW)


def downgrade() -> None:
    # 'stopped' is the closest older status: a reply that ended early and keeps its text.
    op.execute("UPDATE messages SET status = 'stopped' WHERE status = 'interrupted'")
    _replace_status_check(OLD)


def _replace_status_check(check: str) -> None:
    if op.get_bind().dialect.name != "sqlite":
        op.drop_constraint(op.f("ck_messages_status"), "messages", type_="check")
        op.create_check_constraint(op.f("ck_messages_status"), "messages", check)
        return
    # SQLite cannot alter a constraint: the table is copied (batch mode). Dropping the old table runs an implicit
    # DELETE, and with foreign keys on (the store turns them on; a PRAGMA cannot change inside this transaction)
    # that cascades to generations. Their rows are set aside first and put back after the copy.
    op.execute("CREATE TEMP TABLE _keep_generations AS SELECT * FROM generations")
    with op.batch_alter_table("messages", copy_from=_messages(check), recreate="always"):
        pass  # the copy itself is the change: the new table has the new CHECK
    op.execute("INSERT INTO generations SELECT * FROM _keep_generations WHERE NOT EXISTS "
               "(SELECT 1 FROM generations g WHERE g.id = _keep_generations.id)")
    op.execute("DROP TABLE _keep_generations")


def _messages(check: str) -> sa.Table:
    """The messages table as of 0002, with ``check`` on status (a frozen copy: never import app.tables here)."""
    table = sa.Table(
        "messages", sa.MetaData(),
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("conversation_id", sa.String(length=64), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("image_hash", sa.String(length=64), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("token_ids", sa.JSON(), nullable=True),
        sa.CheckConstraint("role IN ('user', 'assistant', 'system')", name=op.f("ck_messages_role")),
        sa.CheckConstraint(check, name=op.f("ck_messages_status")),
        sa.ForeignKeyConstraint(["conversation_id"], ["conversations.id"],
                                name=op.f("fk_messages_conversation_id_conversations"), ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["image_hash"], ["images.hash"], name=op.f("fk_messages_image_hash_images")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_messages")),
        sa.UniqueConstraint("conversation_id", "seq", name=op.f("uq_messages_conversation_id_seq")),
    )
    sa.Index(op.f("ix_messages_image_hash"), table.c.image_hash)
    return table
