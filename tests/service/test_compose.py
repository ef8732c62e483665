"""docker-compose.yml, prometheus.yml and Dockerfile, read (there is no Docker engine on dev/CI machines); their
commands are also run as processes in tests/integration/test_container_commands.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.engine import make_url
from typer.testing import CliRunner

from service.cli import app
from service.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
OURS = sorted(name for name, service in SERVICES.items() if service.get("image") == "scaletune:latest")


def test_compose_runs_every_role_from_our_image() -> None:
    assert set(OURS) == {"migrate", "api", "reconciler", "worker"}
    assert {"postgres", "redis"} <= set(SERVICES)


@pytest.mark.parametrize("name", OURS)
def test_each_command_is_a_real_scaletune_command_with_real_options(name: str) -> None:
    command = SERVICES[name]["command"]
    assert command[0] == "scaletune"
    # Click rejects unknown options while parsing, before --help is acted on.
    result = CliRunner().invoke(app, [*command[1:], "--help"], prog_name="scaletune")
    assert result.exit_code == 0, result.output
    assert f"scaletune {command[1]}" in result.output


@pytest.mark.parametrize("name", OURS)
def test_environment_keys_are_settings_fields(name: str) -> None:
    environment = SERVICES[name]["environment"]
    fields = set(Settings.model_fields)
    for key in environment:
        assert key.startswith("SCALETUNE_"), key
        assert key.removeprefix("SCALETUNE_") in fields, f"{key} is not a Settings field"
    settings = Settings(**{k.removeprefix("SCALETUNE_"): v for k, v in environment.items()})
    assert settings.DATABASE_URL.startswith("postgresql+psycopg://")
    assert settings.BROKER_URL.startswith("redis://")


def test_services_start_in_order_once_their_dependencies_are_ready() -> None:
    for name, service in SERVICES.items():
        for dependency, rule in service.get("depends_on", {}).items():
            assert dependency in SERVICES, f"{name} depends on unknown service {dependency}"
            expected = "service_completed_successfully" if dependency == "migrate" else "service_healthy"
            assert rule["condition"] == expected, (name, dependency)
            if expected == "service_healthy":
                assert "healthcheck" in SERVICES[dependency], dependency
    for name in ("api", "reconciler", "worker"):
        assert "migrate" in SERVICES[name]["depends_on"], name
    assert SERVICES["migrate"]["restart"] == "no"


def test_worker_reserves_gpus_and_runs_one_process_per_gpu() -> None:
    devices = SERVICES["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    assert SERVICES["worker"]["command"][1:] == ["worker", "--queues", "gpu,cpu", "--gpus", "all"]


def test_dockerfile_runs_as_a_non_root_user() -> None:
    lines = [line.split() for line in (ROOT / "Dockerfile").read_text().splitlines() if line.strip()]
    users = [words[1] for words in lines if words[0] == "USER"]
    assert users and users[-1] not in ("root", "0")
    assert lines.index(["USER", users[-1]]) > max(i for i, words in enumerate(lines) if words[0] == "FROM")


def test_optuna_dashboard_reads_the_database_scaletune_writes() -> None:
    dashboard = SERVICES["optuna-dashboard"]
    assert dashboard["image"].startswith("ghcr.io/optuna/optuna-dashboard")
    [storage] = dashboard["command"]
    # The dashboard image ships psycopg2; scaletune uses psycopg 3. Same server, user and database.
    ours = make_url(SERVICES["api"]["environment"]["SCALETUNE_DATABASE_URL"])
    theirs = make_url(storage)
    assert theirs.drivername == "postgresql+psycopg2" and ours.drivername == "postgresql+psycopg"
    assert theirs.set(drivername=ours.drivername) == ours
    assert dashboard["depends_on"] == {"migrate": {"condition": "service_completed_successfully"}}
    assert dashboard["ports"] == ["127.0.0.1:8080:8080"], "published on loopback only: it has no login"


def test_prometheus_scrapes_the_api_metrics(client: TestClient) -> None:
    prometheus = SERVICES["prometheus"]
    mounted = {volume.split(":")[1]: volume.split(":")[0] for volume in prometheus["volumes"]}
    config = yaml.safe_load((ROOT / mounted["/etc/prometheus/prometheus.yml"]).read_text())
    [job] = config["scrape_configs"]
    [target] = [t for group in job["static_configs"] for t in group["targets"]]
    host, port = target.split(":")
    api_command = SERVICES[host]["command"]
    assert api_command[1] == "api" and api_command[api_command.index("--port") + 1] == port
    assert prometheus["depends_on"] == {host: {"condition": "service_healthy"}}

    scraped = client.get(job.get("metrics_path", "/metrics"), headers={"Authorization": ""})
    assert scraped.status_code == 200, "Prometheus sends no token"
    families = {family.name for family in text_string_to_metric_families(scraped.text)}
    assert {"scaletune_trials", "scaletune_studies", "scaletune_queue_depth"} <= families
