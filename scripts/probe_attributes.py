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

    python scripts/probe_attributes.py                                   # embedded model; on 2 CPU cores ~5 min
    python scripts/probe_attributes.py --n_scenarios 4 --n_trials 400 --device cuda
"""

from __future__ import annotations

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
    margin_r = []
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


if __name__ == "__main__":
    main()
