"""Per-epoch verification: greedy held-out choices -> regression -> TensorBoard scalars and result files."""

from __future__ import annotations

import logging
import math
import os
import platform
import time
from pathlib import Path
from typing import Any, Literal

import lightning as L
import pandas as pd
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.trainer.states import TrainerFn

from selfinterp.analysis import analyze, fmt, write_analysis
from selfinterp.atomic import write_json
from selfinterp.datamodule import prompt_text
from selfinterp.dataset import A_COLS, B_COLS, DecisionData
from selfinterp.plots import recovery_curve_figure, save_figure, weight_comparison_figure
from selfinterp.scoring import Choice, score_prompts

log = logging.getLogger(__name__)
SCALARS = ["r", "agreement", "auc", "parse_failure", "mae", "rmse", "frac_A", "spearman", "mean_scenario_r"]


def select_trials(data: DecisionData, n_scenarios: int | None, n_trials: int | None) -> list[int]:
    """Indices of the test trials to verify: the first ``n_trials`` of each of the first ``n_scenarios``."""
    seen: dict[int, int] = {}
    keep = []
    for i, t in enumerate(data.test_trials):
        k = seen.get(t.scenario, 0)
        seen[t.scenario] = k + 1
        if (n_scenarios is None or t.scenario < n_scenarios) and (n_trials is None or k < n_trials):
            keep.append(i)
    return keep


def decisions_frame(data: DecisionData, indices: list[int], choices: list[Choice]) -> pd.DataFrame:
    """One row per verified trial: values, target, parsed choice, raw answer and P(B)."""
    rows = []
    per_scenario: dict[int, int] = {}
    for i, c in zip(indices, choices):
        t = data.test_trials[i]
        k = per_scenario.get(t.scenario, 0)
        per_scenario[t.scenario] = k + 1
        rows.append({"scenario": t.scenario, "trial": k, **dict(zip(A_COLS, t.a)), **dict(zip(B_COLS, t.b)),
                     "target": t.label, "selection": c.selection, "raw": c.raw, "p_b": round(c.p_b, 6)})
    return pd.DataFrame(rows).sort_values(["scenario", "trial"], kind="stable").reset_index(drop=True)


