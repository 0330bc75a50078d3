"""Messages remember the token ids the model generated for them (messages.token_ids, JSON, nullable).

Rows written before this revision get NULL: their replies are re-tokenized from text, as they always were.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # SQLite can ADD COLUMN in place; batch mode only copies the table for what it cannot alter.
    with op.batch_alter_table("messages") as batch:
        batch.add_column(sa.Column("token_ids", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("messages") as batch:
        batch.drop_column("token_ids")
