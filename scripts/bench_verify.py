"""Verification throughput: the project's verifier against naive generate-and-parse, same prompts and model.

project  selfinterp.scoring.score_prompts: prompts grouped by shared token prefix (each prefix run
         once, its key/value cache reused), the output head at the last position only, greedy
         decoding only where the first token is not A or B.
naive    what the public reproduction did: HF generate (greedy, up to --max_new_tokens new tokens)
         on each left-padded batch in the given order, then decode and parse the text.

Both use the same model object: bf16 weights under bf16 autocast (--bf16; by default on a GPU or a CPU
with native bf16), else float32. They take
turns on rounds of ``--chunk`` prompts, so that both see the same machine load. Every prompt is then
scored a second time, in the same batches: that pass shows what is left once the kernels that prepare
per new shape (cuDNN's attention builds a graph for each) have seen them all, as in the second and
later epochs of a training run. The last line is ``ratio: <project / naive>`` of prompts/s in the first
pass. Defaults: 64 prompts on CPU, the paper's 5,000 held-out prompts (100 scenarios x 50) on GPU.

    python scripts/bench_verify.py                     # cuda if available, else cpu
    python scripts/bench_verify.py --device cpu --n_prompts 16 --batch_size 8
    python scripts/bench_verify.py --batch_size 512 --profile results/profile   # where the time goes
    python scripts/bench_verify.py --batch_size 1024 --sdpa no-cudnn   # attention without cuDNN's kernels
"""

from __future__ import annotations

import time
import warnings

import bench_common as bc
import torch

from selfinterp.datamodule import prompt_text
from selfinterp.dataset import build_data
from selfinterp.models import load_model, load_tokenizer
from selfinterp.prefix import can_share
from selfinterp.scoring import _plan, parse_answer, score_prompts

PAPER_TEST = 5000  # held-out prompts verified per epoch in the paper setting


@torch.no_grad()
def naive_verify(model, tokenizer, prompts: list[str], batch_size: int, max_new_tokens: int = 10) -> tuple[list[tuple[str, str]], int]:
    """(raw text, parsed letter) per prompt from ``generate`` on left-padded batches; and the tokens generated."""
    device = next(model.parameters()).device
    out, generated_tokens = [], 0
    for start in range(0, len(prompts), batch_size):
        enc = tokenizer(prompts[start:start + batch_size], add_special_tokens=False, padding=True,
                        padding_side="left", return_tensors="pt").to(device)
        seqs = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        new = seqs[:, enc["input_ids"].shape[1]:]
        generated_tokens += new.numel()
        for text in tokenizer.batch_decode(new, skip_special_tokens=True):
            out.append((text, parse_answer(text)))
    return out, generated_tokens


def project_tokens(model, ids: list[list[int]], batch_size: int) -> int:
    """Tokens the project's verifier runs through the model in its first pass (prefixes once per batch)."""
    total = 0
    for batch in _plan(ids, batch_size, can_share(model)):
        prefixes = {tuple(ids[i][:p]) for i, p in batch if p}
        total += sum(len(ids[i]) - p for i, p in batch) + sum(len(k) for k in prefixes)
    return total


