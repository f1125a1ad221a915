"""Behaviour of verification: greedy scoring, the callback's regression and files, and DDP gathering."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.plugins.precision import Precision
from transformers import AutoModelForCausalLM

from conftest import A_ID, B_ID, ROOT, TINY_CONFIG, naive_answer, scalars
from selfinterp.callbacks import VerificationCallback, select_trials
from selfinterp.datamodule import DecisionDataModule, prompt_text
from selfinterp.dataset import Record, build_data
from selfinterp.scoring import letter_ids, parse_answer, score_prompts, stop_ids


class OracleLM(torch.nn.Module):
    """A causal-LM stand-in that answers each known prompt with its target letter.

    The decoder looks every row's real tokens (attention mask 1) up among the prompts' token ids,
    so a prompt that reaches it padded wrongly, truncated or mixed up fails the lookup; its last
    hidden state is one-hot on the letter, which the output head maps to a logit of +-4.
    """

    def __init__(self, tokenizer, records: list[Record]) -> None:
        super().__init__()
        self.answers = {tuple(tokenizer(prompt_text(tokenizer, r), add_special_tokens=False)["input_ids"]): r.answer
                        for r in records}
        self.head = torch.nn.Linear(2, len(tokenizer), bias=False)
        with torch.no_grad():
            self.head.weight.zero_()
            a, b = letter_ids(tokenizer)
            self.head.weight[a] = torch.tensor([4.0, -4.0])
            self.head.weight[b] = torch.tensor([-4.0, 4.0])

    def get_decoder(self):
        return self.decode

    def get_output_embeddings(self):
        return self.head

    def decode(self, input_ids, attention_mask, **kwargs):
        hidden = torch.zeros(*input_ids.shape, 2)
        for row, (ids, mask) in enumerate(zip(input_ids, attention_mask)):
            assert mask[-1] == 1, "the answer position must be the last column (left padding)"
            letter = self.answers[tuple(ids[mask.bool()].tolist())]
            hidden[row, -1, "AB".index(letter)] = 1.0
        return SimpleNamespace(last_hidden_state=hidden)


class Wrapper(torch.nn.Module):
    """The parts of DecisionLM the callback uses: causal_lm, tokenizer, hparams."""

    def __init__(self, causal_lm, tokenizer) -> None:
        super().__init__()
        self.causal_lm, self.tokenizer = causal_lm, tokenizer
        self.hparams = {"model": "stub", "lora_r": 4}


def fake_trainer(dm: DecisionDataModule, logger=None) -> SimpleNamespace:
    """The parts of a single-process Trainer the callback uses."""
    return SimpleNamespace(datamodule=dm, global_rank=0, world_size=1, is_global_zero=True,
                           precision_plugin=Precision(), logger=logger, loggers=[logger] if logger else [],
                           optimizers=[], max_epochs=None, accumulate_grad_batches=1, precision="32-true",
                           strategy=SimpleNamespace(root_device=torch.device("cpu")))


# --- parsing and scoring ----------------------------------------------------------------------
@pytest.mark.parametrize("text, letter", [
    ("A", "A"), (" b.", "B"), ("Option A", "A"), ("option b.", "B"), ("A because", ""), ("AB", ""), ("", ""),
    ("\n\n", ""), ("C", ""),
])
def test_parse_answer_is_strict(text, letter):
    assert parse_answer(text) == letter


def _check_against_naive(model, tokenizer, prompts, batch_size: int, continue_tokens: int):
    choices = score_prompts(model, tokenizer, prompts, batch_size=batch_size, continue_tokens=continue_tokens)
    expected = [naive_answer(model, tokenizer, p, continue_tokens) for p in prompts]
    assert [c.raw for c in choices] == [raw for raw, _ in expected]
    assert [c.selection for c in choices] == [parse_answer(raw) for raw, _ in expected]
    assert [c.p_b for c in choices] == pytest.approx([p for _, p in expected], abs=1e-5)
    return choices


def _prompts(tokenizer, n_scenarios: int, n_test: int) -> list[str]:
    data = build_data(n_scenarios=n_scenarios, n_train=1, n_val=0, n_test=n_test)
    prompts = [prompt_text(tokenizer, r) for r in data.test]
    prompts.append("<|im_start|>user\nA or B?<|im_end|>\n<|im_start|>assistant\n")  # shares no prefix
    assert len({len(p) for p in prompts}) > 3  # batches are padded
    return prompts


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("batch_size", [5, 64])
def test_score_prompts_matches_one_unpadded_pass_per_prompt(tokenizer, tiny_model_dir, batch_size, attn):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=attn).eval()
    prompts = _prompts(tokenizer, 3, 4)
    ids = torch.tensor([tokenizer(prompts[-1], add_special_tokens=False)["input_ids"]])
    with torch.no_grad():  # the model notices attended padding and position gaps, so this comparison does too
        def p_b(logits):
            return torch.sigmoid(logits[0, -1, B_ID] - logits[0, -1, A_ID]).item()

        plain = p_b(model(input_ids=ids).logits)
        padded = p_b(model(input_ids=torch.cat([torch.full((1, 50), tokenizer.pad_token_id), ids], 1)).logits)
        gap = torch.arange(ids.shape[1])[None] + (torch.arange(ids.shape[1])[None] >= 5) * 5
        assert abs(padded - plain) > 1e-4
        assert abs(p_b(model(input_ids=ids, position_ids=gap).logits) - plain) > 1e-3
    choices = _check_against_naive(model, tokenizer, prompts, batch_size, continue_tokens=0)
    assert len({c.raw for c in choices}) > 1 and all(c.selection == "" for c in choices)


def test_score_prompts_continues_greedily_like_generate(tokenizer, tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    choices = _check_against_naive(model, tokenizer, _prompts(tokenizer, 2, 2), batch_size=3, continue_tokens=3)
    assert all(c.selection == "" for c in choices)  # random weights never say A or B


def test_decoding_stops_at_the_end_of_turn_even_when_the_eos_metadata_is_wrong(tokenizer, monkeypatch):
    """transformers 5.17 converts SmolLM2's GGUF with <|im_start|> as end-of-sequence; answers must still end at <|im_end|>."""
    from conftest import IM_END_ID, make_chooser, tiny_llama
    from selfinterp.selfreport import generate_texts

    model = make_chooser(tiny_llama(kv_heads=2, sharp=False), tokenizer, (IM_END_ID,))  # always says <|im_end|>
    model.generation_config.eos_token_id = 1  # <|im_start|>, as the 5.17 conversion has it
    wrong = copy.deepcopy(tokenizer)
    wrong.eos_token = "<|im_start|>"
    assert stop_ids(model, wrong) == [1, IM_END_ID]
    lengths = []
    generate = model.generate

    def counting(**kwargs):
        out = generate(**kwargs)
        lengths.append(out.shape[1] - kwargs["input_ids"].shape[1])
        return out

    monkeypatch.setattr(model, "generate", counting)
    choices = score_prompts(model, wrong, _prompts(wrong, 2, 2), batch_size=8, continue_tokens=8)
    assert [(c.raw, c.selection) for c in choices] == [("", "")] * 5  # unparseable, not guessed
    assert generate_texts(model, wrong, [[{"role": "user", "content": "Hi"}]], max_new_tokens=8, progress=False) == [""]
    assert lengths == [1, 1]  # one token (<|im_end|>), not 8


