"""Settings come from SCALETUNE_* variables with local defaults under HOME; PostgreSQL URLs use psycopg 3."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.settings import Settings


def test_defaults_live_under_home(tmp_path: Path) -> None:
    settings = Settings(HOME=tmp_path)
    assert settings.DATABASE_URL == f"sqlite:///{tmp_path.resolve() / 'scaletune.db'}"
    assert settings.BROKER_URL == "filesystem://"
    assert settings.broker_transport_options["data_folder_in"] == str(tmp_path.resolve() / "broker" / "in")
    assert settings.broker_transport_options["data_folder_out"] == settings.broker_transport_options["data_folder_in"]
    assert settings.broker_transport_options["processed_folder"] == str(tmp_path.resolve() / "broker" / "processed")
    settings.ensure_dirs()
    assert (tmp_path / "broker" / "in").is_dir() and (tmp_path / "data").is_dir()


@pytest.mark.parametrize("given", ["postgresql://u@db/st", "postgres://u@db/st", "postgresql+psycopg2://u@db/st"])
def test_postgres_urls_are_normalised_to_psycopg3(monkeypatch: pytest.MonkeyPatch, given: str) -> None:
    monkeypatch.setenv("SCALETUNE_DATABASE_URL", given)
    assert Settings().DATABASE_URL == "postgresql+psycopg://u@db/st"


def test_limits_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SCALETUNE_MAX_TRIALS", "7")
    monkeypatch.setenv("SCALETUNE_BROKER_URL", "redis://localhost:6379/0")
    settings = Settings()
    assert settings.MAX_TRIALS == 7
    assert settings.broker_transport_options == {}
