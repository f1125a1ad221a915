"""The throughput benchmarks run end to end on a tiny model, and the fast paths compute what the naive ones do.

No timing is asserted: only that the scripts finish with a ratio line, that the project's training
loss equals the usual transformers loss, and that prefix-shared scoring gives the choices of one
unpadded forward pass per prompt.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import naive_answer, ramp_lora_b
from selfinterp import scoring
from selfinterp.datamodule import collate, encode, prompt_text
from selfinterp.devices import native_bf16
from selfinterp.dataset import build_data
from selfinterp.module import DecisionLM
from selfinterp.prefix import prefix_groups
from selfinterp.scoring import parse_answer, score_prompts

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
RATIO = re.compile(r"^ratio: [0-9.]+$")


def load_script(name: str):
    if str(SCRIPTS) not in sys.path:
        sys.path.insert(0, str(SCRIPTS))
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def run_script(name: str, *args: str, cwd: Path) -> list[str]:
    proc = subprocess.run([sys.executable, str(SCRIPTS / f"{name}.py"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip().splitlines()


# --- the scripts -------------------------------------------------------------------------------
def assert_profiled(folder: Path, name: str, phases: list[tuple[str, int]], lines: list[str]) -> None:
    """The profile's summary line was printed, its text names each phase with its call count, and its trace is JSON."""
    text = (folder / f"{name}.txt").read_text()
    summary = text.splitlines()[0]
    assert re.match(r"^[0-9.]+ s wall for \d+ (step|batch)\(s\); [0-9,]+ aten calls per (step|batch)", summary), summary
    assert any(line.startswith("profile ") and summary in line for line in lines)
    for phase, calls in phases:
        assert re.search(rf"^\| {re.escape(phase)} +\| +{calls} \|", text, re.MULTILINE), (phase, text[:800])
    assert json.loads((folder / f"{name}.json").read_text())["traceEvents"]


@pytest.mark.slow
def test_bench_train_prints_a_table_and_ends_with_the_ratio(tiny_model_dir, tmp_path):
    lines = run_script("bench_train", "--model", str(tiny_model_dir), "--device", "cpu", "--n_scenarios", "1",
                       "--n_train", "8", "--batch_size", "2", "--steps", "2", "--warmup", "1",
                       "--profile", "prof", "--bf16", "off", cwd=tmp_path)
    assert RATIO.match(lines[-1]), lines[-1]
    assert float(lines[-1].split()[1]) > 0
    assert any(line.startswith("| tokens/s") for line in lines)
    assert any(line.startswith("| peak memory MiB") for line in lines)
    assert any(re.match(r"^\| timed steps +\| +2 \| +2 \|$", line) for line in lines)  # profiling is not timed
    assert lines[1].endswith("project path eager, prefix sharing auto; attention auto; float32")
    assert _row(lines, "steps with shared prefixes") == (0, 2)  # auto: on, on the CPU
    assert _cells(lines, "cuDNN attention allowed") == ("yes", "yes")
    phases = [("selfinterp.train.forward", 3), ("selfinterp.train.backward", 3), ("selfinterp.train.optimizer", 3)]
    for path in ("naive", "project"):
        assert_profiled(tmp_path / "prof", f"train-{path}", phases, lines)
    naive, project = _row(lines, "token positions run (padding included)")
    assert project < 0.9 * naive  # each step's 2 rows share their first ~60 of ~170 tokens, run once
    lines = run_script("bench_train", "--model", str(tiny_model_dir), "--device", "cpu", "--n_scenarios", "1",
                       "--n_train", "8", "--batch_size", "2", "--steps", "2", "--warmup", "0", "--share_prefix", "off",
                       "--sdpa", "no-cudnn", "--bf16", "on", cwd=tmp_path)
    assert lines[1].endswith("project path eager, prefix sharing off; attention no-cudnn; bf16 autocast")
    assert _cells(lines, "cuDNN attention allowed") == ("no", "no")  # set in each path's own process
    assert _row(lines, "steps with shared prefixes") == (0, 0)
    padding = _row(lines, "padding (% of batch tokens)")[1]
    real = _row(lines, "real tokens")[1]
    assert _row(lines, "token positions run (padding included)")[1] == pytest.approx(real / (1 - padding / 100), rel=0.01)


def _cells(lines: list[str], name: str) -> tuple[str, str]:
    """The naive and project cells of a benchmark table's row, as printed."""
    cells = next(line for line in lines if line.startswith(f"| {name} ")).split("|")
    return cells[2].strip(), cells[3].strip()


