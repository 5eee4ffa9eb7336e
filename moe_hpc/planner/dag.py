"""Deployment DAGs at three zoom levels, their verifier, and DOT (SVG through Graphviz).

- ``deployment_dag``: the whole run, grouped: the dense blocks, then the MoE blocks in at most
  ``MAX_BANDS`` bands (gate -> experts -> weighted sum), each node naming its GPU ranges, so
  3,904 GPUs stay one readable page;
- ``layer_dag``: one MoE block, one node per hosted (expert, GPU);
- ``expert_dag``: one expert on one GPU: slot rows, the two GEMMs, the activation.

A node carries its operation, the world ranks that run it, the tensor shapes it consumes and
produces (per GPU, bf16 unless a label says otherwise), and for expert nodes the
(block, expert, GPU) triples it computes.  Edges carry shapes; communication edges are dashed.
``verify`` checks what the docstring of that function lists, against the placement itself.
"""
from __future__ import annotations

import math
import shutil
import subprocess
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path

from ..config.roles import stage_blocks
from ..files.atomic import atomic_path, write_text_atomic
from .deployment import Deployment
from .workload import Workload

MAX_BANDS = 8
Shape = tuple[int, ...]
COLOURS = {"dense": "#dbe9f6", "expert": "#fde3c8", "comm": "#eeeeee", "io": "#e2f0d9"}


@dataclass
class Node:
    id: str
    op: str
    kind: str                                    # dense | expert | comm | io (colour only)
    gpus: tuple[int, ...]
    inputs: tuple[Shape, ...]
    outputs: tuple[Shape, ...]
    experts: tuple[tuple[int, int, int], ...] = ()
    note: str = ""


@dataclass(frozen=True)
class Edge:
    src: str
    dst: str
    shape: Shape
    comm: bool = False
    skip: bool = False          # a skip connection (residual, weights): drawn, never ranks nodes


@dataclass
class Dag:
    """scope: the (blocks, experts or None = all, GPUs or None = all) whose experts it shows."""
    name: str
    nodes: dict[str, Node] = field(default_factory=dict)
    edges: list[Edge] = field(default_factory=list)
    source: str = "input"
    sink: str = "output"
    scope: tuple = ((), None, None)
    rankdir: str = "TB"                          # LR stacks many expert nodes vertically

    def add(self, node: Node) -> Node:
        self.nodes[node.id] = node
        return node

    def link(self, src: str, dst: str, shape: Shape, comm: bool = False, skip: bool = False) -> None:
        self.edges.append(Edge(src, dst, tuple(shape), comm, skip))


def ranges(values) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    vals, out = sorted(set(values)), []
    for v in vals:
        if out and v == out[-1][1] + 1:
            out[-1][1] = v
        else:
            out.append([v, v])
    return ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in out)


def _where(layout: Deployment, gpus) -> str:
    gpus = sorted(set(gpus))
    if not gpus:
        return "no GPU"
    nodes = {layout.node(g) for g in gpus}
    return f"GPU {ranges(gpus)} (node {ranges(nodes)})" if len(gpus) < 3 else \
        f"{len(gpus)} GPUs {ranges(gpus)}, nodes {ranges(nodes)}"


def _all(layout: Deployment, local_ranks) -> tuple[int, ...]:
    """Local ranks of a replica -> their world ranks in every replica."""
    return tuple(layout.world_rank(r, g) for r in range(layout.replicas) for g in local_ranks)


def _hosts(layout: Deployment, layers) -> list[tuple[int, int, int]]:
    """(block, expert, world rank) for the given blocks, from the placement's inverse map."""
    layers = set(layers)
    return [(l, e, layout.world_rank(r, layout.roles.expert_ranks[g]))
            for r in range(layout.replicas) for g in range(layout.placement.num_expert_ranks)
            for l, e in layout.hosted(g) if l in layers]


def _rows_per_holder(layout: Deployment, w: Workload, layer: int, expert: int) -> int:
    """Rows one holder of (layer, expert) receives in a step: all dense ranks' T*k rows spread
    uniformly over the experts, then evenly over the expert's replicas."""
    k, E = layout.model.top_k, layout.model.num_experts
    reps = len(layout.placement.replicas(layer, expert))
    return math.ceil(len(layout.routers) * w.tokens * k / (E * reps))


