"""Drawing every study plot from its JSON data onto a matplotlib Axes: the one place plots are drawn."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from scaletune.transfer_check import SizeResult, TransferCheckResult, draw
from service.models import TrialState


def transfer_result(data: dict[str, Any]) -> TransferCheckResult:
    """The analysis back from its JSON form (``TransferCheckResult.to_dict``), for ``scaletune.transfer_check.draw``."""
    rest = {f.name: data[f.name] for f in fields(TransferCheckResult) if f.name != "sizes"}
    return TransferCheckResult(sizes=[SizeResult(**size) for size in data["sizes"]], **rest)


def draw_landscape(ax: Any, data: dict[str, Any]) -> None:
    partial = "" if data["status"] == "completed" else f" (study {data['status']}, partial)"
    result = transfer_result(data)
    draw(result, ax, title=f"loss vs {result.hparam} per size: {result.verdict}{partial}")


def _shape_colors(labels: list[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    palette = colormaps["tab10"]
    return {label: palette(i % 10) for i, label in enumerate(labels)}


def draw_scaling(ax: Any, data: dict[str, Any]) -> None:
    """Measured (FLOPs, loss) points per shape and the law fitted to them, on log FLOPs."""
    colors = _shape_colors(list(data["shapes"]))
    for label, shape in data["shapes"].items():
        ax.scatter([p[0] for p in shape["points"]], [p[1] for p in shape["points"]], s=12, color=colors[label])
        ax.plot(shape["curve"]["flops"], shape["curve"]["loss"], color=colors[label], lw=1.2,
                label=f"{label} ({shape['form']}, extrap. err {shape['extrapolation_error']:.2g})")
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs")
    ax.set_ylabel("eval loss")
    ax.set_title(f"scaling law per shape at proxy size {data['size']:g} (dots measured, lines fitted)", fontsize=9)
    ax.legend(fontsize=7)


def draw_schedule(ax: Any, data: dict[str, Any]) -> None:
    """Each shape's fitted curve (thin, dashed) and the planned schedule along them (thick), to the target loss."""
    colors = _shape_colors(list(data["curves"]))
    for label, curve in data["curves"].items():
        ax.plot(curve["flops"], curve["loss"], color=colors[label], lw=0.8, ls="--", alpha=0.7, label=label)
    for segment in data["segments"]:
        ax.plot(segment["path"]["flops"], segment["path"]["loss"], color=colors[segment["shape"]], lw=3.0)
    for a, b in zip(data["segments"], data["segments"][1:]):
        ax.plot([b["flops_enter"]], [a["loss_exit"]], "ko", ms=4)
    ax.axhline(data["target_loss"], color="gray", lw=0.8, ls=":")
    ax.set_xscale("log")
    ax.set_xlabel("cumulative training FLOPs")
    ax.set_ylabel("eval loss")
    order = " -> ".join(segment["shape"] for segment in data["segments"])
    ax.set_title(f"schedule {order}: saves {100 * data['saving']:.0f}% vs static {data['static']['shape']}",
                 fontsize=9)
    ax.legend(fontsize=7)


def draw_history(ax: Any, data: dict[str, Any]) -> None:
    numbers = [t["number"] for t in data["trials"]]
    done = [(t["number"], t["value"]) for t in data["trials"] if t["state"] == TrialState.complete and t["value"]
            is not None]
    ax.scatter([n for n, _ in done], [v for _, v in done], s=14, label="trial value")
    ax.step(numbers, data["best_so_far"], where="post", color="tab:red", label="best so far")
    others = [t["number"] for t in data["trials"] if t["state"] != TrialState.complete]
    if others:
        top = max(v for _, v in done)
        ax.scatter(others, [top] * len(others), marker="x", color="gray", label="pruned / failed / diverged")
    ax.set_xlabel("trial number")
    ax.set_ylabel(f"objective ({data['direction']})")
    ax.set_title("optimization history")
    ax.legend(fontsize=7)


def draw_intermediate(ax: Any, data: dict[str, Any]) -> None:
    colors = {TrialState.complete: "tab:blue", TrialState.pruned: "tab:orange", TrialState.running: "tab:green"}
    for trial in data["trials"]:
        points = [(s, v) for s, v in zip(trial["step"], trial[data["metric"]]) if v is not None]
        ax.plot([s for s, _ in points], [v for _, v in points], marker=".", ms=3, lw=1, alpha=0.8,
                color=colors.get(trial["state"], "gray"))
    ax.set_xlabel("step")
    ax.set_ylabel(data["metric"])
    ax.set_title("intermediate values (blue complete, orange pruned, green running, gray other)", fontsize=9)


def draw_importance(ax: Any, data: dict[str, Any]) -> None:
    items = sorted(data["importances"].items(), key=lambda kv: kv[1])
    ax.barh([name for name, _ in items], [value for _, value in items], color="tab:blue")
    ax.set_xlabel("importance (fANOVA, normalised)")
    ax.set_title(f"parameter importance over {data['n_trials']} completed trials")