def main(argv: list[str] | None = None) -> None:
    parser = bc.base_parser(__doc__)
    parser.add_argument("--n_scenarios", type=int, help="scenarios to take test prompts from (default: 2 on CPU, 100 on GPU)")
    parser.add_argument("--n_test", type=int, default=50, help="held-out prompts per scenario (default: %(default)s, the paper's)")
    parser.add_argument("--n_prompts", type=int, help="prompts to verify, the first of the test set (default: 64 on CPU, 5000 on GPU)")
    parser.add_argument("--batch_size", type=int, help="prompts per batch, both paths (default: 16 on CPU, 64 on GPU)")
    parser.add_argument("--chunk", type=int, help="prompts per round; the paths take turns (default: one batch on CPU, 1000 on GPU)")
    parser.add_argument("--max_new_tokens", type=int, default=10, help="naive generate length (default: %(default)s)")
    parser.add_argument("--continue_tokens", type=int, default=8, help="project: greedy tokens when not A/B (default: %(default)s)")
    parser.add_argument("--warmup", type=int, help="prompts scored untimed by each path first (default: 4 on CPU, 256 on GPU)")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = bc.pick_device(args.device)
    bc.set_sdpa(args.sdpa)
    gpu = device.type == "cuda"
    bf16 = bc.use_bf16(args.bf16, device)
    n_scenarios = args.n_scenarios or (100 if gpu else 2)
    n_prompts = args.n_prompts or (5000 if gpu else 64)
    warmup = args.warmup if args.warmup is not None else (256 if gpu else 4)
    batch_size = args.batch_size or (64 if gpu else 16)
    chunk = args.chunk or (1000 if gpu else batch_size)
    if n_prompts > n_scenarios * args.n_test:
        parser.error(f"--n_prompts {n_prompts} > {n_scenarios} scenarios x {args.n_test} test prompts")

    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model)
    if bf16:
        model = model.to(torch.bfloat16)
    model = model.to(device).eval()
    data = build_data(n_scenarios=n_scenarios, n_train=1, n_val=0, n_test=args.n_test)
    prompts = [prompt_text(tokenizer, r) for r in data.test[:n_prompts]]
    ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    prompt_tokens = sum(map(len, ids))
    print(f"device: {bc.describe(device)}")
    print(f"model: {args.model} ({'bf16 weights, bf16 autocast' if bf16 else 'float32'}); {n_prompts} prompts from "
          f"{n_scenarios} scenarios ({prompt_tokens / n_prompts:.0f} tokens each on average); batch {batch_size}; "
          f"rounds of {chunk} prompts, the paths in turn; {warmup} warm-up prompts per path; attention {args.sdpa}")

    paths = {
        "naive": lambda ps: naive_verify(model, tokenizer, ps, batch_size, args.max_new_tokens),
        "project": lambda ps: score_prompts(model, tokenizer, ps, batch_size, args.continue_tokens),
    }

    def timed_pass() -> tuple[dict[str, list], dict[str, list[float]]]:
        """Every prompt once per path, in rounds of ``chunk`` taking turns (order swapped every round), so
        that both paths see the same machine load: each path's outputs and (wall, process CPU) seconds."""
        results = {name: [] for name in paths}
        seconds = {name: [0.0, 0.0] for name in paths}
        for r, start in enumerate(range(0, n_prompts, chunk)):
            for name in list(paths) if r % 2 == 0 else list(paths)[::-1]:
                bc.sync(device)
                wall, cpu = time.perf_counter(), time.process_time()
                results[name].append(paths[name](prompts[start:start + chunk]))
                bc.sync(device)
                seconds[name][0] += time.perf_counter() - wall
                seconds[name][1] += time.process_time() - cpu
        return results, seconds

    with bc.autocast(device, enabled=bf16):
        if warmup:
            for fn in paths.values():
                fn(prompts[:warmup])
        results, seconds = timed_pass()
        # The same batches again: kernels that prepare per new shape (cuDNN attention builds a graph) are
        # now ready, as they are from the second epoch of a training run on.
        again, seconds_again = timed_pass()
        if args.profile:  # two batches per path, after the timing, so that it does not slow the timed rounds
            sample = prompts[:2 * batch_size]
            batches = -(-len(sample) // batch_size)
            for name, fn in paths.items():
                summary = bc.profile(lambda: fn(sample), device, args.profile / f"verify-{name}.txt", batches, "batch")
                print(f"profile {name}: {summary} -> {args.profile / f'verify-{name}.txt'}")

    def answers(res: dict[str, list]) -> tuple[list[tuple[str, str]], list]:
        """One pass's (text, letter) per prompt from the naive path and Choice per prompt from the project's."""
        return [answer for part, _ in res["naive"] for answer in part], [c for part in res["project"] for c in part]

    def letters(res: dict[str, list]) -> tuple[list[str], list[str]]:
        naive_answers, project_choices = answers(res)
        return [sel for _, sel in naive_answers], [c.selection for c in project_choices]

    naive, choices = answers(results)
    new_tokens = sum(n for _, n in results["naive"])
    (naive_s, naive_cpu), (proj_s, proj_cpu) = seconds["naive"], seconds["project"]
    computed = sum(project_tokens(model, ids[k:k + chunk], batch_size) for k in range(0, n_prompts, chunk))
    agree = sum(c.selection == sel for c, (_, sel) in zip(choices, naive)) / n_prompts
    n_params = sum(p.numel() for p in model.parameters())
    peak, peak_note = bc.peak_flops(device, args.peak_tflops)
    rows = [
        ["wall seconds", naive_s, proj_s],
        ["wall seconds, second pass (shapes seen)", seconds_again["naive"][0], seconds_again["project"][0]],
        ["CPU seconds (process)", naive_cpu, proj_cpu],
        ["prompts/s", n_prompts / naive_s, n_prompts / proj_s],
        ["prompt tokens/s", prompt_tokens / naive_s, prompt_tokens / proj_s],
        ["tokens through the model (first pass)", prompt_tokens, computed],
        ["generated tokens", new_tokens, None],
        ["unparseable answers", sum(not sel for _, sel in naive), sum(not c.selection for c in choices)],
        ["answers A", sum(sel == "A" for _, sel in naive), sum(c.selection == "A" for c in choices)],
    ]
    if peak:
        rows.append(["MFU % (2*N*tokens/s / peak)", 100.0 * 2 * n_params * (prompt_tokens + new_tokens) / naive_s / peak,
                     100.0 * 2 * n_params * computed / proj_s / peak])
    rows.append([f"projected {PAPER_TEST} prompts, s", PAPER_TEST * naive_s / n_prompts, PAPER_TEST * proj_s / n_prompts])
    rows.append([f"projected {PAPER_TEST} prompts, second pass, s", PAPER_TEST * seconds_again["naive"][0] / n_prompts,
                 PAPER_TEST * seconds_again["project"][0] / n_prompts])
    bc.print_table(["verify", "naive generate", "project"], rows)
    print(f"same letters in both passes: {'yes' if letters(again) == letters(results) else 'NO'}")
    print(f"same choice (A/B/unparseable) on {100 * agree:.1f}% of prompts; N = {n_params:,} parameters; "
          f"peak for MFU: {peak_note}")
    print(f"ratio: {(n_prompts / proj_s) / (n_prompts / naive_s):.2f}")


if __name__ == "__main__":
    main()
