"""The Python client and the CLI client commands against a real API server (uvicorn on loopback, SQLite)."""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from sqlalchemy import update
from typer.testing import CliRunner

from scaletune.client import (Client, Conflict, EndpointMissing, NotFound, ScaletuneError, ServiceUnavailable,
                              StudyDetail, Unauthorized, ValidationFailed)
from service.cli import app
from service.db import SessionFactory, write_session
from service.models import EventType, Study, StudyStatus
from service.settings import Settings
from service.studies import add_event
from service.tokens import create_token
from tests.ports import free_port
from tests.service.test_asktell import EXTERNAL

runner = CliRunner()
CLIENT_COMMANDS = ["submit", "studies", "status", "watch", "trials", "cancel", "transfer", "check", "schedule", "plot"]


@pytest.fixture
def token(session_factory: SessionFactory) -> str:
    return create_token(session_factory, "client-test")


@pytest.fixture
def api(live_url: str, token: str) -> Iterator[Client]:
    with Client(live_url, token=token) as client:
        yield client


@pytest.fixture
def env(live_url: str, token: str) -> dict[str, str]:
    """What a user exports for the CLI."""
    return {"SCALETUNE_URL": live_url, "SCALETUNE_TOKEN": token}


def test_the_server_refuses_a_missing_or_wrong_token(live_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SCALETUNE_TOKEN", raising=False)
    for token in (None, "st_0000_wrong"):
        with Client(live_url, token=token) as client, pytest.raises(Unauthorized, match="SCALETUNE_TOKEN"):
            client.studies()


def _finish(session_factory: SessionFactory, study_id: str, events: list[tuple[EventType, dict[str, Any]]],
            final: StudyStatus = StudyStatus.completed) -> None:
    with write_session(session_factory) as session:
        for type_, payload in events:
            add_event(session, study_id, type_, payload)
        add_event(session, study_id, EventType.study_finished, {"status": final})
        session.execute(update(Study).where(Study.id == study_id).values(status=final, best_value=0.5))


def test_client_round_trip_with_typed_results(api: Client, spec_dict: dict[str, Any], tmp_path: Path) -> None:
    created = api.submit(spec_dict)
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump({**spec_dict, "name": "from-file"}))
    second = api.submit(spec_file)

    page = api.studies()
    assert page.total == 2 and {s.id for s in page.items} == {created.id, second.id}
    study = api.study(second.id)
    assert isinstance(study, StudyDetail) and study.name == "from-file" and not study.finished
    assert study.trial_counts["queued"] == spec_dict["parallelism"]
    trials = api.trials(created.id)
    assert trials.total == 2 and all(t.state == "queued" and t.intermediate == [] for t in trials.items)

    assert api.cancel(created.id).status == "cancelled"
    assert api.studies(status="cancelled").items[0].id == created.id
    with pytest.raises(Conflict, match="already cancelled"):
        api.cancel(created.id)
    with pytest.raises(NotFound, match="no-such"):
        api.study("no-such")


def test_validation_errors_carry_field_paths(api: Client, spec_dict: dict[str, Any]) -> None:
    spec_dict["n_trials"] = 0
    spec_dict["search_space"]["lr"]["low"] = -1.0
    with pytest.raises(ValidationFailed) as caught:
        api.submit(spec_dict)
    locs = [tuple(error["loc"]) for error in caught.value.errors]
    assert ("body", "n_trials") in locs
    assert "n_trials" in str(caught.value)


def test_unreachable_server_names_the_url() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ServiceUnavailable) as caught, Client(url) as client:
        client.studies()
    assert caught.value.url == url and url in str(caught.value) and "scaletune up" in str(caught.value)


def test_token_is_sent_as_bearer_from_argument_or_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("Authorization"))
        return httpx.Response(401, json={"detail": "invalid token"})

    monkeypatch.delenv("SCALETUNE_TOKEN", raising=False)
    for token in ("abc", None):
        with Client("http://st", token=token, transport=httpx.MockTransport(handler)) as client, \
                pytest.raises(Unauthorized, match="SCALETUNE_TOKEN"):
            client.studies()
    monkeypatch.setenv("SCALETUNE_TOKEN", "from-env")
    with Client("http://st", transport=httpx.MockTransport(handler)) as client, pytest.raises(Unauthorized):
        client.studies()
    assert seen == ["Bearer abc", None, "Bearer from-env"]


