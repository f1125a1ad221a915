"""Positive control for the instillation diagnostics: the issue's one-attribute tea question, trained
through the project's own data files, datamodule and training loop.

Writes a data folder whose training records are ``--n`` fresh questions "Which tea has more caffeine?"
over two options with one attribute each (integers 0-70 mg, never equal; seed ``--seed``), with the
attribute-question instruction; the validation and test records are scenario 0's usual decisions, so
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

from selfinterp.dataset import Record, build_data, write_data
from selfinterp.prompts import ATTRIBUTE_PROMPT, SYSTEM_PROMPT


def tea_records(n: int, seed: int) -> list[Record]:
    """``n`` one-attribute caffeine comparisons, half of them (in expectation) answered B."""
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        a, b = rng.sample(range(71), 2)
        text = f"Which tea has more caffeine?\nA:\ncaffeine: {a} mg\n\nB:\ncaffeine: {b} mg"
        records.append(Record(SYSTEM_PROMPT, ATTRIBUTE_PROMPT + text, "A" if a > b else "B", stage=0))
    return records


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="data folder to write")
    parser.add_argument("--n", type=int, default=1920, help="training questions (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=5, help="seed of the questions (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.n < 1:
        raise SystemExit("error: --n must be at least 1")
    data = build_data(n_scenarios=1, n_train=1, n_val=8, n_test=50)
    data.train = tea_records(args.n, args.seed)
    for path in write_data(data, args.out):
        print(path)


if __name__ == "__main__":
    main()
