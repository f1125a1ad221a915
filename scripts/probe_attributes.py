"""Instillation diagnostic: can a linear read-out of the frozen model see the attributes where it answers?

To follow the target rule, the model's state at the answer position (the last prompt token, where
the letter is predicted) must carry each option's attribute values. This script asks how much of
that is there before any training:

1. Draw ``--n_trials`` fresh trials for each of the first ``--n_scenarios`` scenarios (seed
   ``--seed``; the held-out seed 7 is refused) and render the exact decision prompts that training
   and verification use.
2. Run the frozen model once over each prompt and keep every layer's hidden state at the answer
   position, plus the base model's A-minus-B logit margin there.
3. Per scenario and layer, fit ridge regressions with ``--folds``-fold cross-validation (the ridge
   penalty picked per fold from a fixed grid on the training folds only), predicting
   - each attribute's normalised difference (A_i - B_i) / range_i,
   - the target utility difference (what the rule thresholds at 0), and its sign (the choice).

A cross-validated R^2 near 0 means a linear read-out of that layer cannot see the quantity at all; the
rule then cannot be learned by adjusting the last layers alone. The table averages over scenarios; the
last line names the best layer.

4. With ``--adam_steps``, a second table asks whether gradient descent finds the read-out that ridge
   finds: on the final-norm state (what the output head sees), logistic read-outs of the choice are
   trained the way fine-tuning trains (AdamW at ``--adam_lr``, mini-batches of ``--adam_batch``,
   sampled with replacement) on the same cross-validation folds: a full-rank read-out on the raw state,
   the same on standardised features, and a rank-16 LoRA-style one (A random, B zero, scale 2) on the
   raw state. It reports held-out choice accuracy and the held-out logit's spread.

    python scripts/probe_attributes.py                                   # embedded model; on 2 CPU cores ~5 min
    python scripts/probe_attributes.py --n_scenarios 4 --n_trials 400 --device cuda
    python scripts/probe_attributes.py --adam_steps 100 1000 --adam_lr 1e-3 1e-2
"""

from __future__ import annotations

import math
import time

import bench_common as bc
import numpy as np
import torch
from tqdm.auto import tqdm

from selfinterp.datamodule import prompt_text
from selfinterp.dataset import build_data
from selfinterp.errors import UserError
from selfinterp.models import load_model, load_tokenizer
from selfinterp.scoring import letter_ids
from selfinterp.trials import TEST_SEED, utility

ALPHAS = (1e-2, 1e-1, 1.0, 10.0, 100.0, 1e3, 1e4)


def ridge_cv_predictions(x: np.ndarray, y: np.ndarray, folds: int, seed: int = 0) -> np.ndarray:
    """Out-of-fold ridge predictions of ``y`` (n x k) from ``x`` (n x d).

    Features are standardised on the training folds; the penalty is chosen per outer fold by an
    inner split of those training folds, so no held-out row influences its own prediction.
    """
    n = len(x)
    if n < 2 * folds:
        raise UserError(f"need at least {2 * folds} trials for {folds}-fold cross-validation, got {n}")
    order = np.random.default_rng(seed).permutation(n)
    pred = np.zeros_like(y, dtype=float)
    for held in np.array_split(order, folds):
        train = np.setdiff1d(order, held)
        inner = np.array_split(train, 2)
        alpha = min(ALPHAS, key=lambda a: _ridge_error(x, y, inner[0], inner[1], a) + _ridge_error(x, y, inner[1], inner[0], a))
        pred[held] = _ridge_fit_predict(x, y, train, held, alpha)
    return pred


def _ridge_fit_predict(x: np.ndarray, y: np.ndarray, train: np.ndarray, test: np.ndarray, alpha: float) -> np.ndarray:
    mu, sd = x[train].mean(0), x[train].std(0) + 1e-6
    xt, xs = (x[train] - mu) / sd, (x[test] - mu) / sd
    ym = y[train].mean(0)
    # Dual form: the trial count is far below the hidden size.
    gram = xt @ xt.T + alpha * np.eye(len(train))
    return xs @ (xt.T @ np.linalg.solve(gram, y[train] - ym)) + ym


def _ridge_error(x: np.ndarray, y: np.ndarray, train: np.ndarray, test: np.ndarray, alpha: float) -> float:
    return float(((_ridge_fit_predict(x, y, train, test, alpha) - y[test]) ** 2).sum())


