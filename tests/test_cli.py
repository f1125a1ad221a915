"""Behaviour of the command line: configs, checkpoints and resuming, export, and errors on bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from conftest import ROOT, TINY_CONFIG, scalars
from selfinterp.__main__ import main
from selfinterp.cli import SelfInterpCLI, lightning_cli, load_trained
from selfinterp.datamodule import DecisionDataModule, encode
from selfinterp.dataset import TEST_JSONL, TRAIN_JSONL, Record
from selfinterp.models import load_tokenizer
from selfinterp.module import DecisionLM

CONFIGS = ROOT / "configs"
TOP_LEVEL = {"seed_everything", "trainer", "model", "data", "optimizer", "lr_scheduler", "ckpt_path"}


# --- configs ------------------------------------------------------------------------------------
class ParseOnlyCLI(SelfInterpCLI):
    """The project's CLI parser, without instantiating the model, data or trainer, nor running."""

    def instantiate_classes(self) -> None:
        pass

    def after_instantiate_classes(self) -> None:
        pass

    def _run_subcommand(self, subcommand: str) -> None:
        pass


def parse(*args: str):
    """Parse ``fit`` arguments as the CLI does; jsonargparse errors raise instead of exiting."""
    cli = ParseOnlyCLI(DecisionLM, DecisionDataModule, args=["fit", *args], parser_kwargs={"exit_on_error": False})
    return cli.config["fit"]


def _config_files() -> list[Path]:
    """Every fit config; sweep files (configs/sweeps/) are checked by their own test."""
    return sorted(p for p in CONFIGS.rglob("*.yaml") if p.parent.name != "sweeps")


def _parse_args(path: Path) -> list[str]:
    """Standalone configs parse alone; files in sub-folders compose with the quickstart: an overlay
    (top-level keys such as ``trainer:``) as a second ``--config``, a list of callbacks as
    ``--trainer.callbacks file``, a section (the keys of one
    argument group, e.g. ``configs/data/*.yaml``) as ``--<folder> file``."""
    if path.parent == CONFIGS:
        return ["--config", str(path)]
    content = yaml.safe_load(path.read_text()) or {}
    quickstart = ["--config", str(CONFIGS / "quickstart.yaml")]
    if isinstance(content, list):  # a list of callbacks (configs/trainer/callbacks.yaml)
        return quickstart + ["--trainer.callbacks", str(path)]
    keys = set(content)
    if keys <= TOP_LEVEL:
        return quickstart + ["--config", str(path)]
    return quickstart + [f"--{path.parent.name}", str(path)]


def test_there_are_configs_to_check():
    names = {p.relative_to(CONFIGS).as_posix() for p in _config_files()}
    assert {"quickstart.yaml", "trainer/cpu.yaml", "trainer/ddp.yaml"} <= names


@pytest.mark.parametrize("path", _config_files(), ids=lambda p: p.relative_to(CONFIGS).as_posix())
def test_every_config_parses(path):
    config = parse(*_parse_args(path))
    callbacks = [c.class_path for c in config.trainer.callbacks or []]
    assert "selfinterp.callbacks.VerificationCallback" in callbacks
    assert config.data.n_scenarios >= 1 and config.model.model
    content = yaml.safe_load(path.read_text())
    if path.parent.name == "trainer" and isinstance(content, dict):  # an overlay: its values win over the quickstart's
        overlay = content["trainer"]
        assert {k: config.trainer[k] for k in overlay} == overlay


SWEEPS = sorted((CONFIGS / "sweeps").glob("*.yaml"))


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_every_run_of_every_sweep_file_parses(path, monkeypatch):
    from test_bench import load_script

    monkeypatch.chdir(ROOT)
    base, name, runs = load_script("sweep").load_sweep(path)
    assert runs
    for run, options in runs.items():
        config = parse("--config", base, *options, f"--trainer.logger.init_args.name={name}/{run}")
        assert config.trainer.logger.init_args.name == f"{name}/{run}"


