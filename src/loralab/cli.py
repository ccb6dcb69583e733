"""``loralab inits | check | sweep | report | width | alpha-lr | cold-start | export | evaluate | generate``: parse
arguments and call the lab; nothing else lives here."""

from __future__ import annotations

import argparse
import importlib
import sys


def _inits(args) -> int:
    from loralab import init_schemes

    # "on embedding": the scheme an embedding target gets under `init` (its input is one-hot; see docs/library.md)
    print(f"{'name':<22}{'preserves output':>17}{'moves base':>11}{'even rank':>10}  {'on embedding':<16}  summary")
    for name, s in init_schemes().items():
        print(
            f"{name:<22}{s.preserves_output!s:>17}{s.modifies_base!s:>11}{s.even_rank!s:>10}  "
            f"{s.one_hot or 'same':<16}  {s.summary}"
        )
    return 0


def _check(args) -> int:
    from loralab.config import LoraConfig

    from .lab.config.schema import ModelConfig
    from .lab.studies.identity import format_identity_table, identity_table

    targets = [t.strip() for t in args.targets.split(",") if t.strip()]  # "q_proj, v_proj" names two modules
    lora = LoraConfig(rank=args.rank, alpha=args.alpha, targets=tuple(targets))
    rows = identity_table(ModelConfig(name=args.model), lora)
    print(format_identity_table(rows))
    if all(r["ok"] is None for r in rows):
        raise ValueError("no scheme could be checked (see the 'skipped' reasons above); fix --targets/--rank")
    return 0 if all(r["ok"] is not False for r in rows) else 1


def _sweep(args) -> int:
    from .lab.config.toml import load_sweep
    from .lab.sweep.dry_run import dry_run
    from .lab.sweep.plan import SweepPlan
    from .lab.sweep.run import make_executor, outcome, run_sweep

    sweep = load_sweep(args.config, args.set)
    name = args.executor or sweep.executor
    if args.address is not None and name != "ray":
        raise ValueError(f"--address needs --executor ray (the executor is {name!r}, which would ignore it)")
    plan = SweepPlan.build(sweep)
    # Made before the dry run, so that an executor this install cannot run fails the dry run, not the real one.
    executor = make_executor(plan, name, progress=not args.no_progress, address=args.address)
    if args.dry_run:
        return dry_run(plan, executor)
    code, line = outcome(sweep, run_sweep(plan, executor))  # 1 when a run failed: scripts and CI see it
    print(line)
    return code


def _report(args) -> int:
    from .lab.report.write import write_report
    from .lab.runtime import check_out_dir

    out = args.out and check_out_dir(args.out, "--out")
    axes = {"row_axis": args.rows, "col_axis": args.cols, "rep_axis": args.reps}
    for kind, path in write_report(args.run_dir, out=out, baseline=args.baseline, **axes).items():
        print(f"{kind}: {path}")
    return 0


def _width(args) -> int:
    from .lab.runtime import check_out_dir
    from .lab.studies.width.report import write_width_report
    from .lab.studies.width.study import load_width, out_dir, plan_width, run_width

    config = load_width(args.config, args.set)
    out = check_out_dir(out_dir(config, args.out), "--out" if args.out else "out_dir")  # before any training
    print(plan_width(config, out), flush=True)  # what will run, and where, before it starts
    if args.dry_run:
        return 0
    run_width(config, out)
    for kind, path in write_width_report(out).items():
        print(f"{kind}: {path}")
    return 0


def _alpha_lr(args) -> int:
    if args.action == "report":
        from .lab.studies.alpha_lr.page import write_page

        paths = write_page(args.out, collapse=args.collapse, probe=args.probe, ranks=args.rank)
        for kind, path in paths.items():
            print(f"{kind}: {path}")
        return 0
    from .lab.config.toml import load_sweep
    from .lab.studies.alpha_lr.search import plan_search, run_search

    sweep = load_sweep(args.config, args.set)
    if args.dry_run:
        print(plan_search(sweep))
        return 0
    run_search(sweep, start_lr=args.start_lr, confirm=args.confirm, progress=not args.no_progress)
    return 0


def _cold_start(args) -> int:
    from .lab.runtime import check_out_dir
    from .lab.studies.cold_start import write_cold_start

    out = check_out_dir(args.out or f"{args.run_dir}/cold-start", "--out")
    for kind, path in write_cold_start(args.run_dir, out, shock_dir=args.shock, page=args.page).items():
        print(f"{kind}: {path}")
    return 0


def _export(args) -> int:
    from .lab.adapters import describe, export, find_run

    run = find_run(args.run_dir, args.run, args.best)
    out = export(run, args.out, merged=args.merged)
    print(describe(run))
    print(f"{'merged model' if args.merged else 'adapter'}: {out}")
    return 0


def _evaluate(args) -> int:
    from .lab.adapters import evaluate_run, find_run

    print(evaluate_run(find_run(args.run_dir, args.run, args.best), device=args.device).line())
    return 0


