"""``moe-hpc``: the command line. The one place where exceptions become exit codes.

A MoeHpcError prints one ``error: ...`` line (on the rank that found it) and exits 1 on every
rank; a peer's failure exits 1 quietly; a stop signal agreed on at a chunk boundary exits 75 on
every rank (progress recorded: rerun to resume); anything else is a bug: it is reported, and
with more than one rank the job is aborted so no rank is left waiting in a collective.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import traceback
from pathlib import Path

from . import __version__
from .comm.failure import abort_job, collective, on_rank0
from .config.errors import Interrupted, MoeHpcError, PeerFailed
from .config.jsonfile import strict_json
from .files.atomic import write_text_atomic
from .placement.greedy import SEARCH_STEPS
from .runtime.signals import EXIT_INTERRUPTED, StopRequest
from .tools.tracegen import TraceShape

# The demo's batching: small micro-batches and chunks, so even 256 tokens exercise the
# double-buffered exchange and the chunked writes. The model is the built-in tiny default.
DEMO_SETTINGS = ["run.micro_batch_tokens=64", "run.chunk_sequences=4"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moe-hpc", description="Offline MoE inference over MPI ranks.")
    p.add_argument("--version", action="version", version=f"moe-hpc {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="verb", required=True)
    _init_weights_parser(sub)
    _make_inputs_parser(sub)
    _run_parser(sub)
    _generate_parser(sub)
    _bench_parser(sub)
    _scaling_report_parser(sub)
    _make_trace_parser(sub)
    _place_parser(sub)
    _plan_parser(sub)
    _import_hf_parser(sub)
    _demo_parser(sub)
    return p


def _init_weights_parser(sub) -> None:
    w = sub.add_parser("init-weights", help="write a synthetic checkpoint")
    w.add_argument("config")
    w.add_argument("-o", "--output", required=True)
    w.add_argument("--seed", type=int, default=0)
    _common(w)


def _make_inputs_parser(sub) -> None:
    i = sub.add_parser("make-inputs", help="write a synthetic input batch")
    i.add_argument("config")
    i.add_argument("-o", "--output", required=True)
    i.add_argument("--sequences", type=int, required=True)
    i.add_argument("--seq-len", type=int, required=True)
    i.add_argument("--seed", type=int, default=0)
    i.add_argument("--ragged", action="store_true", help="also write /lengths (random in [1, L])")
    _common(i)


def _run_parser(sub) -> None:
    r = sub.add_parser("run", help="run inference (under mpiexec/srun, or as one process)")
    r.add_argument("config")
    r.add_argument("--weights", required=True)
    r.add_argument("--input", required=True)
    r.add_argument("--output", required=True)
    r.add_argument("--restart", action="store_true",
                   help="discard a partial output (<output>.tmp + .progress.json) instead of resuming it")
    r.add_argument("--dry-run", action="store_true",
                   help="check config, files and placement on every rank, print the layout, compute nothing")
    r.add_argument("--progress", choices=("auto", "bar", "lines", "off"), default="auto",
                   help="progress on stderr: a bar on a terminal, lines elsewhere (default: auto)")
    r.add_argument("--progress-every", type=float, default=10.0, metavar="SECONDS",
                   help="seconds between progress lines (default 10; 0: every chunk)")
    r.add_argument("--summary", metavar="PATH", help="also write the JSON summary to PATH")
    r.add_argument("--trace", help="also record a routing trace (HDF5) here")
    _common(r)


# generate's flags, each the [generate] config key of the same name (docs/generate.md)
GENERATE_FLAGS = {"max_new_tokens": int, "temperature": float, "top_k": int, "top_p": float, "seed": int,
                  "decode_slots": int}


def _generate_parser(sub) -> None:
    g = sub.add_parser("generate", help="continue each prompt (a token batch or text) by up to N new tokens")
    g.add_argument("config", help="run config (TOML) or a Hugging Face checkpoint directory")
    g.add_argument("--weights", required=True)
    # exactly one of the two, checked after MPI starts (_prompt_source) so a mistake is one error line
    g.add_argument("--input", help="HDF5 token batch: /tokens [S, L], /lengths (the prompts)")
    g.add_argument("--prompts", help="JSON Lines text prompts, one {\"prompt\": \"...\"} per line, tokenised "
                                     "with the checkpoint's tokenizer.json; completions go to OUT.jsonl")
    g.add_argument("--output", required=True)
    for name, kind in GENERATE_FLAGS.items():
        g.add_argument(f"--{name.replace('_', '-')}", type=kind, help=f"generate.{name}")
    g.add_argument("--ignore-eos", action="store_true", help="generate.ignore_eos = true")
    g.add_argument("--restart", action="store_true",
                   help="discard a partial output (<output>.tmp + .progress.json) instead of resuming it")
    g.add_argument("--progress", choices=("auto", "bar", "lines", "off"), default="auto")
    g.add_argument("--progress-every", type=float, default=10.0, metavar="SECONDS")
    g.add_argument("--summary", metavar="PATH", help="also write the JSON summary to PATH")
    _common(g)


def _bench_parser(sub) -> None:
    b = sub.add_parser("bench", help="time one MoE layer and the shrunk model on GPUs, with ceilings")
    from .tools.bench import add_arguments
    add_arguments(b)
    b.add_argument("--debug", action="store_true", help="show tracebacks")


def _scaling_report_parser(sub) -> None:
    s = sub.add_parser("scaling-report", help="table and PNG plot of a scaling study's run summaries")
    s.add_argument("results", help="folder of *.json run summaries (jobs/scaling_study.sh writes them)")
    s.add_argument("--table", metavar="PATH", help="write the Markdown table here (default: stdout)")
    s.add_argument("--plot", metavar="PATH", help="write a PNG of tokens/s and efficiency against GPUs")
    s.add_argument("--title", default="moe_hpc scaling", help="plot title")
    s.add_argument("--debug", action="store_true", help="show tracebacks")


def _make_trace_parser(sub) -> None:
    t = sub.add_parser("make-trace", help="write a synthetic routing trace (skew, clusters, drift)")
    t.add_argument("config")
    t.add_argument("--cluster", required=True, help="cluster TOML (its GPU count is the world size)")
    t.add_argument("-o", "--output", required=True)
    t.add_argument("--seed", type=int, default=0)
    for name, value in vars(TraceShape()).items():
        t.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value,
                       help=f"(default {value})")
    _common(t)


def _place_parser(sub) -> None:
    pl = sub.add_parser("place", help="plan expert placement from a trace; compare formula, greedy, optimised")
    pl.add_argument("config")
    pl.add_argument("--cluster", required=True, help="cluster TOML")
    pl.add_argument("--trace", required=True, help="routing trace (HDF5)")
    pl.add_argument("-o", "--output", required=True, help="placement file (HDF5) to write")
    pl.add_argument("--steps", type=int, default=SEARCH_STEPS,
                    help=f"local search budget in relocation attempts; keeps results reproducible "
                         f"(default {SEARCH_STEPS})")
    pl.add_argument("--seconds", type=float, default=120.0,
                    help="wall-clock safety net for the search (default 120)")
    pl.add_argument("--json", action="store_true", help="print the report as JSON too")
    _common(pl)


def _plan_parser(sub) -> None:
    pn = sub.add_parser("plan", help="plan a deployment: layout, memory, time, DAGs (no GPU, no MPI run)")
    from .planner.report import add_arguments as add_plan_arguments
    add_plan_arguments(pn)


def _import_hf_parser(sub) -> None:
    h = sub.add_parser("import-hf", help="convert a Hugging Face checkpoint directory to a run config + HDF5 weights")
    h.add_argument("folder", help="directory with config.json and *.safetensors")
    h.add_argument("--config", required=True, help="run config (TOML) to write: its [model] table")
    h.add_argument("--weights", required=True, help="HDF5 checkpoint to write")
    h.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    h.add_argument("--debug", action="store_true", help="show tracebacks")


def _demo_parser(sub) -> None:
    d = sub.add_parser("demo", help="make tiny weights and inputs if missing, run, check vs reference")
    d.add_argument("--dir", default="demo", help="where the demo files go (default: ./demo)")
    _common(d)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", action="append", default=[], metavar="TABLE.KEY=VALUE",
                   help="override a config key (repeatable)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing complete output")
    p.add_argument("--debug", action="store_true", help="show tracebacks")


def _world():
    from mpi4py import MPI
    return MPI.COMM_WORLD


def _load_config(args, comm):
    """Every rank reads the config; a bad key is reported once, by rank 0."""
    from .config.run_config import load_config
    return collective(comm, load_config, args.config, args.set, debug=args.debug)


def cmd_init_weights(args, comm) -> None:
    from .config.run_config import config_files
    from .tools.synth import write_checkpoint
    cfg = _load_config(args, comm)
    on_rank0(comm, write_checkpoint, args.output, cfg.model, args.seed, args.overwrite, config_files(cfg),
             debug=args.debug)
    if comm.Get_rank() == 0:
        print(f"wrote {args.output}")


def cmd_make_inputs(args, comm) -> None:
    from .config.run_config import config_files
    from .tools.synth import write_inputs
    cfg = _load_config(args, comm)
    on_rank0(comm, write_inputs, args.output, cfg.model, args.sequences, args.seq_len,
             args.seed, args.ragged, args.overwrite, config_files(cfg), debug=args.debug)
    if comm.Get_rank() == 0:
        print(f"wrote {args.output}")


def _check_not_singletons(comm) -> None:
    """srun without a PMI plugin starts N independent one-rank jobs: refuse before any write."""
    step_tasks = int(os.environ.get("SLURM_STEP_NUM_TASKS", "1") or 1)
    if comm.Get_size() == 1 and step_tasks > 1:
        raise MoeHpcError(f"srun started {step_tasks} tasks but MPI sees 1 rank in each: srun has "
                          "no PMI for this MPI (use srun --mpi=pmi2, or mpiexec)")


def cmd_run(args, comm) -> None:
    from .runtime.job import Job
    from .planner.fit import check_memory
    from .runtime.runner import run_job
    cfg = _load_config(args, comm)
    _check_not_singletons(comm)
    job = Job(cfg, Path(args.weights), Path(args.input), Path(args.output), args.overwrite, args.debug,
              restart=args.restart, progress=args.progress, progress_every=args.progress_every,
              stop=args.stop, trace=Path(args.trace) if args.trace else None,
              summary=Path(args.summary) if args.summary else None,
              memory_check=check_memory)
    if args.dry_run:
        from .runtime.dryrun import dry_run
        dry_run(comm, job)
        return
    _print_summary(run_job(comm, job), args.summary)


def _print_summary(summary: dict, path) -> None:
    """Rank 0's summary as one JSON line on stdout, and in ``path`` when given (others: {})."""
    if summary:
        text = strict_json({"summary": summary})
        print(text, flush=True)
        if path:
            write_text_atomic(path, text + "\n")


