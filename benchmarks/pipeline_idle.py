"""Expert-rank idle fraction with and without the cross-layer pipeline, on CPU ranks.

    .venv/bin/python benchmarks/pipeline_idle.py [--waves 1 2 3] [--ranks 7]

The tiny model cut to 2 experts (top-1) has 3 MoE blocks: with one dense rank, 6 expert ranks
hold one (block, expert) each (per-layer-disjoint placement). Prints one row per wave count.
"""
import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from moe_hpc.config.run_config import build_config
from moe_hpc.tools.synth import write_checkpoint, write_inputs

SETS = ["model.num_experts=2", "model.top_k=1"]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--waves", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--ranks", type=int, default=7)
    args = p.parse_args()
    d = Path(tempfile.mkdtemp())
    cfg = build_config({}, SETS)
    write_checkpoint(d / "w.h5", cfg.model, seed=8)
    write_inputs(d / "i.h5", cfg.model, sequences=6, seq_len=24, seed=4, ragged=True)
    mpiexec = str(Path(sys.executable).parent / "mpiexec")
    mpiexec = mpiexec if Path(mpiexec).exists() else shutil.which("mpiexec")
    tiny = Path(__file__).resolve().parents[1] / "inputs" / "tiny.toml"
    print("pipeline_waves  expert_idle_fraction")
    for waves in args.waves:
        cmd = [mpiexec, "-n", str(args.ranks), sys.executable, "-m", "moe_hpc.cli", "run", str(tiny),
               "--weights", str(d / "w.h5"), "--input", str(d / "i.h5"), "--output", str(d / f"o{waves}.h5"),
               "--set", "parallel.dense_ranks=1", "--set", "parallel.placement=disjoint",
               "--set", "run.chunk_sequences=6", "--set", f"run.pipeline_waves={waves}"]
        for s in SETS:
            cmd += ["--set", s]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        print(f"{waves:14d}  {json.loads(out.strip().splitlines()[-1])['summary']['expert_idle_fraction']:.2f}")
    shutil.rmtree(d)


if __name__ == "__main__":
    main()
