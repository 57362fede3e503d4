"""The `taopd` command: the one place that wires diagnostics, opd and analysis together.

Subcommands mirror the Makefile targets:
  taopd testbed   build (or reuse) the embedded teacher-student testbed and print its report
  taopd diagnose  the fixed-context diagnostic: rollouts -> bank -> per-token gains -> summary
  taopd train     TA-OPD and baseline selective OPD runs
  taopd analyze   the full statistical report of a diagnostic run
  taopd figures   every figure for every run under results/
  taopd scores    the registered token scores/selectors
Every subcommand takes `--config FILE` and `key=value` overrides of that config's keys.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

console = Console()

OVERRIDES_HELP = "config overrides as key=value (nested keys with dots, e.g. teacher.train_steps=500)"


def _add_config_args(parser: argparse.ArgumentParser, default_config: str) -> None:
    parser.add_argument("--config", default=default_config, help=f"YAML config file (default: {default_config})")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help=OVERRIDES_HELP)


def cmd_testbed(args: argparse.Namespace) -> int:
    from diagnostics.config import load_config
    from diagnostics.testbed import TestbedConfig, build_testbed

    config = load_config(TestbedConfig, args.config, args.overrides)
    testbed = build_testbed(config, force=args.force)
    report = testbed.report
    table = Table(title=f"testbed {testbed.root}")
    table.add_column("measure")
    table.add_column("value", justify="right")
    rows = [
        ("teacher exact match (greedy)", f"{report['teacher_acc_greedy']:.1%}"),
        ("teacher exact match (sampled, T=1)", f"{report['teacher_acc_sampled']:.1%}"),
        ("student exact match (greedy)", f"{report['student_acc_greedy']:.1%}"),
        ("student exact match (sampled, T=1)", f"{report['student_acc_sampled']:.1%}"),
        ("vocabulary (tokenizer length)", str(report["vocab_size"])),
        ("LM-head rows student / teacher", f"{report['student_vocab_rows']} / {report['teacher_vocab_rows']}"),
        ("response tokens (incl. EOS)", str(report["response_tokens"])),
        ("default top-K", str(report["k"])),
        ("C among top-20% D: q10 .. q90", f"{report['c_top20d_q10']:.3f} .. {report['c_top20d_q90']:.3f}"),
        ("C among top-20% D: 10-90% range", f"{report['c_top20d_range']:.3f}"),
        ("C over all positions: q10", f"{report['c_all_q10']:.3f}"),
        ("build time (s)", str(report.get("build_s", "?"))),
    ]
    for name, value in rows:
        table.add_row(name, value)
    console.print(table)
    console.print(f"teacher: {testbed.teacher_path}\nstudent: {testbed.student_path}")
    return 0


def cmd_scores(args: argparse.Namespace) -> int:
    from diagnostics.signals import get_score, list_scores

    table = Table(title="registered token scores (selectors)")
    table.add_column("name")
    table.add_column("Q3 only")
    table.add_column("description")
    for name in list_scores():
        spec = get_score(name)
        table.add_row(name, "yes" if spec.restrict_to_q3 else "", spec.description)
    console.print(table)
    return 0


def cmd_not_built(args: argparse.Namespace) -> int:
    console.print(f"[yellow]taopd {args.command}: not built yet[/yellow]")
    return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="taopd", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("testbed", help="build or reuse the embedded teacher-student testbed; print its report")
    _add_config_args(p, "configs/testbed.yaml")
    p.add_argument("--force", action="store_true", help="rebuild even if a cached build exists")
    p.set_defaults(func=cmd_testbed)

    p = sub.add_parser("scores", help="list the registered token scores / selectors")
    p.set_defaults(func=cmd_scores)

    for name, help_text in (
        ("diagnose", "run the fixed-context diagnostic"),
        ("train", "TA-OPD and baseline training runs"),
        ("analyze", "statistical report of a diagnostic run"),
        ("figures", "generate figures for all runs"),
    ):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("rest", nargs="*")
        p.set_defaults(func=cmd_not_built)
    return parser


def main(argv: list[str] | None = None) -> int:
    from diagnostics.config import ConfigError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
