"""Training-step throughput: the project's step against a naive loop, same data and model, one run.

project  length-grouped batches (ShuffledBatchSampler), on the CPU each prompt prefix the batch shares
         run once (selfinterp.prefix, as collate lays it out; --share_prefix), DecisionLM.answer_logits (output
         head at the answer positions only) + cross entropy, backward, AdamW on the LoRA parameters; with bf16
         (--bf16; by default on a GPU or a CPU with native bf16) the frozen base weights in bf16 (as
         DecisionLM.setup under bf16 precision) under bf16 autocast;
         with --compile MODE, the decoder compiled as ``model.compile`` does (compiled in the warm-up steps;
         a compiled step runs the plain pass, without prefix sharing).
naive    random-order batches padded to the longest, model(input_ids, attention_mask, labels=labels)
         (full-vocabulary logits at every position), backward, AdamW on the same LoRA parameters;
         with bf16, fp32 frozen weights under bf16 autocast.

Each path runs in its own process (so peak memory is its own: CUDA max allocated on GPU, max RSS on
CPU); both processes stay alive and take steps in turn, so that both see the same machine load.
Throughput counts real (non-padding) tokens over the timed steps only; a step's time includes building
its batch (padding, and for the project the shared-prefix layout). The last line is
``ratio: <project / naive>`` of tokens/s. Defaults: small on CPU (4 steps of batch 4), the paper's full epoch on GPU (5,000
training prompts, batch 16).

    python scripts/bench_train.py                      # cuda if available, else cpu
    python scripts/bench_train.py --device cpu --steps 4 --batch_size 4
    python scripts/bench_train.py --steps 30 --batch_size 128 --profile results/profile   # where the time goes
    python scripts/bench_train.py --compile default --warmup 3   # the project's step compiled (model.compile)
    python scripts/bench_train.py --share_prefix off   # the project's step without prefix sharing
    python scripts/bench_train.py --sdpa no-cudnn      # both paths' attention without cuDNN's kernels (GPU)
"""

from __future__ import annotations

import math
import multiprocessing as mp
import random
import time
import traceback
import warnings

import bench_common as bc
import torch
import torch.nn.functional as F
from lightning.fabric.utilities import move_data_to_device
from torch.profiler import record_function

from selfinterp.datamodule import ShuffledBatchSampler, collate, encode_all
from selfinterp.dataset import build_data
from selfinterp.module import DecisionLM

PAPER_EPOCH = 5000  # training prompts in the paper's epoch (100 scenarios x 50)
PATHS = ("naive", "project")
SHARE = {"auto": None, "on": True, "off": False}  # --share_prefix -> model.share_prefix


