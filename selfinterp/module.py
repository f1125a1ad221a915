"""The LightningModule: a causal LM wrapped with PEFT LoRA, trained on the answer tokens only."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn

from selfinterp.datamodule import IGNORE
from selfinterp.devices import native_bf16
from selfinterp.errors import UserError
from selfinterp.models import EMBEDDED, load_model, load_tokenizer
from selfinterp.prefix import can_share, shared_hidden
from selfinterp.standardise import attach, calibrate, is_statistic


def _hidden(decoder: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The decoder's last hidden state, without a KV cache (nothing is generated in training, and a
    cache would hold every layer's keys and values)."""
    return decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state


def saved_tensors(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What a checkpoint keeps of ``net``: its trainable weights and any standardisation statistics
    (the frozen base comes from the model itself)."""
    own = {n: p for n, p in net.named_parameters() if p.requires_grad}
    own.update({n: b for n, b in net.named_buffers() if is_statistic(n)})
    return own


def load_trainable(net: torch.nn.Module, path: str, option: str) -> None:
    """Copy a checkpoint's trainable weights and statistics (as ``DecisionLM.on_save_checkpoint``
    keeps them) into ``net``; ``option`` names where the path came from in the error messages."""
    if not Path(path).is_file():
        raise UserError(f"{option}: {path} does not exist; give a .ckpt file a fit wrote "
                        f"(lightning_logs/<run>/checkpoints/)")
    try:
        # mmap: only the tensors copied below are read, not the optimizer state beside them
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)["state_dict"]
    except Exception as e:  # not a checkpoint: pickle, zip or key errors alike
        raise UserError(f"{option}: {path} is not a selfinterp checkpoint ({type(e).__name__}: {e})") from None
    prefix = "net."
    weights = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    own = saved_tensors(net)
    if set(weights) != set(own) or any(weights[n].shape != p.shape for n, p in own.items()):
        raise UserError(f"{option}: {path} holds other trainable weights than this model: train it and this "
                        f"run with the same model, full_finetune, lora_r, target_modules and lora_standardise")
    with torch.no_grad():
        for n, p in own.items():
            p.copy_(weights[n])


class DecisionLM(L.LightningModule):
    """Fine-tunes a chat LM (LoRA adapter or all weights) to answer decision prompts with A or B."""

    def __init__(
        self,
        model: str = EMBEDDED,
        lora_r: int = 16,
        lora_alpha: int = 32,
        lora_dropout: float = 0.0,
        target_modules: str | list[str] = "all-linear",
        use_rslora: bool = False,
        lora_b_lr_ratio: float = 1.0,
        lora_init: Literal["default", "gaussian", "orthogonal"] = "default",
        lora_standardise: bool = False,
        full_finetune: bool = False,
        init_from: str | None = None,
        optimizer: OptimizerCallable | None = None,
        warmup: float = 0.05,
        decay: Literal["linear", "cosine", "constant"] = "linear",
        base_dtype: Literal["auto", "float32", "bfloat16"] = "auto",
        gradient_checkpointing: bool = False,
        share_prefix: bool | None = None,
        compile: Literal["default", "reduce-overhead", "max-autotune"] | None = None,
    ) -> None:
        """
        Args:
            model: "smollm2-135m" (the embedded model), a .gguf file, a local transformers folder,
                or a hub id already in the local cache (nothing is downloaded).
            lora_r: LoRA rank.
            lora_alpha: LoRA scaling numerator (scale = alpha / r, or alpha / sqrt(r) with rsLoRA).
            lora_dropout: Dropout on the LoRA input.
            target_modules: Modules that get adapters; "all-linear" is every linear projection but the output head.
            use_rslora: Rank-stabilised LoRA scaling.
            lora_b_lr_ratio: Learning rate of the LoRA B matrices as a multiple of the optimizer's lr
                (LoRA+, Hayou et al. 2024, suggest 16); 1 trains A and B alike.
            lora_init: How the adapter starts. "default": A Kaiming-uniform, B zero, so A gets no
                gradient until B has moved; "gaussian": A Gaussian, B zero; "orthogonal": A and B both
                non-zero with B @ A = 0, so the model starts unchanged and both get gradients from the
                first step (needs an even lora_r). Each keeps the base weights as they are.
            lora_standardise: Feed each LoRA A matrix its input centred, and scaled per feature to
                one common spread (the input's root mean square), with statistics of the starting
                model on the first training batch (see :mod:`selfinterp.standardise`): features that
                vary little get as large a share of the adapter's input as the dominant ones, at the
                same overall size. The starting model is unchanged; such adapters cannot be exported
                to PEFT's format.
            full_finetune: Train every weight instead of a LoRA adapter.
            init_from: Start the trainable weights from a checkpoint (.ckpt) that a run with the same
                model and adapter settings wrote: a stage of a curriculum, e.g. continuing on other
                scenarios. Unlike ``--ckpt_path``, which resumes a run, the optimizer, the step count,
                the schedule and the data start fresh.
            optimizer: Optimizer over the trainable parameters only (default AdamW, lr 2e-4, no weight decay).
            warmup: Linear warm-up: a fraction of all steps when below 1, else a number of steps.
            decay: Learning-rate shape after warm-up.
            base_dtype: Dtype of the frozen base weights; "auto" is bfloat16 under bf16 precision (GPU, or
                a CPU with native bf16 such as Intel AMX), else float32.
            gradient_checkpointing: Recompute each layer's activations in the backward pass instead of
                keeping them: far less memory (the CPU quickstart stays under 4 GiB) for about 25% more time.
            share_prefix: Run each prompt prefix that a batch's rows share (the system prompt and
                instruction; within a scenario, also its question) once, not once per row: the same
                loss and gradients from fewer token positions, in two decoder passes instead of one.
                None: on the CPU only, where a step is bound by its arithmetic (steps 1.25-1.3x
                faster in a one-scenario fit at batch 16); not on a GPU, where the steps measured so
                far were bound by dispatching operations, which the second pass doubles. Training
                steps with gradient checkpointing, compile or lora_dropout > 0 run the plain pass
                regardless.
            compile: Compile the training forward pass (the decoder) with torch.compile in this mode, once,
                for every sequence length (dynamic shapes); None runs it eagerly. Fewer, fused kernels
                per step, at the price of a compilation of minutes before the first step. Validation
                and verification stay eager.
        """
        super().__init__()
        if not lora_b_lr_ratio > 0:
            raise UserError(f"model.lora_b_lr_ratio must be positive, got {lora_b_lr_ratio}")
        if full_finetune and lora_b_lr_ratio != 1:
            raise UserError("model.lora_b_lr_ratio applies to LoRA adapters; drop it or model.full_finetune")
        if full_finetune and lora_init != "default":
            raise UserError("model.lora_init applies to LoRA adapters; drop it or model.full_finetune")
        if full_finetune and lora_standardise:
            raise UserError("model.lora_standardise applies to LoRA adapters; drop it or model.full_finetune")
        if lora_init == "orthogonal" and lora_r % 2:
            raise UserError(f"model.lora_init=orthogonal splits the rank in halves: make model.lora_r even, got {lora_r}")
        self.save_hyperparameters(ignore=["optimizer"])
        self.optimizer_factory = optimizer
        self.tokenizer = load_tokenizer(model)
        net = load_model(model)
        if gradient_checkpointing:
            net.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if full_finetune:
            net.requires_grad_(True)
        else:
            from peft import LoraConfig, get_peft_model

            config = LoraConfig(
                r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=target_modules,
                use_rslora=use_rslora, task_type="CAUSAL_LM",
                init_lora_weights=True if lora_init == "default" else lora_init,
            )
            try:
                net = get_peft_model(net, config)
            except ValueError as e:
                raise UserError(f"model.target_modules={target_modules!r} does not fit {model}: {e}") from None
            if lora_standardise:
                if getattr(net.get_base_model().get_output_embeddings(), "lora_A", None):
                    raise UserError("model.lora_standardise calibrates in the decoder's pass, which does not reach "
                                    "the output head: leave the head out of model.target_modules")
                attach(net)
        # Standardisation statistics are measured on the first training batch, unless a checkpoint brings them.
        self._calibrate = lora_standardise and not init_from
        if init_from:
            load_trainable(net, init_from, "model.init_from")
        # Training steps only: validation runs without gradients, which would need a second compilation.
        self._train_hidden = torch.compile(_hidden, mode=compile, dynamic=True) if compile else _hidden
        # from_pretrained returns eval mode and Lightning keeps each submodule's mode: without this,
        # dropout (lora_dropout) would be off in training unless something switched modes first.
        self.net = net.train()
        # Run each batch's shared prompt prefixes once (selfinterp.prefix), where the model allows it.
        # Not in training steps that replay layers (checkpointing drops the cache), that compile the
        # plain pass, or that draw dropout per row (one prefix pass would share its noise).
        self._share = share_prefix is not False and can_share(self.causal_lm)
        self._share_in_training = not (gradient_checkpointing or compile or lora_dropout > 0)
        # Checkpoints hold the trainable weights only; the frozen base comes from `model`.
        self.strict_loading = False

    @property
    def causal_lm(self) -> torch.nn.Module:
        """The transformers causal LM (with LoRA layers injected when an adapter is used)."""
        return self.net.get_base_model() if hasattr(self.net, "get_base_model") else self.net

    def setup(self, stage: str) -> None:
        dtype = self.hparams.base_dtype
        trainer = self._trainer  # None when set up by hand, where `self.trainer` would raise
        bf16 = trainer is not None and str(trainer.precision).startswith("bf16")
        if bf16 and not native_bf16(trainer.strategy.root_device):  # where the module moves after setup
            rank_zero_warn(
                "bf16 precision on a CPU without native bf16 (no amx_bf16 or avx512_bf16 in /proc/cpuinfo): "
                "bf16 is emulated there and runs many times slower than float32; "
                "use --config configs/trainer/cpu.yaml instead of configs/trainer/cpu-bf16.yaml"
            )
        if dtype == "auto":  # bf16 autocast runs the matrix products in bf16 either way; stored bf16 spares the casts
            dtype = "bfloat16" if bf16 else "float32"
        if dtype == "bfloat16":
            self.cast_frozen(torch.bfloat16)

    def cast_frozen(self, dtype: torch.dtype) -> None:
        """Store the frozen (base) weights in ``dtype``; the trainable ones keep theirs for the optimizer."""
        for p in self.net.parameters():
            if not p.requires_grad:
                p.data = p.data.to(dtype)

    def shares_prefixes(self, device: torch.device, training: bool) -> bool:
        """Whether passes on ``device`` (training steps, or passes without gradients) run shared
        prefixes once; the datamodule lays batches out for it only then."""
        if not self._share or (training and not self._share_in_training):
            return False
        return self.hparams.share_prefix is not None or device.type == "cpu"

    def layout_for(self, batch: dict[str, Any]) -> dict[str, torch.Tensor] | None:
        """The batch's prefix-shared layout where this pass can use it, else None (a plain pass)."""
        training = self.training and torch.is_grad_enabled()
        return batch.get("shared") if self.shares_prefixes(self.device, training) else None

    def answer_logits(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Logits at the labelled positions only, their targets, and which of them is a letter.

        The output head runs only where a label follows (the answer tokens), not over the whole
        sequence: for a small model the vocabulary projection is a large share of the work. Where the
        batch has a prefix-shared layout (``batch["shared"]``, see :func:`selfinterp.datamodule.collate`)
        and the model allows it, each shared prompt prefix runs once.
        """
        causal = self.causal_lm
        training = self.training and torch.is_grad_enabled()
        shared = self.layout_for(batch)
        hidden = shared_hidden(causal.get_decoder(), shared) if shared is not None else None
        if hidden is not None:
            labels = shared["suffix_labels"]
        else:
            if shared is not None:  # a cache this model's layers do not fill plainly: never try again
                self._share = False
            hidden_fn = self._train_hidden if training else _hidden
            hidden = hidden_fn(causal.get_decoder(), batch["input_ids"], batch["attention_mask"])
            labels = batch["labels"]
        targets = labels[:, 1:]
        mask = targets != IGNORE
        logits = causal.get_output_embeddings()(hidden[:, :-1][mask]).float()
        letter = (mask.cumsum(dim=1) == 1) & mask  # the first labelled token of each row
        return logits, targets[mask], letter[mask]

    def _step(self, batch: dict[str, torch.Tensor], prefix: str) -> torch.Tensor:
        logits, targets, letter = self.answer_logits(batch)
        loss = F.cross_entropy(logits, targets)
        letter_acc = (logits[letter].argmax(-1) == targets[letter]).float().mean()
        n = int(batch["input_ids"].shape[0])
        on_step = prefix == "train"
        self.log(f"{prefix}/loss", loss, prog_bar=True, on_step=on_step, on_epoch=True, sync_dist=not on_step, batch_size=n)
        self.log(f"{prefix}/letter_acc", letter_acc, on_step=on_step, on_epoch=True, sync_dist=not on_step, batch_size=n)
        return loss

    def calibrate_inputs(
        self, batch: dict[str, Any], total: Callable[[torch.Tensor], torch.Tensor] = lambda t: t
    ) -> None:
        """Set the standardisation statistics (``model.lora_standardise``) from one plain decoder pass
        over ``batch``; ``total`` sums over processes (see :func:`selfinterp.standardise.calibrate`)."""
        calibrate(self.net, lambda: _hidden(self.causal_lm.get_decoder(), batch["input_ids"], batch["attention_mask"]),
                  batch["attention_mask"], total)

    def on_train_batch_start(self, batch: dict[str, Any], batch_idx: int) -> None:
        if self._calibrate:
            self._calibrate = False
            reduce = self.trainer.strategy.reduce
            with self.trainer.precision_plugin.forward_context():
                self.calibrate_inputs(batch, lambda t: reduce(t, reduce_op="sum"))

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._calibrate = False  # a resumed run keeps the statistics it was trained with

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Log the total gradient norm of the trainable weights as ``train/grad_norm``. Lightning calls
        this before it clips (``trainer.gradient_clip_val``), so the curve shows how often a clip acts."""
        grads = [p.grad for p in self.parameters() if p.grad is not None]  # float32: trainable weights stay float32
        if grads:
            self.log("train/grad_norm", torch.nn.utils.get_total_norm(grads), on_step=True, on_epoch=False)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "test")

    def configure_optimizers(self) -> dict[str, Any]:
        ratio = self.hparams.lora_b_lr_ratio
        scaled = {n for n, _ in self.named_parameters() if ratio != 1 and (".lora_B." in n or ".lora_embedding_B." in n)}
        trainable = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        groups = [{"params": [p for n, p in trainable if n not in scaled]}]
        if scaled:
            groups.append({"params": [p for n, p in trainable if n in scaled]})
        if self.optimizer_factory is None:
            optimizer = torch.optim.AdamW(groups, lr=2e-4, weight_decay=0.0)
        else:
            optimizer = self.optimizer_factory(groups)
        if len(groups) == 2:  # the factory gave every group its lr; B's is scaled (LoRA+)
            optimizer.param_groups[1]["lr"] *= ratio
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = self.hparams.warmup
        warm = int(warmup * total) if warmup < 1 else int(warmup)
        decay = self.hparams.decay

        def factor(step: int) -> float:
            if step < warm:
                return (step + 1) / (warm + 1)
            if decay == "constant":
                return 1.0
            progress = min(1.0, (step - warm) / max(1, total - warm))
            return 1.0 - progress if decay == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        names = {f"net.{n}" for n in saved_tensors(self.net)}
        return {k: v for k, v in self.state_dict().items() if k in names}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["state_dict"] = self.trainable_state_dict()