def _generate_overrides(args) -> list[str]:
    """generate's flags as ``--set generate.KEY=VALUE`` overrides, checked like the config's keys."""
    sets = [f"generate.{name}={getattr(args, name)!r}" for name in GENERATE_FLAGS if getattr(args, name) is not None]
    return sets + (["generate.ignore_eos=true"] if args.ignore_eos else [])


def _eos_ids(args) -> tuple[int, ...]:
    """End-of-sequence ids of the Hugging Face directory given as config or weights, if any."""
    from .config.hf import eos_token_ids
    folder = _hf_folder(args)
    return eos_token_ids(folder) if folder is not None else ()


def _hf_folder(args) -> Path | None:
    """The Hugging Face directory given as config or weights, if any."""
    from .config.hf import is_hf_dir
    return next((Path(p) for p in (args.config, args.weights) if is_hf_dir(p)), None)


def _prompt_source(args) -> tuple[Path, Path | None, Path | None]:
    """(the job's input, the prompts file, the tokenizer's folder) from exactly one of --input and
    --prompts; with --prompts the input is the batch rank 0 tokenises beside the output."""
    from .files.prompts import prompt_batch_path
    if (args.input is None) == (args.prompts is None):
        raise MoeHpcError("generate needs exactly one of --input (an HDF5 token batch) and --prompts "
                          f"(JSON Lines text prompts), got {'both' if args.input else 'neither'}")
    if args.input is not None:
        return Path(args.input), None, None
    # the checkpoint's folder: the HF directory given, else the folder holding --weights
    folder = _hf_folder(args) or Path(args.weights).resolve().parent
    return prompt_batch_path(args.output), Path(args.prompts), folder


