"""Experiment 2: ask a model for its own attribute weights (report prompts, greedy generation, the command).

For each scenario, ``k`` fresh trials (seed :data:`REPORT_SEED`) are rendered exactly like the
decision prompts (system prompt, then instruction + trial text) but with an instruction that asks
for a self-report instead of a choice (:data:`selfinterp.prompts.REPORT_PROMPT`). The answers are
generated greedily, with the adapter and (as the control) with it disabled, parsed strictly
(:func:`selfinterp.selfreport_analysis.parse_report`) and written to ``weight_reports.csv``.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import pandas as pd
import torch
from tqdm.auto import tqdm

from selfinterp.analysis import LEARNED_CSV
from selfinterp.callbacks import checkpoint_run_dir
from selfinterp.catalog import Scenario
from selfinterp.dataset import A_COLS, B_COLS, DecisionData
from selfinterp.errors import UserError
from selfinterp.prompts import REPORT_PROMPT, chat_messages
from selfinterp.scoring import stop_ids
from selfinterp.selfreport_analysis import (
    BASE,
    INSTILLED,
    REPORT_COLS,
    REPORTS_CSV,
    analyze_reports,
    load_learned,
    parse_report,
    summary,
    write_report_analysis,
    write_reports,
)
from selfinterp.trials import Trial, draw_trials, trial_text

REPORT_SEED = 11  # distinct from the weights (1), training (2) and test (7) seeds
DEFAULT_K = 10
DEFAULT_OUT = Path("results") / "reports"


@dataclass(frozen=True)
class ReportPrompt:
    """One report prompt: its trial and the chat messages (system, user)."""

    trial: Trial
    messages: list[dict[str, str]]


def report_prompts(
    data: DecisionData,
    k: int = DEFAULT_K,
    report_prompt: str = REPORT_PROMPT,
    seed: int = REPORT_SEED,
    n_scenarios: int | None = None,
    system_prompt: str | None = None,
) -> list[ReportPrompt]:
    """``k`` report prompts per scenario (the first ``n_scenarios``), scenario by scenario.

    The trials are drawn with ``draw_trials`` on the data's scenarios and target weights from
    ``seed`` (the same algorithm as the decision trials, a stream of its own); the user message is
    ``report_prompt`` followed by the trial text, in the data's layout. The system prompt defaults to the data's (that of
    its records).
    """
    if k < 1:
        raise UserError(f"k (report trials per scenario) must be at least 1, got {k}")
    n = len(data.scenarios) if n_scenarios is None else n_scenarios
    if not 1 <= n <= len(data.scenarios):
        raise UserError(f"n_scenarios must be between 1 and {len(data.scenarios)} (the data's scenarios), got {n}")
    if system_prompt is None:
        records = data.test or data.train
        system_prompt = records[0].system if records else ""
    trials = draw_trials(data.scenarios[:n], data.weights[:n], k, seed)
    return [
        ReportPrompt(t, chat_messages(system_prompt, report_prompt + trial_text(data.scenarios[t.scenario], t, layout=data.layout)))
        for per_scenario in trials for t in per_scenario
    ]


@torch.no_grad()
def generate_texts(
    causal_lm: torch.nn.Module,
    tokenizer,
    prompts: Sequence[list[dict[str, str]]],
    batch_size: int = 16,
    max_new_tokens: int = 128,
    progress: bool = True,
    desc: str = "generate",
) -> list[str]:
    """Greedy completions of chat prompts, in the order given.

    Each prompt (a list of chat messages) is rendered with the tokenizer's chat template and the
    assistant generation prompt, tokenized without extra special tokens, and batched (sorted by
    length, left-padded) into ``generate`` with greedy decoding for up to ``max_new_tokens``
    tokens. Returns the new text only, special tokens removed.
    """
    if batch_size < 1 or max_new_tokens < 1:
        raise UserError("batch_size and max_new_tokens must be at least 1")
    from transformers import GenerationConfig

    texts = [tokenizer.apply_chat_template(list(m), add_generation_prompt=True, tokenize=False) for m in prompts]
    device = next(causal_lm.parameters()).device
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                              eos_token_id=stop_ids(causal_lm, tokenizer), pad_token_id=tokenizer.pad_token_id)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = [""] * len(texts)
    for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress, leave=False):
        idx = order[start:start + batch_size]
        enc = tokenizer([texts[i] for i in idx], add_special_tokens=False, padding=True, padding_side="left",
                        return_tensors="pt").to(device)
        generated = causal_lm.generate(**enc, generation_config=config)
        for i, seq in zip(idx, generated[:, enc["input_ids"].shape[1]:]):
            out[i] = tokenizer.decode(seq, skip_special_tokens=True)
    return out


def reports_frame(
    prompts: Sequence[ReportPrompt], answers: Sequence[str], scenarios: Sequence[Scenario], model: str, version: str
) -> pd.DataFrame:
    """Rows of weight_reports.csv: the parsed reports (empty when invalid), the trial's values and the raw answer."""
    rows = []
    for p, raw in zip(prompts, answers, strict=True):
        parsed = parse_report(raw, scenarios[p.trial.scenario].names)
        weights = parsed.weights or (None,) * len(REPORT_COLS)
        rows.append({"explaining_model": model, "version": version, "scenario": p.trial.scenario,
                     **dict(zip(REPORT_COLS, weights)), **dict(zip(A_COLS, p.trial.a)), **dict(zip(B_COLS, p.trial.b)),
                     "raw": raw})
    return pd.DataFrame(rows)


