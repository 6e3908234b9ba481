"""Alembic environment: the URL comes from the service (``store.migrate``), the tables from ``store.Base``."""

from alembic import context

from fewvision.service.store import Base, create

config = context.config


def run_migrations_online() -> None:
    engine = create(config.attributes["url"])
    with engine.connect() as connection:
        context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


run_migrations_online()
