"""Experiment 2: strict parsing of self-reports, report accuracy, the files written, and report-weights end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from selfinterp.__main__ import main
from selfinterp.analysis import LEARNED_COLS
from selfinterp.dataset import A_COLS, B_COLS, build_data
from selfinterp.errors import UserError
from selfinterp.prompts import REPORT_PROMPT
from selfinterp.selfreport_analysis import (
    DUPLICATE_KEY,
    NOT_AN_OBJECT,
    NOT_NUMERIC,
    REPORT_COLS,
    REPORTS_COLUMNS,
    WRONG_KEYS,
    analyze_reports,
    analyze_reports_command,
    load_learned,
    load_reports,
    parse_report,
)

NAMES = ["price", "battery life", "weight", "screen size", "warranty"]
VALID = '{"price": -80, "battery life": 55.5, "weight": -10, "screen size": 0, "warranty": 100}'


# Parsing ---------------------------------------------------------------------------------------
def test_valid_report_in_attribute_order() -> None:
    assert parse_report(VALID, NAMES).weights == (-80.0, 55.5, -10.0, 0.0, 100.0)
    assert parse_report(f"\n  {VALID}  \n", NAMES).valid  # surrounding white space is stripped


def test_reordered_keys_are_valid_and_mapped_by_name() -> None:
    text = '{"warranty": 100, "weight": -10, "price": -80, "screen size": 0, "battery life": 55.5}'
    assert parse_report(text, NAMES).weights == (-80.0, 55.5, -10.0, 0.0, 100.0)


@pytest.mark.parametrize(
    "text, reason",
    [
        (VALID[:-1] + ', "colour": 3}', WRONG_KEYS),  # extra key
        ('{"price": -80, "battery life": 55.5, "weight": -10, "screen size": 0}', WRONG_KEYS),  # missing key
        (VALID.replace('"price"', '"Price"'), WRONG_KEYS),  # names must be spelled as in the prompt
        (VALID.replace("-80", '"-80"'), NOT_NUMERIC),  # a number in a string
        (VALID.replace("-80", "true"), NOT_NUMERIC),
        (VALID.replace("-80", "null"), NOT_NUMERIC),
        (VALID.replace("-80", "NaN"), NOT_AN_OBJECT),  # not JSON
        (VALID.replace("-80", '"high"'), NOT_NUMERIC),
        (VALID[:-1] + ', "price": 3}', DUPLICATE_KEY),
        (f"```json\n{VALID}\n```", NOT_AN_OBJECT),  # fenced: invalid (see parse_report)
        (f"Here are my weights: {VALID}", NOT_AN_OBJECT),
        (VALID[:40], NOT_AN_OBJECT),  # truncated by max_new_tokens
        (f"[{VALID}]", NOT_AN_OBJECT),
        ("", NOT_AN_OBJECT),
        (f"{VALID}\n{VALID}", NOT_AN_OBJECT),
    ],
)
def test_invalid_reports(text: str, reason: str) -> None:
    parsed = parse_report(text, NAMES)
    assert not parsed.valid and parsed.weights is None
    assert parsed.reason == reason


def test_out_of_scale_numbers_stay_valid() -> None:
    assert parse_report(VALID.replace("-80", "-250"), NAMES).weights[0] == -250.0


# Report accuracy -------------------------------------------------------------------------------
def learned_frame(weights: np.ndarray) -> pd.DataFrame:
    frame = pd.DataFrame(weights, columns=LEARNED_COLS)
    frame.insert(0, "scenario", range(len(weights)))
    return frame


def reports_of(weights: np.ndarray, version: str = "instilled", per_scenario: int = 2) -> pd.DataFrame:
    """Reports table with ``per_scenario`` identical reports of ``weights`` for every scenario."""
    rows = [{"explaining_model": "m", "version": version, "scenario": s, **dict(zip(REPORT_COLS, w)),
             **dict.fromkeys(A_COLS, 1.0), **dict.fromkeys(B_COLS, 2.0), "raw": "{}"}
            for s, w in enumerate(weights) for _ in range(per_scenario)]
    return pd.DataFrame(rows, columns=REPORTS_COLUMNS)


@pytest.fixture(scope="module")
def learned() -> np.ndarray:
    return np.round(np.random.default_rng(0).uniform(-100, 100, size=(100, 5)))


def test_reports_equal_to_learned_weights_are_perfectly_accurate(learned: np.ndarray) -> None:
    # A different scale and an invalid report per scenario change nothing: z-scores, invalid ones excluded.
    reports = reports_of(learned / 4 + 7)
    reports.loc[reports.index % 2 == 1, "report_attr3"] = np.nan
    reports = pd.concat([reports, reports_of(learned / 4 + 7)], ignore_index=True)
    m = analyze_reports(reports, learned_frame(learned), learned.tolist()).metrics
    assert m["report_accuracy"] == pytest.approx(1.0)
    assert m["target_r"] == pytest.approx(1.0)
    assert m["report_accuracy_ci95"][0] > 0.99
    assert m["invalid_rate"] == pytest.approx(100 / 400)
    group = m["groups"]["instilled"]
    assert group["n_invalid"] == 100 and group["n_valid"] == 300 and group["report_accuracy_n_pairs"] == 500


def test_shuffled_reports_are_near_zero(learned: np.ndarray) -> None:
    shuffled = np.random.default_rng(1).permutation(learned.ravel()).reshape(learned.shape)
    m = analyze_reports(reports_of(shuffled), learned_frame(learned)).metrics
    assert abs(m["report_accuracy"]) < 0.15
    lo, hi = m["report_accuracy_ci95"]
    assert lo < 0 < hi
    assert m["target_r"] is None  # no target weights given


def test_versions_are_scored_separately_and_instilled_is_primary(learned: np.ndarray) -> None:
    shuffled = np.random.default_rng(2).permutation(learned.ravel()).reshape(learned.shape)
    reports = pd.concat([reports_of(shuffled, "base"), reports_of(learned, "instilled")], ignore_index=True)
    m = analyze_reports(reports, learned_frame(learned)).metrics
    assert list(m["groups"]) == ["base", "instilled"] and m["primary"] == "instilled"
    assert m["report_accuracy"] == pytest.approx(1.0)
    assert abs(m["groups"]["base"]["report_accuracy"]) < 0.15


def test_scenarios_without_learned_weights_or_valid_reports_are_left_out(learned: np.ndarray) -> None:
    table = learned_frame(learned)
    table.loc[3, LEARNED_COLS] = np.nan  # a scenario the regression dropped
    reports = reports_of(learned)
    reports.loc[reports["scenario"] == 5, REPORT_COLS] = np.nan  # no valid report at all
    group = analyze_reports(reports, table).metrics["groups"]["instilled"]
    assert group["n_scenarios_compared"] == 98 and group["n_scenarios_reported"] == 99
    assert group["report_accuracy"] == pytest.approx(1.0)
    assert group["min_valid_per_scenario"] == 0


def test_all_invalid_reports_give_undefined_accuracy(learned: np.ndarray, tmp_path: Path) -> None:
    reports = reports_of(learned[:2])
    reports[REPORT_COLS] = np.nan
    reports.to_csv(tmp_path / "r.csv", index=False)
    learned_frame(learned[:2]).to_csv(tmp_path / "l.csv", index=False)
    m = analyze_reports_command(str(tmp_path / "r.csv"), str(tmp_path / "l.csv"))
    assert m["report_accuracy"] is None and m["invalid_rate"] == 1.0
    assert (tmp_path / "report_vs_learned.png").stat().st_size > 0


def test_analyze_reports_command_writes_results(learned: np.ndarray, tmp_path: Path) -> None:
    reports_of(learned).to_csv(tmp_path / "weight_reports.csv", index=False)
    learned_frame(learned).to_csv(tmp_path / "learned_weights.csv", index=False, float_format="%.0f")
    weights = tmp_path / "instilled_weights.csv"
    pd.DataFrame({"scenario": range(100), **{f"attr{i + 1}": learned[:, i].astype(int) for i in range(5)}}).to_csv(
        weights, index=False)
    code = main(["analyze-reports", "--reports", str(tmp_path / "weight_reports.csv"),
                 "--learned", str(tmp_path / "learned_weights.csv"), "--weights", str(weights), "--out", str(tmp_path / "o")])
    assert code == 0
    results = json.loads((tmp_path / "o" / "experiment2_results.json").read_text())
    assert results["report_accuracy"] == pytest.approx(1.0) and results["target_r"] == pytest.approx(1.0)
    assert (tmp_path / "o" / "report_vs_learned.png").stat().st_size > 0


def test_bad_files_are_user_errors(learned: np.ndarray, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(UserError, match="does not exist"):
        load_reports(tmp_path / "missing.csv")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(UserError, match="not a readable CSV"):
        load_learned(tmp_path / "empty.csv")
    reports_of(learned).drop(columns=["report_attr2"]).to_csv(tmp_path / "r.csv", index=False)
    with pytest.raises(UserError, match="report_attr2"):
        load_reports(tmp_path / "r.csv")
    bad = reports_of(learned).astype({"report_attr4": object})
    bad.loc[0, "report_attr4"] = "lots"
    bad.to_csv(tmp_path / "r.csv", index=False)
    with pytest.raises(UserError, match="report_attr4.*lots"):
        load_reports(tmp_path / "r.csv")
    learned_frame(learned).rename(columns={"b_attr5": "attr5"}).to_csv(tmp_path / "l.csv", index=False)
    with pytest.raises(UserError, match="b_attr5"):
        load_learned(tmp_path / "l.csv")
    code = main(["analyze-reports", "--reports", str(tmp_path / "nope.csv"), "--learned", str(tmp_path / "l.csv")])
    assert code == 2 and capsys.readouterr().err.count("\n") == 1


def test_analysis_does_not_import_torch() -> None:
    code = "import sys, selfinterp.selfreport_analysis; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


# Prompts, generation, the command ----------------------------------------------------------------
def test_report_prompts_structure_and_seed() -> None:
    from selfinterp.selfreport import REPORT_SEED, report_prompts
    from selfinterp.trials import trial_text

    data = build_data(n_scenarios=3, n_train=2, n_val=0, n_test=2)
    prompts = report_prompts(data, k=4, n_scenarios=2)
    assert [p.trial.scenario for p in prompts] == [0] * 4 + [1] * 4
    first = prompts[0]
    assert first.messages[0] == {"role": "system", "content": data.test[0].system}
    assert first.messages[1]["content"] == REPORT_PROMPT + trial_text(data.scenarios[0], first.trial)
    assert [p.trial for p in report_prompts(data, k=4, n_scenarios=2, seed=REPORT_SEED)] == [p.trial for p in prompts]
    assert prompts[0].trial != report_prompts(data, k=4, n_scenarios=2, seed=3)[0].trial
    paired = build_data(n_scenarios=3, n_train=2, n_val=0, n_test=2, layout="paired")
    assert report_prompts(paired, k=4)[0].messages[1]["content"] == REPORT_PROMPT + trial_text(
        data.scenarios[0], first.trial, layout="paired")  # the layout the model was trained in
    with pytest.raises(UserError):
        report_prompts(data, k=0)
    with pytest.raises(UserError):
        report_prompts(data, n_scenarios=4)


def test_generate_texts_is_batched_greedy_and_ordered(tokenizer) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from selfinterp.selfreport import generate_texts

    # Like conftest's tiny model, but initialised with a wide spread so that its answers depend on the prompt.
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        tie_word_embeddings=True, initializer_range=0.2, pad_token_id=tokenizer.pad_token_id)).eval()
    prompts = [[{"role": "user", "content": "Hi" + " there" * n}] for n in (5, 0, 12)]
    batched = generate_texts(model, tokenizer, prompts, batch_size=3, max_new_tokens=5, progress=False)
    single = [generate_texts(model, tokenizer, [p], batch_size=1, max_new_tokens=5, progress=False)[0] for p in prompts]
    assert batched == single  # left padding does not change the greedy answers, and the order is kept
    assert len(set(batched)) > 1


def test_report_weights_end_to_end(tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(
        "trainer:\n  accelerator: cpu\n  devices: 1\n  logger: false\n  enable_checkpointing: false\n"
        f"model:\n  model: {tiny_model_dir}\n  lora_r: 2\n  lora_alpha: 4\n"
        "data:\n  n_scenarios: 2\n  n_train: 2\n  n_val: 1\n  n_test: 2\n"
    )
    learned = tmp_path / "learned_weights.csv"
    learned.write_text("scenario,b_attr1,b_attr2,b_attr3,b_attr4,b_attr5\n0,100,-20,5,0,40\n1,-3,60,-100,22,8\n")
    out = tmp_path / "out"
    code = main(["report-weights", "--config", str(config), "--k", "2", "--max_new_tokens", "8",
                 "--out", str(out), "--learned", str(learned), "--batch_size", "3"])
    assert code == 0, capsys.readouterr().err
    reports = pd.read_csv(out / "weight_reports.csv", keep_default_na=False, na_values=[""])
    assert list(reports.columns) == REPORTS_COLUMNS
    assert len(reports) == 2 * 2 * 2
    assert reports.groupby(["version", "scenario"]).size().to_dict() == {
        (v, s): 2 for v in ("base", "instilled") for s in (0, 1)}
    assert (reports["explaining_model"] == str(tiny_model_dir)).all()
    # A random model does not answer in JSON: every report is invalid, counted and left empty.
    assert reports[REPORT_COLS].isna().all().all()
    results = json.loads((out / "experiment2_results.json").read_text())
    assert results["invalid_rate"] == 1.0 and results["report_accuracy"] is None
    assert results["groups"]["base"]["n_invalid"] == 4
    assert (out / "report_vs_learned.png").stat().st_size > 0
    assert "instilled: 4 of 4 reports invalid" in capsys.readouterr().out


def test_learned_weights_are_found_for_the_checkpoint_epoch(tmp_path: Path) -> None:
    from selfinterp.selfreport import _find_learned

    run = tmp_path / "results" / "tiny" / "version_3"
    last = "lightning_logs/tiny/checkpoints/last.ckpt"
    for epoch in (0, 1, 2):
        (run / f"epoch_{epoch}").mkdir(parents=True)
        (run / f"epoch_{epoch}" / "learned_weights.csv").write_text("scenario,b_attr1\n")
    assert _find_learned(run, last) == run / "epoch_2" / "learned_weights.csv"  # the last trained epoch
    assert _find_learned(run, "x/checkpoints/epoch=0-step=9.ckpt") == run / "epoch_1" / "learned_weights.csv"
    assert _find_learned(None, last) is None