def _segments(m, stages: int) -> list[tuple[int, str, list[int]]]:
    """(stage, "dense" | "moe", blocks) runs of consecutive blocks of one kind on one stage;
    MoE runs cut into bands so the whole model draws as at most about MAX_BANDS of them."""
    moe = list(m.moe_layers)
    per_band = max(1, math.ceil(len(moe) / MAX_BANDS)) if moe else 1
    out = []
    for stage, blocks in enumerate(stage_blocks(m.num_layers, stages)):
        dense = [b for b in blocks if not m.is_moe(b)]
        if dense:
            out.append((stage, "dense", dense))
        ours = [b for b in blocks if m.is_moe(b)]
        out += [(stage, "moe", ours[i:i + per_band]) for i in range(0, len(ours), per_band)]
    return out


def _span(blocks) -> str:
    return f"{blocks[0]}-{blocks[-1]}" if len(blocks) > 1 else f"{blocks[0]}"


def deployment_dag(layout: Deployment, w: Workload) -> Dag:
    """The run, grouped. Dense nodes run on their stage's dense ranks; with ``dense_tp`` > 1 each
    block ends with its group's fp32 all-reduce (named on the node), and a stage hands its
    sequences' activations to the next over a dashed edge."""
    m, roles = layout.model, layout.roles
    T, H, k = w.tokens, m.hidden_size, m.top_k
    P, tp = roles.dense_stages, roles.dense_tp
    on_stage = [_all(layout, [r for r in roles.dense_ranks if roles.stage_of(r) == s]) for s in range(P)]
    copies = f", {layout.replicas} replicas" if layout.replicas > 1 else ""
    dag = Dag(f"deployment ({layout.world_size} GPUs{copies})", scope=(tuple(m.moe_layers), None, None))
    dag.add(Node("input", "read chunk (S x L tokens)", "io", on_stage[0], (), ((T, H),)))
    reduce = (f"; TP {tp}: fp32 all-reduce [{T}, {H}] after attention (and a dense MLP), the leader's "
              f"MoE output broadcast") if tp > 1 else ""
    prev, prev_stage = "input", 0
    for i, (stage, kind, blocks) in enumerate(_segments(m, P)):
        if stage != prev_stage:
            send = f"send{stage}"
            dag.add(Node(send, f"stage {prev_stage} -> {stage}: activations (host MPI)", "comm",
                         on_stage[prev_stage], ((T, H),), ((T, H),)))
            dag.link(prev, send, (T, H))
            prev, prev_stage = send, stage
        span, ranks = _span(blocks), on_stage[stage]
        edge = {"comm": prev.startswith("send")}
        if kind == "dense":
            dag.add(Node(f"dense{i}", f"blocks {span}: attention + dense MLP", "dense", ranks, ((T, H),), ((T, H),),
                         note=reduce.lstrip("; ")))
            dag.link(prev, f"dense{i}", (T, H), **edge)
            prev = f"dense{i}"
            continue
        tag, hosts = f"band{i}", _hosts(layout, blocks)
        gpus = tuple(sorted({g for _, _, g in hosts}))
        dag.add(Node(f"{tag}_gate", f"blocks {span}: attention + gate + top-k", "dense", ranks,
                     ((T, H),), ((T * k, H), (T, H)), note=f"stage {stage}{reduce}" if P > 1 or tp > 1 else ""))
        dag.add(Node(f"{tag}_experts", f"experts of blocks {span}: {len(hosts)} hosted", "expert", gpus,
                     ((T * k, H),), ((T * k, H),), tuple(hosts),
                     note=f"{len(blocks)} block(s) in turn, {len(hosts) // max(len(gpus), 1)} per GPU"))
        dag.add(Node(f"{tag}_sum", f"blocks {span}: weighted sum + residual", "dense", ranks,
                     ((T * k, H), (T, H)), ((T, H),)))
        dag.link(prev, f"{tag}_gate", (T, H), **edge)
        dag.link(f"{tag}_gate", f"{tag}_experts", (T * k, H), comm=True)
        dag.link(f"{tag}_experts", f"{tag}_sum", (T * k, H), comm=True)
        dag.link(f"{tag}_gate", f"{tag}_sum", (T, H))
        prev = f"{tag}_sum"
    dag.add(Node("output", "final norm + write", "io", on_stage[-1], ((T, H),), ()))
    dag.link(prev, "output", (T, H))
    return dag


