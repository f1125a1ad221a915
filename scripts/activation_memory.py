"""Memory a training step keeps for its backward pass, per prompt token, with and without gradient
checkpointing: what decides the largest batch, or how many runs at once, a GPU holds.

Counts the bytes of the tensors autograd saves during one forward pass of the project's training step
(``DecisionLM.answer_logits`` + cross entropy, LoRA on every linear layer, the batch laid out as the
datamodule's collate does, so shared prompt prefixes run once where the step shares them), each storage
once and the model's own weights not at all. By default the frozen base weights are bf16 under bf16 autocast, as on
a GPU; ``--fp32`` gives the CPU recipe. No timing; runs on a GPU when there is one (``--device cpu``
to stay on the CPU). The table gives it per real prompt token and projects it to a batch of
``--project_batch`` prompts (saved bytes per prompt, times that batch).

    python scripts/activation_memory.py                   # the embedded model, 4 paper prompts
    python scripts/activation_memory.py --batch_size 8 --project_batch 256
"""

from __future__ import annotations

import bench_common as bc
import torch
import torch.nn.functional as F
from lightning.fabric.utilities import move_data_to_device

from selfinterp.datamodule import collate, encode_all
from selfinterp.dataset import build_data
from selfinterp.module import DecisionLM


def saved_bytes(module: DecisionLM, batch: dict[str, torch.Tensor], bf16: bool) -> int:
    """Bytes of the distinct storages autograd keeps for the backward pass of one training loss."""
    device = batch["input_ids"].device
    own = {t.untyped_storage().data_ptr() for t in [*module.parameters(), *module.buffers()]}
    seen: set[int] = set()
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in own and ptr not in seen:
            seen.add(ptr)
            total += storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        logits, targets, _ = module.answer_logits(batch)
        F.cross_entropy(logits, targets)
    return total


def main(argv: list[str] | None = None) -> None:
    parser = bc.base_parser(__doc__, timing=False)
    parser.add_argument("--batch_size", type=int, default=4, help="prompts measured (default: %(default)s)")
    parser.add_argument("--n_scenarios", type=int, default=100, help="scenarios the prompts come from, one each (default: %(default)s)")
    parser.add_argument("--project_batch", type=int, default=128, help="batch the table projects to (default: %(default)s)")
    parser.add_argument("--fp32", action="store_true", help="float32 base weights, no autocast (the CPU recipe)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = bc.pick_device(args.device)
    data = build_data(n_scenarios=args.n_scenarios, n_train=1, n_val=0, n_test=1)
    rows = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        module = DecisionLM(model=args.model, gradient_checkpointing=checkpointing)
        if not args.fp32:  # what DecisionLM.setup does under bf16 precision
            module.cast_frozen(torch.bfloat16)
        module.to(device).train()
        items = encode_all(module.tokenizer, data.train[:args.batch_size])
        batch = move_data_to_device(collate(items, module.tokenizer.pad_token_id), device)
        tokens = int(batch["attention_mask"].sum())
        saved = saved_bytes(module, batch, bf16=not args.fp32)
        rows.append([f"gradient checkpointing {'on' if checkpointing else 'off'}", len(items), tokens,
                     bc.positions_run(module, batch), saved / 2**20, saved / tokens / 1024,
                     saved / len(items) * args.project_batch / 2**30])
    print(f"device: {bc.describe(device)}; model: {args.model} "
          f"({'float32' if args.fp32 else 'bf16 frozen weights under bf16 autocast'}, LoRA r=16 on every linear layer)")
    bc.print_table(["setting", "prompts", "tokens", "positions run", "saved MiB", "KiB per token",
                    f"GiB at batch {args.project_batch}"], rows)


if __name__ == "__main__":
    main()
