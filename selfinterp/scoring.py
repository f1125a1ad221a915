"""Greedy A/B choices from a causal LM: batched forward passes, logits at the answer position only.

Prompts that share a long token prefix (all test prompts of a scenario share the system prompt,
the instruction and the question) are scored without recomputing that prefix: it runs once, its
key/value cache is copied to every prompt of the batch that shares it, and only the suffixes run
(:mod:`selfinterp.prefix`; ``docs/PERFORMANCE.md`` has the measured gain). Where that does not
apply (no long shared prefix, an attention or cache type it is not written for) the plain
left-padded path is used.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import torch
from torch.profiler import record_function
from tqdm.auto import tqdm

from selfinterp.datamodule import split_answer
from selfinterp.dataset import Record
from selfinterp.errors import UserError
from selfinterp.prefix import can_share, pad_rows, prefix_groups, shared_hidden, shared_layout

_ANSWER = re.compile(r"^(?:option\s+)?([AB])\.?$", re.IGNORECASE)


@dataclass(frozen=True)
class Choice:
    """A model's answer to one prompt: raw text, parsed letter ("" if unparseable), P(B)/(P(A)+P(B))."""

    raw: str
    selection: str
    p_b: float


def parse_answer(text: str) -> str:
    """"A" or "B" when the answer is exactly that letter (optionally "Option X" or a trailing period), else ""."""
    match = _ANSWER.match(text.strip())
    return match.group(1).upper() if match else ""


def letter_ids(tokenizer) -> tuple[int, int]:
    """Token ids of "A" and "B"; both must be single tokens for one-pass scoring."""
    ids = [tokenizer.encode(letter, add_special_tokens=False) for letter in "AB"]
    if any(len(i) != 1 for i in ids):
        raise UserError(f"'A' and 'B' are not single tokens for this tokenizer ({ids}); this model is not supported")
    return ids[0][0], ids[1][0]


def stop_ids(causal_lm: torch.nn.Module, tokenizer) -> list[int]:
    """Token ids that end an answer: the model's and tokenizer's end-of-sequence ids, and the token the
    chat template puts after an assistant message.

    The last one guards against wrong metadata: transformers 5.17 converts SmolLM2's GGUF file with
    ``<|im_start|>`` as end-of-sequence, and decoding would then run past ``<|im_end|>``.
    """
    configured = getattr(getattr(causal_lm, "generation_config", None), "eos_token_id", None)
    ids = set([configured] if isinstance(configured, int) else configured or [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    letter = tokenizer.encode("A", add_special_tokens=False)
    try:
        _, turn = split_answer(tokenizer, Record(system="", user="?", answer="A"))
    except UserError:  # a template that renders the prompt differently with the answer: no turn end to read
        turn = []
    if len(turn) > len(letter) and turn[:len(letter)] == letter:
        ids.add(turn[len(letter)])
    return sorted(ids)


def _plan(ids: Sequence[Sequence[int]], batch_size: int, share: bool) -> list[list[tuple[int, int]]]:
    """Batches of ``(prompt index, shared prefix length)``: shared groups kept together, then the rest by length."""
    groups = prefix_groups(ids) if share else [(list(range(len(ids))), 0)]
    rows: list[tuple[int, int]] = []
    for members, p in groups:
        if p:
            rows += [(i, p) for i in sorted(members, key=lambda i: len(ids[i]))]
    rows += sorted(((i, 0) for members, p in groups if not p for i in members), key=lambda r: len(ids[r[0]]))
    return [rows[k:k + batch_size] for k in range(0, len(rows), batch_size)]


def _plain_hidden(decoder, ids: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> torch.Tensor:
    """Last-position hidden states from one left-padded forward pass."""
    input_ids, mask = pad_rows(ids, pad_id, left=True, device=device)
    position_ids = (mask.cumsum(dim=1) - 1).clamp(min=0)
    return decoder(input_ids=input_ids, attention_mask=mask, position_ids=position_ids).last_hidden_state[:, -1]


def _shared_last(decoder, ids: Sequence[Sequence[int]], prefix: Sequence[int], pad_id: int,
                 device: torch.device) -> torch.Tensor | None:
    """Last-position hidden states with each distinct prefix computed once; None if the cache is not a plain one."""
    layout = shared_layout(ids, prefix, pad_id, device=device)
    hidden = shared_hidden(decoder, layout)
    if hidden is None:
        return None
    last = layout["suffix_mask"].sum(dim=1) - 1
    return hidden[torch.arange(len(ids), device=device), last]


@torch.no_grad()
def score_prompts(
    causal_lm: torch.nn.Module,
    tokenizer,
    prompts: Sequence[str],
    batch_size: int = 64,
    continue_tokens: int = 8,
    progress: bool = False,
) -> list[Choice]:
    """Greedy answers to chat-templated prompts (each ending with the generation prompt).

    The first answer token is the argmax over the whole vocabulary at the last prompt position.
    Prompts are batched by shared token prefix (each prefix computed once) or, where none is worth
    sharing, by length in one left-padded forward pass. Where the first token is not a clean "A" or
    "B", greedy decoding continues for up to ``continue_tokens`` tokens and the text is parsed
    strictly; what still is not A or B is unparseable (selection ""), never counted as "A".
    """
    a_id, b_id = letter_ids(tokenizer)
    device = next(causal_lm.parameters()).device
    pad_id = tokenizer.pad_token_id
    decoder, head = causal_lm.get_decoder(), causal_lm.get_output_embeddings()
    share = can_share(causal_lm)
    stops = stop_ids(causal_lm, tokenizer)
    # The record_function labels name the phases in a torch.profiler trace (scripts/bench_verify.py --profile).
    with record_function("selfinterp.verify.plan"):
        ids = tokenizer(list(prompts), add_special_tokens=False)["input_ids"] if len(prompts) else []
        plan = _plan(ids, batch_size, share)
    out: list[Choice | None] = [None] * len(prompts)
    for batch in tqdm(plan, desc="verify", disable=not progress, leave=False):
        idx = [i for i, _ in batch]
        rows = [ids[i] for i in idx]
        hidden = None
        if share and any(p for _, p in batch):
            with record_function("selfinterp.verify.shared_pass"):
                hidden = _shared_last(decoder, rows, [p for _, p in batch], pad_id, device)
            share = hidden is not None
        if hidden is None:
            with record_function("selfinterp.verify.plain_pass"):
                hidden = _plain_hidden(decoder, rows, pad_id, device)
        with record_function("selfinterp.verify.head"):
            logits = head(hidden).float()
            top = logits.argmax(dim=-1).tolist()
            p_b = torch.sigmoid(logits[:, b_id] - logits[:, a_id]).tolist()
        unclear = [k for k, t in enumerate(top) if t not in (a_id, b_id)]
        texts = {k: ("A" if t == a_id else "B") for k, t in enumerate(top) if k not in unclear}
        if unclear and continue_tokens > 0:
            with record_function("selfinterp.verify.continue"):
                input_ids, mask = pad_rows([rows[k] for k in unclear], pad_id, left=True, device=device)
                generated = causal_lm.generate(
                    input_ids=input_ids, attention_mask=mask, max_new_tokens=continue_tokens, do_sample=False,
                    pad_token_id=pad_id, eos_token_id=stops,
                )
            for k, seq in zip(unclear, generated[:, input_ids.shape[1]:]):
                texts[k] = tokenizer.decode(seq, skip_special_tokens=True)
        for k, i in enumerate(idx):
            raw = texts.get(k, tokenizer.decode([top[k]]))
            out[i] = Choice(raw, parse_answer(raw), p_b[k])
    return out  # type: ignore[return-value]
