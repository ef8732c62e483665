"""Service configuration from the environment (prefix ``SCALETUNE_``); one object for API, workers and reconciler."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


SQLITE_BUSY_TIMEOUT_S = 30.0  # how long a writer waits for SQLite's lock, for our engine and Optuna's alike


def is_sqlite(url: str) -> bool:
    return url.startswith("sqlite")


def normalise_database_url(url: str) -> str:
    """Use psycopg 3 for PostgreSQL whatever spelling the user gave (``postgres://``, ``postgresql://``)."""
    for prefix in ("postgresql+psycopg2://", "postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


def safe_url(url: str) -> str:
    """A database or broker URL fit for messages: the password masked."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


class TenantQuota(BaseModel):
    """One tenant's overrides of the server-wide quotas; a field left out keeps the server's value."""

    model_config = ConfigDict(extra="forbid")

    concurrent_studies: int | None = Field(None, ge=1)
    trials_per_study: int | None = Field(None, ge=1)
    proxy_params: int | None = Field(None, ge=1)
    steps: int | None = Field(None, ge=1)


class Settings(BaseSettings):
    """Every knob the service reads; limits bound what a study spec may ask for."""

    model_config = SettingsConfigDict(env_prefix="SCALETUNE_", extra="ignore")

    HOME: Path = Path("./.scaletune")
    DATABASE_URL: str = ""
    BROKER_URL: str = ""
    DATA_ROOT: Path | None = None
    ARTIFACTS_DIR: Path | None = None

    MAX_TRIALS: int = Field(1000, ge=1)
    MAX_PARALLELISM: int = Field(64, ge=1)
    MAX_STEPS: int = Field(100_000, ge=1)
    MAX_BATCH_SIZE: int = Field(4096, ge=1)
    MAX_PROXY_PARAMS: int = Field(50_000_000, ge=1)
    MAX_TARGET_PARAMS: int = Field(10**12, ge=1, description="largest target a transfer plan is computed for")
    MAX_REQUEST_BYTES: int = Field(256 * 1024, ge=1024)
    MAX_CONCURRENT_STUDIES: int = Field(20, ge=1, description="unfinished studies one tenant may have at once")
    TENANT_QUOTAS: dict[str, TenantQuota] = Field(
        default_factory=dict, description='per-tenant overrides as JSON, e.g. {"acme": {"concurrent_studies": 3}}')

    AUTH_DISABLED: bool = Field(False, description="serve without tokens (everyone is admin of tenant 'default'); "
                                                   "the CLI allows it only on a loopback address")
    BOOTSTRAP_TOKEN: SecretStr | None = Field(
        None, description="st_<selector>_<secret>: `scaletune up` and `scaletune api` install it as admin token "
                          "'bootstrap' (unset: the first start on an empty token table creates one and prints it)")
    LOG_LEVEL: str = "INFO"

    HEARTBEAT_INTERVAL: float = Field(10.0, gt=0)
    STALE_AFTER: float = Field(120.0, gt=0)
    RECONCILE_INTERVAL: float = Field(15.0, gt=0)
    REQUEUE_AFTER: float = Field(600.0, gt=0, description="re-send a queued attempt's task after this many seconds")
    MAX_RETRIES: int = Field(2, ge=0)
    CHECKPOINT_EVERY_EVALS: int = Field(
        5, ge=0, description="a trial with more evals than this saves a checkpoint every this many evals, and its "
                             "retry resumes from it instead of step 0 (0: never)")
    ORPHAN_STUDY_GRACE: float = Field(
        600.0, gt=0, description="remove an Optuna study named as scaletune's that has no study row after this many "
                                 "seconds (a crash between the two writes of a submit leaves one)")
    PROCESS_STATUS_FILE: Path | None = Field(
        None, description="set by `scaletune up` for its API: /readyz reports the processes it stopped restarting")
    RECONCILE_IN_API: bool = Field(False, description="run the reconciler loop as a thread inside the API process")

    @model_validator(mode="after")
    def _fill_defaults(self) -> Settings:
        if not self.DATABASE_URL:
            self.DATABASE_URL = f"sqlite:///{(self.HOME / 'scaletune.db').resolve()}"
        self.DATABASE_URL = normalise_database_url(self.DATABASE_URL)
        if not self.BROKER_URL:
            self.BROKER_URL = "filesystem://"
        if self.DATA_ROOT is None:
            self.DATA_ROOT = self.HOME / "data"
        if self.ARTIFACTS_DIR is None:
            self.ARTIFACTS_DIR = self.HOME / "artifacts"
        return self

    @property
    def broker_transport_options(self) -> dict[str, Any]:
        """The filesystem broker needs its folders; other brokers need nothing here."""
        if not self.BROKER_URL.startswith("filesystem://"):
            return {}
        root = (self.HOME / "broker").resolve()
        return {"data_folder_in": str(root / "in"), "data_folder_out": str(root / "in"),
                "processed_folder": str(root / "processed"), "control_folder": str(root / "control"),
                "store_processed": False}

    def ensure_dirs(self) -> None:
        """Create the local folders the defaults point at (SQLite file, broker folders, data, artifacts)."""
        for folder in (self.HOME, self.DATA_ROOT, self.ARTIFACTS_DIR):
            assert folder is not None
            folder.mkdir(parents=True, exist_ok=True)
        self.ensure_broker_dirs()

    def ensure_broker_dirs(self) -> None:
        """The filesystem broker's folders (nothing for other brokers): every Celery client needs them."""
        for key in ("data_folder_in", "processed_folder", "control_folder"):
            if key in self.broker_transport_options:
                Path(self.broker_transport_options[key]).mkdir(parents=True, exist_ok=True)


def get_settings() -> Settings:
    return Settings()