def cmd_generate(args, comm) -> None:
    from .planner.fit import check_memory
    from .runtime.generate import generate_job
    from .runtime.job import Job
    source, prompts, tokenizer_dir = collective(comm, _prompt_source, args, debug=args.debug)
    args.set = args.set + _generate_overrides(args)
    cfg = _load_config(args, comm)
    _check_not_singletons(comm)
    eos = collective(comm, _eos_ids, args, debug=args.debug)
    job = Job(cfg, Path(args.weights), source, Path(args.output), args.overwrite, args.debug,
              restart=args.restart, progress=args.progress, progress_every=args.progress_every, stop=args.stop,
              summary=Path(args.summary) if args.summary else None, eos=eos,
              memory_check=functools.partial(check_memory, generate=True),     # with the KV cache
              prompts=prompts, tokenizer_dir=tokenizer_dir)
    _print_summary(generate_job(comm, job), args.summary)


def cmd_scaling_report(args, comm) -> None:
    from .tools.scaling import scaling_report
    print(scaling_report(Path(args.results), args.table and Path(args.table),
                         args.plot and Path(args.plot), args.title))


def cmd_make_trace(args, comm) -> None:
    from .tools.tracegen import make_trace_file
    cfg = _load_config(args, comm)
    shape = TraceShape(**{name: getattr(args, name) for name in vars(TraceShape())})
    on_rank0(comm, make_trace_file, cfg, args.cluster, args.output, shape, args.seed, args.overwrite, debug=args.debug)
    if comm.Get_rank() == 0:
        print(f"wrote {args.output}")