def layer_dag(layout: Deployment, w: Workload, layer: int) -> Dag:
    m = layout.model
    T, H, k, E = w.tokens, m.hidden_size, m.top_k, m.num_experts
    dense = _all(layout, layout.roles.dense_ranks)
    dag = Dag(f"MoE block {layer}", scope=((layer,), None, None), rankdir="LR")
    steps = [("input", "block input x", "io", (), ((T, H),)),
             ("attention", "rmsnorm + attention + residual", "dense", ((T, H),), ((T, H), (T, H))),
             ("norm", "rmsnorm", "dense", ((T, H),), ((T, H), (T, H))),
             ("gate", "gate GEMM + softmax (fp32)", "dense", ((T, H),), ((T, E),)),
             ("topk", "top-k + weights", "dense", ((T, E),), ((T, k), (T, k))),
             ("plan", "plan: sort by (rank, expert)", "dense", ((T, k),), ((T * k,),)),
             ("pack", "pack rows", "dense", ((T, H), (T * k,)), ((T * k, H),))]
    for id_, op, kind, ins, outs in steps:
        dag.add(Node(id_, op, kind, dense, ins, outs))
    for a, b, s in [("input", "attention", (T, H)), ("attention", "norm", (T, H)), ("norm", "gate", (T, H)),
                    ("gate", "topk", (T, E)), ("topk", "plan", (T, k)), ("norm", "pack", (T, H)),
                    ("plan", "pack", (T * k,))]:
        dag.link(a, b, s)
    hosts = sorted(_hosts(layout, [layer]), key=lambda t: (t[1], t[2]))
    rows = [_rows_per_holder(layout, w, layer, e) for _, e, _ in hosts]
    gpus = tuple(sorted({g for _, _, g in hosts}))
    dag.add(Node("dispatch", "dispatch (all-to-all)", "comm", dense + gpus, ((T * k, H),),
                 tuple((r, H) for r in rows)))
    dag.add(Node("combine", "combine (all-to-all back)", "comm", dense + gpus, tuple((r, H) for r in rows),
                 ((T * k, H),)))
    dag.link("pack", "dispatch", (T * k, H), comm=True)
    for (l, e, g), r in zip(hosts, rows):
        node = dag.add(Node(f"e{e}_g{g}", f"expert {e}", "expert", (g,), ((r, H),), ((r, H),), ((l, e, g),)))
        dag.link("dispatch", node.id, (r, H), comm=True)
        dag.link(node.id, "combine", (r, H), comm=True)
    dag.add(Node("sum", "weighted sum + residual", "dense", dense, ((T * k, H), (T, k), (T, H)), ((T, H),)))
    dag.add(Node("output", "block output", "io", dense, ((T, H),), ()))
    dag.link("combine", "sum", (T * k, H), comm=True)
    dag.link("topk", "sum", (T, k), skip=True)
    dag.link("attention", "sum", (T, H), skip=True)
    dag.link("sum", "output", (T, H))
    return dag


def expert_dag(layout: Deployment, w: Workload, layer: int, expert: int) -> Dag:
    """The expert's first holder (replica 0): rows in, slot padding, GEMM, activation, GEMM."""
    m = layout.model
    H, F = m.hidden_size, m.moe_ffn_hidden_size
    g = layout.world_rank(0, layout.roles.expert_ranks[layout.placement.replicas(layer, expert)[0]])
    r = _rows_per_holder(layout, w, layer, expert)
    p = 8 * math.ceil(r * (1 + w.slot_padding) / 8)
    dense = tuple(layout.world_rank(0, d) for d in layout.roles.dense_ranks)      # its replica's
    dag = Dag(f"block {layer} expert {expert} on GPU {g}", source="dispatch", sink="combine",
              scope=((layer,), (expert,), frozenset({g})))
    on = (g,)
    for id_, op, kind, gpus, ins, outs, ex in [
            ("dispatch", "dispatch: rows from the dense ranks", "comm", dense + on, (), ((r, H),), ()),
            ("slot", "expert slot (busiest rows, padded to 8)", "expert", on, ((r, H),), ((p, H),), ()),
            ("w1", f"GEMM x @ w1 [{H}, {F}]", "expert", on, ((p, H),), ((p, F),), ((layer, expert, g),)),
            ("act", f"bias b1 + {m.activation}", "expert", on, ((p, F),), ((p, F),), ()),
            ("w2", f"GEMM h @ w2 [{F}, {H}]", "expert", on, ((p, F),), ((p, H),), ()),
            ("unslot", "real rows only (padding never sent)", "expert", on, ((p, H),), ((r, H),), ()),
            ("combine", "combine: rows back (b2 added there)", "comm", dense + on, ((r, H),), (), ())]:
        dag.add(Node(id_, op, kind, gpus, ins, outs, ex))
    for a, b, s, c in [("dispatch", "slot", (r, H), True), ("slot", "w1", (p, H), False),
                       ("w1", "act", (p, F), False), ("act", "w2", (p, F), False),
                       ("w2", "unslot", (p, H), False), ("unslot", "combine", (r, H), True)]:
        dag.link(a, b, s, c)
    return dag