def _find_learned(run: Path | None, ckpt_path: str | None) -> Path | None:
    """The run's learned_weights.csv for the checkpoint's epoch (``epoch=N`` in its name), else the last epoch's."""
    if run is None:
        return None
    found = {int(p.parent.name.split("_")[1]): p for p in run.glob(f"epoch_*/{LEARNED_CSV}")
             if p.parent.name.split("_")[1].isdigit()}
    match = re.search(r"epoch=(\d+)", Path(ckpt_path or "").name)
    if match and int(match.group(1)) + 1 in found:
        return found[int(match.group(1)) + 1]  # the callback's epoch_k follows training epoch k-1
    trained = [e for e in found if e > 0]
    return found[max(trained)] if trained else None


def _dtype(choice: str, device: torch.device) -> torch.dtype:
    if choice == "auto":
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16 else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[choice]


def report_weights_main(argv: Sequence[str]) -> Path:
    """``report-weights --config C [--ckpt_path P] [options]``: ask the trained model (and its base) for its weights."""
    parser = argparse.ArgumentParser(prog="python -m selfinterp report-weights", description=(
        "Ask the trained model, and the base model (adapter disabled) as the control, how heavily it weighs each "
        "attribute; write weight_reports.csv and, given learned weights, experiment2_results.json and "
        "report_vs_learned.png. Other options (--config ...) are the training run's."))
    parser.add_argument("--ckpt_path", help="checkpoint written by fit (default: the config's untrained adapter)")
    parser.add_argument("--out", help="output folder (default: the checkpoint's run folder under the verification "
                                      f"callback's results_dir, else {DEFAULT_OUT})")
    parser.add_argument("--learned", help=f"{LEARNED_CSV} of the same model's choices (default: the run folder's, "
                                          "for the checkpoint's epoch); without one, only the reports are written")
    parser.add_argument("--k", type=int, default=DEFAULT_K, help="report trials per scenario (default %(default)s)")
    parser.add_argument("--max_new_tokens", type=int, default=128, help="tokens to generate (default %(default)s)")
    parser.add_argument("--batch_size", type=int, default=16, help="prompts per generate call (default %(default)s)")
    parser.add_argument("--report_prompt", default=REPORT_PROMPT, help="instruction placed before the trial text")
    parser.add_argument("--seed", type=int, default=REPORT_SEED, help="seed of the report trials (default %(default)s)")
    parser.add_argument("--n_scenarios", type=int, help="report on the first N scenarios only (default: all)")
    parser.add_argument("--no_base", action="store_true", help="skip the base model (adapter disabled) control")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                        help="weights during generation; auto is bfloat16 on a GPU that supports it (default %(default)s)")
    opts, rest = parser.parse_known_args(list(argv))
    if opts.learned and not Path(opts.learned).is_file():
        raise UserError(f"learned weights file {opts.learned} does not exist")

    from selfinterp.cli import load_trained

    cli = load_trained(rest, opts.ckpt_path)
    module, datamodule = cli.model, cli.datamodule
    data = datamodule.load_data()
    prompts = report_prompts(data, opts.k, opts.report_prompt, opts.seed, opts.n_scenarios)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    module.to(device=device, dtype=_dtype(opts.dtype, device)).eval()
    model_name = str(module.hparams.model)
    net, causal_lm, tokenizer = module.net, module.causal_lm, module.tokenizer
    has_adapter = hasattr(net, "disable_adapter")
    versions = [(INSTILLED, nullcontext)]
    if opts.no_base:
        pass
    elif has_adapter:
        versions.append((BASE, net.disable_adapter))
    else:
        print("no adapter (full fine-tune): the base-model control is skipped")
    frames = []
    for version, context in versions:
        with context():
            answers = generate_texts(causal_lm, tokenizer, [p.messages for p in prompts], opts.batch_size,
                                     opts.max_new_tokens, desc=f"report ({version})")
        frames.append(reports_frame(prompts, answers, data.scenarios, model_name, version))
        reasons = Counter(parse_report(a, data.scenarios[p.trial.scenario].names).reason for p, a in zip(prompts, answers))
        invalid = sum(n for r, n in reasons.items() if r)
        detail = ", ".join(f"{r}: {n}" for r, n in reasons.most_common() if r)
        print(f"{version}: {invalid} of {len(answers)} reports invalid" + (f" ({detail})" if detail else ""))
    reports = pd.concat(frames, ignore_index=True)

    run = checkpoint_run_dir(opts.ckpt_path) if opts.ckpt_path else None
    out = Path(opts.out) if opts.out else (run or DEFAULT_OUT)
    paths = [write_reports(reports, out / REPORTS_CSV)]
    learned = Path(opts.learned) if opts.learned else _find_learned(run, opts.ckpt_path)
    if learned is not None:
        print(f"learned weights: {learned}")
        analysis = analyze_reports(reports, load_learned(learned), data.weights)
        paths += write_report_analysis(analysis, out)
        print(summary(analysis.metrics))
    else:
        print(f"no {LEARNED_CSV} given or found: score the reports later with `python -m selfinterp analyze-reports "
              f"--reports {paths[0]} --learned .../{LEARNED_CSV}`")
    print("wrote " + ", ".join(str(p) for p in paths))
    return out
