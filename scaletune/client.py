"""Python client for a scaletune server: typed results, exceptions that say what to do, live events over SSE.

    from scaletune.client import Client
    client = Client()                      # $SCALETUNE_URL (default http://127.0.0.1:8000), $SCALETUNE_TOKEN
    study = client.submit("spec.yaml")
    for event in client.events(study.id):
        print(event.type, event.payload)
    print(client.wait(study.id).best_params)

Idempotent calls (every GET, ``transfer``, which only computes, and an external trial's ``report``,
``heartbeat`` and ``tell``, which the server records once however often they arrive) and ``submit`` and
``ask`` (each sent with a generated ``Idempotency-Key``, so the server creates the study or hands out the
trial once) are retried on a transport error, a 5xx or a 429: up to ``retries`` times, waiting
``backoff * 2**n`` seconds with jitter, or what the server's ``Retry-After`` asks when that is longer, never
more than ``max_backoff``. Code run by ``scaletune agent`` uses PATIENT_RETRIES, to ride out an API restart.
"""

from __future__ import annotations

import email.utils
import json
import logging
import os
import random
import socket
import time
import uuid
from collections.abc import Iterable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import yaml
from pydantic import BaseModel, ConfigDict

from scaletune.errors import (Conflict, EndpointMissing, NotFound, ScaletuneError, ServiceUnavailable, TooManyOut,
                              Unauthorized, ValidationFailed)
from scaletune.trial import ENV_PARAMS, ENV_STUDY, ENV_TOKEN, ENV_TRIAL, ENV_URL, Trial, shape_of

__all__ = ["Client", "Conflict", "EndpointMissing", "NotFound", "ScaletuneError", "ServiceUnavailable", "TooManyOut",
           "Trial", "Unauthorized", "ValidationFailed", "current_trial"]

DEFAULT_URL = "http://127.0.0.1:8000"
FINISHED = ("completed", "failed", "cancelled")
MAX_RECONNECTS = 5
RETRIED_STATUSES = frozenset({429, 500, 502, 503, 504})
PATIENT_RETRIES = 8  # about a minute and a half of backoff in all (max_backoff 30 s)

log = logging.getLogger("scaletune.client")


class _Model(BaseModel):
    """Mirrors of the API's bodies; unknown fields from a newer server are kept, not refused."""

    model_config = ConfigDict(extra="allow")


class StudyLinks(_Model):
    self: str
    trials: str
    cancel: str


class StudyCreated(_Model):
    id: str
    status: str
    links: StudyLinks


class StudySummary(_Model):
    id: str
    short_id: str  # a unique prefix of id: every method that takes a study id takes it too
    name: str
    kind: str
    status: str
    n_trials: int
    best_value: float | None
    created_at: datetime
    finished_at: datetime | None


class StudyPage(_Model):
    items: list[StudySummary]
    total: int
    limit: int
    offset: int


class StudyDetail(_Model):
    id: str
    name: str
    kind: str
    status: str
    spec: dict[str, Any]
    trial_counts: dict[str, int]
    best_value: float | None
    best_params: dict[str, Any] | None
    error: str | None
    optuna_study_name: str
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None

    @property
    def finished(self) -> bool:
        return self.status in FINISHED


class EvalPoint(_Model):
    step: int
    samples: int | None = None
    flops: float | None = None
    train_loss: float | None = None
    eval_loss: float | None = None
    value: float | None = None


class TrialRecord(_Model):
    """A trial attempt as the server records it (GET .../trials)."""

    id: str
    number: int | None
    attempt: int
    retry_of: str | None
    state: str
    params: dict[str, Any] | None
    value: float | None
    intermediate: list[EvalPoint]
    failure_reason: str | None
    worker: str | None
    queued_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    duration_s: float | None
    flops: float | None


class TrialPage(_Model):
    items: list[TrialRecord]
    total: int
    limit: int
    offset: int


class Event(_Model):
    """One persisted study event; ``id`` is what a reconnect passes as Last-Event-ID."""

    id: int
    type: str
    study_id: str
    trial_id: str | None
    created_at: datetime
    payload: dict[str, Any]


