"""``fewvision serve`` and ``fewvision tokens create | list | revoke``: the inspection service."""

from __future__ import annotations

from inspect import cleandoc
from pathlib import Path
from typing import Optional

import typer

from .common import CONTEXT, EXIT_CODES_HELP, UserError, info

SERVE_EXAMPLE = """

\b
Examples:
  fewvision tokens create --name line-3          (prints the token once, alone on the last line)
  fewvision serve --data-dir /srv/fewvision      (then open http://127.0.0.1:8000/ and sign in with the token)
  fewvision serve --db postgresql://fewvision:secret@db.plant.local/fewvision --host 0.0.0.0
"""


def register(app: typer.Typer) -> None:
    app.command("serve", context_settings=CONTEXT, epilog=EXIT_CODES_HELP,
                help=cleandoc(serve.__doc__) + SERVE_EXAMPLE)(serve)
    tokens_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, context_settings=CONTEXT,
                             help="Create, list and revoke the service's access tokens.")
    app.add_typer(tokens_app, name="tokens")
    tokens_app.command("create", context_settings=CONTEXT, epilog=EXIT_CODES_HELP)(tokens_create)
    tokens_app.command("list", context_settings=CONTEXT, epilog=EXIT_CODES_HELP)(tokens_list)
    tokens_app.command("revoke", context_settings=CONTEXT, epilog=EXIT_CODES_HELP)(tokens_revoke)


def data_dir_option():
    return typer.Option(Path("fewvision-data"), "--data-dir", metavar="DIR",
                        help="folder for images, models, heat maps and (by default) the SQLite store")


def db_option():
    return typer.Option(None, "--db", metavar="URL",
                        help="database URL, e.g. postgresql://user:password@host/db [default: SQLite in --data-dir]")


def _settings(data_dir: Path, db: Optional[str], **kw):
    from ..service.common import Settings

    if db and not (db.startswith("postgresql://") or db.startswith("sqlite")):
        raise UserError(f"--db '{db}': expected a postgresql:// or sqlite:/// URL")
    return Settings(data_dir, db, **kw)


def _offline_service(data_dir: Path, db: Optional[str]):
    from ..service.core import Service

    try:
        return Service(_settings(data_dir, db, worker=False))
    except Exception as err:  # noqa: BLE001 - a store that cannot be opened is the user's to fix
        if isinstance(err, UserError):
            raise
        raise UserError(f"cannot open the store ({type(err).__name__}: {' '.join(str(err).split())[:300]})") from None


