"""Behaviour of the training system: answer-only labels, batching, the LoRA module and its loss."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from conftest import A_ID, B_ID, IM_END_ID, ramp_lora_b
from selfinterp.datamodule import (
    IGNORE,
    DecisionDataModule,
    Encoded,
    ShuffledBatchSampler,
    collate,
    encode,
    encode_all,
    prompt_text,
)
from selfinterp.dataset import Record, build_data
from selfinterp.errors import UserError
from selfinterp.module import DecisionLM, _hidden
from selfinterp.standardise import SCALE, SHIFT, is_statistic

RECORD_B = Record("You choose.", "Which is better?\nA: 1\nB: 2", "B")
RECORD_A = Record("You choose.", "Which is better, the first or the second? A or B", "A")


# --- labels ---------------------------------------------------------------------------------
@pytest.mark.parametrize("record, letter", [(RECORD_B, B_ID), (RECORD_A, A_ID)])
def test_encode_labels_cover_only_the_answer_and_end_of_turn(tokenizer, record, letter):
    prompt_ids = tokenizer(prompt_text(tokenizer, record), add_special_tokens=False)["input_ids"]
    enc = encode(tokenizer, record)
    assert enc.input_ids == prompt_ids + [letter, IM_END_ID]
    assert enc.labels == [IGNORE] * len(prompt_ids) + [letter, IM_END_ID]
    assert sum(label != IGNORE for label in enc.labels) == 2
    # The prompt is the chat template up to the assistant turn.
    assert tokenizer.decode(prompt_ids).endswith("<|im_start|>assistant\n")


def test_encode_letter_only_keeps_the_letter(tokenizer):
    answer = encode(tokenizer, RECORD_B, loss_on="answer")
    letter = encode(tokenizer, RECORD_B, loss_on="letter")
    assert letter.input_ids == answer.input_ids
    assert letter.labels[-2:] == [B_ID, IGNORE]
    assert [label for label in letter.labels if label != IGNORE] == [B_ID]


@pytest.mark.parametrize("loss_on", ["answer", "letter"])
def test_encode_all_batches_the_tokenizer_and_gives_what_each_record_alone_gives(tokenizer, loss_on):
    records = build_data(n_scenarios=3, n_train=4, n_val=0, n_test=1, attribute_train=2).train
    assert {r.answer for r in records} == {"A", "B"} and {r.stage for r in records} == {0, 1}
    encoded = encode_all(tokenizer, records, loss_on)
    assert len(encoded) == len(records)
    for record, enc in zip(records, encoded):
        prompt_ids = tokenizer(prompt_text(tokenizer, record), add_special_tokens=False)["input_ids"]
        letter = {"A": A_ID, "B": B_ID}[record.answer]
        assert enc.input_ids == prompt_ids + [letter, IM_END_ID]
        labels = [letter, IM_END_ID] if loss_on == "answer" else [letter, IGNORE]
        assert enc.labels == [IGNORE] * len(prompt_ids) + labels
    assert encode_all(tokenizer, [], loss_on) == []


def test_collate_right_pads_with_pad_id_ignored_labels_and_zero_mask():
    batch = [Encoded([5, 6, 7, 8], [IGNORE, IGNORE, 7, 8]), Encoded([9, 10], [IGNORE, 10])]
    out = collate(batch, pad_id=2)
    assert torch.equal(out["input_ids"], torch.tensor([[5, 6, 7, 8], [9, 10, 2, 2]]))
    assert torch.equal(out["labels"], torch.tensor([[IGNORE, IGNORE, 7, 8], [IGNORE, 10, IGNORE, IGNORE]]))
    assert torch.equal(out["attention_mask"], torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]]))
    assert all(t.dtype == torch.long for t in out.values())


def test_collate_of_real_records_keeps_each_answer_at_its_own_end(tokenizer):
    encs = [encode(tokenizer, RECORD_A), encode(tokenizer, RECORD_B)]
    out = collate(encs, tokenizer.pad_token_id)
    lengths = out["attention_mask"].sum(1).tolist()
    assert lengths == [len(e.input_ids) for e in encs] and lengths[0] != lengths[1]
    for row, (e, n) in enumerate(zip(encs, lengths)):
        assert out["labels"][row, n - 2:n].tolist() == e.labels[-2:]
        assert (out["labels"][row, n:] == IGNORE).all()


def test_collate_lays_out_each_shared_prompt_prefix_once_and_every_row_keeps_its_answer(tokenizer):
    data = build_data(n_scenarios=2, n_train=3, n_val=0, n_test=1)
    encs = encode_all(tokenizer, data.train) + [encode(tokenizer, RECORD_B)]  # the last shares no system prompt
    out = collate(encs, tokenizer.pad_token_id)
    assert "shared" not in collate(encs, tokenizer.pad_token_id, share=False)
    shared = out["shared"]
    lengths = shared["prefix_len"].tolist()
    assert lengths[-1] == 0 and all(p >= 50 for p in lengths[:-1])
    for row, (e, p) in enumerate(zip(encs, lengths)):
        n = len(e.input_ids) - p
        prefix = shared["prefix_ids"][shared["prefix_row"][row], :p].tolist()
        assert prefix + shared["suffix_ids"][row, :n].tolist() == e.input_ids
        assert int(shared["suffix_mask"][row].sum()) == n and int(shared["prefix_mask"][shared["prefix_row"][row]].sum()) >= p
        assert shared["suffix_labels"][row, :n].tolist() == e.labels[p:]
        assert shared["suffix_labels"][row, 0] == IGNORE  # the last prompt token, which predicts the letter, is in the suffix
    run = int(shared["prefix_mask"].sum() + shared["suffix_mask"].sum())
    assert run < int(out["attention_mask"].sum()) - 4 * 50  # 6 rows in at most 2 prefixes


# --- sampler --------------------------------------------------------------------------------
LENGTHS = [(i * 37) % 101 + 5 for i in range(53)]


def _flat(batches):
    return [i for b in batches for i in b]


@pytest.mark.parametrize("group", [True, False])
def test_sampler_yields_every_index_once_per_epoch(group):
    sampler = ShuffledBatchSampler(LENGTHS, batch_size=4, group_by_length=group, seed=3)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert sorted(_flat(batches)) == list(range(len(LENGTHS)))
        assert len(batches) == len(sampler) == 14
        assert sum(len(b) < 4 for b in batches) == 1  # 53 = 13 * 4 + 1


@pytest.mark.parametrize("world", [1, 2])
def test_curriculum_serves_every_stage_0_batch_before_any_stage_1_batch(world):
    stages = [0 if i % 3 == 0 else 1 for i in range(len(LENGTHS))]  # 18 stage-0, 35 stage-1 examples
    samplers = [ShuffledBatchSampler(LENGTHS, 4, seed=3, rank=r, world=world, stages=stages) for r in range(world)]
    for epoch in (0, 1):
        served = []
        for s in samplers:
            s.set_epoch(epoch)
            batches = list(s)
            kinds = [{stages[i] for i in b} for b in batches]
            assert all(len(k) == 1 for k in kinds)  # no batch mixes stages
            order = [k.pop() for k in kinds]
            assert order == sorted(order) and order[0] == 0 and order[-1] == 1
            served += _flat(batches)
        assert len(served) == len(set(served))
        if world == 1:  # 5 + 9 batches, every example once
            assert sorted(served) == list(range(len(LENGTHS))) and len(list(samplers[0])) == 14
    plain = ShuffledBatchSampler(LENGTHS, 4, seed=3)
    assert any(len({stages[i] for i in b}) == 2 for b in plain)  # without stages they mix


@pytest.mark.parametrize("world", [1, 2])
def test_tied_examples_always_share_a_batch(world):
    lengths = LENGTHS[:52]  # 26 pairs: example 2u and 2u + 1 are a trial and its mirror
    stages = [0 if (i // 2) % 3 == 0 else 1 for i in range(52)]
    samplers = [ShuffledBatchSampler(lengths, 6, seed=3, rank=r, world=world, stages=stages, tie=2) for r in range(world)]
    for epoch in (0, 1):
        served = []
        for s in samplers:
            s.set_epoch(epoch)
            for batch in s:
                assert all(i % 2 == 0 for i in batch[0::2]) and batch[1::2] == [i + 1 for i in batch[0::2]]
                assert len({stages[i] for i in batch}) == 1
                served += batch
        assert len(served) == len(set(served))
        if world == 1:  # 9 stage-0 pairs (3 batches of 3 pairs), 17 stage-1 pairs (5 full batches, one of 2 pairs)
            assert sorted(served) == list(range(52)) and [len(b) for b in samplers[0]].count(6) == 8
    untied = list(ShuffledBatchSampler(lengths, 6, seed=3))
    assert any(b[k] % 2 == 0 and b[k + 1] != b[k] + 1 for b in untied for k in range(0, len(b) - 1, 2))
    with pytest.raises(ValueError, match="multiples of tie=2"):
        ShuffledBatchSampler(lengths, 5, tie=2)


def test_mirror_train_batches_hold_each_trial_next_to_its_mirror(tokenizer):
    dm = DecisionDataModule(n_scenarios=2, n_train=6, n_val=1, n_test=5, batch_size=4, mirror_train=True)
    dm.tokenizer = tokenizer
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert len(batches) == 6  # 24 records: 12 trials, each with its mirror
    for batch in batches:
        letters = batch["labels"][batch["labels"] != IGNORE].view(4, 2)[:, 0]  # the letter of each row
        assert {tuple(pair) for pair in letters.view(2, 2).tolist()} <= {(A_ID, B_ID), (B_ID, A_ID)}
    with pytest.raises(UserError, match="must be even"):
        DecisionDataModule(n_scenarios=2, n_train=4, batch_size=5, mirror_train=True)
    with pytest.raises(UserError, match="drop data.data_dir"):
        DecisionDataModule(data_dir="somewhere", mirror_train=True)

def test_curriculum_needs_attribute_questions():
    with pytest.raises(UserError, match="attribute_train"):
        DecisionDataModule(n_scenarios=2, n_train=4, n_val=1, n_test=5, curriculum=True)
    dm = DecisionDataModule(n_scenarios=2, n_train=4, n_val=1, n_test=5, attribute_train=2, curriculum=True)
    assert [r.stage for r in dm.data.train] == ([1] * 4 + [0] * 2) * 2


def test_sampler_splits_batches_across_two_ranks_disjointly():
    ranks = [ShuffledBatchSampler(LENGTHS, batch_size=4, seed=3, rank=r, world=2) for r in (0, 1)]
    for epoch in (0, 1):
        for s in ranks:
            s.set_epoch(epoch)
        b0, b1 = list(ranks[0]), list(ranks[1])
        assert len(b0) == len(b1) == len(ranks[0]) == len(ranks[1]) == 7  # 14 batches, evenly
        assert not set(_flat(b0)) & set(_flat(b1))
        assert len(set(_flat(b0))) == len(_flat(b0))


def _padding(batches):
    return sum(max(LENGTHS[i] for i in b) * len(b) - sum(LENGTHS[i] for i in b) for b in batches)


def test_grouping_by_length_reduces_padding():
    grouped = list(ShuffledBatchSampler(LENGTHS, batch_size=4, group_by_length=True, seed=3))
    plain = list(ShuffledBatchSampler(LENGTHS, batch_size=4, group_by_length=False, seed=3))
    assert _padding(grouped) < _padding(plain) / 3


def test_sampler_order_depends_on_epoch_only():
    a, b = ShuffledBatchSampler(LENGTHS, 4, seed=3), ShuffledBatchSampler(LENGTHS, 4, seed=3)
    a.set_epoch(1)
    b.set_epoch(1)
    assert list(a) == list(b) == list(a)
    b.set_epoch(2)
    assert list(a) != list(b)


# --- the module -----------------------------------------------------------------------------
def _module(model_dir, **kwargs) -> DecisionLM:
    return DecisionLM(model=str(model_dir), lora_r=4, lora_alpha=8, **kwargs)


def _datamodule(module: DecisionLM, **kwargs) -> DecisionDataModule:
    dm = DecisionDataModule(n_scenarios=2, **{"n_train": 4, "n_val": 1, "n_test": 5, "batch_size": 4, **kwargs})
    dm.tokenizer = module.tokenizer
    dm.setup("fit")
    return dm


def _trainer(**kwargs) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, use_distributed_sampler=False,
        **kwargs,
    )


def test_only_lora_weights_are_trainable(tiny_model_dir):
    module = _module(tiny_model_dir)
    trainable = [n for n, p in module.named_parameters() if p.requires_grad]
    # q, k, v, o, gate, up, down in each of 2 layers, lora_A and lora_B each; not the output head.
    assert len(trainable) == 2 * 7 * 2
    assert all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert not any("lm_head" in n or "embed_tokens" in n for n in trainable)


def test_full_finetune_trains_every_weight(tiny_model_dir):
    module = _module(tiny_model_dir, full_finetune=True)
    params = list(module.named_parameters())
    assert params and all(p.requires_grad for _, p in params)
    assert not any("lora_" in n for n, _ in params)
    assert set(module.trainable_state_dict()) == {n for n, _ in params}


def test_training_changes_lora_weights_and_no_base_weight(tiny_model_dir, tmp_path):
    module = _module(tiny_model_dir)
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    dm = DecisionDataModule(n_scenarios=2, n_train=4, n_val=1, n_test=5, batch_size=4)
    trainer = _trainer(max_steps=3)
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 3
    for name, p in module.named_parameters():
        if p.requires_grad:
            assert not torch.equal(p, before[name]), f"{name} did not change"
        else:
            assert torch.equal(p, before[name]), f"frozen {name} changed"

    # The checkpoint holds the adapter only, and it restores the trained model.
    path = tmp_path / "adapter.ckpt"
    trainer.save_checkpoint(path)
    state = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
    assert set(state) == {n for n, p in module.named_parameters() if p.requires_grad}
    assert all("lora_" in k for k in state)
    fresh = _module(tiny_model_dir)
    assert not fresh.load_state_dict(state, strict=False).unexpected_keys
    batch = collate(dm.train_set.items[:4], dm.tokenizer.pad_token_id)
    with torch.no_grad():
        assert torch.allclose(fresh.answer_logits(batch)[0], module.answer_logits(batch)[0], atol=1e-6)
        assert not torch.allclose(_module(tiny_model_dir).answer_logits(batch)[0], module.answer_logits(batch)[0],
                                  atol=1e-6)
        # model.init_from starts a new run from those weights.
        warm = _module(tiny_model_dir, init_from=str(path))
        assert torch.allclose(warm.answer_logits(batch)[0], module.answer_logits(batch)[0], atol=1e-6)


def test_grad_norm_is_logged_before_clipping(tiny_model_dir):
    class Record(L.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
            self.norm = float(torch.stack([g.norm() for g in grads]).norm())

    module = _module(tiny_model_dir)
    record = Record()
    trainer = _trainer(max_steps=2, gradient_clip_val=1e-6, callbacks=[record])
    trainer.fit(module, datamodule=DecisionDataModule(n_scenarios=2, n_train=4, n_val=1, n_test=5, batch_size=4))
    logged = float(trainer.callback_metrics["train/grad_norm"])
    assert logged == pytest.approx(record.norm, rel=1e-5)
    assert logged > 1e-3  # the norm before the clip to 1e-6


def test_init_from_names_what_is_wrong(tiny_model_dir, tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        _module(tiny_model_dir, init_from=str(tmp_path / "missing.ckpt"))
    junk = tmp_path / "junk.ckpt"
    junk.write_text("not a checkpoint")
    with pytest.raises(UserError, match="is not a selfinterp checkpoint"):
        _module(tiny_model_dir, init_from=str(junk))
    other = tmp_path / "rank2.ckpt"  # what on_save_checkpoint keeps, from an adapter of another rank
    torch.save({"state_dict": DecisionLM(model=str(tiny_model_dir), lora_r=2).trainable_state_dict()}, other)
    with pytest.raises(UserError, match="other trainable weights"):
        _module(tiny_model_dir, init_from=str(other))
    with pytest.raises(UserError, match="other trainable weights"):
        _module(tiny_model_dir, full_finetune=True, init_from=str(other))


@pytest.mark.parametrize("loss_on", ["answer", "letter"])
def test_answer_logits_loss_equals_the_full_forward_loss(tiny_model_dir, loss_on):
    module = _module(tiny_model_dir)
    ramp_lora_b(module)  # a non-zero adapter, so the LoRA path counts
    module.eval()
    dm = _datamodule(module, loss_on=loss_on)
    batch = collate(dm.train_set.items, dm.tokenizer.pad_token_id)
    assert (batch["attention_mask"] == 0).any(), "the batch should contain right padding"
    with torch.no_grad():
        logits, targets, letter = module.answer_logits(batch)
        fast = F.cross_entropy(logits, targets)
        naive = module.net(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           labels=batch["labels"]).loss
        plain = module.causal_lm.__class__.from_pretrained(str(tiny_model_dir))
        base = plain(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    assert abs(fast.item() - naive.item()) < 1e-5
    assert abs(fast.item() - base.item()) > 1e-3  # the adapter changes the loss
    answers = [{"A": A_ID, "B": B_ID}[r.answer] for r in dm.data.train]
    assert targets[letter].tolist() == answers
    per_row = 2 if loss_on == "answer" else 1
    assert len(targets) == per_row * len(answers)
    assert targets[~letter].tolist() == [IM_END_ID] * (len(targets) - len(answers))


@pytest.mark.parametrize("full_finetune", [False, True])
def test_gradient_checkpointing_keeps_less_and_gives_the_same_gradients(tiny_model_dir, full_finetune):
    grads, memory = [], []
    for checkpointing in (False, True):
        torch.manual_seed(0)  # the same LoRA A matrices
        module = _module(tiny_model_dir, gradient_checkpointing=checkpointing, full_finetune=full_finetune)
        ramp_lora_b(module)
        dm = _datamodule(module)
        batch = collate(dm.train_set.items, dm.tokenizer.pad_token_id)
        kept = []  # elements of the tensors the forward pass keeps for the backward pass
        with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t.numel()) or t, lambda t: t):
            logits, targets, _ = module.answer_logits(batch)
        F.cross_entropy(logits, targets).backward()
        grads.append({n: p.grad for n, p in module.named_parameters() if p.requires_grad})
        memory.append(sum(kept))
    assert memory[1] < memory[0] / 2  # the layers' activations are recomputed, not kept
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("setting", ["lora", "full_finetune", "gradient_checkpointing", "lora_dropout"])
def test_shared_prefix_pass_gives_the_plain_pass_loss_and_gradients(tiny_model_dir, tokenizer, setting):
    """A batch whose prompts share prefixes (each run once) trains and validates exactly as one plain pass.
    Training steps that replay layers (checkpointing) or draw dropout per row run the plain pass instead."""
    torch.manual_seed(0)
    kwargs = {"lora": {}, "full_finetune": {"full_finetune": True}, "gradient_checkpointing": {"gradient_checkpointing": True},
              "lora_dropout": {"lora_dropout": 0.3}}[setting]
    module = _module(tiny_model_dir, **kwargs)
    if setting != "full_finetune":
        ramp_lora_b(module)
    data = build_data(n_scenarios=2, n_train=3, n_val=0, n_test=1)
    batch = collate(encode_all(tokenizer, data.train) + [encode(tokenizer, RECORD_B)], tokenizer.pad_token_id)
    plain = {k: v for k, v in batch.items() if k != "shared"}
    assert (module.layout_for(batch) is not None) == (setting in ("lora", "full_finetune"))
    assert _module(tiny_model_dir, share_prefix=False, **kwargs).layout_for(batch) is None
    out = []
    for b in (batch, plain):
        module.zero_grad(set_to_none=True)
        torch.manual_seed(1)  # the same dropout draws
        logits, targets, letter = module.answer_logits(b)
        F.cross_entropy(logits, targets).backward()
        out.append((logits, targets, letter, {n: p.grad for n, p in module.named_parameters() if p.requires_grad}))
    (shared_logits, targets, letter, grads), (plain_logits, plain_targets, plain_letter, plain_grads) = out
    assert torch.equal(targets, plain_targets) and torch.equal(letter, plain_letter) and int(letter.sum()) == 7
    torch.testing.assert_close(shared_logits, plain_logits, rtol=1e-4, atol=1e-5)
    assert grads.keys() == plain_grads.keys() and len(grads) > 0
    for name, g in grads.items():
        torch.testing.assert_close(g, plain_grads[name], rtol=1e-4, atol=1e-6)
    module.eval()  # validation: no gradients, no dropout, so every setting shares
    with torch.no_grad():
        assert module.layout_for(batch) is batch["shared"]
        torch.testing.assert_close(module.answer_logits(batch)[0], module.answer_logits(plain)[0], rtol=1e-4, atol=1e-5)


def test_share_prefix_by_default_on_the_cpu_only(tiny_model_dir, tokenizer, monkeypatch):
    """share_prefix=None (default) shares on the CPU, not on a GPU (dispatch-bound steps); True and False force it."""
    data = build_data(n_scenarios=1, n_train=2, n_val=0, n_test=1)
    batch = collate(encode_all(tokenizer, data.train), tokenizer.pad_token_id)
    modules = {setting: _module(tiny_model_dir, share_prefix=setting) for setting in (None, True, False)}
    assert [modules[s].layout_for(batch) is not None for s in (None, True, False)] == [True, True, False]
    for module in modules.values():  # as if on a GPU (the device Lightning reports after moving the module)
        monkeypatch.setattr(module, "_device", torch.device("cuda", 0))
    assert [modules[s].layout_for(batch) is not None for s in (None, True, False)] == [False, True, False]


@pytest.mark.parametrize("checkpointing", [False, True])
def test_loaders_lay_out_shared_prefixes_only_where_the_model_runs_them(tiny_model_dir, checkpointing):
    """The datamodule asks the model: on the CPU both loaders' batches carry the layout, except training
    batches under gradient checkpointing; on a GPU (share_prefix left to its default) neither does."""
    module = _module(tiny_model_dir, gradient_checkpointing=checkpointing)
    dm = _datamodule(module)
    for device, train, evaluation in (("cpu", not checkpointing, True), ("cuda", False, False)):
        dm.trainer = SimpleNamespace(lightning_module=module, strategy=SimpleNamespace(root_device=torch.device(device)),
                                     global_rank=0, world_size=1, current_epoch=0)
        assert ["shared" in b for b in dm.train_dataloader()] == [train] * 2
        assert ["shared" in b for b in dm.val_dataloader()] == [evaluation]


def test_learning_rate_schedule(tiny_model_dir):
    module = _module(tiny_model_dir, warmup=0.1, decay="linear")
    module._trainer = SimpleNamespace(estimated_stepping_batches=20)

    def lrs(m: DecisionLM, steps: int) -> list[float]:
        conf = m.configure_optimizers()
        opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
        assert conf["lr_scheduler"]["interval"] == "step"
        assert all(p.requires_grad for g in opt.param_groups for p in g["params"])
        out = []
        for _ in range(steps):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return out

    lr = lrs(module, 20)
    assert lr[:3] == pytest.approx([2e-4 / 3, 2 * 2e-4 / 3, 2e-4])  # 2 warm-up steps
    assert lr[2:] == pytest.approx([2e-4 * (1 - k / 18) for k in range(18)])
    module.hparams.decay, module.hparams.warmup = "cosine", 0
    cosine = lrs(module, 20)
    assert cosine[0] == pytest.approx(2e-4) and cosine[10] == pytest.approx(1e-4) and min(cosine) > 0
    module.hparams.decay, module.hparams.warmup = "constant", 4  # warm-up given in steps
    constant = lrs(module, 20)
    assert constant[:4] == pytest.approx([2e-4 * k / 5 for k in range(1, 5)])
    assert constant[4:] == pytest.approx([2e-4] * 16)


def test_lora_b_lr_ratio_steps_b_that_many_times_further_than_a(tiny_model_dir):
    """LoRA+: with the ratio, one plain SGD step moves each B matrix by ratio x lr x its gradient and
    each A matrix by lr x its gradient; the schedule scales both groups alike."""
    module = _module(tiny_model_dir, lora_b_lr_ratio=16, warmup=0, decay="linear",
                     optimizer=lambda params: torch.optim.SGD(params, lr=0.1))
    module._trainer = SimpleNamespace(estimated_stepping_batches=10)
    ramp_lora_b(module)  # with B at zero, A would get no gradient
    conf = module.configure_optimizers()
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.1, 1.6])
    dm = _datamodule(module)
    batch = collate(dm.train_set.items, dm.tokenizer.pad_token_id)
    logits, targets, _ = module.answer_logits(batch)
    F.cross_entropy(logits, targets).backward()
    before = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    opt.step()
    for name, p in module.named_parameters():
        if p.requires_grad:
            lr = 1.6 if ".lora_B." in name else 0.1
            assert p.grad.abs().sum() > 0, name
            torch.testing.assert_close(p.detach(), before[name] - lr * p.grad, rtol=0, atol=1e-6)
    for _ in range(5):
        sched.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.05, 0.8])  # half way down the linear decay


def test_bf16_base_dtype_casts_the_frozen_weights_only(tiny_model_dir):
    """base_dtype=bfloat16 stores the frozen base weights in bf16; the LoRA weights stay float32."""
    module = _module(tiny_model_dir, base_dtype="bfloat16")
    module.setup("fit")
    frozen = {p.dtype for p in module.parameters() if not p.requires_grad}
    trainable = {p.dtype for p in module.parameters() if p.requires_grad}
    assert frozen == {torch.bfloat16} and trainable == {torch.float32}


@pytest.mark.parametrize("precision, frozen", [("bf16-mixed", torch.bfloat16), ("32-true", torch.float32)])
def test_auto_base_dtype_follows_the_precision_on_cpu_too(tiny_model_dir, precision, frozen):
    """base_dtype=auto stores the frozen weights in bf16 under bf16 precision on any device (a CPU with
    AMX runs bf16 matrix products several times faster than float32), and in float32 otherwise."""
    module = _module(tiny_model_dir)
    dm = _datamodule(module)
    _trainer(precision=precision, max_steps=1).fit(module, dm)
    assert {p.dtype for p in module.parameters() if not p.requires_grad} == {frozen}
    assert {p.dtype for p in module.parameters() if p.requires_grad} == {torch.float32}


@pytest.mark.parametrize("native", [False, True])
def test_bf16_on_a_cpu_without_native_bf16_warns_and_points_to_float32(tiny_model_dir, monkeypatch, native):
    """Emulated bf16 ran many times slower than float32 on an AVX2-only CPU, so fit says so and names
    the float32 overlay; a CPU with AMX or AVX512-BF16 hears nothing."""
    monkeypatch.setattr("selfinterp.module.native_bf16", lambda device: native)
    module = _module(tiny_model_dir)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _trainer(precision="bf16-mixed", max_steps=1).fit(module, _datamodule(module))
    slow = [w for w in caught if "configs/trainer/cpu.yaml" in str(w.message)]
    assert len(slow) == (0 if native else 1)
    if slow:
        assert "without native bf16" in str(slow[0].message)


def test_lora_b_lr_ratio_is_checked():
    with pytest.raises(UserError, match="must be positive"):
        DecisionLM(lora_b_lr_ratio=0)
    with pytest.raises(UserError, match="applies to LoRA adapters"):
        DecisionLM(full_finetune=True, lora_b_lr_ratio=16)

@pytest.mark.parametrize("init", ["default", "gaussian", "orthogonal"])
def test_lora_init_starts_at_the_base_model_and_orthogonal_trains_a_from_the_first_step(tiny_model_dir, init):
    """Every init leaves the model's output unchanged (B @ A = 0). With B at zero (default, gaussian)
    the A matrices get no gradient on the first step; orthogonal starts A and B non-zero, so both do."""
    torch.manual_seed(0)
    module = _module(tiny_model_dir, lora_init=init)
    dm = _datamodule(module)
    batch = collate(dm.train_set.items, dm.tokenizer.pad_token_id)
    with torch.no_grad():
        base = module.causal_lm.__class__.from_pretrained(str(tiny_model_dir))(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits, targets, _ = module.answer_logits(batch)
    mask = batch["labels"][:, 1:] != IGNORE
    torch.testing.assert_close(logits, base[:, :-1][mask], rtol=0, atol=1e-5)
    F.cross_entropy(logits, targets).backward()
    grads = {n: p.grad for n, p in module.named_parameters() if p.requires_grad}
    a = [g.abs().sum().item() for n, g in grads.items() if ".lora_A." in n]
    b = [g.abs().sum().item() for n, g in grads.items() if ".lora_B." in n]
    assert len(a) == len(b) > 0
    assert all(v > 0 for v in b)
    if init == "orthogonal":
        assert all(v > 0 for v in a)
    else:
        assert all(v == 0 for v in a)


def test_lora_init_is_checked():
    with pytest.raises(UserError, match="make model.lora_r even, got 5"):
        DecisionLM(lora_r=5, lora_init="orthogonal")
    with pytest.raises(UserError, match="lora_init applies to LoRA adapters"):
        DecisionLM(full_finetune=True, lora_init="gaussian")


def test_module_starts_in_train_mode_so_lora_dropout_is_active(tiny_model_dir):
    module = _module(tiny_model_dir, lora_dropout=0.5)
    assert all(m.training for m in module.modules())
    ramp_lora_b(module)
    with torch.no_grad():
        batch = collate(_datamodule(module).train_set.items[:2], module.tokenizer.pad_token_id)
        first, second = module.answer_logits(batch)[0], module.answer_logits(batch)[0]
        assert not torch.allclose(first, second)
        module.eval()
        assert torch.equal(module.answer_logits(batch)[0], module.answer_logits(batch)[0])


@pytest.mark.slow  # compiles (about a minute on 2 cores)
def test_compiled_forward_gives_the_eager_loss_and_gradients(tiny_model_dir):
    """model.compile runs the same training forward pass, for batches of different lengths; validation stays eager."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    results = []
    for mode in (None, "default"):
        torch.manual_seed(0)  # the same LoRA A matrices
        module = _module(tiny_model_dir, compile=mode)
        ramp_lora_b(module)
        items = sorted(_datamodule(module).train_set.items, key=lambda e: len(e.input_ids))
        assert len(items[0].input_ids) < len(items[-1].input_ids)
        out = []
        for batch in (items[:2], items[2:]):  # two sequence lengths: one compilation serves both
            logits, targets, _ = module.answer_logits(collate(batch, module.tokenizer.pad_token_id))
            loss = F.cross_entropy(logits, targets)
            loss.backward()
            out.append(loss.item())
        out.append({n: p.grad.clone() for n, p in module.named_parameters() if p.requires_grad})
        graphs = counters["stats"]["unique_graphs"]
        with torch.no_grad():  # validation: eager, so it needs no second compilation
            module.eval()
            module.answer_logits(collate(items[:2], module.tokenizer.pad_token_id))
        assert counters["stats"]["unique_graphs"] == graphs
        results.append(out)
    assert counters["stats"]["unique_graphs"] >= 1  # the compiled module really ran a compiled graph
    eager, compiled = results
    assert compiled[:2] == pytest.approx(eager[:2], rel=1e-5)
    assert compiled[2].keys() == eager[2].keys() and len(eager[2]) == 2 * 7 * 2
    for name, g in eager[2].items():
        torch.testing.assert_close(compiled[2][name], g, rtol=1e-4, atol=1e-6)


