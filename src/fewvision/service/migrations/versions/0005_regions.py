"""Defect regions of anomaly predictions (boxes in image pixels, largest first) and where the map peaks.

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("predictions") as batch:  # batch: SQLite cannot alter a table in place
        batch.add_column(sa.Column("regions", sa.JSON, nullable=True))
        batch.add_column(sa.Column("x", sa.Integer, nullable=True))
        batch.add_column(sa.Column("y", sa.Integer, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("predictions") as batch:
        batch.drop_column("y")
        batch.drop_column("x")
        batch.drop_column("regions")
