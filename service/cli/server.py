"""Commands that run the service: ``up`` (embedded), ``migrate``, ``api``, ``worker``, ``reconciler``.

Service modules are imported inside each command so that ``--help`` stays instant (they pull in
SQLAlchemy, Celery and, through the spec validation, torch).
"""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

if TYPE_CHECKING:
    from service.settings import Settings

console = Console()
error_console = Console(stderr=True)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _refuse_open_network_without_auth(host: str, no_auth: bool) -> None:
    if no_auth and not _is_loopback(host):
        raise typer.BadParameter(
            f"{host} is reachable from the network; --no-auth is allowed only on a loopback address such as "
            "127.0.0.1. Drop --no-auth and create tokens with `scaletune token create`.", param_hint="--no-auth")


def _cuda_device_count() -> int:
    import torch

    return torch.cuda.device_count()


def _bootstrap_admin_token(settings: Settings) -> None:
    """Unless auth is off: install SCALETUNE_BOOTSTRAP_TOKEN, or on a first start create an admin token, shown once."""
    if settings.AUTH_DISABLED:
        return
    from service.bootstrap import BadBootstrapToken, bootstrap_admin_token
    from service.db import create_db_engine, make_session_factory

    chosen = settings.BOOTSTRAP_TOKEN.get_secret_value() if settings.BOOTSTRAP_TOKEN else None
    engine = create_db_engine(settings.DATABASE_URL)
    try:
        created = bootstrap_admin_token(make_session_factory(engine), chosen)
    except BadBootstrapToken as error:
        error_console.print(str(error), style="red", markup=False, soft_wrap=True)
        raise typer.Exit(2) from None
    finally:
        engine.dispose()
    if created:
        console.print("No API token existed yet, so this admin token (named 'bootstrap') was created. It is shown "
                      "only this once; store it now (e.g. export SCALETUNE_TOKEN=...):", markup=False, soft_wrap=True)
        console.print(created, markup=False, soft_wrap=True)
        console.file.flush()


def parse_gpus(value: str | None, available: int) -> list[int]:
    """``None``/``all`` -> every visible GPU; ``0,1`` -> those indices, each checked against what is visible."""
    if value is None or value.strip().lower() == "all":
        return list(range(available))
    try:
        gpus = [int(part) for part in value.split(",") if part.strip()]
    except ValueError:
        raise typer.BadParameter(f"expected 'all' or comma-separated GPU indices like 0,1; got {value!r}") from None
    missing = [gpu for gpu in gpus if not 0 <= gpu < available]
    if missing:
        raise typer.BadParameter(f"GPU(s) {missing} not visible: this machine shows {available} CUDA device(s)")
    return gpus


def up(
    host: Annotated[str, typer.Option(help="Address to bind; loopback by default.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port for the HTTP API.")] = 8000,
    no_auth: Annotated[bool, typer.Option(
        "--no-auth",
        help="Serve without API tokens (every caller is admin of tenant 'default'); only on a loopback --host.")
    ] = False,
    workers: Annotated[int, typer.Option(min=1, help="Worker processes (one trial each at a time).")] = 1,
) -> None:
    """Run scaletune on this machine: API, worker(s) and reconciler, data under $SCALETUNE_HOME (./.scaletune).

    Applies database migrations first. SQLite and a filesystem broker by default.

    Set SCALETUNE_DATABASE_URL / SCALETUNE_BROKER_URL to use PostgreSQL / Redis instead.

    The API wants a token unless started with --no-auth: SCALETUNE_BOOTSTRAP_TOKEN becomes the admin token, or the
    first start creates one and prints it once; more with `scaletune token create`.

    With CUDA, workers take queues gpu and cpu, one GPU each (round robin); else queue cpu. A process that dies is
    restarted with backoff; a worker in a crash loop is reported on /readyz. Ctrl-C stops all.

    Example: scaletune up --port 8000 --workers 2
    """
    from service.db import upgrade_database
    from service.embedded import run_up
    from service.logging import configure_logging
    from service.settings import Settings, safe_url

    _refuse_open_network_without_auth(host, no_auth)
    settings = Settings(AUTH_DISABLED=no_auth)
    configure_logging("up", settings.LOG_LEVEL)
    gpu_count = _cuda_device_count()
    gpus = [i % gpu_count for i in range(workers)] if gpu_count else []
    console.print(f"Starting scaletune (data in {settings.HOME.resolve()}, database {safe_url(settings.DATABASE_URL)})")
    settings.ensure_dirs()
    upgrade_database(settings.DATABASE_URL)
    _bootstrap_admin_token(settings)

    def announce(url: str) -> None:
        console.print(f"scaletune is up at {url}  (API docs: {url}/docs). Press Ctrl-C to stop.", style="bold green",
                      markup=False, soft_wrap=True)
        console.file.flush()

    raise typer.Exit(run_up(settings, host, port, workers, gpus, announce))


