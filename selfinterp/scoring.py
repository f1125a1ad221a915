"""Greedy A/B choices from a causal LM: one batched forward pass, logits at the answer position only."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import torch
from tqdm.auto import tqdm

from selfinterp.errors import UserError

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


def _left_pad(tokenizer, prompts: Sequence[str], device: torch.device) -> dict[str, torch.Tensor]:
    enc = tokenizer(list(prompts), add_special_tokens=False, padding=True, padding_side="left", return_tensors="pt")
    mask = enc["attention_mask"].to(device)
    return {
        "input_ids": enc["input_ids"].to(device),
        "attention_mask": mask,
        "position_ids": (mask.cumsum(dim=1) - 1).clamp(min=0),
    }


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

    The first answer token is the argmax over the whole vocabulary at the last prompt position,
    from one forward pass over a left-padded, length-sorted batch. Where it is not a clean "A" or
    "B", greedy decoding continues for up to ``continue_tokens`` tokens and the text is parsed
    strictly; what still is not A or B is unparseable (selection ""), never counted as "A".
    """
    a_id, b_id = letter_ids(tokenizer)
    device = next(causal_lm.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[Choice | None] = [None] * len(prompts)
    for start in tqdm(range(0, len(order), batch_size), desc="verify", disable=not progress, leave=False):
        idx = order[start:start + batch_size]
        batch = _left_pad(tokenizer, [prompts[i] for i in idx], device)
        hidden = causal_lm.get_decoder()(**batch).last_hidden_state[:, -1]
        logits = causal_lm.get_output_embeddings()(hidden).float()
        top = logits.argmax(dim=-1).tolist()
        p_b = torch.sigmoid(logits[:, b_id] - logits[:, a_id]).tolist()
        unclear = [k for k, t in enumerate(top) if t not in (a_id, b_id)]
        texts = {k: ("A" if t == a_id else "B") for k, t in enumerate(top) if k not in unclear}
        if unclear and continue_tokens > 0:
            rows = torch.tensor(unclear, device=device)
            generated = causal_lm.generate(
                input_ids=batch["input_ids"][rows], attention_mask=batch["attention_mask"][rows],
                max_new_tokens=continue_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
            )
            width = batch["input_ids"].shape[1]
            for k, seq in zip(unclear, generated[:, width:]):
                texts[k] = tokenizer.decode(seq, skip_special_tokens=True)
        for k, i in enumerate(idx):
            raw = texts.get(k, tokenizer.decode([top[k]]))
            out[i] = Choice(raw, parse_answer(raw), p_b[k])
    return out  # type: ignore[return-value]
