"""The cost of SPEC §7's guidance methods against the plain fused step, measured in alternating rounds: each round
times every variant once (a median of repeats), so that a noisy machine slows all of them alike, and the ratio of
each variant to the plain step is taken within the round.

    OMP_NUM_THREADS=1 python benchmarks/guidance_ratio.py [--rounds 10] [--backend cpu] [--batch 256]

One "ddim" step (eta 0, the transition of a 50-step grid at its middle) of z [B, 3, 64, 64] float32, w = 3, through
the step cfgfast.sample runs (cfgfast.guidance.Guide): plain; guidance_rescale 0.7; APG with norm threshold 5,
without momentum and with momentum -0.5; on the cpu backend each method also composed from whole-batch passes (the
rows ending in "passes": what the backends without the per-sample op run). Printed per variant: the median over
rounds of the round's time (ms) and of its ratio to the round's plain step, and the smallest ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--backend", default="cpu")
    parser.add_argument("--batch", type=int, default=256)
    args = parser.parse_args()

    import torch

    import cfgfast
    from cfgfast.backends import choose
    from cfgfast.guidance import APG, Guide
    from cfgfast.step import guidance_weights

    # (the triton backend takes CPU tensors under TRITON_INTERPRET=1)
    device = torch.device("cuda" if args.backend in ("cuda", "triton") and torch.cuda.is_available() else "cpu")
    g = torch.Generator().manual_seed(0)
    z, o_c, o_u = (torch.randn(args.batch, 3, 64, 64, generator=g).to(device) for _ in range(3))
    weights = guidance_weights(torch.full((args.batch,), 3.0, device=device))
    row = cfgfast.step_table("ddim", cfgfast.default_lambdas(50, "ddim").tolist())[25].tolist()
    stepper = choose(args.backend, device)
    out = torch.empty_like(z)
    variants = {"plain": Guide("cfg")}
    # per_sample=False: the composition of whole-batch passes, which backends without the per-sample op (cuda,
    # triton) run; on cpu the default runs each sample's reduction and step in one task
    for per_sample, suffix in ((True, ""), (False, ", passes")) if stepper.per_sample_guidance else ((True, ""),):
        variants.update({
            f"rescale 0.7{suffix}": Guide("cfg", 0.7, per_sample=per_sample),
            f"APG{suffix}": Guide(APG(0.0, 5.0), per_sample=per_sample),
            f"APG, momentum{suffix}": Guide(APG(0.0, 5.0, -0.5), buffer=torch.zeros_like(z), per_sample=per_sample),
        })

    def run(guide: Guide) -> None:
        guide.step(stepper, out, z, o_c, o_u, weights, None, None, None, row, row, 1, 25, 0, True)

    def timed(guide: Guide) -> float:
        run(guide)
        times = []
        for _ in range(args.repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            run(guide)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        return statistics.median(times) * 1e3

    ms: dict[str, list[float]] = {name: [] for name in variants}
    ratios: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        this_round = {name: timed(guide) for name, guide in variants.items()}
        for name, value in this_round.items():
            ms[name].append(value)
            ratios[name].append(value / this_round["plain"])
    print(f"{args.backend}, z [{args.batch}, 3, 64, 64], {args.rounds} rounds of {args.repeats} repeats, "
          f"{torch.get_num_threads()} thread(s)")
    print(f"{'variant':<26}{'median ms':>11}{'/ plain, median':>17}{'min':>7}")
    for name in variants:
        print(f"{name:<26}{statistics.median(ms[name]):>11.3f}{statistics.median(ratios[name]):>17.2f}"
              f"{min(ratios[name]):>7.2f}")


if __name__ == "__main__":
    main()
