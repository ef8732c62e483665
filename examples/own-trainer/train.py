"""Train the GPT of model.py on a text file with our own loop: one trial under `scaletune agent`, or the target.

    # one trial of an external study (what `scaletune agent STUDY -- python train.py --data input.txt` runs)
    python train.py --data input.txt
    # the target, initialised by a transfer plan (`scaletune transfer STUDY --factory model:build ...`)
    python train.py --data input.txt --plan plan.json --width 512 --depth 8

Data: the file's bytes, the first 90% for training and the rest for evaluation, random windows of CONTEXT bytes.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

import scaletune
from model import BRANCHES, CONTEXT, build


class TextData:
    """Random windows of a text file's bytes; eval windows are fixed so every trial is measured alike."""

    def __init__(self, path: Path, seed: int = 0) -> None:
        data = torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8).long()
        if len(data) < 20 * (CONTEXT + 1):
            raise SystemExit(f"{path} is too short: give at least {20 * (CONTEXT + 1)} bytes of text")
        split = int(0.9 * len(data))
        self.train, self.eval = data[:split], data[split:]
        self.generator = torch.Generator().manual_seed(seed)

    def batch(self, data: torch.Tensor, size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(len(data) - CONTEXT - 1, (size,), generator=generator)
        windows = torch.stack([data[s:s + CONTEXT + 1] for s in starts.tolist()])
        return windows[:, :-1], windows[:, 1:]

    def train_batch(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.batch(self.train, size, self.generator)

    def eval_batches(self, count: int, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        generator = torch.Generator().manual_seed(1234)
        return [self.batch(self.eval, size, generator) for _ in range(count)]


def loss_of(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    model.eval()
    loss = sum(loss_of(model, x, y).item() for x, y in batches) / len(batches)
    model.train()
    return loss


def train(model: torch.nn.Module, param_groups: list[dict], data: TextData, args: argparse.Namespace,
          on_eval=lambda step, loss: False) -> float:
    """AdamW on the given groups (each keeps its own lr), cosine decay; ``on_eval`` returns True to stop early."""
    optimizer = torch.optim.AdamW(param_groups, betas=(0.9, 0.95))
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    eval_set = data.eval_batches(args.eval_batches, args.batch_size)
    loss = math.nan
    for step in range(1, args.steps + 1):
        decay = 0.5 * (1 + math.cos(math.pi * (step - 1) / args.steps))
        for group, base_lr in zip(optimizer.param_groups, base_lrs):
            group["lr"] = base_lr * decay
        train_loss = loss_of(model, *data.train_batch(args.batch_size))
        optimizer.zero_grad(set_to_none=True)
        train_loss.backward()
        optimizer.step()
        if step % args.eval_every == 0 or step == args.steps:
            loss = evaluate(model, eval_set) if math.isfinite(train_loss.item()) else math.nan
            print(f"step {step}: train {train_loss.item():.4f} eval {loss:.4f}", flush=True)
            if not math.isfinite(loss) or on_eval(step, loss):
                break
    return loss


def run_trial(data: TextData, args: argparse.Namespace) -> None:
    """One trial: build at the study's proxy shape with the trial's values, train, report, tell."""
    trial = scaletune.current_trial()
    if trial is None:
        raise SystemExit("no trial: run under `scaletune agent STUDY_ID -- python train.py ...`, or give --plan")
    with trial:  # an exception tells the trial failed
        built = trial.build(build, branch_outputs=BRANCHES)
        pruned = False

        def on_eval(step: int, loss: float) -> bool:
            nonlocal pruned
            pruned = trial.report(step, loss)
            return pruned

        loss = train(built.model, built.param_groups, data, args, on_eval)
        if pruned:
            trial.prune()
        else:
            trial.tell(loss)  # NaN/inf: recorded as diverged


def run_target(data: TextData, args: argparse.Namespace) -> None:
    """The target model, initialised and given its per-group settings by a transfer plan."""
    model = build(args.width, args.depth)
    param_groups = scaletune.apply_transfer(model, json.loads(args.plan.read_text()))
    n_params = sum(p.numel() for p in model.parameters())
    print(f"target {args.width}x{args.depth}: {n_params:,} parameters, {len(param_groups)} parameter groups")
    print(f"final eval loss {train(model, param_groups, data, args):.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="a text file to model")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--eval-batches", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plan", type=Path, help="train the target with this transfer plan instead of a trial")
    parser.add_argument("--width", type=int, help="the target's width (with --plan)")
    parser.add_argument("--depth", type=int, help="the target's depth (with --plan)")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    data = TextData(args.data, args.seed)
    if args.plan is None:
        run_trial(data, args)
    elif args.width is None or args.depth is None:
        parser.error("--plan needs --width and --depth: the shape the plan was computed for")
    else:
        run_target(data, args)


if __name__ == "__main__":
    main()
