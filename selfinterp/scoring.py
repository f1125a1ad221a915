"""Greedy A/B choices from a causal LM: batched forward passes, logits at the answer position only.

Prompts that share a long token prefix (all test prompts of a scenario share the system prompt,
the instruction and the question) are scored without recomputing that prefix: it runs once, its
key/value cache is copied to every prompt of the batch that shares it, and only the suffixes run
(see ``docs/PERFORMANCE.md`` for the measured gain). Where that does not apply (no long shared
prefix, an attention or cache type it is not written for) the plain left-padded path is used.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass
from typing import Sequence

import torch
from torch.profiler import record_function
from tqdm.auto import tqdm

from selfinterp.datamodule import split_answer
from selfinterp.dataset import Record
from selfinterp.errors import UserError

_ANSWER = re.compile(r"^(?:option\s+)?([AB])\.?$", re.IGNORECASE)
# Shortest shared prefix worth a cached forward pass of its own (tokens).
MIN_SHARED_PREFIX = 16
# Attention implementations whose masks handle the padded prefix + suffix layout used here.
_SHARED_ATTENTION = ("sdpa", "eager")


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


def _pad(rows: Sequence[Sequence[int]], pad_id: int, left: bool, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id rows padded to the longest (on the left or right): ids and attention mask.

    Built as Python lists and turned into two tensors at once: a tensor operation per row would cost
    a dispatch each, which on a GPU is as slow as a layer of the model.
    """
    width = max(len(r) for r in rows)
    ids, mask = [], []
    for r in rows:
        gap = width - len(r)
        ids.append([pad_id] * gap + list(r) if left else list(r) + [pad_id] * gap)
        mask.append([0] * gap + [1] * len(r) if left else [1] * len(r) + [0] * gap)
    return torch.tensor(ids, dtype=torch.long, device=device), torch.tensor(mask, dtype=torch.long, device=device)