def serve(
    data_dir: Path = data_dir_option(),
    db: Optional[str] = db_option(),
    host: str = typer.Option("127.0.0.1", "--host", metavar="ADDRESS",
                             help="address to listen on (0.0.0.0 for every interface)"),
    port: int = typer.Option(8000, "--port", min=1, max=65535, metavar="PORT", help="port to listen on"),
    max_upload_mb: float = typer.Option(25.0, "--max-upload-mb", min=0.001, metavar="MB",
                                        help="largest image upload accepted"),
    max_megapixels: float = typer.Option(40.0, "--max-megapixels", min=0.001, metavar="MP",
                                         help="largest image accepted, in millions of pixels"),
    cors_origin: Optional[str] = typer.Option(None, "--cors-origin", metavar="URL1,URL2",
                                              help="origins allowed to call the API from a browser "
                                                   "[default: none - CORS off]"),
    model: Optional[Path] = typer.Option(None, "--model", metavar="FILE",
                                         help="install this model file (.fvm, or a packed .fvz that runs with no "
                                              "hub) as the active version of a project before serving"),
    project: Optional[str] = typer.Option(None, "--project", metavar="NAME",
                                          help="the project --model goes to, created when missing "
                                               "[default: the file's name]"),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, metavar="N",
                                          help="CPU threads a model uses [default: every core]; replicas on one "
                                               "machine: its cores divided by the replicas"),
) -> None:
    """Run the inspection service: the REST API under /v1 (its OpenAPI schema at /openapi.json), the review page at
    /, fits in a background worker, every prediction recorded. The store is migrated to the current schema at start.
    A SQLite store has one owner: a second serve on it refuses to start."""
    if threads is not None:  # before torch starts its thread pools: OpenMP reads the variable once
        import os

        os.environ["OMP_NUM_THREADS"] = str(threads)
        import torch

        torch.set_num_threads(threads)
    import uvicorn

    from ..service.app import create_app
    from .common import comma_list

    settings = _settings(data_dir, db, max_upload_bytes=int(max_upload_mb * 1024 * 1024),
                         max_pixels=int(max_megapixels * 1_000_000),
                         cors_origins=comma_list(cors_origin, "origin") if cors_origin else [])
    if project and not model:
        raise UserError("--project applies to --model")
    from ..service.store import StoreOwned, own_sqlite_store

    try:
        owner = own_sqlite_store(settings.db_url)  # held until this process ends
    except StoreOwned as err:
        raise UserError(str(err)) from None
    service = _offline_service(data_dir, db)  # a store that cannot be opened or migrated: one line, exit 2
    try:
        if model is not None:
            from ..service.common import ServiceError

            try:
                installed, version = service.install_model(model, project)
            except ServiceError as err:
                raise UserError(err.message if str(model) in err.message else f"{model}: {err.message}") from None
            info(f"project {installed['name']!r} (id {installed['id']}): model version {version} active")
    finally:
        service.stop()
    info(f"fewvision service on http://{host}:{port}/ (store: {settings.db_url.split('@')[-1]}, data: "
         f"{settings.data_dir})")
    try:
        uvicorn.run(create_app(settings), host=host, port=port, log_level="warning", timeout_graceful_shutdown=5)
    finally:
        if owner is not None:
            owner.close()


def tokens_create(
    name: str = typer.Option("token", "--name", "-n", metavar="NAME", help="what the token is for (a line, a "
                             "person)"),
    project: Optional[int] = typer.Option(None, "--project", metavar="ID", help="limit the token to one project"),
    data_dir: Path = data_dir_option(),
    db: Optional[str] = db_option(),
) -> None:
    """Create an access token. It is printed once, alone on the last line of standard output; only its hash is
    stored."""
    from ..service.common import ServiceError

    service = _offline_service(data_dir, db)
    try:
        row, token = service.create_token(name, project)
    except ServiceError as err:
        raise UserError(err.message) from None
    finally:
        service.stop()
    scope = f"project {row['project_id']}" if row["project_id"] is not None else "every project"
    typer.echo(f"token {row['id']} '{row['name']}' for {scope} (shown once; keep it safe):")
    typer.echo(token)


def tokens_list(data_dir: Path = data_dir_option(), db: Optional[str] = db_option()) -> None:
    """List the tokens (never their values)."""
    service = _offline_service(data_dir, db)
    try:
        for t in service.tokens():
            scope = f"project {t['project_id']}" if t["project_id"] is not None else "all projects"
            state = f"revoked {t['revoked_at']}" if t["revoked_at"] else "active"
            typer.echo(f"{t['id']}\t{t['name']}\t{scope}\t{state}\tcreated {t['created_at']}")
    finally:
        service.stop()


def tokens_revoke(token_id: int = typer.Argument(..., metavar="ID", help="the token's id (from 'tokens list')"),
                  data_dir: Path = data_dir_option(), db: Optional[str] = db_option()) -> None:
    """Revoke a token: requests that carry it are refused from now on."""
    from ..service.common import ServiceError

    service = _offline_service(data_dir, db)
    try:
        row = service.revoke_token(token_id)
    except ServiceError as err:
        raise UserError(err.message) from None
    finally:
        service.stop()
    typer.echo(f"token {row['id']} '{row['name']}' revoked")
