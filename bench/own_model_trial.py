"""One trial of bench/own_model_transfer.py, as a user's training script runs under `scaletune agent`.

The agent asks the study for a trial and starts this script with the trial in its environment;
`scaletune.current_trial()` finds it. The script builds a Hugging Face GPT-2 (from a GPT2Config, no weights)
with `trial.build` (the study's proxy shape and parametrization, the trial's LR; scaletune finds the preset by
the model's class), seeds init and data order with the trial's own `seed` hyperparameter, trains with
scaletune's loop on pytext, reports every eval loss and tells the final one (NaN, recorded as diverged, when the
run diverged). The bench imports the model and data settings from here, so both read one definition.

    scaletune agent STUDY_ID -- python bench/own_model_trial.py --steps 40 --batch-size 8 --eval-every 10000
"""

from __future__ import annotations

import argparse
import functools
import math
import resource
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel

import scaletune
from scaletune.data.base import Dataset
from scaletune.data.registry import dataset_spec, get_dataset
from scaletune.hparams import HParams
from scaletune.train import Budget, train
from scaletune.trial import Trial

SEQ_LEN, HEADS = 32, 4
DATA_ARGS = {"seq_len": SEQ_LEN, "max_bytes": 2_000_000, "eval_windows": 256}
WARMUP_FRAC = 0.05


def gpt2(width: int, depth: int) -> GPT2LMHeadModel:
    """The model factory: `HEADS` heads at every width, so the head dimension grows with width; dropout 0, untied
    readout."""
    vocab = dataset_spec("pytext", DATA_ARGS).num_outputs
    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=SEQ_LEN, n_embd=width, n_layer=depth,
                                      n_head=HEADS, bos_token_id=0, eos_token_id=0, resid_pdrop=0.0,
                                      embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=False))


@functools.cache
def pytext() -> Dataset:
    return get_dataset("pytext", DATA_ARGS)


def run(trial: Trial, budget: Budget) -> tuple[float, float]:
    """Build, train, report and tell; (the final eval loss or NaN, seconds spent building and training)."""
    with trial:
        seed = int(trial.params["seed"])
        started = time.perf_counter()
        torch.manual_seed(seed)
        built = trial.build(gpt2)
        hp = HParams(lr=trial.params["lr"], warmup_frac=WARMUP_FRAC)
        result = train(built.model, built.param_groups, pytext(), budget, hp, "adamw", flops_per_sample=0.0,
                       seed=seed, callback=lambda point: trial.report(point.step, point.eval_loss))
        seconds = time.perf_counter() - started
        if result.status == "stopped":  # the study's pruner said so (this bench's studies do not prune)
            trial.prune()
            return math.nan, seconds
        loss = result.final_eval_loss if result.status == "completed" else None
        trial.tell(math.nan if loss is None else loss)  # NaN: recorded as diverged
        return math.nan if loss is None else loss, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--eval-every", type=int, required=True)
    args = parser.parse_args()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    startup_cpu = usage.ru_utime + usage.ru_stime  # starting the interpreter and the imports above
    started = time.perf_counter()
    trial = scaletune.current_trial()
    if trial is None:
        raise SystemExit("run me under `scaletune agent STUDY_ID -- python bench/own_model_trial.py ...`")
    pytext()
    setup = time.perf_counter() - started
    loss, seconds = run(trial, Budget(steps=args.steps, batch_size=args.batch_size, eval_every=args.eval_every))
    # One line the bench reads to split the agent path's overhead from the training itself.
    print(f"trial {trial.number}: eval loss {loss:.4f}; start-up {startup_cpu:.3f} CPU-s, setup {setup:.3f} s, "
          f"build and train {seconds:.3f} s", flush=True)


if __name__ == "__main__":
    main()
