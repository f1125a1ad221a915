"""The attribute probe (scripts/probe_attributes.py): its ridge read-out and its hidden states are right."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import naive_answer
from selfinterp.datamodule import prompt_text
from selfinterp.dataset import build_data
from test_bench import load_script, run_script


def test_ridge_read_out_finds_a_planted_linear_signal_and_nothing_in_noise():
    probe = load_script("probe_attributes")
    rng = np.random.default_rng(0)
    # more features than trials, driven by a few latent quantities, as a model's hidden state is
    latent = rng.normal(size=(200, 8))
    x = latent @ rng.normal(size=(8, 300)) + 0.1 * rng.normal(size=(200, 300))
    signal = latent[:, :5] @ np.array([1.0, -2.0, 0.5, 0.0, 3.0])
    y = np.column_stack([signal + 0.1 * rng.normal(size=200), rng.normal(size=200)])
    scores = probe.r2(y, probe.ridge_cv_predictions(x, y, folds=5))
    assert scores[0] > 0.9
    assert scores[1] < 0.05


def test_answer_states_are_taken_at_each_prompts_last_token(tokenizer, chooser_model_dir):
    probe = load_script("probe_attributes")
    model = AutoModelForCausalLM.from_pretrained(chooser_model_dir).eval()
    data = build_data(n_scenarios=2, n_train=1, n_val=0, n_test=3)
    prompts = [prompt_text(tokenizer, r) for r in data.test]
    assert len({len(tokenizer(p)["input_ids"]) for p in prompts}) > 1  # batches are padded
    states, margins = probe.answer_states(model, tokenizer, prompts, batch_size=4)
    assert states.shape == (6, model.config.num_hidden_layers + 1, model.config.hidden_size)
    for j, prompt in enumerate(prompts):
        ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
        np.testing.assert_allclose(states[j], torch.stack([h[0, -1] for h in hidden]).numpy(), atol=1e-4)
        p_b = naive_answer(model, tokenizer, prompt, 0)[1]
        assert 1 / (1 + np.exp(margins[j])) == pytest.approx(p_b, abs=1e-5)


@pytest.mark.slow
def test_probe_script_prints_one_row_per_layer_and_the_best_layer(tiny_model_dir, tmp_path):
    lines = run_script("probe_attributes", "--model", str(tiny_model_dir), "--device", "cpu", "--n_scenarios", "2",
                       "--n_trials", "12", "--folds", "3", "--batch_size", "5", cwd=tmp_path)
    layer_rows = [line for line in lines if line.startswith("| ") and line.split("|")[1].strip()[0].isdigit()]
    assert len(layer_rows) == 3  # embeddings + 2 layers (the tiny model's last layer output is the final norm)
    assert lines[-1].startswith("best layer: ")


def test_probe_refuses_the_held_out_seed(tiny_model_dir):
    probe = load_script("probe_attributes")
    with pytest.raises(SystemExit, match="held-out"):
        probe.main(["--model", str(tiny_model_dir), "--seed", "7"])
