"""Packaging: the problems install as ``bilevel.problems`` (never a global ``problems``), and any installed
distribution can add a problem through the ``bilevel.problems`` entry-point group."""
import os
import subprocess
import sys
import textwrap

from bilevel.run.problems import registered

PAPER_PROBLEMS = {"ridge", "itl", "arl", "adalfl", "metamd", "erm", "irm", "vrex", "coral", "fishr", "hgp",
                  "hutchinson"}


def clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS="1", HF_DATASETS_OFFLINE="1", **extra)
    return env


def test_no_global_problems_module(tmp_path):
    proc = subprocess.run([sys.executable, "-c", "import problems"], cwd=tmp_path, env=clean_env(),
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "No module named 'problems'" in proc.stderr
    proc = subprocess.run([sys.executable, "-c", "import bilevel.problems.ridge as r; print(r.DEFAULT_SOLVER)"],
                          cwd=tmp_path, env=clean_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_every_paper_problem_is_registered_by_entry_point():
    assert PAPER_PROBLEMS <= set(registered())
    assert all(registered()[name] == f"bilevel.problems.{name}" for name in PAPER_PROBLEMS)


TOY = '''
"""Toy: learned L2 penalty of a 1-d quadratic (a third-party problem)."""
from dataclasses import dataclass
import torch
import bilevel

@dataclass(frozen=True)
class Config:
    target: float = 2.0

SMOKE = Config()
DEFAULT_SOLVER = "exact"

def build(cfg, ctx):
    problem = bilevel.BilevelProblem(
        lambda th, ph, b: 0.5 * ((th["x"] - b) ** 2).sum() + 0.5 * ph["l2"].exp() * (th["x"] ** 2).sum(),
        lambda th, ph, b: 0.5 * ((th["x"] - b) ** 2).sum())
    sub = bilevel.SubProblem(inner={"x": torch.zeros(1)}, inner_batch=torch.tensor([cfg.target]),
                             outer_batch=torch.tensor([0.5 * cfg.target]))
    return bilevel.Nested(problem=problem, outer={"l2": torch.zeros(())}, loop=bilevel.InnerLoop(steps=50, lr=0.5),
                          subproblems=lambda info: [sub], default_solver=DEFAULT_SOLVER, optimizer="sgd", lr=0.5)
'''


def test_a_third_party_distribution_adds_a_problem(tmp_path):
    """A distribution on sys.path with an entry point in the group shows up in `bilevel list` and runs."""
    site = tmp_path / "site"
    (site / "toyprob-0.1.dist-info").mkdir(parents=True)
    (site / "toyprob-0.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: toyprob\nVersion: 0.1\n")
    (site / "toyprob-0.1.dist-info" / "entry_points.txt").write_text("[bilevel.problems]\ntoy = toyprob\n")
    (site / "toyprob.py").write_text(textwrap.dedent(TOY))
    env = clean_env(PYTHONPATH=str(site))
    listing = subprocess.run([sys.executable, "-m", "bilevel.run.cli", "list"], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=300)
    assert listing.returncode == 0, listing.stderr
    names = {line.split()[0] for line in listing.stdout.splitlines() if line.startswith("  ") and line.split()}
    assert {"toy"} | PAPER_PROBLEMS <= names
    assert "Toy: learned L2 penalty" in listing.stdout
    run = subprocess.run([sys.executable, "-m", "bilevel.run.cli", "run", "toy", "--steps", "3", "--out",
                          str(tmp_path / "run"), "--no-progress"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "run" / "outer.safetensors").is_file()