def _row(lines: list[str], name: str) -> tuple[float, float]:
    """The naive and project values of a benchmark table's row."""
    return tuple(float(c.replace(",", "")) for c in _cells(lines, name))


@pytest.mark.slow  # compiles (about a minute on 2 cores)
def test_bench_train_compile_compiles_the_project_path_only(tiny_model_dir, tmp_path):
    lines = run_script("bench_train", "--model", str(tiny_model_dir), "--device", "cpu", "--n_scenarios", "1",
                       "--n_train", "8", "--batch_size", "2", "--steps", "1", "--warmup", "1", "--compile", "default",
                       "--profile", "prof", "--bf16", "off", cwd=tmp_path)
    assert RATIO.match(lines[-1]), lines[-1]
    assert any(line.endswith("project path compiled (default), prefix sharing auto; attention auto; float32")
               for line in lines)
    assert _row(lines, "steps with shared prefixes") == (0, 0)  # compiled steps run the plain pass
    assert any(line.startswith("| warm-up seconds (untimed; compilation included)") for line in lines)
    for path, compiled in (("naive", False), ("project", True)):
        events = json.loads((tmp_path / "prof" / f"train-{path}.json").read_text())["traceEvents"]
        assert any(str(e.get("name", "")).startswith("Torch-Compiled Region") for e in events) == compiled, path


@pytest.mark.slow
def test_bench_verify_prints_a_table_and_ends_with_the_ratio(tiny_model_dir, tmp_path):
    lines = run_script("bench_verify", "--model", str(tiny_model_dir), "--device", "cpu", "--n_scenarios", "2",
                       "--n_test", "4", "--n_prompts", "6", "--batch_size", "4", "--warmup", "2",
                       "--max_new_tokens", "3", "--continue_tokens", "3", "--profile", "prof", "--sdpa", "no-cudnn",
                       "--bf16", "off", cwd=tmp_path)
    assert RATIO.match(lines[-1]), lines[-1]
    assert lines[1].endswith("attention no-cudnn") and "(float32)" in lines[1]
    assert float(lines[-1].split()[1]) > 0
    assert any(line.startswith("| prompts/s") for line in lines)
    # the random model never answers A or B: both paths decode greedily and agree on every prompt
    assert any("same choice (A/B/unparseable) on 100.0% of prompts" in line for line in lines)
    # every prompt scored twice, in the same batches, with the same letters
    assert "same letters in both passes: yes" in lines
    first, second = _row(lines, "wall seconds")[1], _row(lines, "wall seconds, second pass (shapes seen)")[1]
    assert first > 0 and second > 0
    # profiled: 2 batches of 4 of the 6 prompts (the 2 scenarios share their prefix), every answer continued
    phases = [("selfinterp.verify.plan", 1), ("selfinterp.verify.shared_pass", 2), ("selfinterp.verify.head", 2),
              ("selfinterp.verify.continue", 2)]
    assert_profiled(tmp_path / "prof", "verify-project", phases, lines)
    assert_profiled(tmp_path / "prof", "verify-naive", [], lines)


def test_bf16_is_on_by_default_where_the_device_has_it_natively(tmp_path):
    bench = load_script("bench_common")
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    amx, avx2 = tmp_path / "amx", tmp_path / "avx2"
    amx.write_text("flags\t\t: fpu avx2 avx512f amx_bf16 amx_tile\n")
    avx2.write_text("flags\t\t: fpu avx2 fma\n")
    assert native_bf16(cpu, amx) and not native_bf16(cpu, avx2)
    assert not native_bf16(cpu, tmp_path / "absent")  # not Linux: no flags to read, float32
    assert native_bf16(cuda, avx2)
    assert bench.use_bf16("on", cpu) and not bench.use_bf16("off", cuda)
    assert bench.use_bf16("auto", cuda) and bench.use_bf16("auto", cpu) == native_bf16(cpu)


def test_gpu_busy_time_counts_overlapping_kernels_once():
    bench = load_script("bench_common")
    assert bench.covered([(20, 30), (0, 10), (5, 15), (12, 13), (29, 31)]) == 26  # [0,15] + [20,31]
    assert bench.covered([]) == 0