# --- model.lora_standardise: each LoRA A reads its input standardised by the first batch's statistics
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
    batch = collate(_datamodule(module).train_set.items[:4], module.tokenizer.pad_token_id)
    assert int(batch["attention_mask"].sum()) < batch["attention_mask"].numel()  # padding is left out
    raw = _inputs(module, batch)
    assert len(raw) == 2 * 7  # q, k, v, o, gate, up, down in each layer
    with torch.no_grad():
        before = module.answer_logits(batch)[0]
    module.calibrate_inputs(batch)
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
    batch = collate(_datamodule(module).train_set.items[:4], module.tokenizer.pad_token_id)

    def run(rows: slice, total=lambda t: t) -> dict[str, torch.Tensor]:
        module.calibrate_inputs({k: batch[k][rows] for k in ("input_ids", "attention_mask")}, total)
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

    trainer = _trainer(max_steps=2, callbacks=[FirstBatch()])
    trainer.fit(module, datamodule=DecisionDataModule(n_scenarios=2, n_train=4, n_val=1, n_test=5, batch_size=4))
    # Layer 0's attention inputs do not depend on any adapter: the statistics are those of the first batch.
    q = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default"
    x = _inputs(module, first["batch"])[q]
    assert torch.allclose(x.mean(0), torch.zeros(x.shape[1]), atol=1e-4)
    assert torch.allclose(x.std(0, unbiased=False), x.std(0, unbiased=False).mean().expand(x.shape[1]), rtol=1e-3)

    path = tmp_path / "standardised.ckpt"
    trainer.save_checkpoint(path)
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    stats = {k for k in state if is_statistic(k)}
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
