"""Helpers shared by the benchmark scripts (device, peak FLOP/s, memory, positions run, profile, table)."""

from __future__ import annotations

import argparse
import os
import platform
import resource
import sys
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python scripts/bench_*.py` from anywhere, without installing
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from selfinterp.devices import native_bf16  # noqa: E402

# Dense bf16 tensor-core peaks (TFLOP/s) of the cards MFU is computed against when --peak_tflops is unset.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0, "L4": 121.0}


def pick_device(name: str) -> torch.device:
    """``auto`` is cuda when available, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__})"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads (torch {torch.__version__})"


def peak_flops(device: torch.device, override_tflops: float | None) -> tuple[float | None, str]:
    """The peak FLOP/s that MFU is computed against, and where it came from."""
    if override_tflops:
        return override_tflops * 1e12, f"{override_tflops:g} TFLOP/s (--peak_tflops)"
    if device.type != "cuda":
        return None, "n/a on CPU"
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_BF16_TFLOPS.items():
        if key in name:
            return tflops * 1e12, f"{tflops:g} TFLOP/s (assumed bf16 dense peak of {key})"
    return None, f"unknown for {name}; pass --peak_tflops"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> tuple[float, str]:
    """CUDA max allocated on GPU; this process's max RSS on CPU (ru_maxrss is KiB on Linux, bytes on macOS)."""
    if device.type == "cuda":
        return float(torch.cuda.max_memory_allocated(device)), "CUDA max allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return float(rss if sys.platform == "darwin" else rss * 1024), "process max RSS"


def positions_run(module, batch: dict) -> int:
    """Token positions (padding included) that ``module``'s training pass runs through the decoder for
    ``batch``: the shared prefixes plus the suffixes where it shares them, else the whole batch."""
    shared = module.layout_for(batch)
    return int(shared["prefix_ids"].numel() + shared["suffix_ids"].numel() if shared is not None
               else batch["input_ids"].numel())


SDPA_CHOICES = ("auto", "no-cudnn")


def set_sdpa(choice: str) -> None:
    """``no-cudnn`` keeps this process's scaled-dot-product attention off cuDNN's kernels, which build an
    execution graph for each new set of shapes; ``auto`` leaves torch's choice."""
    if choice == "no-cudnn":
        torch.backends.cuda.enable_cudnn_sdp(False)


BF16_CHOICES = ("auto", "on", "off")


def use_bf16(choice: str, device: torch.device) -> bool:
    """``--bf16``: ``auto`` is on where :func:`native_bf16` holds, ``on`` and ``off`` force it."""
    return native_bf16(device) if choice == "auto" else choice == "on"


def autocast(device: torch.device, enabled: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def profile(fn: Callable[[], object], device: torch.device, path: Path, units: int, unit: str) -> str:
    """Run ``fn`` once under torch.profiler; write its phases and top operations to ``path`` and a Chrome
    trace (``path`` with ``.json``) beside it; return a one-line summary.

    The summary says what bounds the run: on GPU, kernel launches per ``unit`` and the share of the
    wall time the GPU was busy (low means it waits for the CPU to dispatch operations, so fewer, larger
    operations pay, not faster kernels); on CPU, aten calls per ``unit`` (nested calls included).
    """
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from selfinterp.atomic import atomic_path, write_text

    gpu = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
    sync(device)
    wall = time.perf_counter()
    with torch_profile(activities=activities) as prof:
        fn()
        sync(device)
    wall = time.perf_counter() - wall
    events = prof.key_averages()
    phases = [[e.key, e.count, e.cpu_time_total / 1e3, e.device_time_total / 1e3 if gpu else None]
              for e in events if e.key.startswith("selfinterp.")]
    if gpu:
        launches = sum(e.count for e in events if "LaunchKernel" in e.key)
        busy = covered([(e.time_range.start, e.time_range.end) for e in prof.events()
                        if e.device_type == DeviceType.CUDA and not e.name.startswith("selfinterp.")]) / 1e6
        summary = (f"{wall:.3f} s wall for {units} {unit}(s); {launches / units:,.0f} kernel launches per {unit}; "
                   f"GPU busy {100 * busy / wall:.0f}% of the wall time")
    else:
        calls = sum(e.count for e in events if e.key.startswith("aten::"))
        summary = f"{wall:.3f} s wall for {units} {unit}(s); {calls / units:,.0f} aten calls per {unit} (nested included)"
    sort = "self_device_time_total" if gpu else "self_cpu_time_total"
    text = "\n".join([summary, "", table_text(["phase", "calls", "CPU ms", "GPU ms"], phases), "",
                      events.table(sort_by=sort, row_limit=30, max_name_column_width=70)])
    write_text(path, text + "\n")
    with atomic_path(path.with_suffix(".json")) as tmp:
        prof.export_chrome_trace(str(tmp))
    return summary


def covered(spans: list[tuple[float, float]]) -> float:
    """Length of the union of ``(start, end)`` intervals: time during which at least one of them ran."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(spans):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def table_text(headers: list[str], rows: list[list]) -> str:
    """A Markdown table: first column left-aligned, the others right-aligned, numbers formatted by ``fmt``."""
    cells = [[str(h) for h in headers]] + [[fmt(v) for v in row] for row in rows]
    widths = [max(len(r[k]) for r in cells) for k in range(len(headers))]
    line = lambda r: "| " + " | ".join(c.ljust(w) if k == 0 else c.rjust(w) for k, (c, w) in enumerate(zip(r, widths))) + " |"
    return "\n".join([line(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells[1:])])


def print_table(headers: list[str], rows: list[list]) -> None:
    print(table_text(headers, rows))


def base_parser(doc: str, timing: bool = True) -> argparse.ArgumentParser:
    """The options the scripts share: model, device, threads; with ``timing``, the MFU peak and --profile."""
    from selfinterp.models import EMBEDDED

    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=EMBEDDED, help="model name or local transformers folder (default: %(default)s)")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    if not timing:
        return parser
    parser.add_argument("--peak_tflops", type=float, help="peak for MFU (default: the card's bf16 dense peak when known)")
    parser.add_argument("--bf16", choices=BF16_CHOICES, default="auto",
                        help="bf16 autocast (the project path also with bf16 frozen weights): auto is on for a GPU "
                             "or a CPU with native bf16 (AMX, AVX512-BF16), else float32 (default: %(default)s)")
    parser.add_argument("--sdpa", choices=SDPA_CHOICES, default="auto",
                        help="attention kernels: auto (torch's choice) or no-cudnn (any but cuDNN's, which builds a "
                             "graph per new shape; GPU only) (default: %(default)s)")
    parser.add_argument("--profile", type=Path, metavar="DIR",
                        help="after the timed run, profile each path briefly (torch.profiler) and write its phases, "
                             "top operations and a Chrome trace to DIR/<bench>-<path>.txt/.json")
    return parser