def test_model_configs_share_the_callbacks_file():
    """The paper-protocol configs read their callbacks from one file, relative to the config, from any
    working directory; the file's values arrive as written."""
    shared = yaml.safe_load((CONFIGS / "trainer" / "callbacks.yaml").read_text())
    models = [p for p in CONFIGS.glob("*.yaml") if p.name != "quickstart.yaml"]
    assert len(models) == 6
    for path in models:
        assert yaml.safe_load(path.read_text())["trainer"]["callbacks"] == "trainer/callbacks.yaml", path.name
        callbacks = parse("--config", str(path)).trainer.callbacks
        assert [c.class_path for c in callbacks] == [c["class_path"] for c in shared]
        for parsed, written in zip(callbacks, shared):
            assert {k: parsed.init_args[k] for k in written["init_args"]} == written["init_args"]


def test_quickstart_values_are_what_it_says():
    config = parse("--config", str(CONFIGS / "quickstart.yaml"))
    assert (config.model.model, config.data.n_scenarios, config.trainer.max_epochs) == ("smollm2-135m", 4, 1)
    assert config.trainer.use_distributed_sampler is False  # the datamodule shards batches itself


def test_config_with_an_unknown_key_fails_to_parse(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer:\n  max_epoch: 1\n")
    with pytest.raises(Exception, match="max_epoch"):
        parse("--config", str(bad))
    section = tmp_path / "data.yaml"
    section.write_text("n_scenario: 3\n")
    with pytest.raises(Exception, match="n_scenario"):
        parse("--config", str(CONFIGS / "quickstart.yaml"), "--data", str(section))


# --- bad input --------------------------------------------------------------------------------
def _one_error_line(err: str) -> str:
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def _fit(model_dir, *extra: str) -> list[str]:
    return ["fit", "--config", str(TINY_CONFIG), f"--model.model={model_dir}", *extra]


def test_missing_config_file(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(tmp_path / "nope.yaml")])
    assert exit_info.value.code == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "nope.yaml" in line and "does not exist" in line


def test_config_with_unknown_key(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  lora_rank: 8\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(bad)])
    assert exit_info.value.code == 2
    assert "lora_rank" in _one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("model, expected", [
    ("/no/such/model", "model path /no/such/model does not exist"),
    ("./missing-model.gguf", "model file ./missing-model.gguf does not exist"),
    ("meta-llama/Llama-3.2-1B-Instruct", "'meta-llama/Llama-3.2-1B-Instruct' is not available offline"),
])
def test_unavailable_model(tmp_path, monkeypatch, capsys, model, expected):
    monkeypatch.chdir(tmp_path)
    _offline_cache(monkeypatch, tmp_path / "hub")  # an empty cache
    assert main(_fit(model)) == 2
    assert expected in _one_error_line(capsys.readouterr().err)


