"""Run the variants of a sweep file one after another, then print their ablation table.

A sweep file is YAML (see configs/sweeps/):

    base: configs/smollm2-135m.yaml        # the config every run starts from
    name: instill-135m                     # the runs log to <name>/<run>
    common: ["--trainer.max_epochs=2"]     # optional: options every run gets first
    runs:
      faithful: []                         # the base config as it is
      lr-5e-5: ["--model.optimizer.init_args.lr=5e-5"]

Each run is ``python -m selfinterp fit --config <base> <common options> <its options> <--extra options>
--trainer.logger.init_args.name=<name>/<run>``, so its results land in ``results/<name>/<run>/version_N/`` and its
checkpoint in ``lightning_logs/<name>/<run>/checkpoints/``. A failed run is reported and the others
still run. The table at the end is ``python -m selfinterp report results/<name>``.

A small model leaves most of a GPU idle (on an H100, each run's step rate was set by its own process,
not by the card), so ``--parallel N`` trains N runs at once on the same devices; each run's output
then goes to ``<results>/<name>/<run>.log`` instead of the terminal. ``--timeout S`` stops a run (its
process group, SIGTERM then SIGKILL) after S seconds; its results keep the epochs verified before,
and it counts as failed. To end runs on a time budget with a last verification instead, give them
Lightning's ``--trainer.max_time`` (``--extra=--trainer.max_time=00:00:06:00``; it counts training
time only, verification included, not loading): a run stopped inside an epoch is verified there, tagged
with the part of an epoch trained (``epoch_1.67``). Keep ``--timeout`` above it as the hard stop.

    python scripts/sweep.py configs/sweeps/instill-135m.yaml
    python scripts/sweep.py configs/sweeps/instill-135m.yaml --only faithful lr-5e-5 --dry_run
    python scripts/sweep.py configs/sweeps/instill-135m.yaml --parallel 4 --timeout 600
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python scripts/sweep.py` without installing
    sys.path.insert(0, str(ROOT))

from selfinterp.commands import report_command  # noqa: E402
from selfinterp.errors import UserError  # noqa: E402


def _options(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(o, str) for o in value)


def load_sweep(path: str | Path) -> tuple[str, str, dict[str, list[str]]]:
    """(base config, sweep name, run name -> fit options, common ones first) from a sweep file, validated."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"sweep file {path} does not exist")
    try:
        spec = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise UserError(f"{path} is not valid YAML{where}: {getattr(e, 'problem', None) or e}") from None
    if not isinstance(spec, dict) or not {"base", "name", "runs"} <= set(spec) <= {"base", "name", "common", "runs"}:
        raise UserError(f"{path} must have the keys base, name and runs, and may have common; nothing else")
    base, name, runs, common = spec["base"], spec["name"], spec["runs"], spec.get("common", [])
    if not isinstance(base, str) or not Path(base).is_file():
        raise UserError(f"{path}: base config {base!r} does not exist (paths are relative to where you run the sweep)")
    if not isinstance(name, str) or not name or "/" in name:
        raise UserError(f"{path}: name must be a non-empty string without '/'")
    if not isinstance(runs, dict) or not runs:
        raise UserError(f"{path}: runs must map run names to lists of fit options")
    if not _options(common):
        raise UserError(f"{path}: common must be a list of option strings")
    for run, options in runs.items():
        if not isinstance(run, str) or "/" in run or not _options(options):
            raise UserError(f"{path}: run {run!r} must be a name without '/' with a list of option strings")
    return base, name, {run: [*common, *options] for run, options in runs.items()}