def test_a_server_without_an_optional_endpoint_says_so() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/transfer"):
            return httpx.Response(404, json={"detail": "Not Found"})
        return httpx.Response(404, json={"detail": "no study with id x"})

    with Client("http://st", transport=httpx.MockTransport(handler)) as client:
        with pytest.raises(EndpointMissing, match="has no POST .../transfer"):
            client.transfer("x", {"width": 512, "depth": 4})
        with pytest.raises(NotFound, match="no study with id x"):
            client.check("x")


class _DroppedStream(httpx.SyncByteStream):
    """Sends some bytes, then fails like a dropped connection."""

    def __init__(self, body: bytes) -> None:
        self.body = body

    def __iter__(self) -> Iterator[bytes]:
        yield self.body
        raise httpx.ReadError("connection reset")


def _frame(event_id: int, type_: str) -> str:
    data = {"id": event_id, "type": type_, "study_id": "s", "trial_id": None, "created_at": "2025-01-01T00:00:00Z",
            "payload": {"n": event_id}}
    return f"id: {event_id}\nevent: {type_}\ndata: {json.dumps(data)}\n\n"


def test_events_reconnect_with_last_event_id_and_miss_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(time, "sleep", lambda _s: None)
    resumed_from: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        resumed_from.append(request.headers.get("Last-Event-ID"))
        if len(resumed_from) == 1:
            body = ("retry: 2000\n\n" + _frame(1, "trial_started") + ": keep-alive\n\n" + _frame(2, "trial_reported"))
            return httpx.Response(200, stream=_DroppedStream(body.encode()))
        return httpx.Response(200, text=_frame(3, "trial_finished") + _frame(4, "study_finished"))

    with Client("http://st", transport=httpx.MockTransport(handler)) as client:
        events = list(client.events("s"))
    assert [(e.id, e.type) for e in events] == [(1, "trial_started"), (2, "trial_reported"),
                                                (3, "trial_finished"), (4, "study_finished")]
    assert resumed_from == [None, "2"]


def test_events_and_wait_against_the_server(api: Client, session_factory: SessionFactory,
                                            spec_dict: dict[str, Any]) -> None:
    study_id = api.submit(spec_dict).id
    with pytest.raises(TimeoutError, match="still queued"):
        api.wait(study_id, timeout=0.2, poll_s=0.05)
    _finish(session_factory, study_id, [(EventType.trial_started, {"attempt": 1}),
                                        (EventType.trial_reported, {"step": 50, "eval_loss": 2.0})])
    events = list(api.events(study_id))
    assert [e.type for e in events] == ["trial_started", "trial_reported", "study_finished"]
    assert events[1].payload["eval_loss"] == 2.0
    assert [e.type for e in api.events(study_id, last_event_id=events[0].id)] == ["trial_reported", "study_finished"]
    assert api.wait(study_id, timeout=5).status == "completed"


@pytest.mark.parametrize("command", CLIENT_COMMANDS)
def test_cli_help_shows_an_example(command: str) -> None:
    result = runner.invoke(app, [command, "--help"], prog_name="scaletune")
    assert result.exit_code == 0, result.output
    assert re.search(rf"scaletune {command}\b", result.output.split("Example", 1)[1])


def test_cli_submit_status_trials_cancel_with_exit_codes(env: dict[str, str], spec_dict: dict[str, Any],
                                                         tmp_path: Path) -> None:
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(spec_dict))
    submitted = runner.invoke(app, ["submit", str(spec_file), "--json"], env=env)
    assert submitted.exit_code == 0, submitted.output
    study_id = json.loads(submitted.output)["id"]

    listed = runner.invoke(app, ["studies", "--json"], env=env)
    assert [s["id"] for s in json.loads(listed.output)["items"]] == [study_id]
    shown = runner.invoke(app, ["status", study_id], env=env)
    assert shown.exit_code == 0 and "queued" in shown.output and spec_dict["name"] in shown.output
    trials = runner.invoke(app, ["trials", study_id, "--json"], env=env)
    assert json.loads(trials.output)["total"] == spec_dict["parallelism"]

    assert runner.invoke(app, ["cancel", study_id], env=env).exit_code == 0
    assert runner.invoke(app, ["status", study_id, "--json"], env=env).exit_code == 4
    assert runner.invoke(app, ["watch", study_id], env=env).exit_code == 4

    missing = runner.invoke(app, ["status", "no-such-study"], env=env)
    assert missing.exit_code == 1 and "no-such-study" in missing.output


