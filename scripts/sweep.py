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

    python scripts/sweep.py configs/sweeps/instill-135m.yaml
    python scripts/sweep.py configs/sweeps/instill-135m.yaml --only faithful lr-5e-5 --dry_run
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
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
    args = parser.parse_args(argv)
    try:
        return run_sweep(args.sweep, args.only, shlex.split(args.extra), args.results, args.dry_run)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def run_sweep(sweep: str, only: list[str] | None, extra: list[str], results: str, dry_run: bool) -> int:
    """Run the selected runs of a sweep file in turn, print the table; 1 if any run failed."""
    base, name, runs = load_sweep(sweep)
    unknown = sorted(set(only or []) - set(runs))
    if unknown:
        raise UserError(f"no run named {', '.join(unknown)} in {sweep}; it has {', '.join(runs)}")
    selected = [r for r in runs if not only or r in only]
    failed = []
    for k, run in enumerate(selected, 1):
        command = fit_command(sys.executable, base, name, run, runs[run], extra)
        print(f"=== [{k}/{len(selected)}] {run}: {shlex.join(command[1:])}", flush=True)
        if dry_run:
            continue
        start = time.perf_counter()
        code = subprocess.call(command)
        print(f"=== {run}: exit {code} after {time.perf_counter() - start:.0f} s", flush=True)
        if code:
            failed.append(run)
    if dry_run:
        return 0
    report_command(str(Path(results) / name))
    if failed:
        print(f"failed runs: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0

if __name__ == "__main__":
    sys.exit(main())