@pytest.mark.parametrize("batch_size", [5, 64])
def test_score_prompts_letters_match_one_unpadded_pass(tokenizer, chooser_model_dir, batch_size):
    model = AutoModelForCausalLM.from_pretrained(chooser_model_dir).eval()
    choices = _check_against_naive(model, tokenizer, _prompts(tokenizer, 3, 4), batch_size, continue_tokens=3)
    assert {c.selection for c in choices} == {"A", "B"}


@pytest.mark.slow
def test_score_prompts_on_the_embedded_model(tokenizer):
    from selfinterp.models import load_model

    model = load_model("smollm2-135m").eval()
    prompts = _prompts(tokenizer, 2, 2)[1:4]  # two that share a scenario's prefix and one that does not
    choices = _check_against_naive(model, tokenizer, prompts, batch_size=4, continue_tokens=0)
    assert all(c.selection in ("A", "B") for c in choices)  # the instruct model answers with a letter


# --- the callback -----------------------------------------------------------------------------
def test_verify_with_an_oracle_recovers_the_weights(tmp_path, tokenizer):
    dm = DecisionDataModule(n_scenarios=20, n_train=1, n_val=0, n_test=50)
    data = dm.load_data()
    oracle = OracleLM(tokenizer, data.test)
    callback = VerificationCallback(batch_size=64, results_dir=str(tmp_path), run_name="oracle", min_valid=10)
    logger = TensorBoardLogger(str(tmp_path / "tb"), name="oracle")
    metrics = callback.verify(fake_trainer(dm, logger), Wrapper(oracle, tokenizer), "epoch_1", 1)
    logger.experiment.flush()
    assert metrics["r"] >= 0.95
    assert metrics["agreement"] == 1.0 and metrics["parse_failure"] == 0.0 and metrics["n_scenarios_fit"] == 20
    assert metrics["auc"] == 1.0
    decisions = pd.read_csv(tmp_path / "oracle" / "epoch_1" / "inference_decisions.csv")
    assert len(decisions) == 1000
    assert (decisions["selection"] == decisions["target"]).all()
    assert ((decisions["p_b"] > 0.99) == (decisions["target"] == "B")).all()
    saved = json.loads((tmp_path / "oracle" / "epoch_1" / "experiment1_results.json").read_text())
    assert saved["r"] == pytest.approx(metrics["r"])
    summary = json.loads((tmp_path / "oracle" / "summary.json").read_text())
    assert [e["tag"] for e in summary["epochs"]] == ["epoch_1"] and summary["model"] == "stub"
    logged = scalars(tmp_path / "tb")
    assert logged["verify/r"] == [(1, pytest.approx(metrics["r"]))]
    assert logged["verify/agreement"] == [(1, 1.0)]
    # the oracle matches each cut rule as often as the cut rule matches the full one; the full rule is the last
    cut = metrics["rule_top_k"]
    assert metrics["agreement_top_k"] == cut and cut[-1] == 1.0 and cut[0] < 1.0
    assert summary["epochs"][0]["agreement_top_k"] == pytest.approx(cut)
    assert [logged[f"verify/agreement_top{k}"] for k in range(1, 6)] == [[(1, pytest.approx(x))] for x in cut]