def test_cli_studies_shows_a_short_id_that_every_command_takes(env: dict[str, str], api: Client,
                                                              spec_dict: dict[str, Any]) -> None:
    first, second = api.submit(spec_dict).id, api.submit(spec_dict).id
    listed = runner.invoke(app, ["studies"], env={**env, "COLUMNS": "60"})  # a narrow terminal
    assert listed.exit_code == 0, listed.output
    shown = [cell for line in listed.output.splitlines() if line.startswith("│")
             if (cell := line.split("│")[1].strip())]
    assert sorted(shown) == sorted([first[:8], second[:8]]), listed.output  # whole, no ellipsis
    status = runner.invoke(app, ["status", first[:8], "--json"], env=env)
    assert status.exit_code == 0 and json.loads(status.output)["id"] == first
    assert runner.invoke(app, ["cancel", second[:8]], env=env).exit_code == 0
    assert api.study(second[:8]).status == "cancelled" and api.study(first).status == "queued"


def test_cli_rejected_spec_prints_field_errors_and_exits_1(env: dict[str, str], spec_dict: dict[str, Any],
                                                           tmp_path: Path) -> None:
    spec_dict["budget"]["eval_every"] = 10_000
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(spec_dict))
    result = runner.invoke(app, ["submit", str(spec_file)], env=env)
    assert result.exit_code == 1
    assert "budget.eval_every" in result.output


def test_cli_unreachable_server_exits_1_naming_the_url(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    result = runner.invoke(app, ["studies"], env={"SCALETUNE_URL": url})
    assert result.exit_code == 1 and url in result.output


def test_cli_watch_follows_events_until_the_study_finishes(api: Client, env: dict[str, str],
                                                           session_factory: SessionFactory,
                                                           spec_dict: dict[str, Any]) -> None:
    study_id = api.submit(spec_dict).id

    def progress() -> None:
        time.sleep(1.0)
        _finish(session_factory, study_id, [(EventType.trial_started, {"attempt": 1}),
                                            (EventType.trial_reported, {"step": 50, "eval_loss": 2.0})])

    thread = threading.Thread(target=progress)
    thread.start()
    result = runner.invoke(app, ["watch", study_id, "--json"], env=env)
    thread.join()
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.output.splitlines() if line.startswith("{")]
    assert [line["type"] for line in lines] == ["trial_started", "trial_reported", "study_finished"]

    table = runner.invoke(app, ["watch", study_id], env=env)
    assert table.exit_code == 0 and "completed" in table.output


# ---- retries, against a real HTTP server on loopback that answers from a script ----
Reply = Callable[[BaseHTTPRequestHandler, bytes], None]


def _drop(handler: BaseHTTPRequestHandler, _body: bytes) -> None:
    """Close the connection without an answer, as a crashed server or a cut network does."""
    handler.close_connection = True
    handler.connection.shutdown(socket.SHUT_RDWR)


def _answer(status: int, headers: dict[str, str] | None = None, body: object | None = None) -> Reply:
    def reply(handler: BaseHTTPRequestHandler, _body: bytes) -> None:
        payload = json.dumps(body if body is not None else {"detail": f"scripted {status}"}).encode()
        handler.send_response(status)
        for name, value in {"Content-Type": "application/json", **(headers or {})}.items():
            handler.send_header(name, value)
        handler.send_header("Content-Length", str(len(payload)))
        handler.end_headers()
        handler.wfile.write(payload)
    return reply


def _forward(upstream: str, then_drop: bool = False) -> Reply:
    """Relay the request to the real API; with ``then_drop`` its answer is lost on the way back."""
    def reply(handler: BaseHTTPRequestHandler, body: bytes) -> None:
        headers = {k: v for k, v in handler.headers.items() if k.lower() not in ("host", "content-length")}
        answer = httpx.request(handler.command, upstream + handler.path, headers=headers, content=body)
        if then_drop:
            _drop(handler, body)
        else:
            _answer(answer.status_code, body=answer.json())(handler, body)
    return reply


