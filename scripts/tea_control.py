"""Positive control for the instillation diagnostics: the issue's one-attribute tea question, trained
through the project's own data files, datamodule and training loop.

Writes a data folder whose training records are ``--n`` fresh questions "Which tea has more caffeine?"
over two options with one attribute each (integers 0-70 mg, never equal; seed ``--seed``), or with
caffeine followed by ``--attributes - 1`` distractor lines, with the attribute-question instruction
and the decisions' text layout; the validation and test records are scenario 0's usual decisions, so
verification runs as always. Train on it with ``--data.data_dir``; every question is new when it is
trained on, so ``train/letter_acc_step`` is a held-out accuracy:

    python scripts/tea_control.py --out data/tea
    python -m selfinterp fit --config configs/smollm2-135m.yaml --config configs/trainer/cpu.yaml \\
        --data.data_dir=data/tea --data.batch_size=16 --trainer.max_epochs=1 --trainer.log_every_n_steps=1 \\
        --model.optimizer.init_args.lr=1e-4 --model.decay=constant --trainer.logger.init_args.name=tea-control
"""

from __future__ import annotations

import argparse
import random

from selfinterp.catalog import Attribute, Scenario
from selfinterp.dataset import Record, build_data, write_data
from selfinterp.prompts import ATTRIBUTE_PROMPT, SYSTEM_PROMPT
from selfinterp.trials import Trial, trial_text


CAFFEINE = Attribute("caffeine", "mg", 0, 70)
# Lines that follow caffeine with ``--attributes`` above 1 (integer values).
DISTRACTORS = [Attribute("price", "dollars", 2, 40), Attribute("steeping time", "minutes", 1, 10),
               Attribute("leaf grade", "out of 10", 1, 10), Attribute("package weight", "grams", 20, 500)]


def tea_records(n: int, seed: int, attributes: int = 1) -> list[Record]:
    """``n`` caffeine comparisons, about half answered B; each option lists caffeine first, then
    ``attributes - 1`` distractor lines whose values play no part in the answer. The distractors have a
    stream of their own, so every ``attributes`` asks the same caffeine questions."""
    rng, noise = random.Random(seed), random.Random(f"{seed}-distractors")
    tea = Scenario("tea", "Which tea has more caffeine?", (CAFFEINE, *DISTRACTORS[:attributes - 1]))
    records = []
    for _ in range(n):
        a, b = rng.sample(range(CAFFEINE.lo, CAFFEINE.hi + 1), 2)
        others = [(noise.randint(d.lo, d.hi), noise.randint(d.lo, d.hi)) for d in tea.attributes[1:]]
        trial = Trial(0, (a, *(x for x, _ in others)), (b, *(y for _, y in others)), "A" if a > b else "B")
        records.append(Record(SYSTEM_PROMPT, ATTRIBUTE_PROMPT + trial_text(tea, trial), trial.label, stage=0))
    return records


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="data folder to write")
    parser.add_argument("--n", type=int, default=1920, help="training questions (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=5, help="seed of the questions (default: %(default)s)")
    parser.add_argument("--attributes", type=int, default=1,
                        help="lines per option: caffeine plus up to 4 distractors, 1-5 (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.n < 1:
        raise SystemExit("error: --n must be at least 1")
    if not 1 <= args.attributes <= len(DISTRACTORS) + 1:
        raise SystemExit(f"error: --attributes must be 1 to {len(DISTRACTORS) + 1}, got {args.attributes}")
    data = build_data(n_scenarios=1, n_train=1, n_val=8, n_test=50)
    data.train = tea_records(args.n, args.seed, args.attributes)
    for path in write_data(data, args.out):
        print(path)


if __name__ == "__main__":
    main()
