"""Re-run the transfer check's analysis on a landscape's saved per-seed losses (no training).

The landscape benchmarks save every run's loss to ``docs/img/*losses*.json`` as
``{"ladder|parametrization|size": {"log2 value": [loss per seed, ...]}}`` (null = diverged). This prints, per
ladder and parametrization, the optimum per size, the drift with its 95 % interval and the verdict as
``scaletune.transfer_check.analyse`` gives them today, so a change to the analysis can be read on old data.

    .venv/bin/python bench/reanalyse.py docs/img/depth_transfer_losses_80steps_d2-4-8-16.json [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from transfer_landscape import fmt_interval, fmt_optimum  # also puts the checkout on sys.path

from scaletune.transfer_check import TrialRecord, analyse

SIZE = re.compile(r"([wd])(\d+)")


def records(losses: dict[str, dict[str, list[float | None]]]) -> dict[tuple[str, str], list[TrialRecord]]:
    """The saved losses as transfer-check records, grouped by (ladder, parametrization)."""
    grouped: dict[tuple[str, str], list[TrialRecord]] = {}
    for key, by_value in losses.items():
        ladder, parametrization, size = key.split("|")
        axis, n = SIZE.fullmatch(size).groups()  # type: ignore[union-attr]
        shape = {"width": int(n), "depth": 1} if axis == "w" else {"width": 1, "depth": int(n)}
        for value, per_seed in by_value.items():
            grouped.setdefault((ladder, parametrization), []).extend(
                TrialRecord.from_dict({"size": size, "shape": shape, "log2_value": float(value), "seed": seed,
                                       "loss": "diverged" if loss is None else loss})
                for seed, loss in enumerate(per_seed))
    return grouped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("losses", type=Path, help="a docs/img/*losses*.json file")
    parser.add_argument("--seed", type=int, default=0, help="the bootstrap's seed (used past 6 seeds only)")
    args = parser.parse_args()
    print("| ladder | parametrization | optimum log2 per size | drift (oct) [95%] | verdict |")
    print("|---|---|---|---|---|")
    for (ladder, parametrization), rows in records(json.loads(args.losses.read_text())).items():
        result = analyse(rows, seed=args.seed)
        optima = "<br>".join(fmt_optimum(s) for s in result.sizes)
        drift = "-" if result.max_drift is None else f"{result.max_drift:+.2f}{fmt_interval(result.max_drift_interval)}"
        print(f"| {ladder} | {parametrization} | {optima} | {drift} | {result.verdict} |")


if __name__ == "__main__":
    main()
