"""Study ids as people type them: a unique prefix stands for the whole id, as git takes a commit's prefix.

Ids are UUIDs; lists show each study's short id, the shortest prefix of at least ``SHORT_ID_LENGTH``
characters that no other study the caller can see shares. Resolution is scoped the same way, so a tenant's
prefix never matches, or is made ambiguous by, another tenant's studies.
"""

from __future__ import annotations

import os
import re
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Select, func, select
from sqlalchemy.orm import Session

from service.models import Study

MIN_PREFIX = 4
ID_LENGTH: int = Study.__table__.c.id.type.length  # type: ignore[attr-defined]
SHORT_ID_LENGTH = 8
MAX_CANDIDATES = 10
_ID_CHARS = re.compile(r"[0-9a-f-]+")


class AmbiguousStudyId(LookupError):
    """A prefix that several studies share: ``candidates`` are (id, name) of the first of them, by id."""

    def __init__(self, prefix: str, candidates: Sequence[tuple[str, str]], more: bool) -> None:
        self.prefix, self.candidates = prefix, list(candidates)
        listed = ", ".join(f"{study_id} ({name})" for study_id, name in self.candidates)
        super().__init__(f"study id prefix {prefix!r} is ambiguous: it matches {listed}{' and more' if more else ''}; "
                         "give more characters")


def _visible(query: Select[Any], tenant: str | None) -> Select[Any]:
    return query if tenant is None else query.where(Study.tenant == tenant)


def resolve_study_id(session: Session, ref: str, tenant: str | None) -> str:
    """The full id ``ref`` names (its id, or a unique prefix of it); ``ref`` unchanged when nothing matches."""
    if len(ref) >= ID_LENGTH:  # no id is longer, so it names itself or nothing: no query (most requests)
        return ref
    if session.scalar(_visible(select(Study.id).where(Study.id == ref), tenant)) is not None:
        return ref
    if len(ref) < MIN_PREFIX or not _ID_CHARS.fullmatch(ref):
        return ref
    matches = session.execute(_visible(select(Study.id, Study.name).where(Study.id.startswith(ref)), tenant)
                              .order_by(Study.id).limit(MAX_CANDIDATES + 1)).all()
    if len(matches) > 1:
        raise AmbiguousStudyId(ref, [(row.id, row.name) for row in matches[:MAX_CANDIDATES]],
                               more=len(matches) > MAX_CANDIDATES)
    return matches[0].id if matches else ref


def short_ids(session: Session, ids: Sequence[str], tenant: str | None) -> dict[str, str]:
    """Each id's shortest prefix (at least SHORT_ID_LENGTH long) that no other visible study shares."""
    heads = {study_id[:SHORT_ID_LENGTH] for study_id in ids}
    near = session.scalars(_visible(select(Study.id).where(func.substr(Study.id, 1, SHORT_ID_LENGTH).in_(heads)),
                                    tenant)).all()
    by_head: dict[str, list[str]] = defaultdict(list)
    for other in near:
        by_head[other[:SHORT_ID_LENGTH]].append(other)
    shortest = {}
    for study_id in ids:
        shared = [len(os.path.commonprefix([study_id, other]))
                  for other in by_head[study_id[:SHORT_ID_LENGTH]] if other != study_id]
        shortest[study_id] = study_id[:max([SHORT_ID_LENGTH - 1, *shared]) + 1]
    return shortest