def project_loss(module: DecisionLM, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The project's training loss: output head at the answer positions only."""
    logits, targets, _ = module.answer_logits(batch)
    return F.cross_entropy(logits, targets)


def naive_loss(module: DecisionLM, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The usual transformers loss: full-vocabulary logits at every position, shifted labels."""
    return module.net(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss


def make_module(model: str, device: torch.device, bf16_base: bool, seed: int, compile: str | None = None,
                share_prefix: bool | None = None) -> DecisionLM:
    """DecisionLM with the default LoRA adapter (same seed, same initial adapter for both paths)."""
    torch.manual_seed(seed)
    module = DecisionLM(model=model, compile=compile, share_prefix=share_prefix)
    if bf16_base:  # what DecisionLM.setup does under bf16 precision
        module.cast_frozen(torch.bfloat16)
    return module.to(device).train()


def batch_order(lengths: list[int], batch_size: int, grouped: bool, seed: int, n_batches: int) -> list[list[int]]:
    """``n_batches`` batches over as many epochs as needed: the project's sampler, or plain random order."""
    out: list[list[int]] = []
    epoch = 0
    while len(out) < n_batches:
        if grouped:
            sampler = ShuffledBatchSampler(lengths, batch_size, group_by_length=True, seed=seed)
            sampler.set_epoch(epoch)
            out += list(sampler)
        else:
            order = list(range(len(lengths)))
            random.Random(seed + epoch).shuffle(order)
            out += [order[k:k + batch_size] for k in range(0, len(order), batch_size)]
        epoch += 1
    return out[:n_batches]


class PathRunner:
    """One path's model, optimizer and batches, stepping on request."""

    def __init__(self, cfg: dict) -> None:
        warnings.filterwarnings("ignore", category=FutureWarning)
        if cfg["threads"]:
            torch.set_num_threads(cfg["threads"])
        bc.set_sdpa(cfg["sdpa"])
        self.device = device = torch.device(cfg["device"])
        self.bf16 = cfg["bf16"]
        project = cfg["path"] == "project"
        self.module = make_module(cfg["model"], device, bf16_base=project and cfg["bf16"], seed=cfg["seed"],
                                  compile=cfg["compile"] if project else None, share_prefix=cfg["share_prefix"])
        self.tokenizer = self.module.tokenizer
        # the layout collate adds for shared prefixes, where this path's training steps run it
        self.share = project and self.module.shares_prefixes(device, training=True)
        data = build_data(n_scenarios=cfg["n_scenarios"], n_train=cfg["n_train"], n_val=0, n_test=1)
        self.encoded = encode_all(self.tokenizer, data.train)
        self.lengths = [len(e.input_ids) for e in self.encoded]
        steps = cfg["steps"] or math.ceil(len(self.encoded) / cfg["batch_size"])
        self.order = batch_order(self.lengths, cfg["batch_size"], grouped=project, seed=cfg["seed"],
                                 n_batches=cfg["warmup"] + steps + cfg["profile_steps"])
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=2e-4, weight_decay=0.0)
        self.loss_fn = project_loss if project else naive_loss
        self.next = 0
        self.stats = {"steps": 0, "examples": 0, "tokens": 0, "padded": 0, "run": 0, "shared_steps": 0, "seconds": 0.0,
                      "cpu_seconds": 0.0, "loss_sum": 0.0, "warmup_seconds": 0.0}

    def step(self, timed: bool) -> float:
        """One training step; its statistics count when ``timed``. Returns its wall seconds."""
        idx = self.order[self.next]
        self.next += 1
        bc.sync(self.device)
        wall, cpu = time.perf_counter(), time.process_time()
        with record_function("selfinterp.train.batch"):
            batch = collate([self.encoded[i] for i in idx], self.tokenizer.pad_token_id, share=self.share)
            batch = move_data_to_device(batch, self.device)
        with record_function("selfinterp.train.forward"), bc.autocast(self.device, enabled=self.bf16):
            loss = self.loss_fn(self.module, batch)
        with record_function("selfinterp.train.backward"):
            loss.backward()
        with record_function("selfinterp.train.optimizer"):
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        bc.sync(self.device)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        if timed:
            st = self.stats
            st["steps"] += 1
            st["examples"] += len(idx)
            st["tokens"] += sum(self.lengths[i] for i in idx)
            st["padded"] += len(idx) * max(self.lengths[i] for i in idx)
            st["run"] += bc.positions_run(self.module, batch)
            st["shared_steps"] += self.module.layout_for(batch) is not None
            st["seconds"] += wall
            st["cpu_seconds"] += cpu
            st["loss_sum"] += float(loss.detach())
        return wall

    def summary(self) -> dict:
        memory, memory_kind = bc.peak_memory(self.device)
        return {**self.stats, "loss": self.stats["loss_sum"] / max(1, self.stats["steps"]), "memory": memory,
                "cudnn_sdpa": torch.backends.cuda.cudnn_sdp_enabled(),
                "memory_kind": memory_kind, "n_params": sum(p.numel() for p in self.module.parameters()),
                "n_trainable": sum(p.numel() for p in self.params)}


def worker(cfg: dict, conn) -> None:
    """A path in its own process (so that peak memory is its own), answering "warmup", "reset", "step", "summary"."""
    try:
        path = PathRunner(cfg)
        conn.send(("ok", len(path.order) - cfg["warmup"] - cfg["profile_steps"]))
        while True:
            cmd = conn.recv()
            if cmd == "warmup":
                path.stats["warmup_seconds"] += path.step(timed=False)
            elif cmd == "reset":
                bc.reset_peak_memory(path.device)
            elif cmd == "step":
                path.step(timed=True)
            elif cmd == "profile":
                n = cfg["profile_steps"]
                file = cfg["profile"] / f"train-{cfg['path']}.txt"
                summary = bc.profile(lambda: [path.step(timed=False) for _ in range(n)], path.device, file, n, "step")
                conn.send(("ok", f"{summary} -> {file}"))
                continue
            elif cmd == "summary":
                conn.send(("ok", path.summary()))
                return
            conn.send(("ok", None))
    except Exception:  # report it in the parent
        conn.send(("error", traceback.format_exc()))


def run_paths(cfg: dict) -> dict[str, dict]:
    """Both paths in live processes, stepping in turn (the order swapped every step), so that they share
    whatever else the machine is doing; each path's timing covers its own steps only."""
    ctx = mp.get_context("spawn")
    conns, procs = {}, []
    for name in PATHS:
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=worker, args=({**cfg, "path": name}, child), daemon=True)
        proc.start()
        conns[name] = parent
        procs.append(proc)

    def ask(name: str, cmd: str | None = None):
        if cmd is not None:
            conns[name].send(cmd)
        status, value = conns[name].recv()
        if status == "error":
            raise RuntimeError(f"the {name} path failed:\n{value}")
        return value

    try:
        steps = min(ask(name) for name in PATHS)
        for _ in range(cfg["warmup"]):
            for name in PATHS:
                ask(name, "warmup")
        for name in PATHS:
            ask(name, "reset")
        for k in range(steps):
            for name in PATHS if k % 2 == 0 else PATHS[::-1]:
                ask(name, "step")
        if cfg["profile_steps"]:  # after the timed steps, so that profiling does not slow them
            for name in PATHS:
                print(f"profile {name}: {ask(name, 'profile')}")
        return {name: ask(name, "summary") for name in PATHS}
    finally:
        for proc in procs:
            proc.join(timeout=60)
            if proc.is_alive():
                proc.terminate()