def _offline_cache(monkeypatch, cache: Path) -> Path:
    from huggingface_hub import constants

    cache.mkdir(parents=True, exist_ok=True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_cached_hub_id_loads_offline(tmp_path, monkeypatch, tiny_model_dir):
    cache = _offline_cache(monkeypatch, tmp_path / "hub")
    repo = cache / "models--selfinterp-tests--tiny"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(tiny_model_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    module = DecisionLM(model="selfinterp-tests/tiny", lora_r=4, lora_alpha=8)
    assert module.causal_lm.config.hidden_size == 32
    assert module.tokenizer.convert_tokens_to_ids("<|im_end|>") == module.tokenizer.pad_token_id


def test_model_folder_without_config(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    assert main(_fit(tmp_path / "empty")) == 2
    assert "without config.json" in _one_error_line(capsys.readouterr().err)


def _data_dir(tmp_path: Path) -> Path:
    out = tmp_path / "data"
    assert main(["data", "--out", str(out), "--n_scenarios", "2", "--n_train", "2", "--n_val", "1",
                 "--n_test", "2"]) == 0
    return out


@pytest.mark.parametrize("name, line, expected", [
    (TRAIN_JSONL, '{"prompt": "Which?", "completion": "A"}', 'line 1: expected a JSON object {"messages": [...]}'),
    (TEST_JSONL, '{"messages": [{"role": "user", "content": "Which?"}]}', "line 1: messages must be [system,] user"),
    (TRAIN_JSONL, "not json", "line 1: expected a JSON object"),
])
def test_data_with_wrong_schema(tmp_path, monkeypatch, capsys, tiny_model_dir, name, line, expected):
    monkeypatch.chdir(tmp_path)
    data = _data_dir(tmp_path)
    (data / name).write_text(line + "\n")
    capsys.readouterr()
    assert main(_fit(tiny_model_dir, f"--data.data_dir={data}")) == 2
    error = _one_error_line(capsys.readouterr().err)
    assert name in error and expected in error


def test_missing_data_dir(tmp_path, monkeypatch, capsys, tiny_model_dir):
    monkeypatch.chdir(tmp_path)
    assert main(_fit(tiny_model_dir, f"--data.data_dir={tmp_path / 'nowhere'}")) == 2
    assert "data folder" in _one_error_line(capsys.readouterr().err)


def test_export_of_a_missing_checkpoint(tmp_path, capsys, tiny_model_dir):
    args = ["export", "--config", str(TINY_CONFIG), f"--model.model={tiny_model_dir}",
            "--ckpt_path", str(tmp_path / "none.ckpt"), "--out", str(tmp_path / "out")]
    assert main(args) == 2
    assert "none.ckpt does not exist" in _one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def test_unknown_command(capsys):
    assert main(["train"]) == 2
    assert "'train'" in _one_error_line(capsys.readouterr().err)


# --- checkpoints, resuming and export ---------------------------------------------------------
def test_resume_from_last_checkpoint_continues_the_run(tmp_path, monkeypatch, tiny_model_dir):
    monkeypatch.chdir(tmp_path)
    args = _fit(tiny_model_dir)
    assert main(args) == 0
    ckpt = tmp_path / "lightning_logs" / "tiny" / "checkpoints" / "last.ckpt"
    first = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert first["global_step"] == 3  # 12 training records, batches of 4
    run0, run1 = tmp_path / "results" / "tiny" / "version_0", tmp_path / "results" / "tiny" / "version_1"
    base_result = run0 / "epoch_0" / "experiment1_results.json"
    stamp = base_result.stat().st_mtime_ns

    # No version pinned: `last` is found in the config's fixed checkpoint folder.
    assert main(args + ["--ckpt_path=last", "--trainer.max_epochs=2"]) == 0
    second = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert (second["epoch"], second["global_step"]) == (first["epoch"] + 1, 6)
    assert all(not torch.equal(second["state_dict"][k], v) for k, v in first["state_dict"].items() if "lora_B" in k)
    assert {p.name for p in run0.iterdir()} == {"epoch_0", "epoch_1", "summary.json", "recovery_curve.png"}
    assert {p.name for p in run1.iterdir()} == {"epoch_2", "summary.json", "recovery_curve.png"}
    assert base_result.stat().st_mtime_ns == stamp  # the base model was not verified again
    summary = json.loads((run1 / "summary.json").read_text())
    assert [(e["tag"], e["epoch"]) for e in summary["epochs"]] == [("epoch_0", 0), ("epoch_1", 1), ("epoch_2", 2)]
    logged = scalars(tmp_path / "lightning_logs" / "tiny" / "version_1")
    assert [step for step, _ in logged["verify/parse_failure"]] == [2]
    # The checkpoint knows which results folder its run wrote (report-weights finds the learned weights there).
    from selfinterp.callbacks import checkpoint_run_dir

    assert checkpoint_run_dir(ckpt) == Path("results") / "tiny" / "version_1"


def test_init_from_starts_a_new_run_on_other_scenarios_from_a_trained_adapter(tmp_path, monkeypatch, chooser_model_dir):
    """A curriculum stage: scenarios 0-1 trained first, then a new run on scenario 1 alone starting from
    that adapter. Before its own first step, the new run decides scenario 1's test trials exactly as the
    first run did after training; its optimizer and step count start at zero."""
    monkeypatch.chdir(tmp_path)
    assert main(_fit(chooser_model_dir, "--trainer.logger.init_args.name=stage1")) == 0
    ckpt = tmp_path / "lightning_logs" / "stage1" / "checkpoints" / "last.ckpt"
    assert main(_fit(chooser_model_dir, "--trainer.logger.init_args.name=stage2", f"--model.init_from={ckpt}",
                     "--data.scenario_ids=[1]")) == 0
    first = pd.read_csv(tmp_path / "results" / "stage1" / "version_0" / "epoch_1" / "inference_decisions.csv")
    second = pd.read_csv(tmp_path / "results" / "stage2" / "version_0" / "epoch_0" / "inference_decisions.csv")
    trained = first[first["scenario"] == 1].drop(columns="scenario").reset_index(drop=True)
    pd.testing.assert_frame_equal(second.drop(columns="scenario"), trained)
    assert set(second["scenario"]) == {0}
    stage2 = torch.load(tmp_path / "lightning_logs" / "stage2" / "checkpoints" / "last.ckpt", map_location="cpu",
                        weights_only=False)
    assert stage2["global_step"] == 2  # its own 6 trials in batches of 4, counted from zero
    setup = json.loads((tmp_path / "results" / "stage2" / "version_0" / "summary.json").read_text())["setup"]
    assert (setup["scenario_ids"], setup["init_from"], setup["n_scenarios"]) == ([1], str(ckpt), 1)


def test_a_fit_instils_given_weights(tmp_path, monkeypatch, chooser_model_dir):
    """--data.weights sets the rule a fit trains and verifies against: the held-out targets follow the
    given weights, and the summary records them with the two seeds that tell runs of one setup apart."""
    monkeypatch.chdir(tmp_path)
    given = [[100, 0, 0, 0, 0], [0, 0, 0, 0, -100]]
    assert main(_fit(chooser_model_dir, "--trainer.max_steps=1", f"--data.weights={json.dumps(given)}",
                     "--seed_everything=3", "--data.seed=5")) == 0
    run = tmp_path / "results" / "tiny" / "version_0"
    decisions = pd.read_csv(run / "epoch_0" / "inference_decisions.csv")
    first, fifth = decisions["A_attribute_1"] - decisions["B_attribute_1"], decisions["A_attribute_5"] - decisions["B_attribute_5"]
    wins_a = (first > 0).where(decisions["scenario"] == 0, fifth < 0)
    assert list(decisions["target"]) == ["A" if a else "B" for a in wins_a]
    setup = json.loads((run / "summary.json").read_text())["setup"]
    assert (setup["weights"], setup["seed"], setup["data_seed"]) == (given, 3, 5)


def test_a_standardised_adapter_verifies_from_its_checkpoint_and_is_not_exported(tmp_path, monkeypatch, capsys,
                                                                               chooser_model_dir):
    """The checkpoint brings the standardisation statistics: `verify` decides exactly as the fit's last
    verification did. PEFT's format cannot hold them, so export refuses and writes nothing."""
    monkeypatch.chdir(tmp_path)
    config = ["--config", str(TINY_CONFIG), f"--model.model={chooser_model_dir}", "--model.lora_standardise=true"]
    assert main(["fit", *config, "--trainer.logger.init_args.name=std"]) == 0
    ckpt = tmp_path / "lightning_logs" / "std" / "checkpoints" / "last.ckpt"
    assert main(["verify", *config, "--trainer.logger.init_args.name=std-check", "--ckpt_path", str(ckpt)]) == 0
    fitted = pd.read_csv(tmp_path / "results" / "std" / "version_0" / "epoch_1" / "inference_decisions.csv")
    checked = pd.read_csv(tmp_path / "results" / "std-check" / "version_0" / "test" / "inference_decisions.csv")
    pd.testing.assert_frame_equal(checked, fitted)
    assert json.loads((tmp_path / "results" / "std" / "version_0" / "summary.json").read_text())["setup"]["lora_standardise"]
    capsys.readouterr()
    assert main(["export", *config, "--ckpt_path", str(ckpt), "--out", str(tmp_path / "out")]) == 2
    assert "lora_standardise" in _one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def test_every_epoch_leaves_a_checkpoint_so_a_cut_off_run_can_resume(tmp_path, monkeypatch, tiny_model_dir):
    """A run stopped between epochs (a GPU lease ending, a sweep's --timeout) must find its last finished
    epoch on disk: last.ckpt (a link to the latest epoch's file) exists before training ends."""
    from selfinterp.callbacks import VerificationCallback

    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "lightning_logs" / "tiny" / "checkpoints"
    seen = []
    original = VerificationCallback.on_train_epoch_start

    def record(self, trainer, pl_module):
        last = folder / "last.ckpt"
        seen.append((trainer.current_epoch, sorted(p.name for p in folder.glob("*.ckpt")),
                     torch.load(last, map_location="cpu", weights_only=False)["global_step"] if last.exists() else None))
        original(self, trainer, pl_module)

    monkeypatch.setattr(VerificationCallback, "on_train_epoch_start", record)
    assert main(_fit(tiny_model_dir, "--trainer.max_epochs=3")) == 0
    assert seen == [(0, [], None), (1, ["epoch=0-step=3.ckpt", "last.ckpt"], 3), (2, ["epoch=1-step=6.ckpt", "last.ckpt"], 6)]
    assert (folder / "last.ckpt").resolve() == folder / "epoch=2-step=9.ckpt"


def test_a_run_stopped_inside_an_epoch_is_verified_where_it_stopped(tmp_path, monkeypatch, tiny_model_dir):
    """trainer.max_time (a GPU visit's budget) or max_steps can end training mid-epoch: the last
    verification is then tagged with the part of an epoch trained, not as a whole epoch."""
    monkeypatch.chdir(tmp_path)
    assert main(_fit(tiny_model_dir, "--trainer.max_epochs=3", "--trainer.max_steps=5")) == 0  # 3 batches per epoch
    run = tmp_path / "results" / "tiny" / "version_0"
    summary = json.loads((run / "summary.json").read_text())
    assert [(e["tag"], e["epoch"]) for e in summary["epochs"]] == [("epoch_0", 0), ("epoch_1", 1), ("epoch_1.67", 1.67)]
    assert (run / "epoch_1.67" / "experiment1_results.json").is_file()
    logged = scalars(tmp_path / "lightning_logs" / "tiny" / "version_0")
    assert [step for step, _ in logged["verify/parse_failure"]] == [0, 1, 2]


def test_the_lr_schedule_counts_optimizer_steps_under_accumulation(tmp_path, monkeypatch, tiny_model_dir):
    """cosclip-gpu's s100-b400 makes steps of 400 from 4 accumulated batches of 100 and cuts each epoch
    with limit_train_batches (micro-batches): the decay must end at the last optimizer step, not halfway
    through a schedule counted in batches."""
    monkeypatch.chdir(tmp_path)
    assert main(_fit(tiny_model_dir, "--trainer.max_epochs=2", "--trainer.limit_train_batches=2",
                     "--trainer.accumulate_grad_batches=2", "--model.decay=linear", "--model.warmup=0")) == 0
    folder = tmp_path / "lightning_logs" / "tiny" / "checkpoints"
    checkpoints = sorted(p.name for p in folder.glob("epoch=*.ckpt"))
    assert checkpoints == ["epoch=1-step=2.ckpt"]  # 2 batches per epoch, 1 optimizer step each
    last = torch.load(folder / checkpoints[0], map_location="cpu", weights_only=False)
    assert last["global_step"] == 2
    assert [g["lr"] for g in last["optimizer_states"][0]["param_groups"]] == [0.0]  # decayed to 0 at step 2 of 2


def test_a_renamed_run_keeps_its_own_checkpoint_folder(tmp_path, monkeypatch, tiny_model_dir):
    """Sweeps rename runs with the logger name; each run's last.ckpt then lives under that name."""
    monkeypatch.chdir(tmp_path)
    assert main(_fit(tiny_model_dir, "--trainer.logger.init_args.name=lr-sweep")) == 0
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.ckpt")) == [
        "lightning_logs/lr-sweep/checkpoints/epoch=0-step=3.ckpt", "lightning_logs/lr-sweep/checkpoints/last.ckpt"]
    assert (tmp_path / "results" / "lr-sweep" / "version_0" / "summary.json").is_file()
    # The saved config leaves the folder to the run name: started again from it under another name, the
    # new run keeps its own checkpoints instead of adding to the first run's folder.
    saved = tmp_path / "lightning_logs" / "lr-sweep" / "version_0" / "config.yaml"
    assert "dirpath: null" in saved.read_text()
    assert main(["fit", "--config", str(saved), "--trainer.logger.init_args.name=lr-sweep-again"]) == 0
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.ckpt")) == [
        "lightning_logs/lr-sweep-again/checkpoints/epoch=0-step=3.ckpt",
        "lightning_logs/lr-sweep-again/checkpoints/last.ckpt",
        "lightning_logs/lr-sweep/checkpoints/epoch=0-step=3.ckpt", "lightning_logs/lr-sweep/checkpoints/last.ckpt"]
    cli = lightning_cli(_fit(tiny_model_dir, "--trainer.logger=false")[1:], run=False)
    assert [Path(c.dirpath).relative_to(tmp_path).as_posix() for c in cli.trainer.callbacks
            if type(c).__name__ == "ModelCheckpoint"] == ["lightning_logs/checkpoints"]  # no logger: no run name


def test_export_writes_adapter_and_merged_model(tmp_path, monkeypatch, tiny_model_dir):
    from peft import PeftModel

    monkeypatch.chdir(tmp_path)
    config = ["--config", str(TINY_CONFIG), f"--model.model={tiny_model_dir}"]
    assert main(["fit", *config, "--model.optimizer.init_args.lr=0.05"]) == 0
    ckpt = tmp_path / "lightning_logs" / "tiny" / "checkpoints" / "last.ckpt"
    out = tmp_path / "export"
    assert main(["export", *config, "--ckpt_path", str(ckpt), "--out", str(out), "--merge"]) == 0
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in (out / "adapter").iterdir()}
    assert (out / "merged" / "config.json").is_file()

    trained = load_trained(config, str(ckpt)).model.eval()
    tokenizer = load_tokenizer(str(out / "merged"))  # the merged folder is usable as model.model
    ids = torch.tensor([encode(tokenizer, Record("Choose.", "Which?\nA: 1\nB: 2", "A")).input_ids])
    merged = AutoModelForCausalLM.from_pretrained(out / "merged").eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        expected = trained.net(input_ids=ids).logits
        assert torch.allclose(merged(input_ids=ids).logits, expected, atol=1e-4)
        adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out / "adapter")
        assert torch.allclose(adapter.eval()(input_ids=ids).logits, expected, atol=1e-4)
        assert (base(input_ids=ids).logits - expected).abs().max() > 1e-3  # training changed the model


