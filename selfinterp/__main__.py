"""``python -m selfinterp <command>``: Lightning subcommands plus the project's own commands."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable, Sequence

from selfinterp.errors import UserError

LIGHTNING = {"fit", "validate", "test", "verify"}
USAGE = """usage: python -m selfinterp <command> [options]

training (Lightning CLI; see `python -m selfinterp fit --help`):
  fit        train with a config:          fit --config configs/quickstart.yaml
  validate   validation loss + verification of a checkpoint
  test       held-out loss + verification (alias: verify) of a checkpoint: test --config C --ckpt_path P

tools (see `python -m selfinterp <command> --help`):
  data       write the Experiment 1 data files
  analyze    regression + recovery metrics from a decisions CSV
  report     Markdown table of all runs under a results folder: report [results]
  export     save a trained adapter (and optionally a merged model)
  report-weights   Experiment 2: the model's (and its base's) reports of its weights: report-weights --config C --ckpt_path P
  analyze-reports  report accuracy from a weight_reports.csv and a learned_weights.csv
"""


def _commands() -> dict[str, Callable[[Sequence[str]], object]]:
    from jsonargparse import auto_cli

    def wrap(func: Callable) -> Callable[[Sequence[str]], object]:
        return lambda argv: auto_cli(func, args=list(argv), as_positional=False)

    from selfinterp.analysis import analyze_command
    from selfinterp.cli import export_main
    from selfinterp.commands import data_command, report_command
    from selfinterp.selfreport import report_weights_main
    from selfinterp.selfreport_analysis import analyze_reports_command

    def report(argv: Sequence[str]) -> object:
        parser = argparse.ArgumentParser(prog="python -m selfinterp report", description=report_command.__doc__.split("\n")[0])
        parser.add_argument("results", nargs="?", default="results", help="folder holding the runs (default: %(default)s)")
        return report_command(parser.parse_args(list(argv)).results)

    return {"data": wrap(data_command), "analyze": wrap(analyze_command), "report": report,
            "export": export_main, "report-weights": report_weights_main, "analyze-reports": wrap(analyze_reports_command)}


def show_info_messages() -> None:
    """Print the project's INFO messages (each verification's r and agreement) as Lightning prints its own."""
    logger = logging.getLogger("selfinterp")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatch a command; user errors end with one line on stderr and exit status 2."""
    from_shell = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    try:
        if command in LIGHTNING:
            from selfinterp.cli import lightning_cli

            show_info_messages()
            argv[0] = "test" if command == "verify" else command
            if from_shell:
                sys.argv[1] = argv[0]  # DDP re-launches the other ranks from sys.argv
            lightning_cli(None if from_shell else argv)
            return 0
        commands = _commands()
        if command not in commands:
            print(f"error: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
            return 2
        commands[command](rest)
        return 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
