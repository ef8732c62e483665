"""A trial of an external study, in the user's own training code: its values, its model, report and tell.

    import scaletune
    client = scaletune.Client("http://tuning:8000", token)
    with client.ask(study_id) as trial:          # an exception in the block tells the trial failed
        built = trial.build(make_model)          # your model at the study's proxy shape, parametrized
        optimizer = torch.optim.AdamW(built.param_groups)
        for step in ...:
            ...
            if trial.report(step, eval_loss):    # True: the pruner says stop
                trial.prune()
                break
        else:
            trial.tell(eval_loss)

Under ``scaletune agent``, ``scaletune.current_trial()`` returns the trial the agent asked for.
"""

from __future__ import annotations

import math
import threading
import traceback
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any

from scaletune.errors import Conflict, NotFound, ScaletuneError
from scaletune.shapes import Shape

if TYPE_CHECKING:
    from scaletune.client import Client
    from scaletune.parametrize import BuiltModel, Factory

ENV_URL, ENV_TOKEN, ENV_STUDY, ENV_TRIAL, ENV_PARAMS = (
    "SCALETUNE_URL", "SCALETUNE_TOKEN", "SCALETUNE_STUDY", "SCALETUNE_TRIAL", "SCALETUNE_PARAMS")
REASON_CHARS = 4000
LEASE_EXPIRED = "lease_expired"  # the failure reason of a trial whose lease ran out
TOLD_STATES = ("complete", "pruned", "failed")


class LeaseKeeper:
    """Renews a trial's lease in a thread, a third of the lease apart, until the server refuses: then ``told`` is
    set when the trial was told (the code may still be saving its work: let it finish), ``lost`` when its lease ran
    out, its study was cancelled or the server no longer knows it (its params go to another: stop the work)."""

    def __init__(self, client: Client, study_id: str, number: int, lease_seconds: float) -> None:
        self.lost = threading.Event()
        self.told = threading.Event()
        self._stop = threading.Event()
        self._interval = max(1.0, lease_seconds / 3)
        self._thread = threading.Thread(target=self._run, args=(client, study_id, number),
                                        name=f"lease-{study_id[:8]}-{number}", daemon=True)

    def _run(self, client: Client, study_id: str, number: int) -> None:
        while not self._stop.wait(self._interval):
            try:
                client.heartbeat(study_id, number)
            except (Conflict, NotFound):
                (self.told if _was_told(client, study_id, number) else self.lost).set()
                return
            except ScaletuneError:  # the server may be restarting: the lease has slack for a missed renewal
                continue

    def __enter__(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _was_told(client: Client, study_id: str, number: int) -> bool:
    """Whether a trial whose renewal was refused ended by a tell, rather than by losing its lease."""
    try:
        record = client.trial(study_id, number)
    except ScaletuneError:
        return False
    return record.state in TOLD_STATES and record.failure_reason != LEASE_EXPIRED


@dataclass
class Trial:
    """One trial handed out by the server: ``params`` in base units, the shapes and parametrization to build at."""

    client: Client
    study_id: str
    number: int
    params: dict[str, Any]
    lease_seconds: int
    parametrization: str
    optimizer: str
    base: Shape | None
    proxy: Shape | None
    options: dict[str, Any] = field(default_factory=dict)
    state: str = "running"
    _keeper: LeaseKeeper | None = field(default=None, repr=False)

    @classmethod
    def from_asked(cls, client: Client, study_id: str, asked: dict[str, Any]) -> Trial:
        """From the ask endpoint's answer."""
        return cls(client=client, study_id=study_id, number=int(asked["number"]), params=dict(asked["params"]),
                   lease_seconds=int(asked["lease_seconds"]), parametrization=asked["parametrization"],
                   optimizer=asked["optimizer"], base=shape_of(asked.get("base")), proxy=shape_of(asked.get("proxy")),
                   options=dict(asked.get("options") or {}))

    @property
    def told(self) -> bool:
        return self.state != "running"

    def report(self, step: int, value: float) -> bool:
        """Record ``value`` at ``step`` (renews the lease); True when the trial should stop (pruned, or cancelled)."""
        value = float(value)
        return self.client.report(self.study_id, self.number, int(step), value if math.isfinite(value) else None)

    def tell(self, value: float) -> None:
        """The trial completed with this final value; a NaN or infinite value records it as diverged."""
        value = float(value)
        self._tell("complete", value if math.isfinite(value) else None)

    def prune(self) -> None:
        """The trial stopped early because ``report`` said so."""
        self._tell("pruned", None)

    def fail(self, reason: str) -> None:
        """The trial failed; ``reason`` is kept with it (its last REASON_CHARS characters)."""
        self._tell("failed", None, reason[-REASON_CHARS:])

    def _tell(self, state: str, value: float | None, reason: str | None = None) -> None:
        self.state = self.client.tell(self.study_id, self.number, state, value, reason).state

    def build(self, factory: Factory, device: str = "cpu", **declarations: Any) -> BuiltModel:
        """``factory(width, depth)`` built at the study's proxy shape in its parametrization with this trial's values.

        Returns the core's BuiltModel: ``.model`` and ``.param_groups`` (per-group lr, weight decay, eps) for
        ``torch.optim``. ``declarations`` go to ``scaletune.parametrize.build_model`` as they are. The study's own
        hyperparameters (names that are not built-in, e.g. dropout) are not applied: read them from ``params``.
        """
        from scaletune.hparams import HParams
        from scaletune.parametrize import ParamOptions, build_model

        if self.base is None or self.proxy is None:
            raise ValueError(f"study {self.study_id} gives no model shapes; add model.base and model.proxy "
                             "({width, depth}) to its spec to build through the study")
        return build_model(factory, self.base, self.proxy, self.parametrization, HParams.builtin_of(self.params),
                           self.optimizer, ParamOptions.from_dict(self.options), device=device, **declarations)

    def __enter__(self) -> Trial:
        """Keep the lease while the block runs; tell ``failed`` if it raises, or ends without telling."""
        self._keeper = LeaseKeeper(self.client, self.study_id, self.number, self.lease_seconds).__enter__()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._keeper is not None:
            self._keeper.__exit__()
            self._keeper = None
        if self.told:
            return
        if exc is not None:
            self.fail("".join(traceback.format_exception(exc_type, exc, tb)))
        else:
            self.fail("the code ended without telling a value (call trial.tell(value), prune() or fail(reason))")


def shape_of(data: dict[str, Any] | None) -> Shape | None:
    return None if data is None else Shape.from_dict(data)
