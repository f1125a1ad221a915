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
                       "--n_trials", "12", "--folds", "3", "--batch_size", "5", "--adam_steps", "0", "3", cwd=tmp_path)
    layer_rows = [line for line in lines if line.startswith("| ") and line.split("|")[1].strip()[0].isdigit()]
    assert len(layer_rows) == 3  # embeddings + 2 layers (the tiny model's last layer output is the final norm)
    assert any(line.startswith("best layer: ") for line in lines)
    adam_rows = [line.split("|")[1:-1] for line in lines[-6:]]
    assert [(r[0].strip(), r[2].strip()) for r in adam_rows] == [
        (name, n) for name in ("full, raw state", "full, standardised", "LoRA r=16, raw state") for n in ("0", "3")]
    assert all(float(r[4]) == 0 for r in adam_rows[::2])  # untrained read-outs give logit 0 everywhere


@pytest.mark.parametrize("kwargs", [{}, {"standardize": True}, {"rank": 16}])
def test_adam_readouts_learn_a_separable_choice(kwargs):
    probe = load_script("probe_attributes")
    x = np.random.default_rng(0).normal(size=(300, 20))
    y = (x[:, 0] - x[:, 1] > 0).astype(float)
    logits = probe.adam_readout(x[:200], y[:200], x[200:], steps=300, lr=1e-2, batch=8, **kwargs)
    assert ((logits > 0) == (y[200:] > 0)).mean() > 0.9
    assert not probe.adam_readout(x[:200], y[:200], x[200:], steps=0, lr=1e-2, batch=8, **kwargs).any()


def test_standardised_adam_readout_ignores_feature_offset_and_scale():
    probe = load_script("probe_attributes")
    x = np.random.default_rng(1).normal(size=(100, 6))
    y = (x[:, 2] > 0).astype(float)
    plain = probe.adam_readout(x[:80], y[:80], x[80:], steps=50, lr=1e-2, batch=8, standardize=True)
    shifted = probe.adam_readout(x[:80] * 1000 + 5, y[:80], x[80:] * 1000 + 5, steps=50, lr=1e-2, batch=8, standardize=True)
    np.testing.assert_allclose(plain, shifted, atol=1e-3)


def test_probe_refuses_the_held_out_seed(tiny_model_dir):
    probe = load_script("probe_attributes")
    with pytest.raises(SystemExit, match="held-out"):
        probe.main(["--model", str(tiny_model_dir), "--seed", "7"])