def _lcp(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def prefix_groups(ids: Sequence[Sequence[int]], min_prefix: int = MIN_SHARED_PREFIX) -> list[tuple[list[int], int]]:
    """Partition prompts (token-id lists) into groups that share a token prefix, saving the most tokens.

    Returns ``(members, prefix_len)`` pairs covering every index once; ``prefix_len`` is 0 for prompts
    that share nothing worth caching, else at least ``min_prefix`` and shorter than every member (each
    keeps at least one token of its own). Groups are contiguous runs of the lexicographically sorted
    prompts; a run is split where splitting saves more tokens, ``(size - 1) * prefix_len`` being a
    group's saving (the optimum over the runs that the sorted prompts' common prefixes nest into).
    """
    n = len(ids)
    order = sorted(range(n), key=lambda i: list(ids[i]))
    # c[k]: the prefix the k-th and (k+1)-th sorted prompts can share.
    c = [min(_lcp(ids[a], ids[b]), len(ids[a]) - 1, len(ids[b]) - 1) for a, b in zip(order, order[1:])]
    best: dict[tuple[int, int], tuple[int, list[tuple[int, int, int]]]] = {}
    stack: list[tuple[int, int, bool]] = [(0, n, False)] if n else []
    while stack:  # post-order over the nested runs, without recursion
        lo, hi, expanded = stack.pop()
        if hi - lo == 1:
            best[lo, hi] = (0, [(lo, hi, 0)])
            continue
        m = min(c[lo:hi - 1])
        cuts = [lo] + [k + 1 for k in range(lo, hi - 1) if c[k] == m] + [hi]
        kids = list(zip(cuts, cuts[1:]))
        if not expanded:
            stack.append((lo, hi, True))
            stack.extend((a, b, False) for a, b in kids)
            continue
        keep = (hi - lo - 1) * m if m >= min_prefix else 0
        parts = [best.pop(k) for k in kids]
        split = sum(s for s, _ in parts)
        if split > keep:
            best[lo, hi] = (split, [g for _, gs in parts for g in gs])
        else:
            best[lo, hi] = (keep, [(lo, hi, m if m >= min_prefix else 0)])
    runs = best[0, n][1] if n else []
    return [([order[k] for k in range(lo, hi)], m) for lo, hi, m in runs]


def _plan(ids: Sequence[Sequence[int]], batch_size: int, share: bool) -> list[list[tuple[int, int]]]:
    """Batches of ``(prompt index, shared prefix length)``: shared groups kept together, then the rest by length."""
    groups = prefix_groups(ids) if share else [(list(range(len(ids))), 0)]
    rows: list[tuple[int, int]] = []
    for members, p in groups:
        if p:
            rows += [(i, p) for i in sorted(members, key=lambda i: len(ids[i]))]
    rows += sorted(((i, 0) for members, p in groups if not p for i in members), key=lambda r: len(ids[r[0]]))
    return [rows[k:k + batch_size] for k in range(0, len(rows), batch_size)]


def _cache_kwarg(decoder: torch.nn.Module) -> str | None:
    """The decoder's keyword for a key/value cache ("cache" in transformers 5, "past_key_values" before)."""
    params = inspect.signature(decoder.forward).parameters
    return next((name for name in ("cache", "past_key_values") if name in params), None)


def _can_share(causal_lm: torch.nn.Module) -> bool:
    config = getattr(causal_lm, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return False
    if getattr(config, "_attn_implementation", None) not in _SHARED_ATTENTION:
        return False
    return _cache_kwarg(causal_lm.get_decoder()) is not None


def _plain_hidden(decoder, ids: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> torch.Tensor:
    """Last-position hidden states from one left-padded forward pass."""
    input_ids, mask = _pad(ids, pad_id, left=True, device=device)
    position_ids = (mask.cumsum(dim=1) - 1).clamp(min=0)
    return decoder(input_ids=input_ids, attention_mask=mask, position_ids=position_ids).last_hidden_state[:, -1]


def _shared_hidden(decoder, ids: Sequence[Sequence[int]], prefix: Sequence[int], pad_id: int,
                   device: torch.device) -> torch.Tensor | None:
    """Last-position hidden states, each distinct prefix computed once; None if the cache is not a plain one.

    Prefixes (right-padded) run once with a cache; each row gets its prefix's keys/values, and the
    right-padded suffixes run against them. The mask hides the prefix padding and the prefixes of
    rows without one; position ids continue each row's own prefix, so every real token sees exactly
    what it sees in the plain pass.
    """
    try:
        from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer
    except ImportError:  # transformers before 4.56: no per-layer cache objects
        return None

    keys = sorted({tuple(r[:p]) for r, p in zip(ids, prefix) if p})
    slot = {k: n for n, k in enumerate(keys)}
    pre_ids, pre_mask = _pad(keys, pad_id, left=False, device=device)
    kwarg = _cache_kwarg(decoder)
    out = decoder(input_ids=pre_ids, attention_mask=pre_mask, use_cache=True)
    cache = out.cache if getattr(out, "cache", None) is not None else getattr(out, "past_key_values", None)
    suffixes = [r[p:] for r, p in zip(ids, prefix)]
    width = pre_ids.shape[1] + max(len(s) for s in suffixes)
    layers = getattr(cache, "layers", None)
    # Plain layers, or sliding-window ones whose window spans the whole padded sequence (then they
    # attend exactly like full ones); anything else (smaller windows, linear attention) is not handled.
    if not layers or not all(type(layer) is DynamicLayer or (type(layer) is DynamicSlidingWindowLayer
                                                             and layer.sliding_window > width) for layer in layers):
        return None
    rows = torch.tensor([slot[tuple(r[:p])] if p else 0 for r, p in zip(ids, prefix)], device=device)
    cache.batch_select_indices(rows)
    own = torch.tensor(prefix, device=device)
    prefix_mask = pre_mask[rows] * (own > 0).unsqueeze(1)
    suf_ids, suf_mask = _pad(suffixes, pad_id, left=False, device=device)
    position_ids = own.unsqueeze(1) + torch.arange(suf_ids.shape[1], device=device)
    hidden = decoder(
        input_ids=suf_ids, attention_mask=torch.cat([prefix_mask, suf_mask], dim=1), position_ids=position_ids,
        use_cache=True, **{kwarg: cache},
    ).last_hidden_state
    last = torch.tensor([len(s) - 1 for s in suffixes], device=device)
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
    share = _can_share(causal_lm)
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
                hidden = _shared_hidden(decoder, rows, [p for _, p in batch], pad_id, device)
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
                input_ids, mask = _pad([rows[k] for k in unclear], pad_id, left=True, device=device)
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