def test_verify_selects_the_first_trials_of_the_first_scenarios(tmp_path, tokenizer):
    dm = DecisionDataModule(n_scenarios=4, n_train=1, n_val=0, n_test=6)
    data = dm.load_data()
    keep = select_trials(data, n_scenarios=3, n_trials=2)
    assert [(data.test_trials[i].scenario, i % 6) for i in keep] == [(s, t) for s in range(3) for t in range(2)]
    callback = VerificationCallback(n_scenarios=3, n_trials=2, results_dir=str(tmp_path), run_name="sel", min_valid=1)
    callback.verify(fake_trainer(dm), Wrapper(OracleLM(tokenizer, data.test), tokenizer), "test", 0)
    decisions = pd.read_csv(tmp_path / "sel" / "test" / "inference_decisions.csv")
    assert list(zip(decisions["scenario"], decisions["trial"])) == [(s, t) for s in range(3) for t in range(2)]
    assert decisions["target"].tolist() == [data.test_trials[i].label for i in keep]


def test_answers_that_are_not_letters_are_parse_failures(tmp_path, tokenizer, stubborn_model_dir):
    model = AutoModelForCausalLM.from_pretrained(stubborn_model_dir).eval()
    dm = DecisionDataModule(n_scenarios=2, n_train=1, n_val=0, n_test=5)
    callback = VerificationCallback(batch_size=4, continue_tokens=2, results_dir=str(tmp_path), run_name="hello",
                                    min_valid=1)
    metrics = callback.verify(fake_trainer(dm), Wrapper(model, tokenizer), "epoch_0", 0)
    assert metrics["parse_failure"] == 1.0 and metrics["frac_A"] == 0.0 and metrics["n_valid"] == 0
    assert metrics["r"] is None and metrics["agreement"] is None
    decisions = pd.read_csv(tmp_path / "hello" / "epoch_0" / "inference_decisions.csv", keep_default_na=False)
    assert len(decisions) == 10
    assert (decisions["selection"] == "").all()
    assert (decisions["raw"] == "HelloHello").all()


# --- through the command line -----------------------------------------------------------------
RESULT_FILES = {"experiment1_results.json", "learned_weights.csv", "scenario_metrics.csv", "inference_decisions.csv",
                "weight_comparison.png", "per_attribute_comparison.png"}


