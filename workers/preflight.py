"""A worker host's configuration, checked when the worker starts (Celery's ``worker_init``).

A worker on another host needs the API's database and broker, a data folder holding what file datasets
read, a writable artifacts folder, and the same model-family and dataset plugins. Missing any of these used
to fail the first trial it took; now the worker refuses to start with one message per problem.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Collection

from celery import Celery
from sqlalchemy import select

from scaletune.data.base import DataError
from scaletune.data.registry import ENTRY_POINT_GROUP as DATASET_GROUP
from scaletune.data.registry import dataset_spec
from scaletune.models.registry import ENTRY_POINT_GROUP as FAMILY_GROUP
from scaletune.models.registry import family_names
from service.db import create_db_engine, database_is_current, make_session_factory
from service.models import UNFINISHED_STUDY, Study
from service.queue import broker_reachable
from service.settings import Settings, safe_url

log = logging.getLogger(__name__)
EX_CONFIG = 78  # sysexits.h: configuration error


class WorkerMisconfigured(SystemExit):
    """Leaves the worker process with EX_CONFIG (a SystemExit, so Celery's signal dispatch lets it through)."""

    def __init__(self) -> None:
        super().__init__(EX_CONFIG)


def database_problems(settings: Settings) -> list[str]:
    url = settings.DATABASE_URL
    local = (" It is this host's default SQLite file: a worker on another host needs SCALETUNE_DATABASE_URL."
             if url.startswith("sqlite") else "")
    try:
        current = database_is_current(url)
    except Exception as error:  # any driver error: the point is to say which setting to fix
        return [f"cannot reach the database {safe_url(url)} ({str(error).splitlines()[0]}).{local} Set "
                "SCALETUNE_DATABASE_URL to the database the API uses"]
    if current:
        return []
    return [f"the database {safe_url(url)} is not at this scaletune version's schema.{local} Point "
            "SCALETUNE_DATABASE_URL at the API's database, run `scaletune migrate` on it, and run the same "
            "scaletune version as the API"]


def artifacts_problems(settings: Settings) -> list[str]:
    artifacts = settings.ARTIFACTS_DIR
    assert artifacts is not None
    try:
        artifacts.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=artifacts):
            pass
    except OSError as error:
        return [f"SCALETUNE_ARTIFACTS_DIR {artifacts} is not a writable folder here ({error.strerror}); give the "
                "worker one, shared by all worker hosts (shape-schedule checkpoints are written there)"]
    return []


def study_problems(settings: Settings, queues: Collection[str]) -> list[str]:
    """Unfinished studies this worker would take whose model family, dataset plugin or data files are not here."""
    engine = create_db_engine(settings.DATABASE_URL)
    try:
        with make_session_factory(engine)() as session:
            studies = list(session.scalars(select(Study).where(Study.status.in_(UNFINISHED_STUDY))))
    finally:
        engine.dispose()
    problems = []
    for study in studies:
        if study.spec.get("queue", "cpu") not in queues:
            continue
        needs = f"study {study.id} ({study.name!r}) needs"
        family = (study.spec.get("model") or {}).get("family")
        if family is not None and family not in family_names():
            problems.append(f"{needs} model family {family!r}, not installed here (installed: "
                            f"{', '.join(family_names())}); install the plugin package that provides it in entry-"
                            f"point group {FAMILY_GROUP}, as on the API host")
        dataset = study.spec.get("dataset") or {}
        if "name" in dataset:
            try:
                dataset_spec(dataset["name"], dataset.get("args") or {}, settings.DATA_ROOT)
            except DataError as error:
                problems.append(f"{needs} dataset {dataset['name']!r}, unusable here: {error}. Install the same "
                                f"dataset plugins (entry-point group {DATASET_GROUP}) and give SCALETUNE_DATA_ROOT "
                                "the same files as on the API host")
    return problems


def configuration_problems(settings: Settings, app: Celery, queues: Collection[str]) -> list[str]:
    problems = database_problems(settings)
    if not broker_reachable(app):
        problems.append(f"cannot reach the broker {safe_url(settings.BROKER_URL)}; set SCALETUNE_BROKER_URL to the "
                        "broker the API uses")
    problems += artifacts_problems(settings)
    if not problems:  # the studies are read from a database we can reach
        problems += study_problems(settings, queues)
    return problems


def check_worker_host(settings: Settings, app: Celery, queues: Collection[str]) -> None:
    """Log every problem and leave with EX_CONFIG, or return when the host can run trials."""
    problems = configuration_problems(settings, app, queues)
    for problem in problems:
        log.error("worker configuration: %s", problem)
    if problems:
        log.error("this worker cannot run trials: %d configuration problem(s) above; see docs/deploy.md",
                  len(problems))
        raise WorkerMisconfigured
    log.info("worker configuration checked: database, broker, artifacts folder, the studies of queues %s",
             ", ".join(sorted(queues)))
