"""model.lora_standardise: every LoRA A reads its input centred and scaled by the first training batch's statistics."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from selfinterp.datamodule import DecisionDataModule, collate
from selfinterp.errors import UserError
from selfinterp.module import DecisionLM, _hidden
from selfinterp.standardise import SCALE, SHIFT, calibrate


def _module(model_dir, **kwargs) -> DecisionLM:
    return DecisionLM(model=str(model_dir), lora_r=4, lora_alpha=8, **kwargs)


def _data() -> DecisionDataModule:
    return DecisionDataModule(n_scenarios=2, n_train=4, n_val=1, n_test=5, batch_size=4)


def _adapters(module: DecisionLM) -> dict[str, torch.nn.Linear]:
    return {n: m for n, m in module.net.named_modules() if n.endswith("lora_A.default")}


def _inputs(module: DecisionLM, batch: dict) -> dict[str, torch.Tensor]:
    """What each LoRA A receives (after standardisation) at the batch's real tokens."""
    seen = {}
    keep = batch["attention_mask"].bool()
    hooks = [a.register_forward_hook(lambda m, args, out, n=n: seen.__setitem__(n, args[0][keep]))
             for n, a in _adapters(module).items()]
    with torch.no_grad():
        _hidden(module.causal_lm.get_decoder(), batch["input_ids"], batch["attention_mask"])
    for h in hooks:
        h.remove()
    return seen


def test_calibration_standardises_every_adapter_input_and_keeps_the_starting_model(tiny_model_dir):
    module = _module(tiny_model_dir, lora_standardise=True)
    dm = _data()
    dm.tokenizer = module.tokenizer
    dm.setup("fit")
    batch = collate(dm.train_set.items[:4], module.tokenizer.pad_token_id)
    assert int(batch["attention_mask"].sum()) < batch["attention_mask"].numel()  # padding is left out
    raw = _inputs(module, batch)
    assert len(raw) == 2 * 7  # q, k, v, o, gate, up, down in each layer
    with torch.no_grad():
        before = module.answer_logits(batch)[0]
    calibrate(module.net, lambda: _hidden(module.causal_lm.get_decoder(), batch["input_ids"], batch["attention_mask"]),
              batch["attention_mask"])
    for name, x in _inputs(module, batch).items():
        size = raw[name].pow(2).mean().sqrt()  # every feature varies as much as the raw input's root mean square
        assert torch.allclose(x.mean(0), torch.zeros(x.shape[1]), atol=1e-4 * size), name
        assert torch.allclose(x.std(0, unbiased=False), size.expand(x.shape[1]), rtol=1e-3), name
        assert not torch.allclose(raw[name].std(0, unbiased=False), size.expand(x.shape[1]), rtol=0.1)
        a = _adapters(module)[name]
        assert torch.allclose(getattr(a, SHIFT), raw[name].mean(0), atol=1e-5)
    with torch.no_grad():  # B is still zero: the adapter adds nothing yet
        assert torch.equal(module.answer_logits(batch)[0], before)


def test_calibration_over_two_ranks_gives_the_statistics_of_both_ranks_batches(tiny_model_dir):
    """Under DDP each rank sees its own first batch; ``total`` sums over ranks, so both get the statistics
    of all the tokens. Simulated: rank 1 holds rows 2-3, rank 0 rows 0-1 and adds rank 1's sums."""
    module = _module(tiny_model_dir, lora_standardise=True)
    dm = _data()
    dm.tokenizer = module.tokenizer
    dm.setup("fit")
    batch = collate(dm.train_set.items[:4], module.tokenizer.pad_token_id)
    decoder = module.causal_lm.get_decoder()

    def run(rows: slice, total=lambda t: t) -> dict[str, torch.Tensor]:
        ids, mask = batch["input_ids"][rows], batch["attention_mask"][rows]
        calibrate(module.net, lambda: _hidden(decoder, ids, mask), mask, total)
        return {n: torch.cat([getattr(a, SHIFT), getattr(a, SCALE)]).clone() for n, a in _adapters(module).items()}

    sent: list[torch.Tensor] = []
    run(slice(2, 4), lambda t: sent.append(t.clone()) or t)
    received = iter(sent)
    ranks = run(slice(0, 2), lambda t: t + next(received))
    whole = run(slice(0, 4))
    assert all(torch.allclose(ranks[n], whole[n], rtol=1e-5) for n in whole)
    assert not torch.allclose(run(slice(0, 2))["base_model.model.model.layers.0.mlp.up_proj.lora_A.default"],
                              whole["base_model.model.model.layers.0.mlp.up_proj.lora_A.default"], rtol=1e-3)


def test_fit_calibrates_once_and_checkpoints_carry_the_statistics(tiny_model_dir, tmp_path):
    module = _module(tiny_model_dir, lora_standardise=True)
    first = {}

    class FirstBatch(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            first.setdefault("batch", batch)

    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, use_distributed_sampler=False, max_steps=2, callbacks=[FirstBatch()])
    trainer.fit(module, datamodule=_data())
    # Layer 0's attention inputs do not depend on any adapter: the statistics are those of the first batch.
    q = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default"
    x = _inputs(module, first["batch"])[q]
    assert torch.allclose(x.mean(0), torch.zeros(x.shape[1]), atol=1e-4)
    assert torch.allclose(x.std(0, unbiased=False), x.std(0, unbiased=False).mean().expand(x.shape[1]), rtol=1e-3)

    path = tmp_path / "standardised.ckpt"
    trainer.save_checkpoint(path)
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    stats = {k for k in state if k.endswith((SHIFT, SCALE))}
    assert len(stats) == 2 * 2 * 7
    warm = _module(tiny_model_dir, lora_standardise=True, init_from=str(path))
    assert not warm._calibrate  # a run started from the checkpoint keeps its statistics
    batch = first["batch"]
    with torch.no_grad():
        assert torch.allclose(warm.answer_logits(batch)[0], module.answer_logits(batch)[0], atol=1e-6)
    with pytest.raises(UserError, match="lora_standardise"):  # the statistics belong to the adapter
        _module(tiny_model_dir, init_from=str(path))
    resumed = _module(tiny_model_dir, lora_standardise=True)
    resumed.on_load_checkpoint({"state_dict": state})
    assert not resumed._calibrate


def test_lora_standardise_is_checked(tiny_model_dir):
    with pytest.raises(UserError, match="lora_standardise applies to LoRA adapters"):
        DecisionLM(full_finetune=True, lora_standardise=True)
    with pytest.raises(UserError, match="output head"):
        _module(tiny_model_dir, lora_standardise=True, target_modules=["q_proj", "lm_head"])