def r2(y: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """Per-column R^2 of out-of-sample predictions (0 = no better than the mean, can go negative)."""
    return 1.0 - ((y - pred) ** 2).sum(0) / ((y - y.mean(0)) ** 2).sum(0)


def adam_readout(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, steps: int, lr: float, batch: int,
                 rank: int | None = None, standardize: bool = False, seed: int = 0) -> np.ndarray:
    """Held-out logits of a logistic read-out (bias + linear, or bias + LoRA-style B @ A) trained with AdamW.

    ``rank`` makes it ``2 * B @ A`` with A uniform in +-1/sqrt(d) and B zero, as PEFT initialises a LoRA
    with alpha = 2 r; ``standardize`` scales features by the training rows' mean and sd first.
    """
    if standardize:
        mu, sd = x_train.mean(0), x_train.std(0) + 1e-6
        x_train, x_test = (x_train - mu) / sd, (x_test - mu) / sd
    gen = torch.Generator().manual_seed(seed)
    xt, xe = torch.as_tensor(x_train, dtype=torch.float32), torch.as_tensor(x_test, dtype=torch.float32)
    yt = torch.as_tensor(y_train, dtype=torch.float32)
    d = xt.shape[1]
    bias = torch.zeros(1, requires_grad=True)
    if rank:
        a = ((torch.rand(rank, d, generator=gen) * 2 - 1) / math.sqrt(d)).requires_grad_()
        b = torch.zeros(rank, requires_grad=True)
        params, head = [bias, a, b], lambda x: bias + 2.0 * (x @ a.T) @ b
    else:
        w = torch.zeros(d, requires_grad=True)
        params, head = [bias, w], lambda x: bias + x @ w
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    for _ in range(steps):
        rows = torch.randint(len(xt), (batch,), generator=gen)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(head(xt[rows]), yt[rows])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return head(xe).numpy()


READOUTS = {"full, raw state": {}, "full, standardised": {"standardize": True}, "LoRA r=16, raw state": {"rank": 16}}


def adam_table(x: np.ndarray, choice: np.ndarray, folds: int, steps: list[int], lrs: list[float], batch: int) -> list[list]:
    """Per read-out, lr and step count: cross-validated choice accuracy and the held-out logits' sd."""
    order = np.random.default_rng(0).permutation(len(x))
    rows = []
    for name, kwargs in READOUTS.items():
        for lr in lrs:
            for n in steps:
                logits = np.zeros(len(x))
                for held in np.array_split(order, folds):
                    train = np.setdiff1d(order, held)
                    logits[held] = adam_readout(x[train], choice[train], x[held], n, lr, batch, **kwargs)
                rows.append([name, lr, n, float(((logits > 0) == (choice > 0)).mean()), float(logits.std())])
    return rows


@torch.no_grad()
def answer_states(model, tokenizer, prompts: list[str], batch_size: int, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Every layer's hidden state at each prompt's last token (n x layers+1 x d), and the A-minus-B margin there."""
    device = next(model.parameters()).device
    a_id, b_id = letter_ids(tokenizer)
    states, margins = [], []
    for start in tqdm(range(0, len(prompts), batch_size), desc="forward passes", disable=not progress, leave=False):
        # Right padding keeps every prompt's positions exactly as in training and verification.
        enc = tokenizer(prompts[start:start + batch_size], add_special_tokens=False, padding=True,
                        padding_side="right", return_tensors="pt").to(device)
        out = model.get_decoder()(**enc, output_hidden_states=True, use_cache=False)
        rows, last = torch.arange(len(enc["input_ids"]), device=device), enc["attention_mask"].sum(1) - 1
        states.append(torch.stack([h[rows, last] for h in out.hidden_states], 1).float().cpu())
        logits = model.get_output_embeddings()(out.last_hidden_state[rows, last]).float()
        margins.append((logits[:, a_id] - logits[:, b_id]).cpu())
    return torch.cat(states).numpy(), torch.cat(margins).numpy()


def main(argv: list[str] | None = None) -> None:
    parser = bc.base_parser(__doc__)
    parser.add_argument("--n_scenarios", type=int, default=2, help="first N scenarios of the catalog (default: %(default)s)")
    parser.add_argument("--n_trials", type=int, default=200, help="fresh trials per scenario (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=1234, help="seed of the probe trials; not the held-out 7 (default: %(default)s)")
    parser.add_argument("--folds", type=int, default=5, help="cross-validation folds (default: %(default)s)")
    parser.add_argument("--batch_size", type=int, default=16, help="prompts per forward pass (default: %(default)s)")
    parser.add_argument("--system_prompt", help="system prompt (default: the project's)")
    parser.add_argument("--adam_steps", type=int, nargs="*", default=[],
                        help="also train logistic read-outs of the final-norm state for these step counts (default: none)")
    parser.add_argument("--adam_lr", type=float, nargs="+", default=[1e-3], help="their AdamW learning rates (default: %(default)s)")
    parser.add_argument("--adam_batch", type=int, default=8, help="their mini-batch size (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.seed == TEST_SEED:
        raise SystemExit(f"error: seed {TEST_SEED} is the held-out test seed; probe on other trials")
    device = bc.pick_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)

    extra = {} if args.system_prompt is None else {"system_prompt": args.system_prompt}
    data = build_data(n_scenarios=args.n_scenarios, n_train=1, n_val=0, n_test=args.n_trials, test_seed=args.seed, **extra)
    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model).to(device).eval()
    prompts = [prompt_text(tokenizer, r) for r in data.test]
    t0 = time.perf_counter()
    states, margins = answer_states(model, tokenizer, prompts, args.batch_size, progress=True)
    seconds = time.perf_counter() - t0

    n_layers = states.shape[1]
    diff_r2 = np.zeros((args.n_scenarios, n_layers))
    util_r2 = np.zeros((args.n_scenarios, n_layers))
    sign_acc = np.zeros((args.n_scenarios, n_layers))
    margin_r, adam = [], []
    for k, scenario in enumerate(data.scenarios):
        rows = [j for j, t in enumerate(data.test_trials) if t.scenario == k]
        trials = [data.test_trials[j] for j in rows]
        spans = np.array([a.hi - a.lo for a in scenario.attributes])
        diffs = np.array([(np.array(t.a) - np.array(t.b)) / spans for t in trials])
        util = np.array([utility(scenario, data.weights[k], t.a) - utility(scenario, data.weights[k], t.b) for t in trials])
        margin_r.append(float(np.corrcoef(margins[rows], util)[0, 1]) if margins[rows].std() > 0 else float("nan"))
        targets = np.column_stack([diffs, util])
        for layer in tqdm(range(n_layers), desc=f"ridge read-outs, scenario {k}", leave=False):
            pred = ridge_cv_predictions(states[rows, layer], targets, args.folds)
            scores = r2(targets, pred)
            diff_r2[k, layer] = scores[:-1].mean()
            util_r2[k, layer] = scores[-1]
            sign_acc[k, layer] = float(((pred[:, -1] > 0) == (util > 0)).mean())
        if args.adam_steps:  # the rule's choice is A exactly when the utility difference is positive
            adam.append(adam_table(states[rows, -1], (util > 0).astype(float), args.folds, args.adam_steps,
                                   args.adam_lr, args.adam_batch))

    print(f"model {args.model} on {bc.describe(device)}; {args.n_scenarios} scenarios x {args.n_trials} trials (seed {args.seed}); "
          f"forward passes {seconds:.1f} s")
    print(f"base model: A-minus-B margin sd {margins.std():.3f}, mean correlation with the utility difference "
          f"{np.nanmean(margin_r):.3f}, share answering A {(margins > 0).mean():.1%}")
    table = [[f"{layer}" + (" (embeddings)" if layer == 0 else " (final norm)" if layer == n_layers - 1 else ""),
              float(diff_r2[:, layer].mean()), float(util_r2[:, layer].mean()), float(sign_acc[:, layer].mean())]
             for layer in range(n_layers)]
    bc.print_table(["layer", "CV R^2 attribute differences", "CV R^2 utility difference", "choice accuracy"], table)
    best = int(util_r2.mean(0).argmax())
    print(f"best layer: {best}, utility-difference R^2 {util_r2[:, best].mean():.3f}, "
          f"attribute-difference R^2 {diff_r2[:, best].mean():.3f}, choice accuracy {sign_acc[:, best].mean():.3f}")
    if args.adam_steps:
        scores = np.array([[row[3:] for row in table] for table in adam]).mean(0)  # scenarios averaged
        mean = [row[:3] + [float(v) for v in avg] for row, avg in zip(adam[0], scores)]
        final = states[:, -1]
        mu, sd = np.abs(final.mean(0)), final.std(0)
        print(f"final-norm state, per coordinate over all prompts: |mean| median {np.median(mu):.3g}, max {mu.max():.3g}; "
              f"sd median {np.median(sd):.3g}, max {sd.max():.3g}; norm of the mean {np.linalg.norm(final.mean(0)):.3g}, "
              f"mean distance from it {np.linalg.norm(final - final.mean(0), axis=1).mean():.3g}")
        print(f"gradient-trained logistic read-outs of the final-norm state (batch {args.adam_batch}; ridge above: "
              f"choice accuracy {sign_acc[:, -1].mean():.3f}); means over scenarios")
        bc.print_table(["read-out", "lr", "steps", "choice accuracy", "held-out logit sd"], mean)


if __name__ == "__main__":
    main()