def _generate(args) -> int:
    from .lab.adapters import describe, find_run, generate

    run = find_run(args.run_dir, args.run, args.best)
    answers = generate(
        run, args.prompt, max_new_tokens=args.max_new_tokens, fmt=args.format, device=args.device, with_base=args.base
    )
    print(describe(run))
    for who, text in answers.items():
        print(f"--- {who}:\n{text}")
    return 0


def _run_choice(p: argparse.ArgumentParser) -> None:
    """``RUN_DIR [--run ID | --best]``, shared by the commands that use one run's adapter."""
    p.add_argument("run_dir", help="a sweep's out_dir (or one run's directory, then no --run/--best)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--run", default=None, metavar="ID", help="the run id (or a prefix of exactly one)")
    which.add_argument("--best", action="store_true", help="the ok run with the lowest final eval loss")


def _add_overrides(p: argparse.ArgumentParser, text: str) -> None:
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="loralab", description="LoRA with the adapter's initialization as the variable.")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("inits", help="list the init schemes and their properties").set_defaults(fn=_inits)
    c = sub.add_parser("check", help="identity check of every scheme on a model: max |Δ logits| at init")
    c.add_argument("--model", default="smollm2-135m", help="'smollm2-135m' (offline default) or a model directory")
    c.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj", help="comma-separated module suffixes")
    c.add_argument("--rank", type=int, default=8)
    c.add_argument("--alpha", type=float, default=16.0)
    c.set_defaults(fn=_check)
    s = sub.add_parser("sweep", help="run a grid of training runs (resumable)")
    s.add_argument("config", help="a TOML file, e.g. configs/quick.toml")
    _add_overrides(s, "override a field (train.lr=1e-3) or a grid axis (grid.train.lr=[1e-4,1e-3])")
    s.add_argument("--dry-run", action="store_true", help="print the grid and validate everything; train nothing")
    s.add_argument("--executor", choices=["local", "ray"], default=None, help="default: the config's executor")
    s.add_argument("--address", default=None, help="Ray cluster address (with --executor ray)")
    s.add_argument("--no-progress", action="store_true", help="no progress bars")
    s.set_defaults(fn=_sweep)
    r = sub.add_parser("report", help="tables and plots from a sweep's store")
    r.add_argument("run_dir", help="the sweep's out_dir")
    r.add_argument("--out", default=None, help="where to write the report (default: RUN_DIR/report)")
    r.add_argument("--rows", default="lora.init", help="the axis compared (table rows; default lora.init)")
    r.add_argument("--cols", default="train.lr", help="the axis tuned per row (columns; default train.lr)")
    r.add_argument(
        "--reps",
        default="train.seed",
        help="the axis averaged over (default train.seed); the grid's other axes give one table each",
    )
    r.add_argument(
        "--baseline",
        default=None,
        help="the row the others are compared with (paired differences, "
        "tuned comparison); default: standard, when it is a row",
    )
    r.set_defaults(fn=_report)
    w = sub.add_parser("width", help="max stable LR vs width per init (Hayou et al. 2024 scaling); resumable")
    w.add_argument("config", help="a TOML file, e.g. configs/width.toml")
    _add_overrides(w, "override a field (probe.steps=50, widths=[64,128], device=cuda)")
    w.add_argument("--out", default=None, help="results directory (default: the config's out_dir)")
    w.add_argument(
        "--dry-run", action="store_true", help="print the cells, check the config, device and store; train nothing"
    )
    w.set_defaults(fn=_width)
    a = sub.add_parser("alpha-lr", help="α vs learning rate, α/r vs α/√r (docs/results/alpha-lr.md)")
    act = a.add_subparsers(dest="action", required=True)
    ap = act.add_parser("probe", help="max stable lr of each series of a sweep, training only what the search needs")
    ap.add_argument("config", help="a sweep TOML with a geometric train.lr axis, e.g. configs/alpha-lr-probe.toml")
    _add_overrides(ap, "as for loralab sweep")
    ap.add_argument("--start-lr", type=float, default=1e-2, help="where the first series' search starts")
    ap.add_argument("--confirm", type=int, default=1, help="grid points above the answer checked unstable")
    ap.add_argument("--dry-run", action="store_true", help="print the series and finished probes; train nothing")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    ar = act.add_parser("report", help="verdicts, tables and figures from the stores (results.md, results.json)")
    ar.add_argument("--collapse", default=None, metavar="DIR", help="the α × lr store (configs/alpha-lr.toml)")
    ar.add_argument("--probe", default=None, metavar="DIR", help="the stability-search store (alpha-lr probe)")
    ar.add_argument(
        "--rank", action="append", default=[], metavar="DIR", help="a rank × lr store (repeat: α/r and α/√r)"
    )
    ar.add_argument("--out", required=True, help="where results.md, results.json and the PNGs go")
    a.set_defaults(fn=_alpha_lr)
    cs = sub.add_parser("cold-start", help="the cold-start shock study's figures, tables and verdict (issue 18)")
    cs.add_argument("run_dir", help="the out_dir of configs/cold-start.toml's sweep")
    cs.add_argument("--shock", default=None, help="the out_dir of configs/cold-start-shock.toml's sweep (shock vs α)")
    cs.add_argument("--out", default=None, help="figures and results.json (default: RUN_DIR/cold-start)")
    cs.add_argument(
        "--page", default=None, help="the page whose results section is rewritten (default: OUT.md if it exists)"
    )
    cs.set_defaults(fn=_cold_start)
    e = sub.add_parser("export", help="write a run's trained adapter (PEFT format), or with --merged a full model")
    _run_choice(e)
    e.add_argument("--out", required=True, help="a new (or empty) directory to write")
    e.add_argument(
        "--merged",
        action="store_true",
        help="the base model with the adapter merged in, plus its tokenizer (save_pretrained), instead of the adapter",
    )
    e.set_defaults(fn=_export)
    v = sub.add_parser("evaluate", help="recompute a run's eval loss from its saved adapter, next to the stored one")
    _run_choice(v)
    v.add_argument("--device", default="auto", help="auto | cpu | cuda | mps (default auto)")
    v.set_defaults(fn=_evaluate)
    g = sub.add_parser("generate", help="greedy completion of a prompt by a run's adapted model")
    _run_choice(g)
    g.add_argument("prompt", help="what the user says")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument(
        "--format",
        choices=["chat", "train", "raw"],
        default="chat",
        help="chat: the tokenizer's chat template (the lab's training text when it has none); train: "
        "'User: ...' as the lab trains; raw: the prompt as it is",
    )
    g.add_argument("--base", action="store_true", help="also print the base model's answer (adapter off)")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | mps (default auto)")
    g.set_defaults(fn=_generate)
    return p


