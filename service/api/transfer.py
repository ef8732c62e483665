"""POST /v1/studies/{id}/transfer: the tuned values of a study projected to a target shape (pure, meta device)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, status
from pydantic import BaseModel, ConfigDict, Field, create_model

from scaletune.data.registry import dataset_spec
from scaletune.hparams import HParams
from scaletune.parametrize import Optimizer
from scaletune.models.registry import get_family
from scaletune.models.size import family_factory, params_by_depth
from scaletune.shapes import Shape
from scaletune.transfer import TransferPlan, transfer_plan
from service.api.auth import UNAUTHORIZED, CurrentPrincipal
from service.api.lookup import study_of_kind
from service.api.problems import InvalidField
from service.api.schemas import Problem
from service.api.state import ServiceState, service_state
from service.kinds import tune
from service.kinds.tuned import NoCompletedTrial, best_attempt, tuned_values
from service.spec import ShapeSpec, TuneSpec

router = APIRouter(prefix="/v1/studies", tags=["transfer"], responses=UNAUTHORIZED)
State = Annotated[ServiceState, Depends(service_state)]


class TransferRequest(BaseModel):
    """The target to plan for; batch size and steps only matter for the warnings and the optional batch rule."""

    model_config = ConfigDict(extra="forbid")

    target: ShapeSpec
    optimizer: Optimizer | None = Field(None, description="defaults to the optimizer tuned with")
    batch_size: int | None = Field(None, ge=1)
    steps: int | None = Field(None, ge=1)
    batch_rule: Literal["sqrt", "linear"] | None = Field(
        None, description="scale LRs with the batch size by a labelled heuristic (needs batch_size)")


# The plan's documented JSON (TransferPlan.to_dict), its schema derived from the core's dataclasses.
TransferPlanJSON = create_model("TransferPlan", __doc__=TransferPlan.to_dict.__doc__,
                                **{key: (type_, ...) for key, type_ in TransferPlan.json_types().items()})


def _unprocessable(msg: str, *loc: str | int) -> InvalidField:
    return InvalidField(("body", *loc), msg)


def plan_for(spec: TuneSpec, tuned: dict[str, float], request: TransferRequest, max_params: int,
             data_root: Any, provenance: dict[str, Any]) -> TransferPlan:
    """Validate the target against the family and the size limit, then plan it; ValueErrors become 422s."""
    optimizer = request.optimizer or spec.optimizer
    if optimizer != spec.optimizer:
        raise _unprocessable(f"the study tuned {spec.optimizer}; its values do not transfer to {optimizer}. "
                             f"Tune a study with optimizer {optimizer} instead.", "optimizer")
    if request.batch_rule is not None and request.batch_size is None:
        raise _unprocessable("batch_rule needs batch_size, the target's batch size", "batch_size")
    family = get_family(spec.model.family)
    data = dataset_spec(spec.dataset.name, spec.dataset.args, data_root)
    target = Shape(**request.target.model_dump())
    try:
        family.validate(target, data, spec.model.args)
    except (ValueError, TypeError) as error:
        raise _unprocessable(str(error), "target") from None
    n_params = params_by_depth(family_factory(family, target, data, spec.model.args), target)
    if n_params > max_params:
        raise _unprocessable(f"the target has about {n_params:,} parameters, above this server's limit of "
                             f"{max_params:,} (SCALETUNE_MAX_TARGET_PARAMS)", "target")
    transfer = transfer_plan(spec.model.family, data, spec.model.args, Shape(**spec.model.base.model_dump()),
                             target, spec.parametrization, HParams.from_dict(tuned), optimizer,
                             spec.parametrization_options,
                             tuned_batch_size=spec.budget.batch_size, batch_size=request.batch_size,
                             tuned_steps=spec.budget.steps, steps=request.steps, batch_rule=request.batch_rule,
                             provenance=provenance)
    transfer.provenance["n_params"] = sum(group.numel for group in transfer.plan.groups)
    return transfer


@router.post("/{study_id}/transfer", response_model=TransferPlanJSON,
             responses={404: {"model": Problem, "description": "no study with this id"},
                        409: {"model": Problem, "description": "not a tune study, or no completed trial yet"}},
             summary="Project the study's best hyperparameters to a target shape")
def post_transfer(study_id: str, request: TransferRequest, state: State,
                  principal: CurrentPrincipal) -> dict[str, Any]:
    with state.session_factory() as session:
        study, spec = study_of_kind(session, study_id, principal, tune.KIND,
                                    "only tune studies have tuned values to transfer")
        try:
            best = best_attempt(session, study)
        except NoCompletedTrial as error:
            raise HTTPException(status.HTTP_409_CONFLICT, str(error)) from None
        tuned = tuned_values(spec, best)
        provenance = {"study_id": study_id, "best_trial": best.number, "value": best.value}
    return plan_for(spec, tuned, request, state.settings.MAX_TARGET_PARAMS, state.settings.DATA_ROOT,
                    provenance).to_dict()