def cmd_place(args, comm) -> None:
    from .comm.failure import collective
    from .placement.search import format_report, place_to_file
    cfg = _load_config(args, comm)
    report = collective(comm, lambda: place_to_file(cfg, args.cluster, args.trace, args.output, args.steps,
                                                    args.seconds, args.overwrite) if comm.Get_rank() == 0 else None,
                        debug=args.debug)
    if comm.Get_rank() == 0:
        print(format_report(report))
        if args.json:
            print(json.dumps({"place": report}))
        print(f"wrote {args.output}")


def cmd_demo(args, comm) -> None:
    """Tiny end to end: weights and inputs (kept), a run, and a check against float64."""
    from .config.run_config import build_config
    from .model.reference import compare, read_output_hidden, reference_forward
    from .runtime.job import Job
    from .runtime.runner import run_job
    from .tools.synth import write_checkpoint, write_inputs
    folder = Path(args.dir)
    cfg = collective(comm, build_config, {}, DEMO_SETTINGS + args.set, where="<built-in tiny default>")
    weights, inputs, output = folder / "tiny_weights.h5", folder / "tiny_inputs.h5", folder / "tiny_output.h5"

    def prepare():
        folder.mkdir(parents=True, exist_ok=True)
        if not weights.exists():
            write_checkpoint(weights, cfg.model, seed=0)
        if not inputs.exists():
            write_inputs(inputs, cfg.model, sequences=8, seq_len=32, seed=1, ragged=True)
    on_rank0(comm, prepare, debug=args.debug)
    summary = run_job(comm, Job(cfg, weights, inputs, output, overwrite=True, debug=args.debug, restart=True))
    if comm.Get_rank() == 0:
        ref = reference_forward(weights, inputs)
        import h5py
        with h5py.File(inputs, "r") as f:
            lengths = f["lengths"][()]
        agreement = compare(read_output_hidden(output), ref, lengths)
        print(f"demo: {summary['tokens']} tokens on {comm.Get_size()} rank(s) in "
              f"{summary['wall_time_s']:.2f} s -> {output}")
        print(f"demo: vs float64 reference: {agreement} -> {'OK' if agreement.ok() else 'MISMATCH'}")
        if not agreement.ok():
            raise MoeHpcError("demo output does not match the float64 reference")


def cmd_import_hf(args, comm) -> None:
    from .tools.hf_import import import_hf
    on_rank0(comm, import_hf, args.folder, args.config, args.weights, args.overwrite, debug=args.debug)


def cmd_bench(args, comm) -> None:
    from .tools.bench import run_bench
    run_bench(comm, args)


def cmd_plan(args, comm) -> None:
    """Pure planning on one process (no MPI traffic): docs/plan.md."""
    from .planner.report import run_plan
    if comm.Get_rank() == 0:
        run_plan(args)


COMMANDS = {"init-weights": cmd_init_weights, "make-inputs": cmd_make_inputs, "run": cmd_run,
            "generate": cmd_generate,
            "demo": cmd_demo, "bench": cmd_bench, "scaling-report": cmd_scaling_report,
            "make-trace": cmd_make_trace, "place": cmd_place,
            "plan": cmd_plan, "import-hf": cmd_import_hf}


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    # Before MPI starts: a stop signal from then on is noted, never fatal.
    args.stop = StopRequest().install() if args.verb in ("run", "generate") else None
    comm = None
    try:
        comm = _world() if args.verb != "scaling-report" else None
    except ImportError as exc:
        print(f"error: mpi4py cannot load an MPI library ({exc}); install the [mpi] extra "
              "or load your cluster's MPI", file=sys.stderr)
        return 1
    try:
        COMMANDS[args.verb](args, comm)
        return 0
    except Interrupted as exc:
        if comm.Get_rank() == 0:
            sys.stderr.write(f"moe-hpc: {exc}\n")
        return EXIT_INTERRUPTED
    except PeerFailed:
        return 1
    except MoeHpcError as exc:
        if args.debug:
            traceback.print_exc()
        sys.stderr.write(f"error: {exc}\n")   # one write: ranks share stderr
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug: say so, and never leave other ranks hanging
        if args.debug:
            traceback.print_exc()
        where = f" on rank {comm.Get_rank()}" if comm is not None else ""
        sys.stderr.write(f"error: internal error{where}: {type(exc).__name__}: "
                         f"{exc} (rerun with --debug for a traceback)\n")
        if comm is not None and comm.Get_size() > 1:
            abort_job(comm, 1)
        return 1


if __name__ == "__main__":
    sys.exit(main())