def fit_command(python: str, base: str, name: str, run: str, options: list[str], extra: list[str]) -> list[str]:
    # The name goes last, so that no --config among the options can override it.
    return [python, "-m", "selfinterp", "fit", "--config", base, *options, *extra, f"--trainer.logger.init_args.name={name}/{run}"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep", help="sweep file (YAML)")
    parser.add_argument("--only", nargs="+", metavar="RUN", help="run only these runs of the file")
    parser.add_argument("--extra", default="", help="options added to every run; write it with = as in --extra=\"--config configs/trainer/cpu.yaml\"")
    parser.add_argument("--results", default="results", help="results folder of the runs (default: %(default)s)")
    parser.add_argument("--dry_run", action="store_true", help="print the commands without running them")
    parser.add_argument("--parallel", type=int, default=1, help="runs trained at once; above 1, each run logs to <results>/<name>/<run>.log (default: %(default)s)")
    parser.add_argument("--timeout", type=float, help="seconds after which a run is stopped (default: none)")
    args = parser.parse_args(argv)
    try:
        if args.parallel < 1:
            raise UserError(f"--parallel must be at least 1, got {args.parallel}")
        if args.timeout is not None and args.timeout <= 0:
            raise UserError(f"--timeout must be a positive number of seconds, got {args.timeout:g}")
        return run_sweep(args.sweep, args.only, shlex.split(args.extra), args.results, args.dry_run, args.parallel, args.timeout)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def run_sweep(sweep: str, only: list[str] | None, extra: list[str], results: str, dry_run: bool,
              parallel: int = 1, timeout: float | None = None) -> int:
    """Run the selected runs of a sweep file, ``parallel`` at a time, print the table; 1 if any run failed."""
    base, name, runs = load_sweep(sweep)
    unknown = sorted(set(only or []) - set(runs))
    if unknown:
        raise UserError(f"no run named {', '.join(unknown)} in {sweep}; it has {', '.join(runs)}")
    selected = [r for r in runs if not only or r in only]
    commands = {run: fit_command(sys.executable, base, name, run, runs[run], extra) for run in selected}
    for k, (run, command) in enumerate(commands.items(), 1):
        print(f"=== [{k}/{len(selected)}] {run}: {shlex.join(command[1:])}", flush=True)
    if dry_run:
        return 0
    log_dir = Path(results) / name if parallel > 1 else None
    failed = run_commands(commands, parallel, timeout, log_dir)
    try:
        report_command(str(Path(results) / name))
    except UserError as e:  # every run failed before its first verification
        print(f"error: {e}", file=sys.stderr)
    if failed:
        print(f"failed runs: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def run_commands(commands: dict[str, list[str]], parallel: int, timeout: float | None, log_dir: Path | None) -> list[str]:
    """Run the commands, at most ``parallel`` at a time, each in its own process group (so that a stop
    reaches its data workers too) and, with ``log_dir``, with its output in ``<log_dir>/<run>.log``;
    the runs that failed or were stopped after ``timeout`` seconds, in the commands' order."""
    waiting, running, failed = list(commands), {}, set()
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)
    try:
        while waiting or running:
            while waiting and len(running) < parallel:
                run = waiting.pop(0)
                with _stops_deferred():  # a stop during Popen would leave this run untracked, running on
                    log = open(log_dir / f"{run}.log", "w") if log_dir is not None else None
                    if log is not None:
                        print(f"=== {run}: started, output in {log.name}", flush=True)
                    process = subprocess.Popen(commands[run], stdout=log, stderr=subprocess.STDOUT if log else None,
                                               start_new_session=True)
                    running[run] = (process, time.perf_counter(), log)
            time.sleep(0.2)
            for run, (process, start, log) in list(running.items()):
                seconds = time.perf_counter() - start
                stopped = process.poll() is None and timeout is not None and seconds > timeout
                if stopped:
                    _stop(process)
                if process.poll() is None:
                    continue
                del running[run]
                if log is not None:
                    log.close()
                outcome = f"stopped after {seconds:.0f} s (--timeout)" if stopped else f"exit {process.returncode} after {seconds:.0f} s"
                print(f"=== {run}: {outcome}", flush=True)
                if stopped or process.returncode:
                    failed.add(run)
    finally:  # an interrupted sweep (Ctrl-C, SIGTERM) takes its runs down with it
        for process, _, log in running.values():
            if process.poll() is None:
                _stop(process, grace=10.0)
            if log is not None:
                log.close()
    return [run for run in commands if run in failed]


@contextmanager
def _stops_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM for the block, then deliver them to the handlers they had before.

    Not by blocking the signals: a child started while they are blocked would inherit the mask
    and ignore the SIGTERM that stops it."""
    held: list[int] = []
    stops = (signal.SIGINT, signal.SIGTERM)
    handlers = {s: signal.signal(s, lambda number, _: held.append(number)) for s in stops}
    try:
        yield
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
        for s in dict.fromkeys(held):
            signal.raise_signal(s)


def _stop(process: subprocess.Popen, grace: float = 30.0) -> None:
    """SIGTERM to the run's process group, SIGKILL if it is still there after ``grace`` seconds."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(grace)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    except ProcessLookupError:  # it ended on its own in the meantime
        process.wait()


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that run_commands stops the runs it started
    sys.exit(main())
