"""The service's durable store: SQLAlchemy tables, the engine for SQLite (default) or PostgreSQL, and migrations.

Every write the API acknowledges is one committed transaction. Files (exemplar images, model files, heat maps) live
beside the database in the data folder (:mod:`.blobs`), each written to a temp file and renamed before its row is
committed, so a row never points at a half-written file; a file whose row was never committed is invisible.

The schema is created and upgraded by Alembic (``migrations/``) when the service starts (:func:`migrate`).
"""

from __future__ import annotations

import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

SQLITE_BUSY_TIMEOUT_S = 60


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    pass


class Project(Base):
    __tablename__ = "projects"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    task: Mapped[str] = mapped_column(String(20))
    backbone: Mapped[str] = mapped_column(String(500))
    method: Mapped[str] = mapped_column(String(50))
    classes: Mapped[list] = mapped_column(JSON, default=list)
    params: Mapped[dict] = mapped_column(JSON, default=dict)
    active_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    needs_refit: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Exemplar(Base):
    __tablename__ = "exemplars"
    __table_args__ = (UniqueConstraint("project_id", "sha256", "label", name="uq_exemplar"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id"), index=True)
    sha256: Mapped[str] = mapped_column(String(64))
    label: Mapped[str] = mapped_column(String(200))
    filename: Mapped[str] = mapped_column(String(255), default="")
    source: Mapped[str] = mapped_column(String(20), default="upload")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Job(Base):
    __tablename__ = "jobs"
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id"), index=True)
    kind: Mapped[str] = mapped_column(String(20), default="fit")
    state: Mapped[str] = mapped_column(String(20), default="queued", index=True)
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    model_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    owner: Mapped[str | None] = mapped_column(String(200), nullable=True)  # host:pid of the process running it
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class ModelVersion(Base):
    __tablename__ = "models"
    __table_args__ = (UniqueConstraint("project_id", "version", name="uq_model_version"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id"), index=True)
    version: Mapped[int] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(String(500))
    sha256: Mapped[str] = mapped_column(String(64))
    origin: Mapped[str] = mapped_column(String(200), default="fit")
    summary: Mapped[dict] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Prediction(Base):
    __tablename__ = "predictions"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id"), index=True)
    model_version: Mapped[int] = mapped_column(Integer)
    image_sha256: Mapped[str] = mapped_column(String(64), index=True)
    filename: Mapped[str] = mapped_column(String(255), default="")
    label: Mapped[str | None] = mapped_column(String(200), nullable=True)
    score: Mapped[float | None] = mapped_column(Float, nullable=True)
    threshold: Mapped[float | None] = mapped_column(Float, nullable=True)
    probabilities: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    decision: Mapped[str] = mapped_column(String(10), index=True)
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    heatmap: Mapped[str | None] = mapped_column(String(500), nullable=True)
    # anomaly models: where the map peaks and the defect regions (boxes in image pixels, largest first)
    x: Mapped[int | None] = mapped_column(Integer, nullable=True)
    y: Mapped[int | None] = mapped_column(Integer, nullable=True)
    regions: Mapped[list | None] = mapped_column(JSON, nullable=True)
    reviewed_label: Mapped[str | None] = mapped_column(String(200), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    # a station's verdicts (none on an upload): the verdict's stable id (the sinks' idempotency key), the station,
    # the part, where the image ended up, and file complete -> verdict recorded
    uid: Mapped[str | None] = mapped_column(String(36), nullable=True, unique=True)
    station: Mapped[str | None] = mapped_column(String(200), nullable=True, index=True)
    part_id: Mapped[str | None] = mapped_column(String(200), nullable=True)
    path: Mapped[str | None] = mapped_column(String(1000), nullable=True)
    latency_ms: Mapped[float | None] = mapped_column(Float, nullable=True)


class Alarm(Base):
    """A monitor's alarm (docs/monitor.md): raised by the scores of a project's (or a station's) predictions,
    acknowledged by a person."""

    __tablename__ = "alarms"
    __table_args__ = (UniqueConstraint("prediction_id", "kind", name="uq_alarm"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id"), index=True)
    model_version: Mapped[int] = mapped_column(Integer)
    station: Mapped[str | None] = mapped_column(String(200), nullable=True)
    prediction_id: Mapped[int] = mapped_column(ForeignKey("predictions.id"))  # the score that raised it
    kind: Mapped[str] = mapped_column(String(20))
    value: Mapped[float] = mapped_column(Float)
    message: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    acknowledged_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    acknowledged_by: Mapped[int | None] = mapped_column(Integer, nullable=True)  # the token's id


class Outbox(Base):
    """Messages for a station's sinks, written in the transaction that records what they tell (a verdict, an
    alarm): a message exists exactly when its record does. Each sink reads them in ``id`` order from its cursor."""

    __tablename__ = "outbox"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    station: Mapped[str] = mapped_column(String(200), index=True)
    kind: Mapped[str] = mapped_column(String(20), default="verdict")
    payload: Mapped[dict] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class SinkCursor(Base):
    """How far one sink of a station has delivered the outbox (``position``: the last outbox id it took)."""

    __tablename__ = "sink_cursors"
    __table_args__ = (UniqueConstraint("station", "sink", name="uq_sink_cursor"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    station: Mapped[str] = mapped_column(String(200))
    sink: Mapped[str] = mapped_column(String(200))
    position: Mapped[int] = mapped_column(Integer, default=0)
    delivered: Mapped[int] = mapped_column(Integer, default=0)
    rejected: Mapped[int] = mapped_column(Integer, default=0)  # messages the receiver refused for good (4xx)
    failures: Mapped[int] = mapped_column(Integer, default=0)  # failed attempts, retried
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    last_error_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Review(Base):
    __tablename__ = "reviews"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    prediction_id: Mapped[int] = mapped_column(ForeignKey("predictions.id"), index=True)
    label: Mapped[str] = mapped_column(String(200))
    token_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Token(Base):
    __tablename__ = "tokens"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    project_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


def database_url(data_dir: str | os.PathLike, db: str | None = None) -> str:
    """``db`` as given, else a SQLite file in the data folder."""
    if db:
        return db
    path = Path(data_dir).expanduser().resolve() / "fewvision.sqlite"
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def create(url: str) -> Engine:
    """The engine: SQLite in WAL mode with a busy timeout (many readers, one writer at a time, no 'database is
    locked' errors under load); PostgreSQL through psycopg."""
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://"):]
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S, "check_same_thread": False},
                               pool_size=20, max_overflow=20)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(conn, _record):
            conn.isolation_level = None  # let SQLAlchemy's BEGIN (below) decide
            cur = conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        @event.listens_for(engine, "begin")
        def _begin_immediate(conn):
            # writers queue on the busy timeout instead of failing on a lock upgrade
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        return engine
    return create_engine(url, pool_size=20, max_overflow=20, pool_pre_ping=True)


_MIGRATION_LOCK = 0x66657776  # "fewv": the advisory lock replicas take around a migration


def migrate(url: str) -> None:
    """Bring the schema up to the latest Alembic revision (creating it on an empty database)."""
    from alembic import command
    from alembic.config import Config
    from alembic.script import ScriptDirectory
    from sqlalchemy import inspect, text

    config = Config()
    config.set_main_option("script_location", str(Path(__file__).resolve().parent / "migrations"))
    config.attributes["url"] = url
    known = {rev.revision for rev in ScriptDirectory.from_config(config).walk_revisions()}
    engine = create(url)
    try:
        with engine.connect() as conn:
            current = (conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all()
                       if inspect(conn).has_table("alembic_version") else [])
    finally:
        engine.dispose()
    unknown = [rev for rev in current if rev not in known]
    if unknown:  # written by a newer fewvision: migrating "up" from it is impossible, writing to it unsafe
        raise RuntimeError(f"the store's schema is at revision {unknown[0]}, which this fewvision does not know "
                           "(a newer version wrote it); upgrade fewvision to use this store")
    if url.startswith("postgresql"):  # replicas starting together: one migrates, the others wait for it
        engine = create(url)
        try:
            with engine.connect() as conn:
                conn.execute(text("SELECT pg_advisory_lock(:key)"), {"key": _MIGRATION_LOCK})
                try:
                    command.upgrade(config, "head")
                finally:
                    conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": _MIGRATION_LOCK})
        finally:
            engine.dispose()
    else:
        command.upgrade(config, "head")


def sessions(engine: Engine) -> sessionmaker:
    return sessionmaker(engine, expire_on_commit=False)


def as_dict(row: Any, fields: list[str]) -> dict:
    out = {}
    for f in fields:
        v = getattr(row, f)
        if isinstance(v, datetime):
            v = (v if v.tzinfo else v.replace(tzinfo=timezone.utc)).isoformat()  # SQLite keeps no time zone
        out[f] = v
    return out


class StoreOwned(RuntimeError):
    """Another service process owns this SQLite store."""


class Locked(RuntimeError):
    """The lock file is held by another process (``owner``: the process id it wrote)."""

    def __init__(self, path: Path, owner: str):
        super().__init__(f"{path} is held by process {owner}")
        self.path, self.owner = path, owner


def hold_lock_file(path: Path):
    """An exclusive lock on ``path`` for this process's lifetime (the file holds the owner's process id); the lock
    goes with the process, however it ends (kill -9 included). None where the OS has no ``fcntl`` (Windows)."""
    try:
        import fcntl
    except ImportError:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        owner = handle.read().strip() or "unknown"
        handle.close()
        raise Locked(path, owner) from None
    handle.truncate(0)
    handle.write(str(os.getpid()))
    handle.flush()
    return handle


def sqlite_file(url: str) -> Path | None:
    """The database file of a SQLite URL; None for other databases and in-memory ones."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database or parsed.database == ":memory:":
        return None
    return Path(parsed.database).expanduser().resolve()


def own_sqlite_store(url: str):
    """An exclusive lock on a SQLite store for this process's lifetime (the file ``<database>.owner``); None for
    other databases. Two services on one SQLite file would each think they own its jobs and model versions: the
    second refuses to start (:class:`StoreOwned`) before it reads or writes anything."""
    database = sqlite_file(url)
    if database is None:
        return None
    try:
        return hold_lock_file(database.with_name(database.name + ".owner"))
    except Locked as err:
        raise StoreOwned(f"another fewvision serve (process {err.owner}) owns the store {database}; stop it "
                         "first (several service processes need PostgreSQL: --db postgresql://...)") from None