def _os_error(e: OSError) -> str:
    """One line naming the path, e.g. ``cannot write /x/report: File exists (an existing file is in the way)``."""
    if e.filename is None:
        return str(e)
    hint = {
        FileExistsError: " (an existing file is in the way: choose another path)",
        NotADirectoryError: " (a part of the path is a file, not a directory: choose another path)",
    }
    return f"cannot use {e.filename}: {e.strerror}{hint.get(type(e), '')}"


# What each command imports that starts C++ (torch is imported with the package): imported while Ctrl-C is held.
_START_UP = {
    "check": ["loralab.lab.studies.identity", "transformers:AutoModelForCausalLM,AutoTokenizer"],
    "sweep": [
        "loralab.lab.sweep.run",
        "loralab.lab.sweep.dry_run",
        "transformers:AutoConfig,AutoModelForCausalLM,AutoTokenizer",
    ],
    "report": ["loralab.lab.report.write"],
    "width": ["loralab.lab.studies.width.study", "loralab.lab.studies.width.report"],
    "alpha-lr": [
        "loralab.lab.studies.alpha_lr.search",
        "loralab.lab.studies.alpha_lr.page",
        "transformers:AutoConfig,AutoModelForCausalLM,AutoTokenizer",
    ],
    "cold-start": ["loralab.lab.studies.cold_start"],
    **{
        name: ["loralab.lab.adapters", "transformers:AutoConfig,AutoModelForCausalLM,AutoTokenizer"]
        for name in ("export", "evaluate", "generate")
    },
}


def _start_up(command: str) -> None:
    """Import what ``command`` will use; a module that is not installed is the command's to report."""
    for item in _START_UP.get(command, []):
        name, _, attrs = item.partition(":")
        try:
            module = importlib.import_module(name)
            for attr in filter(None, attrs.split(",")):
                getattr(module, attr)  # transformers imports lazily, on first use of a name
        except ImportError:
            pass


def main(argv: list[str] | None = None) -> int:
    from . import _startup

    command = None
    try:
        with _startup.held():  # Ctrl-C during start-up is raised at its end, here, as one line (see _startup)
            args = build_parser().parse_args(argv)
            command = args.command
            _start_up(command)
        return args.fn(args)
    except KeyboardInterrupt:
        resumable = command in ("sweep", "width", "alpha-lr")  # only these store results as they go
        print(
            "interrupted" + (": finished runs are stored; rerun the same command to resume" if resumable else ""),
            file=sys.stderr,
        )
        return 130
    except (ValueError, TypeError) as e:  # bad input: the message names the problem and fix
        print(f"loralab {command}: error: {_line(str(e))}", file=sys.stderr)
        return 2
    except OSError as e:  # FileNotFoundError, an out path that is a file, a full disk: name the path
        print(f"loralab {command}: error: {_line(_os_error(e))}", file=sys.stderr)
        return 2


def _line(message: str) -> str:
    """An error message as the one line it should be: a quoted megabyte of user input is cut from its middle (the
    problem leads, the fix ends it)."""
    from loralab.config import clip

    return clip(message, 4000)


if __name__ == "__main__":
    sys.exit(main())