def migrate() -> None:
    """Apply the database migrations to $SCALETUNE_DATABASE_URL (creates scaletune's and Optuna's tables).

    Example: scaletune migrate
    """
    from service.db import upgrade_database
    from service.settings import Settings, safe_url

    settings = Settings()
    settings.ensure_dirs()
    upgrade_database(settings.DATABASE_URL)
    console.print(f"Database is at the latest revision: {safe_url(settings.DATABASE_URL)}", markup=False)


def api(
    host: Annotated[str, typer.Option(help="Address to bind.")] = "0.0.0.0",
    port: Annotated[int, typer.Option(help="Port for the HTTP API.")] = 8000,
    no_auth: Annotated[bool, typer.Option(
        "--no-auth", help="Serve without API tokens; refused unless --host is a loopback address.")] = False,
) -> None:
    """Serve the HTTP API alone (production). Callers need a token from `scaletune token create`.

    SCALETUNE_BOOTSTRAP_TOKEN becomes the admin token; unset, the first start on a database without any token
    creates an admin token and prints it once.

    Refuses to start until `scaletune migrate` has been run on the database.

    Example: scaletune api --host 0.0.0.0 --port 8000
    """
    from service.db import database_is_current
    from service.settings import Settings, safe_url

    settings = Settings()
    _refuse_open_network_without_auth(host, no_auth)
    settings = settings.model_copy(update={"AUTH_DISABLED": no_auth})
    if not database_is_current(settings.DATABASE_URL):
        error_console.print(
            f"The database {safe_url(settings.DATABASE_URL)} is not migrated to this version of scaletune. "
            "Run `scaletune migrate` first.", style="red", markup=False)
        raise typer.Exit(1)
    _bootstrap_admin_token(settings)

    import uvicorn

    from service.api.app import create_app
    from service.logging import configure_logging

    configure_logging("api", settings.LOG_LEVEL)
    # Our JSON logs instead of uvicorn's config; our request log leaves out query strings (a token may be there).
    uvicorn.run(create_app(settings), host=host, port=port, log_config=None, access_log=False)


def worker(
    queues: Annotated[str | None, typer.Option(
        help="Comma-separated queues to consume; default gpu when CUDA is visible, else cpu.")] = None,
    gpus: Annotated[str | None, typer.Option(
        help="GPUs to use, 'all' or indices like 0,1; one worker process per GPU. Default: all visible.")] = None,
) -> None:
    """Run Celery worker processes that train trials: one per GPU (pinned, one trial at a time), else one on CPU.

    A worker process that dies is restarted with backoff; a crash loop stops the command (exit code 1).

    Example: scaletune worker --queues gpu --gpus 0,1
    """
    from service.embedded import run_processes, worker_fleet
    from service.logging import configure_logging
    from service.settings import Settings

    configure_logging("worker", Settings().LOG_LEVEL)
    available = _cuda_device_count()
    if gpus is not None and available == 0:
        raise typer.BadParameter("no CUDA device is visible on this machine", param_hint="--gpus")
    raise typer.Exit(run_processes(worker_fleet(parse_gpus(gpus, available), 1, queues)))


def reconciler() -> None:
    """Run the reconciler loop alone (production): re-queues lost work, fails stale trials, tops up studies.

    Example: scaletune reconciler
    """
    from service.embedded import stop_on_signals
    from service.logging import configure_logging
    from service.reconcile import reconcile_forever
    from service.settings import Settings

    settings = Settings()
    configure_logging("reconciler", settings.LOG_LEVEL)
    reconcile_forever(settings, stop_on_signals())