# --- training: the answer-only head gives the usual loss ----------------------------------------
def test_project_training_loss_equals_the_naive_full_vocabulary_loss(tiny_model_dir, tokenizer):
    bench = load_script("bench_train")
    module = bench.make_module(str(tiny_model_dir), torch.device("cpu"), bf16_base=False, seed=0)
    ramp_lora_b(module)  # a non-zero adapter, so that it takes part in the loss
    data = build_data(n_scenarios=2, n_train=3, n_val=0, n_test=1)
    items = [encode(tokenizer, r) for r in data.train]
    assert len({len(e.input_ids) for e in items}) > 1  # the batch is padded
    batch = collate(items, tokenizer.pad_token_id)
    assert module.layout_for(batch) is not None  # the project's step runs each shared prefix once
    losses, grads = [], []
    for loss_fn in (bench.project_loss, bench.naive_loss):
        module.zero_grad(set_to_none=True)
        loss = loss_fn(module, batch)
        loss.backward()
        losses.append(loss.item())
        grads.append({n: p.grad.clone() for n, p in module.named_parameters() if p.requires_grad})
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)
    for name, g in grads[0].items():  # float32 sums in another order (shared prefixes): within 1e-5
        torch.testing.assert_close(g, grads[1][name], rtol=1e-4, atol=1e-5)


def test_batch_orders_cover_the_data_the_naive_one_unsorted():
    bench = load_script("bench_train")
    lengths = [5, 9, 1, 7, 3, 8, 2, 6, 4, 10]
    for grouped in (True, False):
        batches = bench.batch_order(lengths, 3, grouped, seed=0, n_batches=4)
        assert len(batches) == 4 and sorted(i for b in batches for i in b) == list(range(10))
    assert bench.batch_order(lengths, 3, False, seed=0, n_batches=6)[4:] == bench.batch_order(lengths, 3, False, 1, 2)


# --- verification: prefix sharing changes nothing ---------------------------------------------
def _prompts(tokenizer) -> list[str]:
    data = build_data(n_scenarios=3, n_train=1, n_val=0, n_test=5)
    prompts = [prompt_text(tokenizer, r) for r in data.test]
    prompts.insert(4, "<|im_start|>user\nA or B?<|im_end|>\n<|im_start|>assistant\n")  # shares no prefix
    prompts.append(prompts[0])  # a duplicate: shares all but its last token
    return prompts


@pytest.mark.parametrize("which", ["chooser", "random"])
def test_shared_prefix_scoring_matches_one_unpadded_pass_per_prompt(tokenizer, chooser_model_dir, tiny_model_dir,
                                                                    monkeypatch, which):
    model = AutoModelForCausalLM.from_pretrained(chooser_model_dir if which == "chooser" else tiny_model_dir).eval()
    prompts = _prompts(tokenizer)
    calls = []
    shared = scoring._shared_last
    monkeypatch.setattr(scoring, "_shared_last", lambda *a, **k: calls.append(1) or shared(*a, **k))
    choices = score_prompts(model, tokenizer, prompts, batch_size=4, continue_tokens=3)
    assert calls  # the shared-prefix path ran
    expected = [naive_answer(model, tokenizer, p, 3) for p in prompts]
    assert [c.raw for c in choices] == [raw for raw, _ in expected]
    assert [c.selection for c in choices] == [parse_answer(raw) for raw, _ in expected]
    assert [c.p_b for c in choices] == pytest.approx([p for _, p in expected], abs=1e-5)
    if which == "chooser":
        assert {c.selection for c in choices} == {"A", "B"}
    # the plain left-padded path gives the same
    monkeypatch.setattr(scoring, "can_share", lambda model: False)
    plain = score_prompts(model, tokenizer, prompts, batch_size=4, continue_tokens=3)
    assert [c.raw for c in plain] == [c.raw for c in choices]
    assert [c.p_b for c in plain] == pytest.approx([c.p_b for c in choices], abs=1e-5)


def test_scoring_matches_naive_generate_and_parse_on_clean_answers(tokenizer, stubborn_model_dir):
    """With a model whose greedy text is fixed, the naive baseline and the verifier read the same answers."""
    bench = load_script("bench_verify")
    model = AutoModelForCausalLM.from_pretrained(stubborn_model_dir).eval()
    prompts = _prompts(tokenizer)[:6]
    naive, generated = bench.naive_verify(model, tokenizer, prompts, batch_size=4, max_new_tokens=3)
    choices = score_prompts(model, tokenizer, prompts, batch_size=4, continue_tokens=3)
    assert generated == 3 * len(prompts)
    assert [(c.raw, c.selection) for c in choices] == naive
    assert bench.project_tokens(model, tokenizer(prompts, add_special_tokens=False)["input_ids"], 4) < sum(
        len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts)


