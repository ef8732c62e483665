"""Every study kind by name, the spec and summary unions they define, and parsing a spec into its kind's type.

A new kind is a module exporting ``KIND`` (a ``service.kinds.base.StudyKind``) and one line in ``KINDS``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Protocol, Union

import yaml
from pydantic import Field, TypeAdapter, ValidationError

from service.kinds import external, shape_schedule, transfer_check, tune
from service.kinds.base import StudyKind
from service.models import Study
from service.settings import Settings
from service.spec import Loc, SpecError, SpecProblem

KINDS: dict[str, StudyKind[Any]] = {kind.name: kind for kind in (
    tune.KIND,
    transfer_check.KIND,
    shape_schedule.KIND,
    external.KIND,
)}

StudySpec = Annotated[Union[tuple(kind.spec_type for kind in KINDS.values())],  # type: ignore[valid-type]  # noqa: UP007
                      Field(discriminator="kind")]
STUDY_SPEC: TypeAdapter[Any] = TypeAdapter(StudySpec)
SUMMARY_KINDS = [name for name, kind in KINDS.items() if kind.summary_type is not None]
StudyResult = Annotated[Union[tuple(KINDS[name].summary_type  # type: ignore[valid-type]  # noqa: UP007
                                     for name in SUMMARY_KINDS)], Field(discriminator="kind")]
"""A completed study's summary (``StudyKind.summary``), told apart by its ``kind``."""


class HasKind(Protocol):
    """A spec or a study row: both name their kind."""

    kind: str


def kind_of(spec_or_study: HasKind) -> StudyKind[Any]:
    return KINDS[spec_or_study.kind]


def spec_of(study: Study) -> Any:
    """The study's spec as stored: resolved at submission, so whatever it refers to is in it."""
    return kind_of(study).parse(study.spec)


def dispatching_kinds() -> list[str]:
    """The kinds whose trials the service queues for workers (the others' are asked for over HTTP)."""
    return [name for name, kind in KINDS.items() if kind.dispatches_trials]


def without_kind_tag(loc: Loc) -> Loc:
    """Pydantic puts the union tag in error paths (``tune.n_trials``); users wrote ``n_trials``."""
    return loc[1:] if loc and loc[0] in KINDS else loc


def check_spec(spec: Any, settings: Settings) -> None:
    """Raise SpecError listing every problem the types alone cannot catch."""
    problems = kind_of(spec).check(spec, settings)
    if problems:
        raise SpecError(problems)


def parse_spec(data: Any, settings: Settings) -> Any:
    """Validate a decoded YAML/JSON document completely; every failure is a SpecError."""
    try:
        spec = STUDY_SPEC.validate_python(data)
    except ValidationError as error:
        raise SpecError([SpecProblem(without_kind_tag(tuple(e["loc"])), e["msg"]) for e in error.errors()]) from None
    check_spec(spec, settings)
    return spec


def load_spec(path: str | Path, settings: Settings | None = None) -> Any:
    """Read a spec from a .yaml/.yml or .json file (what the CLI submits)."""
    text = Path(path).read_text()
    data = json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)
    return parse_spec(data, settings or Settings())
