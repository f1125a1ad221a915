"""The LightningDataModule: decision records -> chat-formatted token ids with answer-only labels."""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Literal, Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from selfinterp.dataset import DecisionData, Record, build_data, read_data
from selfinterp.errors import UserError
from selfinterp.prefix import prefix_lengths, shared_layout

IGNORE = -100


@dataclass(frozen=True)
class Encoded:
    """One tokenized example: prompt + answer ids and labels that are IGNORE on the prompt."""

    input_ids: list[int]
    labels: list[int]


def prompt_text(tokenizer, record: Record) -> str:
    """The chat-templated prompt up to and including the assistant generation prompt."""
    return tokenizer.apply_chat_template(record.messages(with_answer=False), tokenize=False, add_generation_prompt=True)


def _split_text(tokenizer, record: Record) -> tuple[str, str]:
    """The chat-templated prompt and the text the template appends for the answer, trailing white space dropped."""
    prompt = prompt_text(tokenizer, record)
    full = tokenizer.apply_chat_template(record.messages(), tokenize=False)
    if not full.startswith(prompt):
        raise UserError("the chat template renders the prompt differently with and without the answer; use another model")
    return prompt, full[len(prompt):].rstrip()


def split_answer(tokenizer, record: Record) -> tuple[str, list[int]]:
    """The chat-templated prompt and the token ids the template appends for the answer (e.g.
    ``A<|im_end|>``), trailing white space dropped."""
    prompt, tail = _split_text(tokenizer, record)
    return prompt, tokenizer(tail, add_special_tokens=False)["input_ids"]


def encode_all(tokenizer, records: Sequence[Record], loss_on: Literal["answer", "letter"] = "answer") -> list[Encoded]:
    """Tokenize records; labels cover the answer letter and the end-of-turn token only.

    The completion is whatever the chat template appends after the generation prompt for the
    assistant turn (e.g. ``A<|im_end|>\\n``), with trailing white space dropped. ``loss_on="letter"``
    keeps only the first completion token (the letter). The prompts are tokenized in one batch call
    (a run of 100 scenarios x 500 trials has 50,000) and each distinct completion once.
    """
    texts = [_split_text(tokenizer, r) for r in records]
    if not texts:
        return []
    prompt_ids = tokenizer([p for p, _ in texts], add_special_tokens=False)["input_ids"]
    tail_ids = {t: tokenizer(t, add_special_tokens=False)["input_ids"] for t in {t for _, t in texts}}
    out = []
    for ids, (_, tail) in zip(prompt_ids, texts):
        answer_ids = tail_ids[tail]
        labels = answer_ids[:1] + [IGNORE] * (len(answer_ids) - 1) if loss_on == "letter" else list(answer_ids)
        out.append(Encoded(ids + answer_ids, [IGNORE] * len(ids) + labels))
    return out


def encode(tokenizer, record: Record, loss_on: Literal["answer", "letter"] = "answer") -> Encoded:
    """One record tokenized as :func:`encode_all` does."""
    return encode_all(tokenizer, [record], loss_on)[0]


