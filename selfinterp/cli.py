"""The Lightning CLI (fit / validate / test) and the commands built on its configs (export)."""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

from lightning.pytorch.cli import LightningCLI

from selfinterp.datamodule import DecisionDataModule
from selfinterp.errors import UserError
from selfinterp.module import DecisionLM, load_trainable


class SelfInterpCLI(LightningCLI):
    """LightningCLI for DecisionLM + DecisionDataModule with this project's defaults."""

    def add_arguments_to_parser(self, parser) -> None:
        # The datamodule shards training batches across ranks itself (length-grouped batches).
        parser.set_defaults({"trainer.use_distributed_sampler": False})

    def after_instantiate_classes(self) -> None:
        """A ModelCheckpoint without ``dirpath`` saves into ``<save_dir>/<logger name>/checkpoints``.

        One fixed folder per run name (not per version), so ``fit --ckpt_path last`` finds the
        latest run's checkpoint, and runs renamed with ``--trainer.logger.init_args.name`` (a sweep)
        keep their own checkpoints. Set on the callback, not in the config: the run's saved
        config.yaml keeps ``dirpath: null``, so a run started again from it under another name gets
        its own folder too, rather than the first run's.
        """
        config = self.config[self.subcommand] if self.subcommand else self.config
        trainer = config.get("trainer") or {}
        init = getattr(trainer.get("logger"), "init_args", None)  # None for no logger, true/false or a list
        folder = Path(init.get("save_dir") or "lightning_logs") / str(init.get("name") or "default") if init else Path("lightning_logs")
        for callback in self.trainer.checkpoint_callbacks:
            if callback.dirpath is None:  # as ModelCheckpoint keeps a local dirpath: absolute, links resolved
                callback.dirpath = os.path.realpath(folder / "checkpoints")


def lightning_cli(args: Sequence[str] | None = None, run: bool = True) -> SelfInterpCLI:
    """Run (or, with ``run=False``, only instantiate) the Lightning CLI on ``args`` (default: sys.argv).

    From the command line the arguments stay in ``sys.argv``: DDP re-launches the other ranks
    from it.
    """
    return SelfInterpCLI(
        DecisionLM, DecisionDataModule, args=None if args is None else list(args), run=run,
        save_config_kwargs={"overwrite": True},
    )


def load_trained(args: Sequence[str], ckpt_path: str | None) -> SelfInterpCLI:
    """Instantiate model, data and trainer from a config and load the trained weights of a checkpoint."""
    cli = lightning_cli(args, run=False)
    if ckpt_path:
        load_trainable(cli.model.net, ckpt_path, "--ckpt_path")
    return cli


def export_main(argv: Sequence[str]) -> Path:
    """``export --config C --ckpt_path P --out DIR [--merge]``: save the adapter (and a merged model)."""
    parser = argparse.ArgumentParser(prog="python -m selfinterp export", description=(
        "Save a trained adapter with save_pretrained (DIR/adapter) and, with --merge, the merged model "
        "(DIR/merged). Other options (--config ...) are the training run's."))
    parser.add_argument("--ckpt_path", required=True, help="checkpoint written by fit (adapter weights)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--merge", action="store_true", help="also write the base model with the adapter merged in")
    opts, rest = parser.parse_known_args(list(argv))
    module = load_trained(rest, opts.ckpt_path).model
    if module.hparams.get("lora_standardise"):
        raise UserError("export: an adapter trained with model.lora_standardise reads standardised inputs, which "
                        "PEFT's format cannot hold; verify it with `python -m selfinterp verify` instead")
    out = Path(opts.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        net = module.net
        if hasattr(net, "peft_config"):
            net.save_pretrained(tmp / "adapter")
            module.tokenizer.save_pretrained(tmp / "adapter")
        if opts.merge or not hasattr(net, "peft_config"):
            merged = net.merge_and_unload() if hasattr(net, "peft_config") else net
            merged.save_pretrained(tmp / "merged")
            module.tokenizer.save_pretrained(tmp / "merged")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"exported to {out}: {', '.join(sorted(p.name for p in out.iterdir()))}")
    return out
