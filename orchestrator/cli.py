"""``unlearn``: run, resume, compare, prepare, validate, methods. Bad input exits 2 with one line."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

EXIT_BAD_INPUT = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="unlearn",
        description="LLM-unlearning sweeps on Ray: Ray Tune searches methods × hyperparameters, every trial is a "
                    "Ray Train gang running DeepSpeed ZeRO, every evaluation lands in one Arrow table, and the "
                    "methods are ranked by forget quality and utility loss.",
        epilog="Bad input (spec, data, model paths) exits with status 2 and one line naming the field.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="validate a job spec, prepare the models, sweep, compare",
                              description="Validate SPEC, start or join Ray, prepare (cached), run the sweep and "
                                          "print the ranking. Writes everything under the run directory.")
    run.add_argument("spec", metavar="SPEC", help="job spec YAML (e.g. jobs/quickstart.yaml)")
    _common_run_options(run)
    run.add_argument("--run-dir", metavar="DIR", help="where the run is written (default: the spec's run_dir, "
                                                      "else runs/<name>-<timestamp>)")

    resume = commands.add_parser("resume", help="continue a stopped sweep from its run directory",
                                 description="Restore the Tune experiment in RUN_DIR: finished trials are not re-run, "
                                             "unfinished ones continue from their last checkpoint.")
    resume.add_argument("run_dir", metavar="RUN_DIR")
    resume.add_argument("--address", metavar="ADDR", help="Ray cluster address (default: start a local one)")

    compare = commands.add_parser("compare", help="rank the trials of one or more runs; write the report",
                                  description="Read the evals tables of RUN_DIRs (or Parquet files with that schema), "
                                              "pick each trial's best epoch under the utility ceiling, Pareto-rank.")
    compare.add_argument("sources", nargs="+", metavar="RUN_DIR")
    compare.add_argument("--out", metavar="DIR", help="where ranking.parquet and report/ go (default: first RUN_DIR)")
    compare.add_argument("--utility-ceiling", type=float, default=None, metavar="X",
                         help="largest utility loss a chosen epoch may have (default: the spec's, else 0.10)")
    compare.add_argument("--robust", action="store_true",
                         help="rank on each trial's forgetting after its worst robustness probe (robustness.probes)")

    evaluate = commands.add_parser(
        "eval", help="score models on a benchmark without training; the same evals/samples tables as a sweep",
        description="Evaluate the spec's target and retain models (prepared and cached as for a sweep) and every "
                    "--model, rank them and write evals/, samples/, ranking.parquet and report/ under --out. "
                    "SPEC_OR_MODEL is a job spec, or a model (directory or hub id) scored on the spec built "
                    "from --set (benchmark.source=..., model.retain=..., ...).")
    evaluate.add_argument("spec", metavar="SPEC_OR_MODEL")
    evaluate.add_argument("--model", dest="models", action="append", default=[], metavar="[NAME=]REF",
                          help="another model to score: a from_pretrained directory or hub id (repeatable)")
    evaluate.add_argument("--out", metavar="DIR", help="where the tables go (default: runs/<name>-eval-<timestamp>)")
    _common_run_options(evaluate)

    prepare = commands.add_parser("prepare", help="only build (or reuse) the tokenizer, target and retain models",
                                  description="Run the prepare stage of SPEC on Ray and print the cached paths.")
    prepare.add_argument("spec", metavar="SPEC")
    _common_run_options(prepare)

    validate = commands.add_parser("validate", help="check a spec (and its data and model paths) without running",
                                   description="Exit 0 if SPEC is valid, else 2 with one line naming the field.")
    validate.add_argument("spec", metavar="SPEC")
    validate.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                          help="override a spec field, dotted path (repeatable)")

    methods = commands.add_parser("methods", help="list registered methods and their default search spaces",
                                  description="Every method the registry knows, its hyperparameters and default space.")
    methods.add_argument("--json", action="store_true", help="machine-readable output")
    return parser


def _common_run_options(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("--address", metavar="ADDR",
                     help="Ray cluster address (default: RAY_ADDRESS, else start a local cluster)")
    sub.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a spec field, dotted path, value parsed as YAML (repeatable), "
                          "e.g. --set training.epochs=3")


def _methods_listing(as_json: bool) -> str:
    from methods import catalog

    listing = {name: info.listing() for name, info in catalog().items()}
    if as_json:
        return json.dumps(listing, indent=1, default=str)
    lines = []
    for name, info in listing.items():
        lines.append(f"{name:9s} {info['doc']}")
        lines.append(f"          params: {json.dumps(info['params'], default=str)}")
        lines.append(f"          space:  {json.dumps(info['default_space'])}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from orchestrator.errors import BadInput

    try:
        return _dispatch(args)
    except BadInput as err:
        print(f"unlearn: error: {str(err).splitlines()[0]}", file=sys.stderr)
        return EXIT_BAD_INPUT


def _dispatch(args: argparse.Namespace) -> int:
    from orchestrator import api
    from orchestrator.spec import load_spec

    if args.command == "methods":
        print(_methods_listing(args.json))
    elif args.command == "validate":
        spec = load_spec(args.spec, args.overrides)
        api.preflight(spec)
        sweep = f"{len(spec.sweep.methods)} methods, search {spec.sweep.search}" if spec.sweep else "no sweep: eval only"
        print(f"{args.spec}: valid ({sweep})")
    elif args.command == "eval":
        from orchestrator.eval_job import evaluate, named_models, spec_for_model

        is_spec = args.spec.endswith((".yaml", ".yml"))
        spec = load_spec(args.spec, args.overrides) if is_spec else spec_for_model(args.spec, args.overrides)
        evaluate(spec, named_models(args.models), args.out, args.address)
    elif args.command == "run":
        api.run(load_spec(args.spec, args.overrides), run_dir=args.run_dir, address=args.address)
    elif args.command == "resume":
        api.resume(args.run_dir, address=args.address)
    elif args.command == "prepare":
        spec = load_spec(args.spec, args.overrides)
        api.preflight(spec)
        prepared = api.prepare_only(spec, args.address)
        print(json.dumps({"model": prepared.model_path, "tokenizer": prepared.tokenizer_path,
                          "retain_stats": prepared.retain_stats, "seconds": round(prepared.seconds, 1)}, indent=1))
    elif args.command == "compare":
        from orchestrator.api import summarize_sources

        summarize_sources(args.sources, args.out, args.utility_ceiling, robust=args.robust)
    return 0


if __name__ == "__main__":
    sys.exit(main())
