"""Shared fixtures: the real embedded tokenizer and tiny Llama models saved next to it.

``tiny_model_dir`` is a randomly initialised 2-layer Llama (hidden size 32) with the SmolLM2
tokenizer; ``model.model: <that folder>`` works everywhere a model name is accepted. Its answers
are whatever random weights give (never A or B here); its query/key weights are scaled up so that
attention depends on token positions (a padding or position-id mistake changes its outputs).

``chooser_model_dir`` is the same architecture with hand-set weights so that it always answers
"A" or "B" and the letter depends on the prompt's digits: attention is uniform (zero query/key
weights, identity value/output maps), so the last position's hidden state is the mean of the
prompt's normalised embeddings, and only digit embeddings carry a component along the direction
that separates the "A" and "B" output rows. It gives a mix of A and B answers, i.e. a regression
that can be fitted, without any training.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = Path(__file__).resolve().parent / "configs" / "tiny.yaml"
A_ID, B_ID, IM_END_ID = 49, 50, 2  # "A", "B" and "<|im_end|>" in the SmolLM2 tokenizer


def pytest_configure(config):
    # The tests call the CLI in-process with explicit argv while pytest's own options are in sys.argv.
    config.addinivalue_line("filterwarnings", "ignore:LightningCLI's args parameter is intended:UserWarning")


@pytest.fixture(scope="session")
def tokenizer():
    from selfinterp.models import load_tokenizer

    return load_tokenizer("smollm2-135m")


def tiny_llama(seed: int = 0, kv_heads: int = 1, sharp: bool = True):
    """A randomly initialised 2-layer Llama over the SmolLM2 vocabulary (tied embeddings; by default
    grouped-query attention, 2 query heads sharing 1 key/value head). ``sharp`` scales weights up so
    that attention is position-dependent and matters (the default init is nearly uniform)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=kv_heads, max_position_embeddings=1024, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=IM_END_ID, pad_token_id=IM_END_ID,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    if not sharp:
        return model
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(10.0)
        for layer in model.model.layers:
            for proj, scale in [("q_proj", 25.0), ("k_proj", 25.0), ("v_proj", 5.0), ("o_proj", 5.0)]:
                getattr(layer.self_attn, proj).weight.mul_(scale)
    return model


def make_chooser(model, tokenizer, winner: tuple[int, ...] = (A_ID, B_ID)):
    """Set the weights of ``tiny_llama(kv_heads=2, sharp=False)`` so that the tokens in ``winner`` always top the logits.

    With ``winner=(A, B)`` the choice between them depends on the digits in the prompt (see the
    module docstring), calibrated to about half A on some test prompts; with one other token,
    that token wins everywhere (answers are unparseable).
    """
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        emb = model.get_input_embeddings().weight  # tied with the output head
        emb[:, 0] = 1.0  # a direction shared by every token: dominates every hidden state
        emb[:, 1] = 0.0  # the A-vs-B direction: only digits contribute to it
        digits = [tokenizer.convert_tokens_to_ids(str(d)) for d in range(10)]
        emb[digits, 1] = torch.randn(10, generator=gen)
        for layer in model.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            attn.q_proj.weight.zero_()
            attn.k_proj.weight.zero_()
            attn.v_proj.weight.copy_(torch.eye(32))
            attn.o_proj.weight.copy_(torch.eye(32) if layer is model.model.layers[0] else torch.zeros(32, 32))
            mlp.down_proj.weight.zero_()
        for k, token in enumerate(winner):
            emb[token, 0] = 2.0
            emb[token, 1] = 1.0 if k == 0 else -1.0
        if len(winner) == 2:
            _calibrate(model, tokenizer, winner)
    return model


def _calibrate(model, tokenizer, pair: tuple[int, int]) -> None:
    """Shift the two output rows along the shared direction so that the median prompt is a tie."""
    from selfinterp.datamodule import prompt_text
    from selfinterp.dataset import build_data

    data = build_data(n_scenarios=4, n_train=1, n_val=0, n_test=6)
    emb = model.get_input_embeddings().weight
    batch = tokenizer([prompt_text(tokenizer, r) for r in data.test], add_special_tokens=False, padding=True,
                      padding_side="left", return_tensors="pt")
    for _ in range(2):  # (attention is uniform over the unmasked tokens, so left padding is exact here)
        hidden = model.model(**batch).last_hidden_state[:, -1]
        diff = hidden @ (emb[pair[0]] - emb[pair[1]])
        shift = diff.median() / (2 * hidden[:, 0].mean())
        emb[pair[0], 0] -= shift
        emb[pair[1], 0] += shift


def ramp_lora_b(module: torch.nn.Module) -> None:
    """A fixed, non-zero adapter (LoRA B starts at zero), so that the adapter takes part and two
    modules built alike compute alike."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.linspace(-0.5, 0.5, p.numel()).view_as(p))


def save_model(model, tokenizer, folder: Path) -> Path:
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> Path:
    return save_model(tiny_llama(), tokenizer, tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def chooser_model_dir(tmp_path_factory, tokenizer) -> Path:
    model = make_chooser(tiny_llama(kv_heads=2, sharp=False), tokenizer)
    return save_model(model, tokenizer, tmp_path_factory.mktemp("tiny-chooser"))


@pytest.fixture(scope="session")
def stubborn_model_dir(tmp_path_factory, tokenizer) -> Path:
    """A tiny model whose top token is always "Hello" (never A or B)."""
    hello = tokenizer.encode("Hello", add_special_tokens=False)[0]
    model = make_chooser(tiny_llama(kv_heads=2, sharp=False), tokenizer, (hello,))
    return save_model(model, tokenizer, tmp_path_factory.mktemp("tiny-hello"))


def scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the TensorBoard event files under a folder: tag -> [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, list[tuple[int, float]]] = {}
    for events in sorted(Path(log_dir).rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return out


def naive_answer(model, tokenizer, prompt: str, continue_tokens: int) -> tuple[str, float]:
    """The reference answer: one unpadded forward pass of the full model (then greedy decoding) for one prompt."""
    ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, -1].float()
        top = int(logits.argmax())
        p_b = torch.sigmoid(logits[B_ID] - logits[A_ID]).item()
        if top in (A_ID, B_ID):
            return "AB"[top == B_ID], p_b
        if not continue_tokens:
            return tokenizer.decode([top]), p_b
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=continue_tokens,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True), p_b