def test_prefix_groups_partition_prompts_by_shared_prefix():
    base = list(range(100, 130))
    ids = [base + [1, 2], base + [1, 3, 4], [7, 8, 9], base[:20] + [5], base + [1, 2], [7, 8, 9, 10], [3]]
    groups = prefix_groups(ids, min_prefix=16)
    assert sorted(i for members, _ in groups for i in members) == list(range(len(ids)))
    for members, p in groups:
        assert p == 0 or p >= 16
        for i in members:
            assert p < len(ids[i]) and ids[i][:p] == ids[members[0]][:p]
    shared = {frozenset(members): p for members, p in groups if p}
    # the four prompts starting with `base` share 20 tokens, but three of them share 31: keeping the
    # 20-token group saves 3 * 20 = 60 tokens, splitting it 2 * 31 = 62
    assert shared == {frozenset({0, 1, 4}): 31}
    assert prefix_groups([]) == []
    assert prefix_groups([[1, 2, 3]]) == [([0], 0)]


def test_real_prompts_of_a_scenario_share_their_system_prompt_instruction_and_question(tokenizer):
    data = build_data(n_scenarios=2, n_train=1, n_val=0, n_test=10)
    ids = tokenizer([prompt_text(tokenizer, r) for r in data.test], add_special_tokens=False)["input_ids"]
    groups = prefix_groups(ids)
    assert all(p >= 50 for _, p in groups)
    saved = sum((len(m) - 1) * p for m, p in groups)
    assert saved / sum(map(len, ids)) > 0.25


@pytest.mark.parametrize("window, shared", [(512, True), (64, False)])
def test_sliding_window_models_share_prefixes_only_when_the_window_spans_the_batch(tokenizer, monkeypatch, window,
                                                                                   shared):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(
        vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, sliding_window=window, max_position_embeddings=1024,
        layer_types=["sliding_attention", "full_attention"], pad_token_id=2, eos_token_id=2, bos_token_id=1,
    )
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(config).eval()
    prompts = _prompts(tokenizer)[:6]
    results = []
    original = scoring._shared_last
    monkeypatch.setattr(scoring, "_shared_last", lambda *a, **k: results.append(original(*a, **k)) or results[-1])
    choices = score_prompts(model, tokenizer, prompts, batch_size=4, continue_tokens=2)
    assert results and all((r is not None) == shared for r in results)
    expected = [naive_answer(model, tokenizer, p, 2) for p in prompts]
    assert [c.raw for c in choices] == [raw for raw, _ in expected]
    assert [c.p_b for c in choices] == pytest.approx([p for _, p in expected], abs=1e-5)


# --- memory the backward pass keeps ---------------------------------------------------------------
def test_activation_memory_counts_what_backward_keeps_per_token(tiny_model_dir, tokenizer, capsys):
    """Saved bytes grow with the tokens, not the weights; gradient checkpointing keeps far fewer."""
    mem = load_script("activation_memory")
    item = encode(tokenizer, build_data(n_scenarios=1, n_train=1, n_val=0, n_test=1).train[0])
    saved = {}
    for checkpointing in (False, True):
        module = DecisionLM(model=str(tiny_model_dir), gradient_checkpointing=checkpointing).train()
        for rows in (1, 2):  # the same prompt once and twice: no padding, twice the tokens
            for share in (False, True):
                batch = collate([item] * rows, tokenizer.pad_token_id, share=share)
                saved[checkpointing, rows, share] = mem.saved_bytes(module, batch, bf16=False)
    head = module.causal_lm.get_output_embeddings().weight
    assert saved[False, 1, False] < head.numel() * head.element_size() / 4  # the weights the graph holds are not counted
    assert saved[False, 2, False] / saved[False, 1, False] == pytest.approx(2, abs=0.1)
    assert saved[True, 2, False] / saved[True, 1, False] == pytest.approx(2, abs=0.1)
    assert saved[True, 1, False] < saved[False, 1, False] / 2
    # two rows that share all but their last prompt token: that prefix's activations are kept once
    assert saved[False, 2, True] < 0.8 * saved[False, 2, False]  # 0.71 on this tiny model
    assert saved[True, 2, True] == saved[True, 2, False]  # checkpointed layers run the plain pass
    mem.main(["--model", str(tiny_model_dir), "--device", "cpu", "--fp32", "--n_scenarios", "2", "--batch_size", "2"])
    out = capsys.readouterr().out
    assert re.search(r"\| gradient checkpointing off \|\s+2 \|", out) and "| gradient checkpointing on " in out
    assert "positions run" in out
    assert "GiB at batch 128" in out