def parse_sse(lines: Iterable[str]) -> Iterator[tuple[str | None, str, str]]:
    """Server-sent event frames as (id, event, data); comments (keep-alives) and retry hints are skipped."""
    event_id: str | None = None
    event_type = "message"
    data: list[str] = []
    for line in lines:
        if not line:
            if data:
                yield event_id, event_type, "\n".join(data)
            event_id, event_type, data = None, "message", []
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if field == "id":
            event_id = value
        elif field == "event":
            event_type = value
        elif field == "data":
            data.append(value)


def _load_spec(spec: dict[str, Any] | str | Path) -> dict[str, Any]:
    if isinstance(spec, dict):
        return spec
    text = Path(spec).read_text()
    loaded = json.loads(text) if str(spec).endswith(".json") else yaml.safe_load(text)
    if not isinstance(loaded, dict):
        raise ValueError(f"{spec} does not hold a study spec (expected a mapping at the top level)")
    return loaded


class Client:
    """A scaletune server at ``url`` ($SCALETUNE_URL); ``token`` ($SCALETUNE_TOKEN) is sent as a Bearer token."""

    def __init__(self, url: str | None = None, token: str | None = None, timeout: float = 30.0,
                 transport: httpx.BaseTransport | None = None, retries: int = 4, backoff: float = 0.5,
                 max_backoff: float = 30.0) -> None:
        self.url = (url or os.environ.get("SCALETUNE_URL") or DEFAULT_URL).rstrip("/")
        self.retries, self.backoff, self.max_backoff = retries, backoff, max_backoff
        token = token or os.environ.get("SCALETUNE_TOKEN") or None
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout, transport=transport)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _raise_for(self, response: httpx.Response, route: str | None) -> None:
        if response.is_success:
            return
        try:
            problem: Any = response.json()
        except ValueError:
            problem = None
        if not isinstance(problem, dict):  # not a problem document (say, a proxy's error page)
            problem = {"detail": response.text or response.reason_phrase}
        status = response.status_code
        if status == 422 and problem.get("errors"):
            raise ValidationFailed(problem["errors"])
        message = str(problem.get("detail") or response.reason_phrase)
        if status in (404, 405) and route is not None and message in ("Not Found", "Method Not Allowed"):
            raise EndpointMissing(f"the server at {self.url} has no {route}; it is older than this client or "
                                  "does not offer this feature", status)
        if status == 404:
            raise NotFound(message, status)
        if status in (401, 403):
            raise Unauthorized(f"{message} (set SCALETUNE_TOKEN or pass token=... to a valid token)", status)
        if status == 409:
            raise Conflict(message, status)
        if status == 429:
            raise TooManyOut(message, float(response.headers.get("Retry-After", 5)))
        if status >= 500:
            raise ServiceUnavailable(self.url, f"HTTP {status}: {message}", status)
        raise ScaletuneError(f"HTTP {status}: {message}", status)

    def _delay(self, attempt: int, retry_after: str | None) -> float:
        """Exponential backoff with jitter, or the server's Retry-After (seconds or a date) when longer; capped."""
        delay = self.backoff * 2 ** (attempt - 1) * random.uniform(0.5, 1.0)
        if retry_after is not None:
            if retry_after.strip().isdigit():
                delay = max(delay, float(retry_after))
            elif (when := email.utils.parsedate_to_datetime(retry_after)) is not None:
                delay = max(delay, when.timestamp() - time.time())
        return min(delay, self.max_backoff)

    def _request(self, method: str, path: str, route: str | None = None, retry: bool | None = None,
                 retried_statuses: frozenset[int] = RETRIED_STATUSES, **kwargs: Any) -> httpx.Response:
        """``route`` names an optional feature's endpoint, so a server without it gives EndpointMissing;
        ``retry`` (default: GET only) says whether sending the request twice is harmless."""
        retry = method == "GET" if retry is None else retry
        attempt = 0
        while True:
            attempt += 1
            last = not retry or attempt > self.retries
            try:
                response = self._http.request(method, path, **kwargs)
            except httpx.TransportError as error:
                if last:
                    raise ServiceUnavailable(self.url, f"{type(error).__name__}: {error}") from None
                reason, retry_after = type(error).__name__, None
            else:
                if last or response.status_code not in retried_statuses:
                    self._raise_for(response, route)
                    return response
                reason, retry_after = f"HTTP {response.status_code}", response.headers.get("Retry-After")
            delay = self._delay(attempt, retry_after)
            log.warning("%s %s: %s; retry %d of %d in %.1f s", method, path, reason, attempt, self.retries, delay)
            time.sleep(delay)

    def health(self) -> dict[str, Any]:
        return dict(self._request("GET", "/readyz").json())

    def submit(self, spec: dict[str, Any] | str | Path, idempotency_key: str | None = None) -> StudyCreated:
        """Submit a spec given as a dict or as the path of a YAML/JSON file.

        Retries reuse one ``Idempotency-Key`` (generated unless given), so the study is created once.
        """
        headers = {"Idempotency-Key": idempotency_key or str(uuid.uuid4())}
        return StudyCreated.model_validate(self._request("POST", "/v1/studies", retry=True, json=_load_spec(spec),
                                                         headers=headers).json())

    def studies(self, status: str | None = None, limit: int = 50, offset: int = 0) -> StudyPage:
        params: dict[str, Any] = {"limit": limit, "offset": offset}
        if status:
            params["status"] = status
        return StudyPage.model_validate(self._request("GET", "/v1/studies", params=params).json())

    def study(self, study_id: str) -> StudyDetail:
        return StudyDetail.model_validate(self._request("GET", f"/v1/studies/{study_id}").json())

    def trials(self, study_id: str, state: str | None = None, limit: int = 100, offset: int = 0) -> TrialPage:
        params: dict[str, Any] = {"limit": limit, "offset": offset}
        if state:
            params["state"] = state
        return TrialPage.model_validate(self._request("GET", f"/v1/studies/{study_id}/trials", params=params).json())

    def trial(self, study_id: str, number: int) -> TrialRecord:
        return TrialRecord.model_validate(self._request("GET", f"/v1/studies/{study_id}/trials/{number}").json())

    def cancel(self, study_id: str) -> StudyCreated:
        return StudyCreated.model_validate(self._request("POST", f"/v1/studies/{study_id}/cancel").json())

    def transfer(self, study_id: str, target: dict[str, Any], **options: Any) -> dict[str, Any]:
        """The transfer plan (JSON) of the study's best values onto ``target`` ({"width":…, "depth":…})."""
        body = {"target": target, **{k: v for k, v in options.items() if v is not None}}
        return dict(self._request("POST", f"/v1/studies/{study_id}/transfer", route="POST .../transfer",
                                  retry=True, json=body).json())

    def check(self, study_id: str) -> dict[str, Any]:
        """A transfer_check study's verdict: per-size optimum LR, drift in octaves, holds/drifts."""
        return dict(self._request("GET", f"/v1/studies/{study_id}/check", route="GET .../check").json())

    def schedule(self, study_id: str, **query: Any) -> dict[str, Any]:
        """A shape_schedule study's fits and schedule; query: target_loss | budget_flops, target_width, …"""
        params = {k: v for k, v in query.items() if v is not None}
        return dict(self._request("GET", f"/v1/studies/{study_id}/schedule", route="GET .../schedule",
                                  params=params).json())

    def plot(self, study_id: str, kind: str) -> bytes:
        """A rendered PNG of one plot kind (history, intermediate, importance, …)."""
        return self._request("GET", f"/v1/studies/{study_id}/plots/{kind}.png", route="GET .../plots").content

    def plot_data(self, study_id: str, kind: str) -> dict[str, Any]:
        """The numbers behind a plot, to draw it yourself."""
        return dict(self._request("GET", f"/v1/studies/{study_id}/plots/{kind}.json", route="GET .../plots").json())

    def wait(self, study_id: str, timeout: float | None = None, poll_s: float = 2.0) -> StudyDetail:
        """Block until the study has finished (any outcome); TimeoutError after ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            study = self.study(study_id)
            if study.finished:
                return study
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"study {study_id} is still {study.status} after {timeout} s")
            time.sleep(poll_s if deadline is None else max(0.0, min(poll_s, deadline - time.monotonic())))

    def ask(self, study_id: str, wait: bool = True, worker: str | None = None) -> Trial:
        """The next trial of an external study, under a lease (see ``scaletune.trial``).

        With ``wait``, a 429 (every allowed trial is out) is asked again after its Retry-After, for as long as it
        takes; Conflict means the study has nothing left to ask (finished, cancelled, or not an external study).
        Transport errors and 5xx are retried with one ``Idempotency-Key``, so a lost answer hands out no second trial.
        """
        body = {"worker": worker or f"{socket.gethostname()}:{os.getpid()}"}
        headers = {"Idempotency-Key": str(uuid.uuid4())}
        while True:
            try:
                asked = self._request("POST", f"/v1/studies/{study_id}/trials/ask", route="POST .../trials/ask",
                                      retry=True, retried_statuses=RETRIED_STATUSES - {429}, json=body,
                                      headers=headers).json()
            except TooManyOut as error:
                if not wait:
                    raise
                time.sleep(error.retry_after)
                continue
            return Trial.from_asked(self, study_id, asked)

    def report(self, study_id: str, number: int, step: int, value: float | None) -> bool:
        """Record a trial's value at a step (None: not finite) and renew its lease; True: the trial should stop."""
        answer = self._request("POST", f"/v1/studies/{study_id}/trials/{number}/report", retry=True,
                               json={"step": step, "value": value}).json()
        return bool(answer["should_prune"])

    def heartbeat(self, study_id: str, number: int) -> None:
        """Renew a trial's lease; Conflict once it has ended or its lease ran out."""
        self._request("POST", f"/v1/studies/{study_id}/trials/{number}/heartbeat", retry=True)

    def tell(self, study_id: str, number: int, state: str, value: float | None = None,
             reason: str | None = None) -> TrialRecord:
        """How a trial ended (complete, pruned, failed); telling again answers what the first tell recorded."""
        body = {"state": state, "value": value, "reason": reason}
        return TrialRecord.model_validate(self._request("POST", f"/v1/studies/{study_id}/trials/{number}/tell",
                                                        retry=True, json=body).json())

    def events(self, study_id: str, last_event_id: int | None = None) -> Iterator[Event]:
        """Every event after ``last_event_id``, live, until the study finishes; reconnects without losing any."""
        failures = 0
        while True:
            headers = {"Accept": "text/event-stream"}
            if last_event_id is not None:
                headers["Last-Event-ID"] = str(last_event_id)
            try:
                with self._http.stream("GET", f"/v1/studies/{study_id}/events", headers=headers,
                                       timeout=httpx.Timeout(self._http.timeout.connect, read=60.0)) as response:
                    if not response.is_success:
                        response.read()
                        self._raise_for(response, "GET .../events")
                    for frame_id, _type, data in parse_sse(response.iter_lines()):
                        event = Event.model_validate_json(data)
                        last_event_id = event.id if frame_id is None else int(frame_id)
                        failures = 0
                        yield event
                return
            except httpx.TransportError as error:
                failures += 1
                if failures > MAX_RECONNECTS:
                    raise ServiceUnavailable(self.url, f"event stream lost: {type(error).__name__}: {error}") from None
                time.sleep(min(0.5 * 2 ** failures, 10.0))


def current_trial() -> Trial | None:
    """The trial ``scaletune agent`` runs this process for (from its environment); None outside an agent."""
    number = os.environ.get(ENV_TRIAL)
    if not number:
        return None
    study_id = os.environ[ENV_STUDY]
    client = Client(os.environ.get(ENV_URL), os.environ.get(ENV_TOKEN), retries=PATIENT_RETRIES)
    spec = client.study(study_id).spec
    model = spec.get("model") or {}
    return Trial(client=client, study_id=study_id, number=int(number), params=json.loads(os.environ[ENV_PARAMS]),
                 lease_seconds=int(spec["lease_seconds"]), parametrization=spec["parametrization"],
                 optimizer=spec["optimizer"], base=shape_of(model.get("base")), proxy=shape_of(model.get("proxy")),
                 options=dict(spec.get("parametrization_options") or {}))
