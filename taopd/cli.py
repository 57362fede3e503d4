"""The `taopd` command: the one place that wires diagnostics, opd and analysis together.

Subcommands mirror the Makefile targets:
  taopd testbed   build (or reuse) the embedded teacher-student testbed and print its report
  taopd diagnose  the fixed-context diagnostic: rollouts -> bank -> per-token gains -> summary
  taopd train     TA-OPD and baseline selective OPD runs (metrics, comparison, live gain)
  taopd evaluate  answer accuracy of trained students (exact / math-verify; lm-eval tasks)
  taopd analyze   the full statistical report of a diagnostic run
  taopd figures   every figure for every run under results/
  taopd scores    the registered token scores/selectors
Every subcommand takes `--config FILE` and `key=value` overrides of that config's keys (before or
after the flags). A bad input ends in one line, `error: ...`, naming the key, file or position, and exit
status 2; TAOPD_DEBUG=1 shows the traceback instead.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from pathlib import Path

import pandas as pd
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from analysis import format_report, load_run, make_all_figures, summarize, write_token_view
from analysis.bootstrap import check_bootstrap_args
from analysis.io import count_clusters, load_train_run, lost_sections
from analysis.pass_at_1 import student_accuracy
from analysis.plots import plot_learning_curves, plot_selector_comparison, save_figure
from analysis.report import SCHEMA
from analysis.training import run_comparison, to_markdown
from analysis.variants import first_order_agreement, group_summary
from diagnostics.core.config import load_config
from diagnostics.core.files import atomic_write, read_json, write_json, write_parquet
from diagnostics.core.lock import RunLockedError, release_all_run_locks
from diagnostics.core.nonfinite import NonFiniteError
from diagnostics.core.paths import check_user_path
from diagnostics.core.rundir import check_not_a_run
from diagnostics.diagnose import run_diagnose
from diagnostics.diagnose_config import PROTOCOL_MEANING, DiagnoseConfig
from diagnostics.signals import get_score, list_scores
from diagnostics.testbed.build import build_testbed
from diagnostics.testbed.config import TestbedConfig
from diagnostics.testbed.rebuild import rebuild_testbed
from opd.config import TrainConfig
from opd.distributed import launched_world
from opd.engines import run_training
from opd.evaluate import EvaluateConfig, run_evaluation
from opd.paper_protocol import run_paper_protocol

console = Console()
error_console = Console(stderr=True, soft_wrap=True)  # one line, whatever the terminal width

OVERRIDES_HELP = "config overrides as key=value (nested keys with dots, e.g. teacher.train_steps=500)"


def _add_config_args(parser: argparse.ArgumentParser, default_config: str) -> None:
    parser.add_argument("--config", default=default_config, help=f"YAML config file (default: {default_config})")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help=OVERRIDES_HELP)


def _with_model_overrides(args: argparse.Namespace) -> list[str]:
    """--student/--teacher flags become config overrides (the config checks both are given)."""
    overrides = list(args.overrides)
    if args.student or args.teacher:
        overrides += [f"student={args.student or ''}", f"teacher={args.teacher or ''}"]
    return overrides


def _percent(value: float | None) -> str:
    return "not measured" if value is None else f"{value:.1%}"


def _quantiles(report: dict, name: str) -> str:
    values = [report.get(f"{name}_{q}") for q in ("q10", "median", "q90")]
    return "not measured" if None in values else " / ".join(f"{v:g}" for v in values)


def cmd_testbed(args: argparse.Namespace) -> int:
    config = load_config(TestbedConfig, args.config, args.overrides)
    comparison = None
    if args.rebuild:  # retrain from the config; compared with the shipped testbed of its hash, if any
        testbed, comparison = rebuild_testbed(config)
    else:
        testbed = build_testbed(config)
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
        ("BPE tokens + added tokens", f"{report['bpe_tokens']:,} + {report['added_tokens']}" if "bpe_tokens" in report
         else "?"),
        ("probability outside the task's tokens: student / teacher",
         f"{report['off_task_mass_student']:.2e} / {report['off_task_mass_teacher']:.2e}"
         if "off_task_mass_student" in report else "?"),
        ("same student trained to capacity_steps (greedy)", _percent(report.get("capacity_acc_greedy"))),
        ("response tokens (incl. EOS)", str(report["response_tokens"])),
        ("student samples' tokens: q10 / median / q90", _quantiles(report, "response_tokens")),
        ("default top-K", str(report["k"])),
        ("C among top-20% D: q10 .. q90", f"{report['c_top20d_q10']:.3f} .. {report['c_top20d_q90']:.3f}"),
        ("C among top-20% D: 10-90% range", f"{report['c_top20d_range']:.3f}"),
        ("C over all positions: q10", f"{report['c_all_q10']:.3f}"),
        ("build time (s)", str(report.get("build_s", "?"))),
    ]
    for name, value in rows:
        table.add_row(name, value)
    console.print(table)
    console.print(f"testbed: {testbed.describe()}\nteacher: {testbed.teacher_path}\nstudent: {testbed.student_path}",
                  highlight=False, soft_wrap=True)
    if args.rebuild:
        console.print("\n".join(comparison.lines() if comparison else ["no shipped testbed has this config's hash"]),
                      highlight=False, soft_wrap=True)
        return 0 if comparison is None or comparison.ok else 1
    return 0


def cmd_scores(args: argparse.Namespace) -> int:
    table = Table(title="registered token scores (selectors)")
    table.add_column("name")
    table.add_column("Q3 only")
    table.add_column("description")
    for name in list_scores():
        spec = get_score(name)
        table.add_row(name, "yes" if spec.restrict_to_q3 else "", spec.description)
    console.print(table)
    return 0


def cmd_diagnose(args: argparse.Namespace) -> int:
    overrides = _with_model_overrides(args)
    config = load_config(DiagnoseConfig, args.config, overrides)
    # the summary's bootstrap is checked now, not after the run (n_sequences bounds its clusters)
    check_bootstrap_args(config.n_boot, config.seed, config.n_sequences, keys=("n_boot", "seed"))
    world = launched_world(config.device)  # None in a plain process; torchrun: the shards split over processes
    if config.protocol == "paper":  # trains full-token OPD first: the chain lives in opd (diagnostics never imports it)
        run_dir = run_paper_protocol(config, world)
    else:
        run_dir = run_diagnose(config, processes=world)
    if world is None or world.is_main:  # under torchrun the first process merged the shards
        report_run(run_dir, n_boot=config.n_boot, seed=config.seed)
    return 0


def report_run(run_dir: Path, *, n_boot: int, seed: int, json_path: Path | None = None,
               out_dir: Path | None = None) -> dict:
    """Summary statistics of a diagnostic run (from analysis/), printed and written to summary.json in
    `out_dir` (default: the run directory)."""
    tokens, manifest = load_run(run_dir)
    summary = summarize(tokens, n_boot=n_boot, seed=seed, manifest=manifest)
    summary["protocol"] = manifest.get("protocol", "single-step")  # runs from before the key were single-step
    summary["protocol_meaning"] = manifest.get("protocol_meaning", PROTOCOL_MEANING[summary["protocol"]])
    if "paper_protocol" in manifest:  # the OPD run whose checkpoint and rollouts the paper protocol re-scored
        summary["paper_protocol"] = {k: v for k, v in manifest["paper_protocol"].items() if k != "train_config"}
    agreement = first_order_agreement(tokens)  # mode=first-order: Proposition 1 vs the measured gain
    if agreement is not None:
        summary["first_order_agreement"] = agreement
    group_path = Path(run_dir) / "group.parquet"
    if group_path.is_file():
        summary["group"] = group_summary(pd.read_parquet(group_path))
    summary_path = Path(out_dir or run_dir) / "summary.json"
    lost = lost_sections(summary_path, summary)
    if lost:  # never replace a stored result by less (a section skipped now keeps the old file)
        why = "; ".join(n for n in summary.get("notes", []) if "skipped" in n)[:300] or "see the notes"
        raise ValueError(f"{summary_path}: the new summary would lose sections it holds ({', '.join(lost)}: {why}); "
                         f"the old summary is kept (write elsewhere with --out DIR)")
    write_json(summary_path, summary)
    if json_path is not None:
        write_json(json_path, summary)
    console.print(format_report(summary), markup=False, highlight=False)
    console.print(f"protocol {summary['protocol']}: {summary['protocol_meaning']}", markup=False, highlight=False)
    if "paper_protocol" in summary:
        run = summary["paper_protocol"]
        console.print(f"OPD run: {run['steps']} steps x {run['rollouts_per_step']} rollouts, held-out accuracy "
                      f"{run['accuracy_before']:.3f} -> {run['accuracy_after']:.3f}; bank: {run['bank']}",
                      markup=False, highlight=False)
    if "first_order_agreement" in summary:
        agreement = summary["first_order_agreement"]
        console.print(f"first-order estimate vs single-step gain: Spearman {agreement['spearman']:+.3f} "
                      f"over {agreement['n']} positions")
    console.print(f"run: {run_dir}")
    return summary


def check_analyze_args(args: argparse.Namespace) -> Path:
    """Every analyze argument checked before any statistics run; returns where the outputs go."""
    run = Path(args.run)
    if run.is_file():
        raise ValueError(f"analyze: {run} is a file; give its run directory ({run.parent})")
    try:
        check_user_path(run, "analyze", "directory")
    except FileNotFoundError:
        raise FileNotFoundError(f"analyze: run directory {run} does not exist") from None
    if not (run / "tokens.parquet").is_file():
        raise FileNotFoundError(f"analyze: {run} holds no tokens.parquet (not a finished diagnostic run)")
    if not (run / "manifest.json").is_file():  # tokens.parquet is written before the manifest: a cut-short run
        raise FileNotFoundError(f"analyze: {run} holds no manifest.json (the run stopped before it finished): rerun "
                                f"its diagnose command to finish it")
    check_bootstrap_args(args.n_boot, args.seed, count_clusters(run / "tokens.parquet"))
    out = Path(args.out) if args.out else run
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out: {out} is a file, not a directory")
    if out != run:
        check_user_path(out, "--out", "writable directory")
        check_not_a_run(out, "--out")
    if args.json:
        if Path(args.json).is_dir():
            raise ValueError(f"--json: {args.json} is a directory; give a file name")
        check_replaceable_summary(Path(args.json))
        if not Path(args.json).parent.is_dir():
            raise FileNotFoundError(f"--json: directory {Path(args.json).parent} does not exist")
        check_user_path(Path(args.json).parent, "--json", "writable directory")
    writable = out if out.is_dir() else out.parent
    if writable.is_dir() and not os.access(writable, os.W_OK):
        raise PermissionError(errno.EACCES, "cannot write the report there (pass --out DIR)", str(writable))
    return out


def check_replaceable_summary(path: Path) -> None:
    """--json may replace an earlier summary JSON only, never another file (a run's tokens.parquet, a config)."""
    if not path.exists():
        return
    try:
        held = read_json(path) if path.suffix == ".json" else None
    except ValueError:
        held = None
    if not (isinstance(held, dict) and held.get("schema") == SCHEMA):
        raise ValueError(f"--json: {path} exists and is not a summary written by analyze; it would be replaced: "
                         f"give a new file name")


def cmd_analyze(args: argparse.Namespace) -> int:
    out = check_analyze_args(args)
    out.mkdir(parents=True, exist_ok=True)
    report_run(Path(args.run), n_boot=args.n_boot, seed=args.seed, json_path=Path(args.json) if args.json else None,
               out_dir=out)
    if args.html:

        tokens, manifest = load_run(args.run)
        run_name = manifest.get("run_name", Path(args.run).name)
        out = write_token_view(tokens, out / "tokens.html", run_name=run_name)
        console.print(f"token view: {out}")
    return 0


def cmd_figures(args: argparse.Namespace) -> int:
    try:
        check_user_path(args.results, "--results", "directory")
    except FileNotFoundError:
        raise FileNotFoundError(f"--results: directory {args.results} does not exist") from None
    check_bootstrap_args(args.n_boot, 0, 1, keys=("--n-boot", "--seed"))  # clusters: at least one per run
    check_user_path(args.out, "--out", "writable directory")
    paths = make_all_figures(args.results, args.out, n_boot=args.n_boot)
    console.print(f"{len(paths)} figure files written to {args.out}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    import os


    overrides = _with_model_overrides(args)
    config = load_config(TrainConfig, args.config, overrides)
    run_dir = run_training(config, resume=args.resume)  # errors: one line from main
    if int(os.environ.get("RANK", "0")) == 0:  # under accelerate launch / torchrun: rank 0 only

        comparison, markdown = run_comparison(run_dir)  # opd writes raw tables; the statistics are analysis'
        write_parquet(run_dir / "comparison.parquet", comparison)
        atomic_write(run_dir / "comparison.md", lambda tmp: Path(tmp).write_text(markdown))
        console.print(markdown, markup=False, highlight=False, soft_wrap=True)
        metrics, comparison, manifest = load_train_run(run_dir)
        paths = save_figure(plot_learning_curves(metrics, run_name=manifest["run_name"]), run_dir, "learning_curves")
        if comparison is not None:
            figure = plot_selector_comparison(comparison, run_name=manifest["run_name"])
            paths += save_figure(figure, run_dir, "selector_comparison")
        console.print(f"run: {run_dir}\nfigures: {', '.join(str(p) for p in paths)}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    config = load_config(EvaluateConfig, args.config, args.overrides)
    out = run_evaluation(config)
    students = student_accuracy(pd.read_parquet(out / "evaluation.parquet"))  # statistics live in analysis
    markdown = to_markdown(students, title=f"pass@1 of each student ({out})")
    lm_eval = pd.read_parquet(out / "lm_eval.parquet")
    if not lm_eval.empty:
        markdown += "\n" + to_markdown(lm_eval, title="lm-eval results")
    atomic_write(out / "evaluation.md", lambda tmp: Path(tmp).write_text(markdown))
    console.print(markdown, markup=False, highlight=False, soft_wrap=True)
    if config.run:  # the run's comparison table gains eval_pass1_* (and lm_*) columns
        comparison, table_md = run_comparison(config.run)
        write_parquet(Path(config.run) / "comparison.parquet", comparison)
        atomic_write(Path(config.run) / "comparison.md", lambda tmp: Path(tmp).write_text(table_md))
        console.print(table_md, markup=False, highlight=False, soft_wrap=True)
    console.print(f"evaluation: {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="taopd", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("testbed", help="build or reuse the embedded teacher-student testbed; print its report")
    _add_config_args(p, "configs/testbed.yaml")
    p.add_argument("--rebuild", "--force", action="store_true", dest="rebuild",
                   help="retrain from the config (into the cache) and compare with the shipped testbed of its hash")
    p.set_defaults(func=cmd_testbed)

    p = sub.add_parser("scores", help="list the registered token scores / selectors")
    p.set_defaults(func=cmd_scores)

    p = sub.add_parser("diagnose", help="run the fixed-context diagnostic and print its summary")
    _add_config_args(p, "configs/diagnose.yaml")
    p.add_argument("--student", help="student model dir or hub id (default: the embedded testbed)")
    p.add_argument("--teacher", help="teacher model dir or hub id (default: the embedded testbed)")
    p.set_defaults(func=cmd_diagnose)

    p = sub.add_parser("analyze", help="print the full statistical report of a diagnostic run")
    p.add_argument("run", help="a run directory, e.g. results/diagnose/single-step-1a2b3c4d")
    p.add_argument("--json", help="also write the report as JSON to this file")
    p.add_argument("--out", help="directory for summary.json (and tokens.html); default: the run directory")
    p.add_argument("--html", action="store_true", help="also write the token view (tokens.html) beside summary.json")
    p.add_argument("--n-boot", type=int, default=1000, help="cluster-bootstrap resamples, >= 0 (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("figures", help="write every figure for every run under the results directory")
    p.add_argument("--results", default="results", help="results directory (default: results)")
    p.add_argument("--out", default="results/figures", help="output directory (default: results/figures)")
    p.add_argument("--n-boot", type=int, default=1000, help="cluster-bootstrap resamples (default 1000)")
    p.set_defaults(func=cmd_figures)

    p = sub.add_parser("train", help="TA-OPD and baseline selective OPD runs: metrics, comparison table, live gain")
    _add_config_args(p, "configs/train.yaml")
    p.add_argument("--student", help="student model dir or hub id (default: the embedded testbed)")
    p.add_argument("--teacher", help="teacher model dir or hub id (default: the embedded testbed)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in the config's run directory from its last checkpoints")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="answer accuracy of trained students (own generation and lm-eval tasks)")
    _add_config_args(p, "configs/evaluate.yaml")
    p.set_defaults(func=cmd_evaluate)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """argparse, with `key=value` overrides allowed after the flags too (`a=1 --resume b=2`)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    stray = [token for token in extra if token.startswith("-") or "=" not in token or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


def error_line(exc: BaseException) -> str:
    """The one-line message of an expected error: the exception's text with its file, never a traceback."""
    if isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError | FileExistsError) and exc.strerror:
        where = f": {exc.filename}" if exc.filename else ""
        hint = {errno.ENOSPC: " (the disk is full: free space and rerun; finished work is kept)",
                errno.EACCES: " (no permission: choose another out_dir / --out)",
                errno.EROFS: " (read-only file system: choose another out_dir / --out)"}.get(exc.errno, "")
        text = f"{exc.strerror}{where}{hint}"
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(text.split())  # one line: YAML and library messages span several


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError, RunLockedError, NonFiniteError) as exc:  # ConfigError is a ValueError
        if os.environ.get("TAOPD_DEBUG"):
            raise
        error_console.print(f"[red]error:[/red] {escape(error_line(exc))}", highlight=False)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: one line, the shell's 128 + SIGINT; finished shards/checkpoints are kept
        if os.environ.get("TAOPD_DEBUG"):
            raise
        error_console.print("[red]error:[/red] interrupted (Ctrl-C); finished work is kept: rerun the same command "
                            "to resume", highlight=False)
        return 130
    finally:
        release_all_run_locks()  # in-process callers (tests, notebooks) must not keep runs locked


if __name__ == "__main__":
    sys.exit(main())
