"""``moe-hpc plan``: put the plan together, print it (table or JSON), write the full rank table
and the DAGs, and refuse, with suggestions, a deployment whose memory does not fit.

Everything printed comes from deployment.py (layout), memory.py, time_model.py (seconds),
calibrate.py (measured figures) and dag.py (DAGs); this module only assembles and formats.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

from ..config.cluster import load_cluster
from ..config.errors import ConfigError
from ..config.run_config import load_config, validate
from ..files.atomic import write_text_atomic
from ..model.dense_tp import local_model
from ..model.flops import model_flops
from .calibrate import attention_fitted_on, calibrated_cluster, compare, fit, load_measured
from .dag import all_dags, ranges, verify, write_dags
from .deployment import Deployment, RankRow, make_layout, rank_rows
from .memory import GIB, cache_rows_fitting, fits, kv_cache_bytes, kv_cache_bytes_per_token, plan_memory
from .time_model import CATEGORIES, step_time
from .workload import flash_planned, workload_of

PHASE_NAMES = {"gate_topk": "gate + top-k", "plan_and_counts_d2h": "dispatch plan + counts to host",
               "pack_rows": "pack rows", "weighted_combine": "weighted sum", "t_experts_ms": "experts",
               "t_exchange_ms": "exchange (dispatch + combine)", "t_layer_ms": "MoE layer",
               "t_forward_ms": "whole model forward"}
CONSTANTS = ("mfu", "memory_util", "copy_util", "attention_mfu", "launch_us", "sync_us")


def experts_text(pairs) -> str:
    """[(block, expert)] -> 'L3-60:e5' (experts grouped by the blocks they share)."""
    by_expert: dict[int, list[int]] = {}
    for layer, e in pairs:
        by_expert.setdefault(e, []).append(layer)
    by_layers: dict[str, list[int]] = {}
    for e, layers in sorted(by_expert.items()):
        by_layers.setdefault(ranges(layers).replace(", ", ",L"), []).append(e)
    return " ".join(f"L{ls}:e{ranges(es).replace(', ', ',e')}" for ls, es in by_layers.items()) or "-"


def write_rank_table(rows: list[RankRow], path: Path) -> None:
    lines = ["rank\tnode\tlocal_gpu\treplica\trole\tdense_part\texpert_rank\tn_experts\texperts"]
    lines += [f"{r.rank}\t{r.node}\t{r.local_gpu}\t{r.replica}\t{r.role}\t{r.dense_part or '-'}\t{r.expert_rank}\t{len(r.experts)}\t"
              f"{experts_text(r.experts)}" for r in rows]
    write_text_atomic(path, "\n".join(lines) + "\n")


def rank_groups(rows: list[RankRow]) -> list[dict]:
    """Consecutive ranks of one (replica, role): their ranges and experts per GPU."""
    groups: list[list[RankRow]] = []
    for r in rows:
        if groups and (groups[-1][-1].replica, groups[-1][-1].role) == (r.replica, r.role):
            groups[-1].append(r)
        else:
            groups.append([r])
    return [{"replica": g[0].replica, "role": g[0].role, "ranks": ranges(r.rank for r in g),
             "nodes": ranges(r.node for r in g), "experts_per_gpu": ranges({len(r.experts) for r in g}),
             "first": g[0], "last": g[-1]} for g in groups]


def memory_by_role(memory) -> dict[str, dict]:
    """The fullest GPU of each role: its local rank and GiB by part."""
    out = {}
    for g in memory:
        if g.role not in out or g.memory.total > out[g.role]["bytes"]:
            out[g.role] = {"local_rank": g.local, "bytes": g.memory.total,
                           "gib": {k: v / GIB for k, v in dataclasses.asdict(g.memory).items()}}
    for v in out.values():
        v["gib"]["total"] = v["bytes"] / GIB
    return out


def suggestions(cfg, cluster, layout: Deployment, w, memory) -> list[str]:
    """What would make the fullest GPU fit, each re-planned with the same functions: smaller
    chunks or micro-batches alone; TP inside experts or more GPUs, alone or with one-sequence
    chunks; always the memory a GPU would need."""
    worst = max(memory, key=lambda g: g.memory.total).memory
    kind = layout.placement.kind

    def fits_with(cfg2=cfg, cluster2=cluster, tp=None) -> bool:
        same = cluster2 is cluster and (cfg2.model, cfg2.parallel) == (cfg.model, cfg.parallel)
        lay = layout if same else make_layout(cfg2, cluster2, kind)      # run keys never move experts
        return fits(plan_memory(cfg2, cluster2, lay, workload_of(cfg2, cluster2, w.slot_padding), tp), cluster2)

    def with_run(base=cfg, **kw):
        return dataclasses.replace(base, run=dataclasses.replace(base.run, **kw))
    out = []
    if worst.activations:
        smallest = cfg.run.pipeline_waves          # a chunk holds at least one sequence per wave
        chunk = next((c for c in range(cfg.run.chunk_sequences - 1, smallest - 1, -1)
                      if fits_with(with_run(chunk_sequences=c))), 0)
        if chunk:
            out.append(f"smaller chunks: --set run.chunk_sequences={chunk} fits")
    if worst.token_buffers:
        mbt = cfg.run.micro_batch_tokens // 2
        while mbt >= 256 and not fits_with(with_run(micro_batch_tokens=mbt)):
            mbt //= 2
        if mbt >= 256:
            out.append(f"smaller micro-batches: --set run.micro_batch_tokens={mbt} fits")
    bases = [(cfg, "")] + ([(with_run(chunk_sequences=1), " with --set run.chunk_sequences=1")]
                           if worst.activations and cfg.run.chunk_sequences > 1 else [])
    for base, also in bases if worst.expert_weights and not out else []:
        tp = next((t for t in (2, 4, 8) if fits_with(base, tp=t)), 0)
        grow = next((f for f in (2, 4, 8, 16) if fits_with(base, dataclasses.replace(cluster, nodes=cluster.nodes * f))), 0)
        if tp:
            out.append(f"tensor parallelism inside experts (--set parallel.expert_tp={tp}){also} fits: expert "
                       f"weights {worst.expert_weights / tp / GIB:.1f} GiB per GPU")
        if grow:
            out.append(f"more GPUs: {cluster.nodes * grow} nodes ({cluster.num_gpus * grow} GPUs){also} fit "
                       "(fewer experts per GPU)")
        if tp or grow:
            break
    if worst.dense_weights:
        T, tried = cfg.parallel.dense_tp * 2, None
        while T <= cfg.model.num_heads and tried is None:
            cand = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, dense_tp=T))
            try:
                validate(cand)
                tried = T if fits_with(cand) else None
            except ConfigError:
                pass
            T *= 2
        out.append(f"dense weights are {worst.dense_weights / GIB:.1f} GiB on every dense GPU whatever the GPU count"
                   + (f": tensor parallelism of attention and the dense MLP, --set parallel.dense_tp={tried}, fits"
                      if tried else ""))
    out.append(f"or GPUs with at least {math.ceil(worst.total / GIB)} GiB")
    return out


def fit_dense_side(cfg, cluster, kind=None):
    """The config's plan, or, when its fullest GPU does not fit and the config leaves
    ``parallel.dense_tp`` and ``parallel.dense_stages`` at 1, the plan with the smallest dense
    split that fits: (dense TP, stages) pairs in order of their product, TP first (it also
    splits the activations). -> (config, deployment, workload, memory, the split chosen or None)."""
    layout, w = make_layout(cfg, cluster, kind), workload_of(cfg, cluster)
    memory = plan_memory(cfg, cluster, layout, w)
    p = cfg.parallel
    if fits(memory, cluster) or p.dense_tp > 1 or p.dense_stages > 1:
        return cfg, layout, w, memory, None
    powers = [2 ** i for i in range(8)]
    for T, P in sorted(((T, P) for T in powers for P in powers if T * P > 1), key=lambda tp: (tp[0] * tp[1], -tp[0])):
        cand = dataclasses.replace(cfg, parallel=dataclasses.replace(p, dense_tp=T, dense_stages=P))
        try:
            validate(cand)
            lay = make_layout(cand, cluster, kind)
        except ConfigError:
            continue
        mem = plan_memory(cand, cluster, lay, w)
        if fits(mem, cluster):
            return cand, lay, w, mem, {"parallel.dense_tp": T, "parallel.dense_stages": P}
    return cfg, layout, w, memory, None


def build(args) -> dict:
    """The whole plan as one dict (what --format json prints)."""
    t0 = time.perf_counter()
    cfg = load_config(args.config, args.set)
    cluster = load_cluster(args.cluster)
    result: dict = {"config": args.config, "cluster": args.cluster}
    if args.measured:
        measured = [load_measured(p, cluster, args.config) for p in args.measured]
        gpu = fit(cluster, measured)
        checks = [load_measured(p, cluster, args.config) for p in args.validate]
        result["calibration"] = {"constants": {k: float(getattr(gpu, k)) for k in CONSTANTS},
                                 "files": [_comparison(c) for c in compare(cluster, measured, gpu, True)
                                           + compare(cluster, checks, gpu, False)]}
        # a rate fitted on one attention core says nothing of the other's
        core = attention_fitted_on(measured)
        other = core is not None and core != flash_planned(cfg)
        result["calibration"]["attention_mfu_used"] = not other
        cluster = calibrated_cluster(cluster, gpu, keep_attention=other)
    cfg, layout, w, memory, chosen = fit_dense_side(cfg, cluster, args.placement)
    if chosen:
        result["chose"] = dict(chosen, why="with whole blocks on every dense GPU, a dense GPU does not fit")
    rows = rank_rows(layout)
    table = Path(args.table or f"plan-{cluster.name}-ranks.tsv")
    write_rank_table(rows, table)
    dags = all_dags(layout, w)
    result.update(_summary(cfg, cluster, layout, w), rank_table=str(table),
                  rank_groups=[{k: v for k, v in g.items() if k not in ("first", "last")} | {
                      end: f"rank {g[end].rank}: {experts_text(g[end].experts)}" for end in ("first", "last")}
                      for g in rank_groups(rows)],
                  memory=memory_by_role(memory), capacity_gib=cluster.gpu.memory_gib,
                  fits=fits(memory, cluster),
                  dags=[{"name": d.name, "nodes": len(d.nodes), "edges": len(d.edges),
                         "problems": verify(d, layout)} for d in dags])
    result["kv_cache"]["sequences_fit"] = _kv_sequences_fit(cfg, cluster, layout, w) if result["fits"] else None
    if args.dot:
        written, svg = write_dags(dags, layout, Path(args.dot), cluster.name)
        result["dot"] = {"files": [str(p) for p in written], "svg": svg}
    if result["fits"]:
        result["time"] = _times(cfg, cluster, layout, w)
    else:
        result["suggestions"] = suggestions(cfg, cluster, layout, w, memory)
    result["planner_seconds"] = time.perf_counter() - t0
    result["_rows"] = rows
    return result


def _comparison(c) -> dict:
    return {"file": c.measured.path, "device": c.measured.device, "ranks": c.measured.bench["ranks"],
            "tokens": c.measured.bench["layer"]["tokens_per_gpu"],
            "micro_batches": c.measured.bench["layer"]["micro_batches"], "fitted_on": c.fitted_on,
            "ms": {k: {"default": c.default[k], "calibrated": c.calibrated[k], "measured": c.actual[k]}
                   for k in c.actual}}


def _summary(cfg, cluster, layout: Deployment, w) -> dict:
    m, gpu, net = cfg.model, cluster.gpu, cluster.network
    return {"model": {"blocks": m.num_layers, "dense_blocks": m.first_dense_layers, "moe_blocks": m.num_moe_layers,
                      "experts": m.num_experts, "top_k": m.top_k, "hidden": m.hidden_size,
                      "expert_hidden": m.moe_ffn_hidden_size, "gflop_per_token": model_flops(m, w.seq_len) / 1e9},
            "gpus": layout.world_size, "nodes": cluster.nodes, "gpus_per_node": cluster.gpus_per_node,
            "rails": cluster.rails,
            "replicas": layout.replicas, "placement": layout.placement.kind,
            "dense_only_gpus": layout.replicas * len(layout.dense_set - set(layout.roles.expert_ranks)),
            "expert_gpus": layout.replicas * len(layout.roles.expert_ranks),
            "gpu": dataclasses.asdict(gpu), "network": dataclasses.asdict(net),
            "workload": {"sequences_per_chunk": w.sequences, "seq_len": w.seq_len, "tokens_per_dense_gpu": w.tokens,
                         "micro_batches": w.micro_batches, "micro_batch_tokens": w.mb_tokens,
                         "slot_padding": w.slot_padding,
                         "attention_core": "flash (cuDNN)" if w.flash else "tiles (fp32)"},
            "kv_cache": _kv_cache(cfg, w)}


def _kv_cache(cfg, w) -> dict:
    """What ``moe-hpc generate`` adds on a dense GPU: its KV cache, per position and block and for
    a group of run.chunk_sequences (at most generate.decode_slots of them at once) x (seq_len +
    generate.max_new_tokens) positions (the fullest stage's)."""
    m, p, N = cfg.model, cfg.parallel, cfg.generate.max_new_tokens
    rows = cfg.generate.cache_rows(w.sequences)
    group = max(kv_cache_bytes(m, rows, w.seq_len + N, p.dense_tp, s, p.dense_stages)
                for s in range(p.dense_stages))
    return {"bytes_per_token_and_block": kv_cache_bytes_per_token(local_model(m, p.dense_tp)),
            "blocks": m.num_layers, "sequences": rows, "positions": w.seq_len + N, "group_gib": group / GIB,
            "vocabulary": m.vocab_size > 0}


def _kv_sequences_fit(cfg, cluster, layout, w) -> int | None:
    """How many sequences' KV caches fit on each dense GPU beside the rest of what a generate job
    holds there (the plan's memory with the LM head, which generate always loads), the fewest
    over the dense GPUs (0 when not one fits)."""
    memory = plan_memory(cfg, cluster, layout, w, new_tokens=cfg.generate.max_new_tokens)
    cap, rows = int(cluster.gpu.memory_gib * GIB), cfg.generate.cache_rows(w.sequences)
    room = [cache_rows_fitting(g.memory, rows, cap) for g in memory if g.memory.kv_cache]
    return max(0, int(min(room))) if room else 0


def _kv_fit_hint(kv: dict) -> str:
    n = kv["sequences_fit"]
    if not kv["vocabulary"]:
        return " (but this model has no vocabulary, model.vocab_size = 0: generate refuses it)"
    if n is None:
        return " (none: the plan does not fit without one; see its suggestions)"
    if n >= kv["sequences"]:
        return ""
    if n == 0:
        return " (not one: split the dense side, parallel.dense_tp or parallel.dense_stages)"
    return f" (fewer than the group's: --set run.chunk_sequences={n} or --set generate.decode_slots={n})"


def _times(cfg, cluster, layout, w) -> dict:
    step = step_time(cfg, cluster, layout, w)
    slow = step.slowest_moe()
    dense = next((b for b in step.blocks if "dense_mlp" in b.phases), None)
    flops = model_flops(cfg.model, w.seq_len)
    return {"step_s": step.seconds, "tokens_per_step": step.tokens, "tokens_per_s": step.tokens_per_s,
            "tokens_per_s_per_gpu": step.tokens_per_s / layout.world_size,
            "mfu": step.tokens_per_s * flops / (layout.world_size * cluster.gpu.peak_tflops * 1e12),
            "shares": step.shares, "expert_busy": step.expert_busy_fraction(),
            "stages_s": step.stage_seconds if step.stage_of else None, "waves": step.waves,
            "moe_block": None if slow is None else {"block": slow.layer, "total_ms": slow.seconds * 1e3,
                                                    **{k: v * 1e3 for k, v in slow.phases.items()}},
            "dense_block": None if dense is None else {"block": dense.layer, "total_ms": dense.seconds * 1e3,
                                                       **{k: v * 1e3 for k, v in dense.phases.items()}}}


# ---------------------------------------------------------------------------- text

def _pct(x: float) -> str:
    return f"{x:+.0%}" if abs(x) >= 0.005 else "0%"


def render_calibration(cal: dict) -> list[str]:
    c = cal["constants"]
    out = ["calibration (ms; default = the cluster file's constants, calibrated = fitted; error = calibrated vs measured)"]
    for f in cal["files"]:
        out.append(f"  {f['file']}: {f['device']}, {f['ranks']} GPU, {f['tokens']} tokens, "
                   f"{f['micro_batches']} micro-batch(es){'' if f['fitted_on'] else ', NOT used in the fit'}")
        out.append(f"    {'figure':<32}{'default':>9}{'calibrated':>12}{'measured':>10}{'error':>8}")
        for k, v in f["ms"].items():
            out.append(f"    {PHASE_NAMES[k]:<32}{v['default']:>9.3f}{v['calibrated']:>12.3f}{v['measured']:>10.3f}"
                       f"{_pct(v['calibrated'] / v['measured'] - 1):>8}")
    out.append(f"  fitted: GEMM mfu {c['mfu']:.3f}, memory_util {c['memory_util']:.3f}, copy_util {c['copy_util']:.3f}, "
               f"attention_mfu {c['attention_mfu'] or c['mfu']:.4f}, launch_us {c['launch_us']:.1f}, "
               f"sync_us {c['sync_us']:.0f} (the plan below uses them"
               + ("" if cal.get("attention_mfu_used", True) else
                  ", but not attention_mfu: it was fitted on the other attention core than the plan's, "
                  "so the cluster file's stands") + ")")
    return out


def render_layout(r: dict, rows) -> list[str]:
    m, wl, kv = r["model"], r["workload"], r["kv_cache"]
    out = [f"model      {m['blocks']} blocks ({m['dense_blocks']} dense + {m['moe_blocks']} MoE x {m['experts']} experts, "
           f"top-{m['top_k']}), H {m['hidden']}, expert F {m['expert_hidden']}, {m['gflop_per_token']:.1f} GFLOP/token",
           f"cluster    {r['nodes']} nodes x {r['gpus_per_node']} GPUs = {r['gpus']} GPUs; {r['gpu']['peak_tflops']:.0f} "
           f"TFLOP/s x {r['gpu']['mfu']:.2f}, {r['gpu']['memory_gib']:.0f} GiB, {r['gpu']['memory_tb_s']} TB/s x "
           f"{r['gpu']['memory_util']:.2f}; links {r['network']['intra_node_gb_s']:.0f} GB/s in a node, "
           f"{r['rails']} x {r['network']['inter_node_gb_s']:.0f} GB/s rails per node between nodes",
           "layout     " + (f"{r['replicas']} data-parallel replicas (the runner's parallel.dp) x "
                             f"{r['gpus'] // r['replicas']} GPUs, in all: " if r["replicas"] > 1 else "")
           + f"{r['expert_gpus']} expert GPUs, {r['dense_only_gpus']} dense-only GPUs"
           f"{' (roles co-located)' if not r['dense_only_gpus'] else ''}; placement {r['placement']}",
           f"workload   per dense GPU and step: {wl['sequences_per_chunk']} sequence(s) x {wl['seq_len']} = "
           f"{wl['tokens_per_dense_gpu']} tokens, {wl['micro_batches']} micro-batch(es) of {wl['micro_batch_tokens']}; "
           f"attention core {wl['attention_core']}",
           f"KV cache   (moe-hpc generate) {kv['bytes_per_token_and_block'] / 1024:.2f} KiB per position and block "
           f"({kv['blocks']} blocks); a group of {kv['sequences']} sequence(s) x {kv['positions']} positions "
           f"(seq_len + generate.max_new_tokens): {kv['group_gib']:.2f} GiB per dense GPU; "
           f"{'no' if kv['sequences_fit'] is None else kv['sequences_fit']} sequences' caches fit beside "
           "the plan's memory and the LM head"
           + _kv_fit_hint(kv),
           f"rank table {len(rows)} ranks, all of them in {r['rank_table']}:",
           f"  {'replica':<8}{'role':<14}{'ranks':<16}{'nodes':<12}{'experts/GPU':<12}first -> last"]
    out += [f"  {g['replica']:<8}{g['role']:<14}{g['ranks']:<16}{g['nodes']:<12}{g['experts_per_gpu']:<12}"
            f"{g['first']} -> {g['last']}" for g in r["rank_groups"]]
    return out


def render_memory(r: dict) -> list[str]:
    roles = list(r["memory"])
    out = [f"memory     GiB on the fullest GPU of each role (capacity {r['capacity_gib']:.0f} GiB)",
           "  " + f"{'':<16}" + "".join(f"{role:>14}" for role in roles)]
    for part in ("dense_weights", "expert_weights", "activations", "token_buffers", "transport", "reserved", "total"):
        out.append("  " + f"{part.replace('_', ' '):<16}" + "".join(f"{r['memory'][x]['gib'][part]:>14.2f}" for x in roles))
    verdict = ["fits" if r["memory"][x]["gib"]["total"] <= r["capacity_gib"] else "DOES NOT FIT" for x in roles]
    out.append("  " + f"{'':<16}" + "".join(f"{v:>14}" for v in verdict))
    return out


def render_time(t: dict, gpus: int) -> list[str]:
    mb, db = t["moe_block"], t["dense_block"]
    out = ["time       ms per block on the critical path (slowest GPU)"]
    if mb:
        out.append(f"  MoE block {mb['block']}: attention {mb['attention']:.2f}, gating {mb['gating']:.2f}, dispatch "
                   f"{mb['dispatch']:.2f}, experts {mb['experts']:.2f}, combine {mb['combine']:.2f}, pack + weighted sum "
                   f"{mb['local']:.2f}; overlapped dispatch..combine {mb['moe']:.2f} -> block {mb['total_ms']:.2f}")
    if db:
        out.append(f"  dense block {db['block']}: attention {db['attention']:.2f}, dense MLP {db['dense_mlp']:.2f} -> "
                   f"block {db['total_ms']:.2f}")
    if t["stages_s"]:
        out.append("  stages: " + ", ".join(f"{v:.3f}" for v in t["stages_s"]) + " s busy each (their blocks and "
                   f"the hand-over); {t['waves']} wave(s) step through them in lockstep (engine schedule)")
    out += [f"step       {t['step_s']:.3f} s for {t['tokens_per_step']:,} tokens: {t['tokens_per_s']:,.0f} tokens/s "
            f"({t['tokens_per_s_per_gpu']:,.0f} per GPU), MFU {t['mfu']:.1%} of {gpus} GPUs",
            "shares     " + ", ".join(f"{k} {t['shares'][k]:.0%}" for k in CATEGORIES),
            f"busy       the busiest expert GPU computes {t['expert_busy']:.2%} of the step (every rank steps through "
            f"every block together)"]
    return out


def render(r: dict) -> str:
    out = [f"moe-hpc plan: {r['config']} on {r['cluster']} (planned in {r['planner_seconds']:.1f} s)"]
    if "calibration" in r:
        out += render_calibration(r["calibration"])
    if "chose" in r:
        sets = {k: v for k, v in r["chose"].items() if k != "why" and v > 1}
        out.append(f"chose      {', '.join(f'{k} = {v}' for k, v in sets.items())}: {r['chose']['why']} "
                   f"({' '.join(f'--set {k}={v}' for k, v in sets.items())} runs this plan)")
    out += render_layout(r, r["_rows"]) + render_memory(r)
    if "time" in r:
        out += render_time(r["time"], r["gpus"])
    out.append("DAGs       " + "; ".join(f"{d['name']}: {d['nodes']} nodes, {d['edges']} edges, "
                                        f"{'verified' if not d['problems'] else 'FAILED: ' + ' | '.join(d['problems'])}"
                                        for d in r["dags"]))
    if "dot" in r:
        out.append(f"           written: {', '.join(r['dot']['files'])}" + (
            "" if r["dot"]["svg"] else " (Graphviz 'dot' not found: DOT only; install graphviz for SVG)"))
    if "suggestions" in r:
        out.append("refused    the plan does not fit in GPU memory; to make it fit:")
        out += [f"  - {s}" for s in r["suggestions"]]
    return "\n".join(out)


def run_plan(args, out=print) -> dict:
    """The ``plan`` verb: print the plan; a plan that does not fit, or a DAG that fails its
    check, ends with a ConfigError (one ``error:`` line, exit 1) after the report."""
    if args.validate and not args.measured:
        raise ConfigError("--validate needs --measured (the files the constants are fitted on)")
    r = build(args)
    public = {k: v for k, v in r.items() if k != "_rows"}
    out(json.dumps(public, indent=2, default=str) if args.format == "json" else render(r))
    if not r["fits"]:
        worst = max(r["memory"].items(), key=lambda kv: kv[1]["bytes"])
        raise ConfigError(f"{args.cluster}: the plan does not fit: a {worst[0]} GPU needs {worst[1]['gib']['total']:.1f} "
                          f"GiB of {r['capacity_gib']:.0f} GiB (suggestions above)")
    failed = [d["name"] for d in r["dags"] if d["problems"]]
    if failed:
        raise ConfigError(f"DAG verification failed for {', '.join(failed)} (problems above)")
    return public


def add_arguments(p) -> None:
    """The ``plan`` verb's options (docs/plan.md)."""
    p.add_argument("config")
    p.add_argument("--cluster", required=True, help="cluster description TOML (docs/plan.md)")
    p.add_argument("--placement", choices=("auto", "shared", "disjoint"), help="override parallel.placement")
    p.add_argument("--format", choices=("table", "json"), default="table")
    p.add_argument("--dot", metavar="DIR", help="write the DAGs as DOT (and SVG when Graphviz is installed)")
    p.add_argument("--table", metavar="FILE", help="the full rank table (default: plan-<cluster>-ranks.tsv)")
    p.add_argument("--measured", action="append", default=[], metavar="BENCH.json",
                   help="a `moe-hpc bench` JSON: compare and fit the model's constants (repeatable)")
    p.add_argument("--validate", action="append", default=[], metavar="BENCH.json",
                   help="a bench JSON predicted with the fitted constants, not used in the fit (repeatable)")
    p.add_argument("--set", action="append", default=[], metavar="TABLE.KEY=VALUE",
                   help="override a config key (repeatable)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")


__all__ = ["add_arguments", "run_plan", "render", "build", "experts_text", "write_rank_table", "rank_groups", "memory_by_role", "suggestions",
           "PHASE_NAMES", "CONSTANTS"]
