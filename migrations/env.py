"""Alembic environment for the provenance database (see README.md beside this file).

The agent runs it through `agent.store.migrate`, which passes its own connection (already in a
BEGIN IMMEDIATE transaction) as `config.attributes["connection"]`. From the command line it opens
the database given by `-x db=PATH` (default: the agent's own, under $AGENT_HOME) with the agent's
connection settings.
"""

from pathlib import Path

from alembic import context

from agent import store as db

config = context.config
target_metadata = db.Base.metadata


def _configure(**options) -> None:
    # batch mode: SQLite cannot ALTER most things, so Alembic copies the table instead
    context.configure(target_metadata=target_metadata, render_as_batch=True, compare_type=True, **options)


def run_migrations_offline() -> None:
    _configure(url="sqlite://", literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        # SQLite's DDL is transactional: every migration of a run commits together or not at all
        _configure(connection=connection, transactional_ddl=True)
        with context.begin_transaction():
            context.run_migrations()
        return
    import logging

    from agent.service.home import agent_home

    # the command line shows what it does; the agent itself stays quiet
    logging.basicConfig(format="%(levelname)-5.5s [%(name)s] %(message)s")
    logging.getLogger("alembic").setLevel(logging.INFO)
    path = Path(context.get_x_argument(as_dictionary=True).get("db") or db.database_path(agent_home()))
    engine = db.make_engine(path)
    try:
        with engine.connect().execution_options(**db.WRITE_OPTIONS) as connection, connection.begin():
            _configure(connection=connection, transactional_ddl=True)
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
