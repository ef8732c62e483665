"""The study spec: the documented example is accepted; each mistake is a 422 naming the field, with advice."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from fastapi.testclient import TestClient

from scaletune.parametrize import ParamOptions
from service.settings import Settings
from service.kinds.registry import STUDY_SPEC, load_spec
from service.kinds.tune import KIND as TUNE
from service.spec import SpecError


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_example_spec_loads_from_file(tmp_path: Path, settings: Settings, spec_dict: dict[str, Any],
                                      suffix: str) -> None:
    path = tmp_path / f"study{suffix}"
    path.write_text(yaml.safe_dump(spec_dict) if suffix == ".yaml" else json.dumps(spec_dict))
    spec = load_spec(path, settings)
    assert spec.kind == "tune"
    assert spec.model.proxy.width == 128
    assert spec.search_space["lr"].log is True
    assert spec.queue == "cpu"


def test_load_spec_reports_every_problem_with_its_path(tmp_path: Path, settings: Settings,
                                                       spec_dict: dict[str, Any]) -> None:
    spec_dict["n_trials"] = 0
    spec_dict["optimizer"] = "lion"
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(spec_dict))
    with pytest.raises(SpecError) as caught:
        load_spec(path, settings)
    assert {problem.loc for problem in caught.value.problems} == {("n_trials",), ("optimizer",)}


def _set(spec: dict[str, Any], path: str, value: Any) -> None:
    *parents, last = path.split(".")
    for key in parents:
        spec = spec[key]
    spec[last] = value


BAD_SPECS = [
    # (field path to change, new value, expected error location, words the message must contain)
    ("model.family", "transformerxl", ["body", "model", "family"], "available: gpt, mlp, resnet, vit"),
    ("dataset.name", "imagenet", ["body", "dataset", "name"], "available:"),
    ("kind", "sweep", ["body"], "'tune'"),
    ("search_space.lr.low", 0.5, ["body", "search_space", "lr", "high"], "must be a finite number above low"),
    ("search_space.output_mult.low", 0.0, ["body", "search_space", "output_mult", "low"], "log-scale range needs low > 0"),
    ("search_space.dropout", {"type": "float", "low": 0, "high": 1}, ["body", "search_space", "dropout", "[key]"], "'lr'"),
    ("search_space.lr.type", "uniform", ["body", "search_space", "lr"], "'float', 'int', 'categorical'"),
    ("hyperparameters.lr", 0.01, ["body", "hyperparameters", "lr"], "both fixed and searched"),
    ("n_trials", 5000, ["body", "n_trials"], "limit of 1000 trials per study"),
    ("parallelism", 65, ["body", "parallelism"], "SCALETUNE_MAX_PARALLELISM"),
    ("budget.batch_size", 10_000, ["body", "budget", "batch_size"], "limit of 4096 batch size"),
    ("budget.eval_every", 500, ["body", "budget", "eval_every"], "no eval would run"),
    ("budget.schedule", "exp", ["body", "budget", "schedule"], "'cosine'"),
    ("model.proxy.depth", 0, ["body", "model", "proxy", "depth"], "greater than or equal to 1"),
    ("model.colour", "red", ["body", "model", "colour"], "Extra inputs are not permitted"),
    ("sampler.name", "grid", ["body", "search_space", "lr"], "give this float a step"),
    # A step so small the range would hold ~10^297 values: refused before anything counts or allocates them.
    ("search_space.lr", {"type": "float", "low": 1e-3, "high": 1e-2, "step": 1e-300},
     ["body", "search_space", "lr", "step"], "more than 1,000,000,000 values"),
    ("enqueue", [{"lr": 0.01, "beta1": 0.9}], ["body", "enqueue", 0, "beta1"], "not in search_space"),
    ("parametrization_options", {"eps_rule": "adam-atan2"}, ["body", "parametrization_options", "eps_rule"], "'per_group'"),
]


@pytest.mark.parametrize(("path", "value", "loc", "words"), BAD_SPECS, ids=[case[0] for case in BAD_SPECS])
def test_bad_spec_is_422_naming_the_field(client: TestClient, spec_dict: dict[str, Any], path: str, value: Any,
                                          loc: list[Any], words: str) -> None:
    _set(spec_dict, path, value)
    response = client.post("/v1/studies", json=spec_dict)
    assert response.status_code == 422, response.text
    problems = response.json()["errors"]
    matching = [p for p in problems if p["loc"][:len(loc)] == loc]
    assert matching, problems
    assert any(words in p["msg"] for p in matching), problems


def test_proxy_over_the_parameter_limit_is_refused_with_count_and_limit(
        settings: Settings, spec_dict: dict[str, Any]) -> None:
    from service.api.app import create_app
    from service.db import upgrade_database

    upgrade_database(settings.DATABASE_URL)
    small = settings.model_copy(update={"MAX_PROXY_PARAMS": 10_000, "AUTH_DISABLED": True})
    spec_dict["model"]["proxy"] = {"width": 512, "depth": 4}
    with TestClient(create_app(small)) as client:
        response = client.post("/v1/studies", json=spec_dict)
    assert response.status_code == 422
    [problem] = response.json()["errors"]
    assert problem["loc"] == ["body", "model", "proxy"]
    assert re.search(r"the proxy has [\d,]{6,} parameters, above this server's limit of 10,000", problem["msg"])


def test_parametrization_options_reach_every_trial(spec_dict: dict[str, Any]) -> None:
    default = TUNE.trial_config(STUDY_SPEC.validate_python(spec_dict), {"lr": 1e-3})
    assert default.options is not None and ParamOptions.from_dict(default.options) == ParamOptions()
    spec_dict["parametrization_options"] = {"zero_init_readout": False, "eps_rule": "none"}
    chosen = TUNE.trial_config(STUDY_SPEC.validate_python(spec_dict), {"lr": 1e-3})
    assert chosen.options is not None
    assert ParamOptions.from_dict(chosen.options) == ParamOptions(zero_init_readout=False, eps_rule="none")