@contextmanager
def scripted_server(*replies: Reply) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """Answers the n-th request with ``replies[n]`` (the last one from then on); yields its URL and what it saw."""
    seen: list[dict[str, Any]] = []

    class Handler(BaseHTTPRequestHandler):
        def _any(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            seen.append({"method": self.command, "path": self.path, "at": time.monotonic(),
                         "idempotency_key": self.headers.get("Idempotency-Key")})
            replies[min(len(seen), len(replies)) - 1](self, body)

        do_GET = do_POST = _any

        def log_message(self, *_args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", seen
    finally:
        server.shutdown()
        server.server_close()


EMPTY_PAGE = {"items": [], "total": 0, "limit": 50, "offset": 0}


def test_an_idempotent_call_is_retried_through_drops_5xx_and_429_honouring_retry_after() -> None:
    with scripted_server(_drop, _answer(503), _answer(429, {"Retry-After": "1"}), _answer(200, body=EMPTY_PAGE)) \
            as (url, seen), Client(url, backoff=0.01) as client:
        assert client.studies().total == 0
    assert [request["path"] for request in seen] == ["/v1/studies?limit=50&offset=0"] * 4
    assert seen[3]["at"] - seen[2]["at"] >= 1.0, "the client waited as Retry-After asked"


def test_retries_are_bounded() -> None:
    with scripted_server(_answer(503)) as (url, seen), Client(url, retries=2, backoff=0.01) as client, \
            pytest.raises(ServiceUnavailable, match="HTTP 503"):
        client.studies()
    assert len(seen) == 3, "the first try and two retries"


def test_a_call_that_is_not_idempotent_is_sent_once() -> None:
    with scripted_server(_answer(503)) as (url, seen), Client(url, backoff=0.01) as client, \
            pytest.raises(ScaletuneError):
        client.cancel("some-study")
    assert len(seen) == 1


def test_a_retried_submit_creates_one_study(live_url: str, token: str, api: Client, spec_dict: dict[str, Any]) -> None:
    """The first answer is lost after the server created the study; the retry carries the same key."""
    with scripted_server(_forward(live_url, then_drop=True), _forward(live_url)) as (url, seen), \
            Client(url, token=token, backoff=0.01) as flaky:
        created = flaky.submit(spec_dict)
    assert len(seen) == 2 and seen[0]["idempotency_key"] == seen[1]["idempotency_key"] is not None
    assert [s.id for s in api.studies().items] == [created.id]


def test_an_external_trials_calls_are_retried_and_each_counts_once(live_url: str, token: str, api: Client) -> None:
    """The answer to the ask, a report and the tell is each lost once after the server acted; the retries (the ask
    with the same Idempotency-Key) hand out one trial, record one point and one outcome."""
    study_id = api.submit({**EXTERNAL, "n_trials": 2, "parallelism": 2}).id
    with scripted_server(*[_forward(live_url, then_drop=True), _forward(live_url)] * 3) as (url, seen), \
            Client(url, token=token, backoff=0.01) as flaky:
        trial = flaky.ask(study_id)
        assert trial.report(1, 0.5) is False
        trial.tell(0.25)
    assert [request["path"].rsplit("/", 1)[1] for request in seen] == ["ask", "ask", "report", "report", "tell",
                                                                       "tell"]
    assert seen[0]["idempotency_key"] == seen[1]["idempotency_key"] is not None
    recorded, = api.trials(study_id).items
    assert (recorded.number, recorded.state, recorded.value) == (trial.number, "complete", 0.25)
    assert [(point.step, point.value) for point in recorded.intermediate] == [(1, 0.5)]


def test_cli_submit_retries_and_creates_one_study(live_url: str, env: dict[str, str], api: Client,
                                                  spec_dict: dict[str, Any], tmp_path: Path) -> None:
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(spec_dict))
    with scripted_server(_forward(live_url, then_drop=True), _answer(502), _forward(live_url)) as (url, seen):
        result = runner.invoke(app, ["submit", str(spec_file), "--json"], env={**env, "SCALETUNE_URL": url})
    assert result.exit_code == 0, result.output
    assert len(seen) == 3 and len({request["idempotency_key"] for request in seen}) == 1
    assert [s.id for s in api.studies().items] == [json.loads(result.stdout)["id"]]
