"""Standardised adapter inputs: each LoRA A matrix reads its input centred and scaled per feature.

Why: RESULTS section 5 found the attributes in directions of the hidden state that vary little
beside a large common component, and an AdamW-trained read-out found them only once its inputs were
standardised. A LoRA adapter's A matrix reads the raw input, so its output (and B's gradient) is
dominated by the common part. Here every A reads ``(x - mean) / std * rms``: per feature, the mean
and standard deviation of its input over the tokens of one batch of training prompts, measured on the
starting model; ``rms``, that input's root mean square over all features, keeps the input's overall
size, so that only its balance across features changes, not the adapter's effective step size. B
starts at zero, so the starting model is unchanged; what changes is what the adapter's updates act on.

The statistics are buffers of each A module (``input_shift``, ``input_scale``), saved in checkpoints
with the trainable weights. The standardisation has no PEFT form, so such adapters are not exported.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

SHIFT, SCALE = "input_shift", "input_scale"


def _adapter_inputs(net: torch.nn.Module) -> Iterator[torch.nn.Linear]:
    """Every LoRA A matrix (one per adapted layer and adapter name) of a PEFT model."""
    for module in net.modules():
        for a in getattr(module, "lora_A", {}).values():
            yield a


def _standardise(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    x = args[0]
    return (((x - getattr(module, SHIFT)) * getattr(module, SCALE)).to(x.dtype), *args[1:])


def attach(net: torch.nn.Module) -> None:
    """Give every LoRA A of ``net`` identity statistics (shift 0, scale 1) and the hook that applies them."""
    for a in _adapter_inputs(net):
        a.register_buffer(SHIFT, torch.zeros(a.in_features))
        a.register_buffer(SCALE, torch.ones(a.in_features))
        a.register_forward_pre_hook(_standardise)


def is_statistic(name: str) -> bool:
    """Whether a state-dict name is one of the standardisation buffers."""
    return name.endswith((f".{SHIFT}", f".{SCALE}"))


@torch.no_grad()
def calibrate(
    net: torch.nn.Module,
    forward: Callable[[], object],
    mask: torch.Tensor,
    total: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
) -> None:
    """Set every A's statistics from its raw inputs during ``forward()`` at the tokens where ``mask``
    (batch x sequence) is true. ``total`` sums a tensor over processes (DDP), so that every rank gets
    the same statistics."""
    keep = mask.bool()
    sums: dict[torch.nn.Module, list[torch.Tensor]] = {}

    def record(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        x = args[0][keep].double()
        sums[module] = [x.sum(0), (x * x).sum(0), torch.tensor(float(x.shape[0]), device=x.device, dtype=torch.double)]

    adapters = list(_adapter_inputs(net))
    handles = [a.register_forward_pre_hook(record, prepend=True) for a in adapters]
    try:
        forward()
    finally:
        for h in handles:
            h.remove()
    for a in adapters:
        s, sq, n = (total(t) for t in sums[a])
        mean = s / n
        var = (sq / n - mean * mean).clamp_min(0)
        # A floor for features that barely vary (constant ones would otherwise be scaled without bound).
        std = var.sqrt().clamp_min(1e-3 * float(var.mean().sqrt()) + 1e-12)
        size = (sq / n).mean().sqrt()  # the raw input's root mean square, over features and tokens
        getattr(a, SHIFT).copy_(mean)
        getattr(a, SCALE).copy_(size / std)