def main(argv: list[str] | None = None) -> None:
    parser = bc.base_parser(__doc__)
    parser.add_argument("--n_scenarios", type=int, help="scenarios to draw training prompts from (default: 2 on CPU, 100 on GPU)")
    parser.add_argument("--n_train", type=int, default=50, help="training prompts per scenario (default: %(default)s, the paper's)")
    parser.add_argument("--batch_size", type=int, help="examples per step (default: 4 on CPU, 16 on GPU)")
    parser.add_argument("--steps", type=int, help="timed steps per path (default: 4 on CPU, one full epoch on GPU)")
    parser.add_argument("--warmup", type=int, help="untimed steps first, per path (default: 2 on CPU, 5 on GPU)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compile", choices=["default", "reduce-overhead", "max-autotune"],
                        help="compile the project path's decoder in this torch.compile mode (model.compile); "
                             "it compiles during the warm-up steps, whose time is reported apart")
    parser.add_argument("--share_prefix", choices=list(SHARE), default="auto",
                        help="prefix sharing in the project path, as model.share_prefix: auto (the default; "
                             "on the CPU only), on or off")
    args = parser.parse_args(argv)
    device = bc.pick_device(args.device)
    gpu = device.type == "cuda"
    n_scenarios = args.n_scenarios or (100 if gpu else 2)
    batch_size = args.batch_size or (16 if gpu else 4)
    steps = args.steps if args.steps is not None else (0 if gpu else 4)  # 0: one full epoch
    warmup = args.warmup if args.warmup is not None else (5 if gpu else 2)
    cfg = dict(model=args.model, device=str(device), n_scenarios=n_scenarios, n_train=args.n_train,
               batch_size=batch_size, steps=steps, warmup=warmup, seed=args.seed, threads=args.threads, compile=args.compile,
               share_prefix=SHARE[args.share_prefix], sdpa=args.sdpa, bf16=bc.use_bf16(args.bf16, device),
               profile=args.profile, profile_steps=3 if args.profile else 0)
    print(f"device: {bc.describe(device)}")
    print(f"model: {args.model}; {n_scenarios * args.n_train} training prompts; batch {batch_size}; "
          f"{'one full epoch' if not steps else f'{steps} steps'} per path after {warmup} warm-up step(s); "
          f"project path {'compiled (' + args.compile + ')' if args.compile else 'eager'}, prefix sharing {args.share_prefix}; "
          f"attention {args.sdpa}; {'bf16 autocast' if cfg['bf16'] else 'float32'}")
    results = run_paths(cfg)
    naive, proj = results["naive"], results["project"]
    peak, peak_note = bc.peak_flops(device, args.peak_tflops)
    rows = []

    def row(name, f):
        rows.append([name, f(naive), f(proj)])

    row("timed steps", lambda r: r["steps"])
    row("examples", lambda r: r["examples"])
    row("real tokens", lambda r: r["tokens"])
    row("padding (% of batch tokens)", lambda r: 100.0 * (1 - r["tokens"] / r["padded"]))
    row("token positions run (padding included)", lambda r: r["run"])
    row("steps with shared prefixes", lambda r: r["shared_steps"])
    row("cuDNN attention allowed", lambda r: "yes" if r["cudnn_sdpa"] else "no")
    row("warm-up seconds (untimed; compilation included)", lambda r: r["warmup_seconds"])
    row("wall seconds", lambda r: r["seconds"])
    row("CPU seconds (process)", lambda r: r["cpu_seconds"])
    row("tokens/s", lambda r: r["tokens"] / r["seconds"])
    row("examples/s", lambda r: r["examples"] / r["seconds"])
    row(f"peak memory MiB ({naive['memory_kind']})", lambda r: r["memory"] / 2**20)
    row("mean loss over timed steps", lambda r: r["loss"])
    if peak:
        row("MFU % (6*N*tokens/s / peak)", lambda r: 100.0 * 6 * r["n_params"] * r["tokens"] / r["seconds"] / peak)
    row(f"projected epoch of {PAPER_EPOCH} prompts, s", lambda r: PAPER_EPOCH / (r["examples"] / r["seconds"]))
    bc.print_table(["train step", "naive", "project"], rows)
    print(f"N = {proj['n_params']:,} parameters ({proj['n_trainable']:,} trainable LoRA); peak for MFU: {peak_note}")
    print(f"ratio: {(proj['tokens'] / proj['seconds']) / (naive['tokens'] / naive['seconds']):.2f}")


if __name__ == "__main__":
    main()
