"""Speedup of 2 processes over 1 for embarrassingly parallel work inside an outer step.

Workloads (each run through ``bilevel run``, once with 1 process and once under
``accelerate launch --multi_gpu --num_processes 2 ... --cpu``):
  - a CMA-ES generation of 8 candidates (ridge, d = 50, 1,000 inner steps per candidate);
  - 6 leave-one-domain-out inner runs + CG hypergradients (``benchmarks/parallel_workload.py``).
Time per outer step is the median of the logged ``step_seconds`` after the first step (process start-up
and data building excluded). Target: ≥ 1.6x on 2 cores. Prints a table and writes
``benchmarks/results/parallel.md``.

    python benchmarks/parallel.py [--steps 4]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAUNCH_2 = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]
WORKLOADS = {
    "CMA-ES generation, 8 candidates": ["ridge", "--solver", "cmaes:popsize=8,evaluate_mean=false",
                                        "--set", "inner_steps=1000"],
    "6 leave-one-domain-out inner runs": ["benchmarks.parallel_workload", "--solver", "cg:maxiter=50,rtol=1e-4"],
}


def step_time(args: list[str], processes: int, steps: int) -> float:
    with tempfile.TemporaryDirectory() as out:
        cli = ["-m", "bilevel.run.cli", "run", *args, "--steps", str(steps), "--out", out, "--no-progress"]
        cmd = (LAUNCH_2 + cli + ["--cpu"]) if processes == 2 else [sys.executable, *cli]
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
        subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
        rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(r["step_seconds"] for r in rows[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    lines = ["| workload | 1 process (s/step) | 2 processes (s/step) | speedup | target |", "|---|---|---|---|---|"]
    for name, wl in WORKLOADS.items():
        one, two = step_time(wl, 1, args.steps), step_time(wl, 2, args.steps)
        lines.append(f"| {name} | {one:.2f} | {two:.2f} | {one / two:.2f}x | ≥ 1.6x |")
        print(lines[-1], flush=True)
    text = "\n".join(["# 2 processes vs 1 on this machine (2 cores, 1 thread per process)", "",
                      f"`python benchmarks/parallel.py --steps {args.steps}`; median step time after the first step.",
                      "", *lines, ""])
    (ROOT / "benchmarks" / "results").mkdir(parents=True, exist_ok=True)
    (ROOT / "benchmarks" / "results" / "parallel.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
