"""A tune study's coordinate check around its proxy width: computed once, on first request, then served from files.

It answers "is my proxy in a transferable parametrization?": with the study's family, parametrization and
optimizer, activations should keep their size as width grows. Computing it trains small models for a few steps,
so the result is kept as JSON + PNG under ARTIFACTS_DIR/<study>/ (a study's setup never changes).
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scaletune.coord_check import FLAT_SLOPE, coord_check
from scaletune.data.registry import dataset_spec
from scaletune.models.registry import get_family
from scaletune.models.size import family_factory, params_by_depth
from scaletune.shapes import Shape
from service.plots import NoPlotData, Plot, PlotInput
from service.spec import TuneSpec

WIDTH_FACTORS = (0.25, 0.5, 1.0, 2.0, 4.0)  # proxy/4 .. proxy*4
STEPS, SEEDS = 4, 2
_computing = threading.Lock()  # one check at a time: bounds CPU use, and CoordCheckResult.plot uses pyplot


@dataclass(frozen=True)
class CoordCheckFiles:
    json: Path
    png: Path


def coord_widths(spec: TuneSpec, data_root: Path | None, max_params: int) -> list[int]:
    """proxy/4 .. proxy*4, keeping the widths the family can build at the base depth within the proxy size limit."""
    family, args = get_family(spec.model.family), spec.model.args
    data = dataset_spec(spec.dataset.name, spec.dataset.args, data_root)
    base = Shape(**spec.model.base.model_dump())
    widths = []
    for width in sorted({max(1, int(spec.model.proxy.width * factor)) for factor in WIDTH_FACTORS}):
        shape = base.with_(width=width)
        try:
            family.validate(shape, data, args)
        except ValueError:
            continue
        if params_by_depth(family_factory(family, shape, data, args), shape) <= max_params:
            widths.append(width)
    return widths


def _write_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """Write to a temporary file in the same folder, then rename: a reader never sees a half-written file."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        write(Path(temporary))
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def _compute(spec: TuneSpec, files: CoordCheckFiles, data_root: Path | None, max_params: int) -> None:
    widths = coord_widths(spec, data_root, max_params)
    if len(widths) < 2:
        raise NoPlotData(f"a coordinate check needs two buildable widths around the proxy width "
                         f"{spec.model.proxy.width}; only {widths} are buildable within the proxy size limit.")
    try:
        result = coord_check(spec.model.family, spec.parametrization, widths, steps=STEPS, seeds=SEEDS,
                             base=Shape(**spec.model.base.model_dump()), dataset=spec.dataset.name,
                             dataset_args=spec.dataset.args, optimizer=spec.optimizer, args=spec.model.args)
    except ValueError as error:
        raise NoPlotData(f"the coordinate check cannot run on this study's setup: {error}") from None
    worst = result.to_json()["max_abs_slope"]
    body = {"kind": "coord_check", "proxy_width": spec.model.proxy.width, "flat_slope": FLAT_SLOPE,
            "flat": worst is not None and worst <= FLAT_SLOPE, **result.to_json()}
    files.json.parent.mkdir(parents=True, exist_ok=True)
    _write_atomically(files.png, result.plot)
    _write_atomically(files.json, lambda path: path.write_text(json.dumps(body, allow_nan=False)))


def coord_check_files(artifacts_dir: Path, study_id: str, spec: TuneSpec, data_root: Path | None,
                      max_params: int) -> CoordCheckFiles:
    """The cached check's JSON and PNG, computing them first if this study has none yet (the JSON is written last)."""
    folder = artifacts_dir / study_id
    files = CoordCheckFiles(folder / "coord_check.json", folder / "coord_check.png")
    if files.json.exists():
        return files
    with _computing:
        if not files.json.exists():
            _compute(spec, files, data_root, max_params)
    return files


class CoordCheckPlot(Plot):
    """The coordinate check as a plot: both forms read from the files computed on first request."""

    def _files(self, given: PlotInput) -> CoordCheckFiles:
        settings = given.settings
        assert settings.ARTIFACTS_DIR is not None
        return coord_check_files(settings.ARTIFACTS_DIR, given.study.id, given.spec, settings.DATA_ROOT,
                                 settings.MAX_PROXY_PARAMS)

    def data(self, given: PlotInput) -> dict[str, Any]:
        return dict(json.loads(self._files(given).json.read_text()))

    def png(self, given: PlotInput) -> bytes:
        return self._files(given).png.read_bytes()


COORD_CHECK = CoordCheckPlot()