def test_fit_writes_every_result_file_and_tensorboard_scalars(tmp_path, monkeypatch, chooser_model_dir):
    from selfinterp.__main__ import main

    monkeypatch.chdir(tmp_path)
    assert main(["fit", "--config", str(TINY_CONFIG), f"--model.model={chooser_model_dir}",
                 "--trainer.limit_train_batches=1"]) == 0
    run = tmp_path / "results" / "tiny" / "version_0"
    assert {p.name for p in run.iterdir()} == {"epoch_0", "epoch_1", "summary.json", "recovery_curve.png"}
    data = build_data(n_scenarios=2, n_train=6, n_val=2, n_test=8)
    for epoch in ("epoch_0", "epoch_1"):
        assert {p.name for p in (run / epoch).iterdir()} == RESULT_FILES
        decisions = pd.read_csv(run / epoch / "inference_decisions.csv", keep_default_na=False)
        assert list(zip(decisions["scenario"], decisions["trial"])) == [(s, t) for s in range(2) for t in range(8)]
        assert decisions["target"].tolist() == [t.label for t in data.test_trials]
        assert set(decisions["selection"]) == {"A", "B"}  # the chooser answers with letters
    summary = json.loads((run / "summary.json").read_text())
    assert [e["tag"] for e in summary["epochs"]] == ["epoch_0", "epoch_1"]
    assert summary["model"] == str(chooser_model_dir) and summary["lora_r"] == 4
    assert all(e["r"] is not None for e in summary["epochs"])
    setup = summary["setup"]
    assert {k: setup[k] for k in ("n_scenarios", "train_trials_per_scenario", "max_epochs", "lr", "full_finetune",
                                  "lora_b_lr_ratio", "lora_init", "batch_size", "accumulate_grad_batches", "compile",
                                  "devices", "precision")} == {
        "n_scenarios": 2, "train_trials_per_scenario": 6, "max_epochs": 1, "lr": 1e-3, "full_finetune": False,
        "lora_b_lr_ratio": 1.0, "lora_init": "default", "batch_size": 4, "accumulate_grad_batches": 1, "compile": None, "devices": 1,
        "precision": "32-true"}
    assert setup["attribute_questions_per_scenario"] == 0 and setup["curriculum"] is setup["mirror_train"] is False
    assert setup["layout"] == "blocks" and setup["scenario_ids"] is setup["weights"] is None and setup["init_from"] is None
    assert setup["optimizer"] == "AdamW" and setup["lora_standardise"] is False and setup["data_seed"] == 0
    assert setup["machine"].startswith("CPU")
    base, trained = summary["epochs"]
    assert base["train_seconds"] == 0 and trained["train_seconds"] > 0
    logged = scalars(tmp_path / "lightning_logs" / "tiny" / "version_0")
    for key in ("verify/r", "verify/agreement", "verify/auc", "verify/parse_failure", "verify/frac_A"):
        assert [step for step, _ in logged[key]] == [0, 1], key
    assert [v for _, v in logged["verify/r"]] == pytest.approx([e["r"] for e in summary["epochs"]])
    assert "train/loss_step" in logged and "val/loss" in logged


def test_fast_dev_run_verifies_into_a_run_folder(tmp_path, monkeypatch, tiny_model_dir):
    from selfinterp.__main__ import main

    monkeypatch.chdir(tmp_path)
    assert main(["fit", "--config", str(TINY_CONFIG), f"--model.model={tiny_model_dir}",
                 "--trainer.fast_dev_run=true"]) == 0
    run = tmp_path / "results" / "run"
    for epoch in ("epoch_0", "epoch_1"):
        assert {p.name for p in (run / epoch).iterdir()} == RESULT_FILES
        assert len(pd.read_csv(run / epoch / "inference_decisions.csv")) == 16
    assert not (tmp_path / "results" / "summary.json").exists()
    summary = json.loads((run / "summary.json").read_text())
    assert [(e["tag"], e["parse_failure"]) for e in summary["epochs"]] == [("epoch_0", 1.0), ("epoch_1", 1.0)]


@pytest.mark.slow
def test_ddp_gathers_every_test_trial_once(tmp_path, chooser_model_dir):
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "selfinterp", "fit", "--config", str(TINY_CONFIG),
           f"--model.model={chooser_model_dir}", "--trainer.strategy=ddp", "--trainer.devices=2",
           "--trainer.accelerator=cpu", "--data.n_scenarios=3", "--data.n_test=5"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "results" / "tiny" / "version_0"
    for epoch in ("epoch_0", "epoch_1"):
        decisions = pd.read_csv(run / epoch / "inference_decisions.csv", keep_default_na=False)
        pairs = list(zip(decisions["scenario"], decisions["trial"]))
        assert pairs == [(s, t) for s in range(3) for t in range(5)]  # complete, unique, ordered
        assert set(decisions["selection"]) <= {"A", "B"}
    summary = json.loads((run / "summary.json").read_text())
    assert [e["tag"] for e in summary["epochs"]] == ["epoch_0", "epoch_1"]
    assert (tmp_path / "lightning_logs" / "tiny" / "checkpoints" / "last.ckpt").is_file()


# --- the embedded model -----------------------------------------------------------------------
@pytest.mark.slow
def test_embedded_model_chat_template_and_letters():
    from transformers import AutoConfig

    from selfinterp.models import load_tokenizer, resolve_model

    tokenizer = load_tokenizer("smollm2-135m")
    config = AutoConfig.from_pretrained(resolve_model("smollm2-135m"))
    assert config.model_type == "llama" and config.vocab_size == len(tokenizer) == 49152
    assert config.tie_word_embeddings
    record = Record("Be brief.", "Which one?\nA: x\nB: y", "B")
    assert prompt_text(tokenizer, record) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhich one?\nA: x\nB: y<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert tokenizer.apply_chat_template(record.messages(), tokenize=False).endswith("<|im_start|>assistant\nB<|im_end|>\n")
    assert letter_ids(tokenizer) == (A_ID, B_ID)
    assert tokenizer.pad_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