def all_dags(layout: Deployment, w: Workload) -> list[Dag]:
    m = layout.model
    if not m.num_moe_layers:
        return [deployment_dag(layout, w)]
    first = m.first_dense_layers
    return [deployment_dag(layout, w), layer_dag(layout, w, first), expert_dag(layout, w, first, 0)]


# ---------------------------------------------------------------------------- verification

def expected_experts(layout: Deployment, scope) -> Counter:
    """What the placement says: (block, expert, world rank) for every holder in the scope."""
    layers, experts, gpus = scope
    out = Counter()
    for r in range(layout.replicas):
        for l in layers:
            for e in experts if experts is not None else range(layout.model.num_experts):
                for g in layout.placement.replicas(l, e):
                    world = layout.world_rank(r, layout.roles.expert_ranks[g])
                    if gpus is None or world in gpus:
                        out[(l, e, world)] += 1
    return out


def _cycle(dag: Dag) -> list[str]:
    """Nodes left after peeling every node without incoming edges (Kahn): empty iff acyclic."""
    indeg = Counter(e.dst for e in dag.edges)
    ready = deque(n for n in dag.nodes if indeg[n] == 0)
    seen = 0
    while ready:
        n = ready.popleft()
        seen += 1
        for e in dag.edges:
            if e.src == n:
                indeg[e.dst] -= 1
                if indeg[e.dst] == 0:
                    ready.append(e.dst)
    return sorted(n for n in dag.nodes if indeg[n] > 0) if seen < len(dag.nodes) else []


def _reach(dag: Dag, start: str, forward: bool) -> set[str]:
    nxt: dict[str, list[str]] = {}
    for e in dag.edges:
        a, b = (e.src, e.dst) if forward else (e.dst, e.src)
        nxt.setdefault(a, []).append(b)
    seen, todo = {start}, [start]
    while todo:
        for b in nxt.get(todo.pop(), []):
            if b not in seen:
                seen.add(b)
                todo.append(b)
    return seen


def verify(dag: Dag, layout: Deployment) -> list[str]:
    """Problems found (empty: the DAG is sound): every edge joins known nodes; acyclic; every
    node reachable from the source and reaching the sink; on every node the shapes of its
    incoming and outgoing edges are exactly its declared inputs and outputs; every operation
    runs on at least one GPU of the deployment; the expert triples of all nodes together are
    exactly the placement's for the DAG's scope (none missing, none extra, none twice)."""
    problems = [f"edge {e.src} -> {e.dst} joins an unknown node" for e in dag.edges
                if e.src not in dag.nodes or e.dst not in dag.nodes]
    if problems:
        return problems
    cycle = _cycle(dag)
    if cycle:
        problems.append(f"cycle through {', '.join(cycle[:6])}")
    src, dst = _reach(dag, dag.source, True), _reach(dag, dag.sink, False)
    problems += [f"{n} is not reachable from {dag.source}" for n in dag.nodes if n not in src]
    problems += [f"{n} does not reach {dag.sink}" for n in dag.nodes if n not in dst]
    for n in dag.nodes.values():
        got_in = Counter(e.shape for e in dag.edges if e.dst == n.id)
        got_out = Counter(e.shape for e in dag.edges if e.src == n.id)
        if got_in != Counter(n.inputs):
            problems.append(f"{n.id}: input shapes {_diff(got_in, Counter(n.inputs))}")
        if got_out != Counter(n.outputs):
            problems.append(f"{n.id}: output shapes {_diff(got_out, Counter(n.outputs))}")
        if not n.gpus or any(not 0 <= g < layout.world_size for g in n.gpus):
            problems.append(f"{n.id} ({n.op}) is not on a GPU of the deployment")
    want, have = expected_experts(layout, dag.scope), Counter(t for n in dag.nodes.values() for t in n.experts)
    if want != have:
        missing, extra = want - have, have - want
        problems.append(f"experts differ from the placement: {sum(missing.values())} missing "
                        f"(e.g. {sorted(missing)[:2]}), {sum(extra.values())} extra (e.g. {sorted(extra)[:2]})")
    return problems


