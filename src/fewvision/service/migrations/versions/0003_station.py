"""A station's verdicts in the predictions table (stable id, station, part, where the image went, latency) and the
outbox its sinks read with a cursor each.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("predictions") as batch:
        batch.add_column(sa.Column("uid", sa.String(36), nullable=True))
        batch.add_column(sa.Column("station", sa.String(200), nullable=True))
        batch.add_column(sa.Column("part_id", sa.String(200), nullable=True))
        batch.add_column(sa.Column("path", sa.String(1000), nullable=True))
        batch.add_column(sa.Column("latency_ms", sa.Float, nullable=True))
        batch.create_unique_constraint("uq_predictions_uid", ["uid"])
        batch.create_index("ix_predictions_station", ["station"])
    op.create_table(
        "outbox",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("station", sa.String(200), nullable=False, index=True),
        sa.Column("kind", sa.String(20), nullable=False),
        sa.Column("payload", sa.JSON, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "sink_cursors",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("station", sa.String(200), nullable=False),
        sa.Column("sink", sa.String(200), nullable=False),
        sa.Column("position", sa.Integer, nullable=False),
        sa.Column("delivered", sa.Integer, nullable=False),
        sa.Column("rejected", sa.Integer, nullable=False),
        sa.Column("failures", sa.Integer, nullable=False),
        sa.Column("last_error", sa.Text, nullable=True),
        sa.Column("last_error_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("station", "sink", name="uq_sink_cursor"),
    )


def downgrade() -> None:
    op.drop_table("sink_cursors")
    op.drop_table("outbox")
    with op.batch_alter_table("predictions") as batch:
        batch.drop_index("ix_predictions_station")
        batch.drop_constraint("uq_predictions_uid", type_="unique")
        for name in ("latency_ms", "path", "part_id", "station", "uid"):
            batch.drop_column(name)