class EncodedDataset(Dataset):
    """A list of encoded examples."""

    def __init__(self, items: Sequence[Encoded]) -> None:
        self.items = list(items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Encoded:
        return self.items[i]


def collate(batch: Sequence[Encoded], pad_id: int, share: bool = True) -> dict[str, Any]:
    """Right-pad a batch: input ids with ``pad_id``, labels with IGNORE, attention mask 0 on padding.

    With ``share``, where rows share a prompt prefix worth it, ``"shared"`` also holds the batch as
    distinct prefixes plus each row's own suffix (:func:`selfinterp.prefix.shared_layout`), so that
    the model can run each prefix once. Prefixes end before a row's last prompt token, whose hidden
    state predicts the letter.
    """
    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, e in enumerate(batch):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        mask[row, :n] = 1
    out: dict[str, Any] = {"input_ids": ids, "labels": labels, "attention_mask": mask}
    if not share:
        return out
    prompts = [e.input_ids[:next((t for t, y in enumerate(e.labels) if y != IGNORE), len(e.labels))] for e in batch]
    prefix = prefix_lengths(prompts)
    if any(prefix):
        out["shared"] = shared_layout([e.input_ids for e in batch], prefix, pad_id, [e.labels for e in batch], IGNORE)
    return out


class ShuffledBatchSampler(Sampler[list[int]]):
    """Shuffled training batches, optionally of examples of similar length (less padding).

    Each epoch (seeded by ``seed + epoch``): shuffle; with ``group_by_length``, cut into chunks of
    ``batch_size * 32`` and sort each chunk by length; cut into batches; shuffle the batches.
    With ``stages`` (one curriculum stage per example), every epoch does this for each stage on its
    own and serves the stages' batches in ascending stage order, so no batch mixes stages.
    With ``tie`` > 1, runs of ``tie`` consecutive examples (a trial and its mirror) move as one unit
    and always share a batch; ``batch_size`` counts examples and must be a multiple of ``tie``.
    Under DDP each rank takes every world-size-th batch (all ranks get the same number).
    """

    def __init__(
        self, lengths: Sequence[int], batch_size: int, group_by_length: bool = True, seed: int = 0,
        rank: int = 0, world: int = 1, stages: Sequence[int] | None = None, tie: int = 1,
    ) -> None:
        if batch_size % tie or len(lengths) % tie:
            raise ValueError(f"batch size {batch_size} and {len(lengths)} examples must be multiples of tie={tie}")
        self.lengths, self.batch_size, self.group = list(lengths), batch_size, group_by_length
        self.seed, self.rank, self.world, self.tie = seed, rank, world, tie
        self.stages = list(stages) if stages is not None else [0] * len(self.lengths)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _batches(self) -> list[list[int]]:
        rng = random.Random(self.seed + self.epoch)
        tie, units = self.tie, self.batch_size // self.tie  # a unit: examples tie*u .. tie*u + tie - 1
        length = [max(self.lengths[tie * u:tie * u + tie]) for u in range(len(self.lengths) // tie)]
        batches = []
        for stage in sorted(set(self.stages)):
            order = [u for u in range(len(length)) if self.stages[tie * u] == stage]
            rng.shuffle(order)
            chunk = units * 32 if self.group else len(order)
            stage_batches = []
            for start in range(0, len(order), chunk):
                part = order[start:start + chunk]
                if self.group:
                    part.sort(key=lambda u: length[u])
                stage_batches += [[tie * u + j for u in part[k:k + units] for j in range(tie)]
                                  for k in range(0, len(part), units)]
            rng.shuffle(stage_batches)
            batches += stage_batches
        usable = len(batches) - len(batches) % self.world if len(batches) >= self.world else len(batches)
        return batches[:usable][self.rank::self.world]

    def __iter__(self):
        return iter(self._batches())

    def __len__(self) -> int:
        return len(self._batches())


class DecisionDataModule(L.LightningDataModule):
    """Serves the Experiment 1 decision prompts for training, validation and verification."""

    def __init__(
        self,
        data_dir: str | None = None,
        batch_size: int = 16,
        eval_batch_size: int = 64,
        group_by_length: bool = True,
        loss_on: Literal["answer", "letter"] = "answer",
        curriculum: bool = False,
        num_workers: int = 0,
        seed: int = 0,
        **build_args: Any,
    ) -> None:
        """
        Args:
            data_dir: A folder written by ``python -m selfinterp data``; when unset, the data is
                generated in memory from the data set's parameters (same algorithm, same seeds).
            batch_size: Training batch size per device.
            eval_batch_size: Validation batch size per device.
            group_by_length: Batch examples of similar length together (less padding).
            loss_on: "answer" (letter + end-of-turn token) or "letter" (the letter only).
            curriculum: In every epoch, train on all attribute questions (``attribute_train``, stage 0)
                before any decision (stage 1); otherwise the two are shuffled together.
            num_workers: DataLoader worker processes.
            seed: Shuffling seed.
            **build_args: The data set's parameters (see :func:`selfinterp.dataset.build_data`).
        """
        super().__init__()
        if batch_size < 1 or eval_batch_size < 1:
            raise UserError("data.batch_size and data.eval_batch_size must be at least 1")
        if build_args.get("mirror_train"):  # each trial and its mirror share a training batch
            if data_dir:
                raise UserError("data.mirror_train applies to data generated in memory; drop data.data_dir "
                                "(a folder written with --mirror_train is read as plain records)")
            if batch_size % 2:
                raise UserError(f"data.mirror_train puts each trial and its mirror in one batch, so data.batch_size "
                                f"must be even, got {batch_size}")
        self.save_hyperparameters()
        self.data: DecisionData = read_data(data_dir) if data_dir else build_data(**build_args)
        if curriculum and not any(r.stage == 0 for r in self.data.train):
            raise UserError("data.curriculum needs attribute questions among the training records; "
                            "set data.attribute_train > 0 (or drop data.curriculum)")
        self.tokenizer = None

    def load_data(self) -> DecisionData:
        """The data set (read from ``data_dir`` or generated when the module was made)."""
        return self.data

    def setup(self, stage: str | None = None) -> None:
        if self.tokenizer is None:
            self.tokenizer = self.trainer.lightning_module.tokenizer
        data = self.load_data()
        needed = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",)}.get(stage or "", ("train", "val", "test"))
        for split in needed:
            records = getattr(data, split)
            setattr(self, f"{split}_set", EncodedDataset(encode_all(self.tokenizer, records, self.hparams.loss_on)))

    def _collate_fn(self, train: bool) -> Callable[[Sequence[Encoded]], dict[str, Any]]:
        """``collate`` for a loader: batches get the shared-prefix layout only where the model runs it."""
        trainer = self.trainer
        share = trainer is None or trainer.lightning_module.shares_prefixes(trainer.strategy.root_device, train)
        return partial(collate, pad_id=self.tokenizer.pad_token_id, share=share)

    def train_dataloader(self) -> DataLoader:
        h = self.hparams
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        stages = [r.stage for r in self.data.train] if h.curriculum else None
        sampler = ShuffledBatchSampler(
            [len(e.input_ids) for e in self.train_set.items], h.batch_size, h.group_by_length, h.seed, rank, world, stages,
            tie=2 if h.get("mirror_train") else 1,
        )
        if trainer is not None:
            sampler.set_epoch(trainer.current_epoch)
        return DataLoader(self.train_set, batch_sampler=sampler, collate_fn=self._collate_fn(train=True),
                          num_workers=h.num_workers)

    def _eval_loader(self, dataset: EncodedDataset) -> DataLoader:
        return DataLoader(dataset, batch_size=self.hparams.eval_batch_size, collate_fn=self._collate_fn(train=False),
                          num_workers=self.hparams.num_workers)

    def val_dataloader(self) -> DataLoader:
        """The validation records (``val/loss`` every epoch)."""
        return self._eval_loader(self.val_set)

    def test_dataloader(self) -> DataLoader:
        """The held-out test records, teacher-forced (``test/loss``, ``test/letter_acc``)."""
        return self._eval_loader(self.test_set)