def _diff(got: Counter, want: Counter) -> str:
    return f"edges carry {sorted((got - want).elements())[:3]} where the node takes {sorted((want - got).elements())[:3]}"


# ---------------------------------------------------------------------------- DOT / SVG

def _label(n: Node, layout: Deployment, boxed: bool = False) -> str:
    """Operation, GPUs, shapes; a node boxed by its physical node leaves the node out."""
    shapes = tuple(dict.fromkeys(n.outputs or n.inputs))
    shape = " ".join(str(list(s)) for s in shapes)
    if len(shapes) > 3:
        shape = f"{len(n.outputs or n.inputs)} tensors [rows, {shapes[0][-1]}]"
    where = f"GPU {n.gpus[0]}" if boxed else _where(layout, n.gpus)
    return "\\n".join(x for x in (n.op, where, shape, n.note) if x).replace('"', "'")


def to_dot(dag: Dag, layout: Deployment) -> str:
    """Nodes: operation, GPUs (and nodes), output shape; dashed edges move data between GPUs.
    Single-GPU expert nodes are boxed by their physical node; the edges of a wide fan-out are
    left unlabelled (their shapes are on the expert nodes)."""
    lines = [f'digraph "{dag.name}" {{', f'  rankdir={dag.rankdir}; newrank=true; labelloc=t; label="{dag.name}";',
             '  node [shape=box, style="rounded,filled", fontname="Helvetica", fontsize=10, margin="0.08,0.03"];',
             '  nodesep=0.08; ranksep=0.35;',
             '  edge [fontname="Helvetica", fontsize=8];']
    by_node: dict[int, list[Node]] = {}
    for n in dag.nodes.values():
        if n.kind == "expert" and len(n.gpus) == 1 and len(dag.nodes) > 12:
            by_node.setdefault(layout.node(n.gpus[0]), []).append(n)
        else:
            lines.append(f'  "{n.id}" [label="{_label(n, layout)}", fillcolor="{COLOURS[n.kind]}"];')
    for node, members in sorted(by_node.items()):
        lines.append(f'  subgraph cluster_node{node} {{ label="node {node}"; style=dashed; color="#999999";')
        lines += [f'    "{n.id}" [label="{_label(n, layout, True)}", fillcolor="{COLOURS[n.kind]}"];' for n in members]
        lines.append("  }")
    fan_out, fan_in = Counter(e.src for e in dag.edges), Counter(e.dst for e in dag.edges)
    for e in dag.edges:
        attrs = [] if fan_out[e.src] > 8 or fan_in[e.dst] > 8 else [f'label="{list(e.shape)}"']
        attrs += ['style=dashed, color="#555555"'] if e.comm else []
        attrs += ["constraint=false"] if e.skip else []
        lines.append(f'  "{e.src}" -> "{e.dst}" [{", ".join(attrs)}];')
    lines.append("}")
    return "\n".join(lines) + "\n"


def write_dags(dags: list[Dag], layout: Deployment, folder: Path, stem: str) -> tuple[list[Path], bool]:
    """DOT files (and SVGs when Graphviz ``dot`` is on PATH) -> (written paths, svg made)."""
    folder.mkdir(parents=True, exist_ok=True)
    dot = shutil.which("dot")
    written = []
    for dag, level in zip(dags, ("deployment", "layer", "expert")):
        path = folder / f"{stem}_{level}.dot"
        write_text_atomic(path, to_dot(dag, layout))
        written.append(path)
        if dot:
            with atomic_path(path.with_suffix(".svg"), durable=False) as svg:
                subprocess.run([dot, "-Tsvg", str(path), "-o", str(svg)], check=True, capture_output=True, timeout=120)
            written.append(path.with_suffix(".svg"))
    return written, dot is not None


__all__ = ["Node", "Edge", "Dag", "deployment_dag", "layer_dag", "expert_dag", "all_dags",
           "expected_experts", "verify", "to_dot", "write_dags", "ranges", "MAX_BANDS"]
