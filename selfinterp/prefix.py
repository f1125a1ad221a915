"""Forward passes that run a token prefix shared by several rows once (verification and training).

All decision prompts share the chat header, the system prompt and the instruction, and those of one
scenario also its question: 50-76 of their ~180 tokens. A batch is split into its distinct prefixes
and each row's own suffix; the prefixes run once with a key/value cache, every row gets its prefix's
keys and values, and the suffixes run against them. Every real token sees what it sees in one plain
pass, so the results are the same (``tests/test_bench.py``, ``tests/test_training.py``); gradients
flow through the cache into the prefix pass.
"""

from __future__ import annotations

import inspect
from typing import Sequence

import torch

# Shortest shared prefix worth a cached forward pass of its own (tokens).
MIN_SHARED_PREFIX = 16
# Attention implementations whose masks handle the padded prefix + suffix layout used here.
_SHARED_ATTENTION = ("sdpa", "eager")


def pad_rows(rows: Sequence[Sequence[int]], pad_id: int, left: bool = False,
             device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
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


def prefix_lengths(ids: Sequence[Sequence[int]], min_prefix: int = MIN_SHARED_PREFIX) -> list[int]:
    """Each row's shared prefix length from :func:`prefix_groups` (0: it runs whole)."""
    lengths = [0] * len(ids)
    for members, p in prefix_groups(ids, min_prefix):
        for i in members:
            lengths[i] = p
    return lengths


def cache_kwarg(decoder: torch.nn.Module) -> str | None:
    """The decoder's keyword for a key/value cache ("cache" in transformers 5, "past_key_values" before)."""
    params = inspect.signature(decoder.forward).parameters
    return next((name for name in ("cache", "past_key_values") if name in params), None)


def can_share(causal_lm: torch.nn.Module) -> bool:
    """Whether the model's attention and decoder take the prefix + suffix layout (else: plain passes)."""
    config = getattr(causal_lm, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return False
    if getattr(config, "_attn_implementation", None) not in _SHARED_ATTENTION:
        return False
    return cache_kwarg(causal_lm.get_decoder()) is not None


def shared_layout(rows: Sequence[Sequence[int]], prefix: Sequence[int], pad_id: int,
                  labels: Sequence[Sequence[int]] | None = None, ignore: int = -100,
                  device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a prefix-shared pass over ``rows``, row ``i`` sharing its first ``prefix[i]`` tokens
    (at least one row has a prefix).

    ``prefix_ids``/``prefix_mask``: the distinct prefixes, right-padded; ``prefix_row``: each row's
    prefix (0 for rows without one, which ``prefix_len`` 0 masks out); ``suffix_ids``/``suffix_mask``:
    each row's own tokens, right-padded; with ``labels``, ``suffix_labels`` (padded with ``ignore``).
    """
    keys = sorted({tuple(r[:p]) for r, p in zip(rows, prefix) if p})
    slot = {k: n for n, k in enumerate(keys)}
    prefix_ids, prefix_mask = pad_rows(keys, pad_id, device=device)
    suffix_ids, suffix_mask = pad_rows([r[p:] for r, p in zip(rows, prefix)], pad_id, device=device)
    layout = {
        "prefix_ids": prefix_ids, "prefix_mask": prefix_mask,
        "prefix_row": torch.tensor([slot[tuple(r[:p])] if p else 0 for r, p in zip(rows, prefix)], device=device),
        "prefix_len": torch.tensor(list(prefix), device=device),
        "suffix_ids": suffix_ids, "suffix_mask": suffix_mask,
    }
    if labels is not None:
        layout["suffix_labels"] = pad_rows([lab[p:] for lab, p in zip(labels, prefix)], ignore, device=device)[0]
    return layout


def shared_hidden(decoder: torch.nn.Module, layout: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """The decoder's last hidden states at every suffix position (rows x suffix width x hidden), or
    None when its cache is not a plain one.

    The mask hides the prefix padding and the prefixes of rows without one; position ids continue each
    row's own prefix. Not for training under gradient checkpointing: checkpointed layers drop the cache.
    """
    try:
        from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer
    except ImportError:  # transformers before 4.56: no per-layer cache objects
        return None

    out = decoder(input_ids=layout["prefix_ids"], attention_mask=layout["prefix_mask"], use_cache=True)
    cache = out.cache if getattr(out, "cache", None) is not None else getattr(out, "past_key_values", None)
    suffix_ids, own = layout["suffix_ids"], layout["prefix_len"]
    width = layout["prefix_ids"].shape[1] + suffix_ids.shape[1]
    layers = getattr(cache, "layers", None)
    # Plain layers, or sliding-window ones whose window spans the whole padded sequence (then they
    # attend exactly like full ones); anything else (smaller windows, linear attention) is not handled.
    if not layers or not all(type(layer) is DynamicLayer or (type(layer) is DynamicSlidingWindowLayer
                                                             and layer.sliding_window > width) for layer in layers):
        return None
    rows = layout["prefix_row"]
    cache.batch_select_indices(rows)
    prefix_mask = layout["prefix_mask"][rows] * (own > 0).unsqueeze(1)
    position_ids = own.unsqueeze(1) + torch.arange(suffix_ids.shape[1], device=suffix_ids.device)
    return decoder(
        input_ids=suffix_ids, attention_mask=torch.cat([prefix_mask, layout["suffix_mask"]], dim=1),
        position_ids=position_ids, use_cache=True, **{cache_kwarg(decoder): cache},
    ).last_hidden_state