def test_report_prints_one_row_per_run(tmp_path, capsys):
    run = tmp_path / "results" / "m" / "version_0"
    run.mkdir(parents=True)
    epochs = [{"tag": "epoch_0", "epoch": 0, "r": None, "p_value": None, "agreement": 0.5, "parse_failure": 0.0},
              {"tag": "epoch_3", "epoch": 3, "r": 0.912, "p_value": 1e-40, "agreement": 0.9, "parse_failure": 0.004}]
    epochs[1].update(frac_A=0.47, auc=0.9734, train_seconds=150.0)
    setup = {"n_scenarios": 100, "train_trials_per_scenario": 200.0, "lr": 5e-5, "full_finetune": False, "machine": "1 x NVIDIA H100"}
    (run / "summary.json").write_text(json.dumps({"model": "tiny", "n_params": 135_000_000, "lora_r": 16,
                                                  "setup": setup, "epochs": epochs}))
    old = tmp_path / "results" / "old" / "version_0"  # written before summaries had a setup
    old.mkdir(parents=True)
    (old / "summary.json").write_text(json.dumps({"model": "tiny", "n_params": 135_000_000, "epochs": epochs[:1]}))
    assert main(["report", str(tmp_path / "results")]) == 0
    rows = capsys.readouterr().out.strip().splitlines()
    assert rows[2] == "| m/version_0 | tiny | 135M | 100 | 200 | 3 | 5e-05 | 16 | 0.912 | 1e-40 | 90.0% | 0.973 | 0.4% | 47.0% | 2.5 | 1 x NVIDIA H100 |"
    assert rows[3] == "| old/version_0 | tiny | 135M | - | - | 0 | - | - | n/a | n/a | 50.0% | n/a | 0.0% | n/a | - | - |"
    setup.update(attribute_questions_per_scenario=150.0, curriculum=True, lora_b_lr_ratio=16, mirror_train=True,
                 lora_init="orthogonal", layout="paired", n_scenarios=2, scenario_ids=[3, 0], init_from="a.ckpt",
                 optimizer="Muon", lora_standardise=True)
    (run / "summary.json").write_text(json.dumps({"model": "tiny", "n_params": 135_000_000, "lora_r": 16,
                                                  "setup": setup, "epochs": epochs}))
    assert main(["report", str(tmp_path / "results")]) == 0
    assert ("| 135M | 2 (catalog 3, 0) | 200 (half mirrors) (paired layout) + 150 questions first | 3 | 5e-05 (B x16) (Muon) "
            "| 16 (orthogonal init) (standardised inputs) (from a checkpoint) |") in capsys.readouterr().out.splitlines()[2]
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert "no summary.json" in _one_error_line(capsys.readouterr().err)
