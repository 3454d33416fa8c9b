"""Host time of one cfgfast.reverse_step call on tiny CPU tensors (z [2, 4], backend "cpu", one thread) in two
source trees side by side: each tree's time is measured in its own subprocess (its PYTHONPATH), the trees
alternating round by round, so that a noisy machine slows both alike.

    python benchmarks/host_time.py OLD_TREE NEW_TREE [--rounds 6]

Each tree must hold its built extension (python setup.py build_ext --inplace). Per tree and variant: the median
over the rounds of each round's median (timeit, 15 repeats of 2000 calls), in µs per call. The bare op
torch.ops.cfgfast.guided_step_ (the floor) is timed where the tree has it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys


def _child() -> dict[str, float]:
    import timeit

    import torch

    import cfgfast

    torch.set_num_threads(1)
    z, eps_cond, eps_uncond, out = torch.randn(2, 4), torch.randn(2, 4), torch.randn(2, 4), torch.empty(2, 4)
    calls = {
        "reverse_step, out=": lambda: cfgfast.reverse_step(z, eps_cond, eps_uncond, -1.0, 0.0, 2.0, backend="cpu",
                                                           out=out),
        "reverse_step, allocating": lambda: cfgfast.reverse_step(z, eps_cond, eps_uncond, -1.0, 0.0, 2.0,
                                                                 backend="cpu"),
    }
    if hasattr(cfgfast, "guided_step"):
        row = cfgfast.step_table("ddpm", [-1.0, 0.0])[0]
        weights, coef = torch.ones(2, 2), row.tolist()
        calls["guided_step, out="] = lambda: cfgfast.guided_step(z, eps_cond, eps_uncond, row, 2.0, backend="cpu",
                                                                 out=out)
        calls["bare op guided_step_"] = lambda: torch.ops.cfgfast.guided_step_(
            out, z, eps_cond, eps_uncond, weights, None, None, None, coef, 0, 0, 0, None)
    times = {}
    for name, call in calls.items():
        call()
        times[name] = statistics.median(timeit.repeat(call, number=2000, repeat=15)) / 2000 * 1e6
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trees", nargs="+")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child()))
        return
    runs: dict[str, list[dict[str, float]]] = {tree: [] for tree in args.trees}
    for r in range(args.rounds):
        for tree in args.trees if r % 2 == 0 else reversed(args.trees):
            env = dict(os.environ, PYTHONPATH=os.path.abspath(tree), OMP_NUM_THREADS="1")
            result = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", tree], env=env, cwd="/",
                                    capture_output=True, text=True, check=True)
            runs[tree].append(json.loads(result.stdout.splitlines()[-1]))
    for tree, results in runs.items():
        print(tree)
        for name in results[0]:
            print(f"  {name:<28} {statistics.median(r[name] for r in results):7.2f} µs")


if __name__ == "__main__":
    main()