class VerificationCallback(Callback):
    """Scores the held-out test trials greedily and recovers the weights, after every training epoch.

    Also runs at the end of ``validate`` and ``test``, and where training stops inside an epoch
    (``trainer.max_time``, ``max_steps``), tagged with the epochs trained (``epoch_1.67``). Writes
    ``<results_dir>/<run>/epoch_<k>/`` and the run's ``summary.json`` and ``recovery_curve.png``; logs
    ``verify/*`` scalars per epoch.
    """

    def __init__(
        self,
        n_scenarios: int | None = None,
        n_trials: int | None = None,
        batch_size: int = 64,
        verify_base: bool = True,
        regression: Literal["paper", "mle"] = "paper",
        min_valid: int = 10,
        continue_tokens: int = 8,
        results_dir: str = "results",
        run_name: str | None = None,
        every_n_epochs: int = 1,
    ) -> None:
        """
        Args:
            n_scenarios: Verify the first N scenarios only (default: all in the data).
            n_trials: Verify the first N test trials of each scenario (default: all, 50 in the paper setting).
            batch_size: Prompts per forward pass.
            verify_base: Also verify the model before training (written as epoch 0).
            regression: "paper" (MAP with intercept, the authors' spec) or "mle" (statsmodels Logit, no intercept).
            min_valid: Scenarios with fewer valid answers get no weights.
            continue_tokens: Greedy tokens to decode when the first token is not a clean A or B.
            results_dir: Folder that holds one sub-folder per run.
            run_name: The run's folder name (default: the logger's name/version_N).
            every_n_epochs: Verify after every N-th training epoch (the last epoch, whole or not, is always verified).
        """
        super().__init__()
        self.n_scenarios, self.n_trials, self.batch_size = n_scenarios, n_trials, batch_size
        self.verify_base, self.regression, self.min_valid = verify_base, regression, min_valid
        self.continue_tokens, self.results_dir, self.run_name = continue_tokens, results_dir, run_name
        self.every_n_epochs = every_n_epochs
        self.history: list[dict[str, Any]] = []
        self.last_run_dir: str | None = None  # where the results of the latest verification went
        self.train_seconds = 0.0  # wall time in training epochs (steps and validation loss), verification excluded
        self._epoch_start: float | None = None

    def run_dir(self, trainer: L.Trainer) -> Path:
        if self.run_name:
            return Path(self.results_dir) / self.run_name
        logger = trainer.logger
        if logger is None or not logger.name:  # no logger, or fast_dev_run's dummy one
            return Path(self.results_dir) / "run"
        version = logger.version if isinstance(logger.version, str) else f"version_{logger.version}"
        return Path(self.results_dir) / logger.name / version

    # Hooks -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history, "run_dir": self.last_run_dir}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))
        self.train_seconds = float(self.history[-1].get("train_seconds") or 0.0) if self.history else 0.0

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A resumed run (fit --ckpt_path) keeps the history restored from the checkpoint and
        # does not verify the base model again.
        if trainer.ckpt_path is None:
            self.history, self.train_seconds = [], 0.0
            if self.verify_base:
                self.verify(trainer, pl_module, "epoch_0", 0)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch_start = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._epoch_start is not None:
            self.train_seconds += time.perf_counter() - self._epoch_start
            self._epoch_start = None
        done, total = trainer.fit_loop.epoch_loop.batch_progress.current.completed, trainer.num_training_batches
        if done < total:  # stopped inside the epoch (trainer.max_time or max_steps): tagged with how far it got
            fraction = round(trainer.current_epoch + done / total, 2)
            self.verify(trainer, pl_module, f"epoch_{fraction:g}", fraction)
            return
        epoch = trainer.current_epoch + 1
        last = trainer.max_epochs is not None and epoch >= trainer.max_epochs
        if epoch % self.every_n_epochs == 0 or last or trainer.fast_dev_run:
            self.verify(trainer, pl_module, f"epoch_{epoch}", epoch)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.VALIDATING:
            self.verify(trainer, pl_module, "validate", trainer.current_epoch)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.verify(trainer, pl_module, "test", trainer.current_epoch)

    # Work --------------------------------------------------------------------------------
    def score(self, trainer: L.Trainer, pl_module: L.LightningModule, data: DecisionData) -> tuple[list[int], list[Choice]]:
        """This rank's share of the selected test trials, scored; then every rank's, gathered."""
        indices = select_trials(data, self.n_scenarios, self.n_trials)
        mine = indices[trainer.global_rank::trainer.world_size]
        tokenizer = pl_module.tokenizer
        prompts = [prompt_text(tokenizer, data.test[i]) for i in mine]
        was_training = pl_module.training
        pl_module.eval()
        with trainer.precision_plugin.forward_context():
            choices = score_prompts(pl_module.causal_lm, tokenizer, prompts, self.batch_size, self.continue_tokens,
                                    progress=trainer.is_global_zero)
        pl_module.train(was_training)
        if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            gathered: list[Any] = [None] * trainer.world_size
            dist.all_gather_object(gathered, list(zip(mine, choices)))
            pairs = sorted(p for part in gathered for p in part)
            return [i for i, _ in pairs], [c for _, c in pairs]
        return mine, choices

    def verify(self, trainer: L.Trainer, pl_module: L.LightningModule, tag: str, step: float) -> dict[str, Any] | None:
        """Score, analyse, write and log; every rank scores, only rank 0 analyses and writes."""
        data: DecisionData = trainer.datamodule.load_data()
        indices, choices = self.score(trainer, pl_module, data)
        if not trainer.is_global_zero:
            return None
        decisions = decisions_frame(data, indices, choices)
        result = analyze(decisions, data.scenarios, data.weights, self.regression, self.min_valid)
        run = self.run_dir(trainer)
        self.last_run_dir = str(run)
        write_analysis(result, run / tag, decisions)
        metrics = result.metrics
        self.history.append({"tag": tag, "epoch": step, **{k: metrics.get(k) for k in SCALARS},
                             "p_value": metrics.get("p_value"), "r_ci95": metrics.get("r_ci95"),
                             "r_per_attribute": metrics.get("r_per_attribute"),
                             "agreement_top_k": metrics.get("agreement_top_k"),
                             "train_seconds": self.train_seconds})
        self.write_summary(trainer, pl_module, run)
        self.log_metrics(trainer, result, math.ceil(step))  # a part-epoch's point goes to the epoch in progress
        log.info("verified %s: r=%s, agreement %s, parse failures %s -> %s", tag, fmt(metrics.get("r"), ".3f"),
                 fmt(metrics.get("agreement"), ".1%"), fmt(metrics.get("parse_failure"), ".1%"), run / tag)
        return metrics

    def write_summary(self, trainer: L.Trainer, pl_module: L.LightningModule, run: Path) -> None:
        hp = dict(pl_module.hparams)
        data: DecisionData = trainer.datamodule.load_data()
        groups = trainer.optimizers[0].param_groups if trainer.optimizers else []
        n_scenarios = max(1, len(data.scenarios))
        summary = {
            "model": hp.get("model"),
            "n_params": sum(p.numel() for p in pl_module.parameters()),
            "n_trainable": sum(p.numel() for p in pl_module.parameters() if p.requires_grad),
            "lora_r": None if hp.get("full_finetune") else hp.get("lora_r"),
            "regression": self.regression,
            "setup": {
                "n_scenarios": len(data.scenarios),
                "scenario_ids": trainer.datamodule.hparams.get("scenario_ids"),
                "weights": trainer.datamodule.hparams.get("weights"),  # given target weights; None: seed 1's draw
                "seed": _global_seed(),  # seed_everything: the adapter's random start
                "data_seed": trainer.datamodule.hparams.get("seed"),  # the order of the training batches
                "train_trials_per_scenario": sum(r.stage == 1 for r in data.train) / n_scenarios,
                "attribute_questions_per_scenario": sum(r.stage == 0 for r in data.train) / n_scenarios,
                "curriculum": bool(trainer.datamodule.hparams.get("curriculum")),
                "mirror_train": bool(trainer.datamodule.hparams.get("mirror_train")),  # counted in the trials
                "layout": data.layout,
                "max_epochs": trainer.max_epochs,
                "lr": groups[0].get("initial_lr", groups[0].get("lr")) if groups else None,
                "optimizer": type(trainer.optimizers[0]).__name__ if trainer.optimizers else None,
                "full_finetune": bool(hp.get("full_finetune")),
                "use_rslora": bool(hp.get("use_rslora")),
                "lora_b_lr_ratio": hp.get("lora_b_lr_ratio", 1.0),
                "lora_init": hp.get("lora_init", "default"),
                "lora_standardise": bool(hp.get("lora_standardise")),
                "init_from": hp.get("init_from"),
                "batch_size": trainer.datamodule.hparams.get("batch_size"),
                "accumulate_grad_batches": trainer.accumulate_grad_batches,  # examples per step: batch x this x devices
                "compile": hp.get("compile"),
                "devices": trainer.world_size,
                "precision": str(trainer.precision),
                "machine": machine(trainer),
            },
            "epochs": self.history,
        }
        write_json(run / "summary.json", summary)
        curve = [h for h in self.history if h["tag"].startswith("epoch_")]
        if curve:
            fig = recovery_curve_figure([h["epoch"] for h in curve], [h["r"] for h in curve],
                                        [h["agreement"] for h in curve], [h.get("auc") for h in curve])
            save_figure(fig, run / "recovery_curve.png")

    def log_metrics(self, trainer: L.Trainer, result, step: int) -> None:
        m = result.metrics
        scalars = {f"verify/{k}": float(m[k]) for k in SCALARS if m.get(k) is not None}
        for k, r in enumerate(m.get("r_per_attribute") or [], 1):
            if r is not None:
                scalars[f"verify/r_attr{k}"] = float(r)
        for k, x in enumerate(m.get("agreement_top_k") or [], 1):
            scalars[f"verify/agreement_top{k}"] = float(x)
        for logger in trainer.loggers:
            logger.log_metrics(scalars, step=step)
            if isinstance(logger, TensorBoardLogger):
                fig = weight_comparison_figure(result.learned.filter(like="b_attr").to_numpy(float), result.targets, m.get("r"))
                logger.experiment.add_figure("verify/weight_comparison", fig, global_step=step, close=True)


def machine(trainer: L.Trainer) -> str:
    """The accelerator the run trained on, in words (for result tables)."""
    device = trainer.strategy.root_device
    if device.type == "cuda":
        return f"{trainer.world_size} x {torch.cuda.get_device_name(device)}"
    return f"CPU ({platform.machine()}, {os.cpu_count()} cores)"


def _global_seed() -> int | None:
    """The seed Lightning's ``seed_everything`` set for this process (``--seed_everything``), if any."""
    seed = os.environ.get("PL_GLOBAL_SEED")
    return int(seed) if seed is not None else None


def checkpoint_run_dir(ckpt_path: str | Path) -> Path | None:
    """The results folder the verification callback wrote for the run a checkpoint belongs to, if any.

    Memory-mapped: only the callbacks' small state is read, not the weights (a full fine-tuning
    checkpoint of the 135M model holds 1.6 GB)."""
    state = torch.load(ckpt_path, map_location="cpu", weights_only=False, mmap=True).get("callbacks", {})
    dirs = [v.get("run_dir") for k, v in state.items() if k.startswith("VerificationCallback") and isinstance(v, dict)]
    return Path(dirs[0]) if dirs and dirs[0] else None
