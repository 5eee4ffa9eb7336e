"""Chunks in which some ranks hold no sequence (issue 21, item 1).

When the sequence count is not a multiple of (sequence owners x ``run.chunk_sequences``), the
last chunk leaves some owners empty, and an owner with fewer sequences than chunks is empty in
more. Every rank still steps through every chunk (its collectives must match), so each part of
the engine must take zero sequences: the embedding lookup and the final logits among them.

Each launch below leaves some owner empty in some chunk, on the Hugging Face fixtures (their
tokens, some rows repeated to reach the wanted count), in every layout that shards a chunk
differently; the logits must match transformers' (the fixtures' ``hf_logits``) as in
test_hf.py. Few launches, several layouts each: CI has 2 cores.
"""
from __future__ import annotations

import h5py
import numpy as np
import pytest

from helpers import bf16_values, fixture, moe_hpc, needs_mpiexec

# name -> (family, fixture rows making up the input, ranks, --set options). Comments: the owners'
# sequences and the chunks in which an owner is empty.
CASES = {
    # 4 co-located owners of [0,1) [1,3) [3,5) [5,7): owner 0 is empty in chunk 2
    "mixtral-7-seqs-4-ranks-chunk-1": ("mixtral", [0, 1, 2, 3, 0, 1, 2], 4, ["run.chunk_sequences=1"]),
    # 3 owners of [0,2) [2,4) [4,7): owners 0 and 1 are empty in chunk 2
    "mixtral-7-seqs-3-ranks-chunk-2": ("mixtral", [0, 1, 2, 3, 0, 1, 2], 3, ["run.chunk_sequences=2"]),
    # 4 owners of [0,0) [0,1) [1,2) [2,3): owner 0 never holds a sequence
    "deepseek_v3-3-seqs-4-ranks": ("deepseek_v3", [0, 1, 2], 4, []),
    # 2 dense TP groups of 2, experts split in TP pairs: group 0 ([0,1)) is empty in chunk 2
    "mixtral-dense_tp-expert_tp": ("mixtral", [0, 1, 2], 4, ["parallel.dense_tp=2", "parallel.expert_tp=2",
                                                         "run.chunk_sequences=1"]),
    # 2 pipelines of 2 stages, 2 waves, 2-sequence chunks of 5 sequences: chunk 2 holds one
    # sequence, so pipeline 0 runs one wave empty and pipeline 1 holds nothing
    "qwen3_moe-stages-waves": ("qwen3_moe", [0, 1, 2, 0, 1], 4, ["parallel.dense_stages=2", "run.pipeline_waves=2",
                                                                "run.chunk_sequences=2"]),
    # 2 data-parallel replicas of 1 dense + 1 expert rank: replica 0 ([0,1)) is empty in chunk 2
    "qwen2_moe-dp-split-roles": ("qwen2_moe", [0, 1, 2], 4, ["parallel.dp=2", "parallel.dense_ranks=1",
                                                            "run.chunk_sequences=1"]),
    # split roles with 2 dense ranks beside 1 expert rank: dense rank 0 ([0,1)) is empty in chunk 2
    "mixtral-split-roles": ("mixtral", [0, 1, 2], 3, ["parallel.dense_ranks=2", "run.chunk_sequences=1"]),
}


def input_of_rows(family: str, rows: list[int], path) -> np.ndarray:
    """Write the fixture's sequences ``rows`` as an input file; returns their hf_logits [S, L, V]."""
    with h5py.File(fixture(family) / "reference.h5", "r") as src, h5py.File(path, "w") as dst:
        dst.attrs["format"] = src.attrs["format"]
        dst["tokens"] = src["tokens"][()][rows]
        dst["lengths"] = src["lengths"][()][rows]
        return src["hf_logits"][()][rows], dst["lengths"][()]


@needs_mpiexec
@pytest.mark.parametrize("case", CASES)
def test_ranks_without_sequences_finish_and_match_transformers(case, tmp_path):
    family, rows, ranks, sets = CASES[case]
    inputs, out = tmp_path / "in.h5", tmp_path / "out.h5"
    want, lengths = input_of_rows(family, rows, inputs)
    sets = [*sets, "run.logits=true", "run.micro_batch_tokens=16"]
    r = moe_hpc("run", fixture(family), "--weights", fixture(family), "--input", inputs, "--output", out,
                *[a for s in sets for a in ("--set", s)], "--progress", "off", ranks=ranks)
    assert r.returncode == 0, r.stderr
    with h5py.File(out, "r") as f:
        logits = bf16_values(f["logits"])
    valid = np.arange(want.shape[1])[None, :] < lengths[:, None]
    err = (np.linalg.norm(logits - want, axis=-1) / np.maximum(np.linalg.norm(want, axis=-1), 1e-30))[valid]
    print(f"{case}: median {np.median(err):.2e}, {np.mean(err > 5e-2):.1%} over 5e-2")
    assert np.median(err) < 2e-2 and np.mean(err > 5e-2) <= 0.05
    assert not logits[~valid].any(), "padding positions must be zero"
