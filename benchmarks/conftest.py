"""Fixtures of the step benchmarks and the summary printed after them: per size, the median of every
variant measured in this run and the ratios the speed target is stated in."""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from cfgfast.samplers import MULTISTEP

from .utils import (
    COMPILED_FALLBACK_LABEL,
    COMPILED_LABEL,
    COPY_LABEL,
    COPY_MULTISTEP_LABEL,
    DIFFUSERS_LABEL,
    DIT_DIFFUSERS_LABEL,
    DIT_SAMPLE_LABEL,
    DPM_DIFFUSERS_LABEL,
    EAGER_LABEL,
    FAST_BACKENDS,
    FORWARD_LABEL,
    GPU_ONLY_SIZES,
    HAND_LOOP_LABEL,
    RANDN_LABEL,
    REFERENCE_LABEL,
    SAMPLE_GRAPH_LABEL,
    SAMPLE_LABEL,
    SAMPLER_CASES,
    SIZES,
    TWIN_LABEL,
    device_info,
    fused_label,
    make_step_inputs,
    noise_label,
    runs_on,
    sampler_label,
    synchronized,
)

TARGET_SPEEDUP = 10.0  # the bar: fused step >= 10x faster than the eager PyTorch step
TARGET_SAMPLE_SPEEDUP = 1.5  # the bar: sample >= 1.5x the hand-written loop (on the digits model)
TARGET_NOISELESS_SPEEDUP = 2.0  # a step that draws no noise ("ddim" eta 0, "dpmpp_2m") >= 2x the "ddpm" step
MIN_ROUND_S = 1e-3  # rounds shorter than this loop several calls, so the timer's resolution is no issue
WARMUP_S = 0.3  # untimed calls before each variant's rounds
SLOW_CALL_S = 0.5  # calls slower than this (the reference backend) get 3 rounds, not --benchmark-min-rounds


@dataclass
class Record:
    median_s: float
    min_s: float  # best round: what the variant costs when the machine leaves it alone
    rounds: int
    gb_per_s: float  # at the median


# (device, size) -> {label: Record}, and (device, size) -> device_info; filled by the `step_benchmark` fixture.
RESULTS: dict[tuple[str, str], dict[str, Record]] = {}
DEVICE_INFO: dict[tuple[str, str], dict] = {}

_HERE = Path(__file__).resolve().parent
_LOAD_AT_START: list[float] = []


def pytest_configure(config):
    # CFGFAST_BENCH_THREADS=n: torch's intra-op threads (the fused kernel uses the same pool); on a
    # machine shared with other work, fewer threads than cores keeps the timings from being quantised
    # by the scheduler (a parallel region waits for its slowest thread).
    threads = os.environ.get("CFGFAST_BENCH_THREADS")
    if threads:
        torch.set_num_threads(int(threads))
    if hasattr(os, "getloadavg"):
        _LOAD_AT_START[:] = [os.getloadavg()[0]]


def pytest_collection_modifyitems(session, config, items):
    """Run the benchmarks size by size (stable order otherwise), so the variants compared in one
    ratio run close together in time on a noisy machine."""
    size_rank = {size: rank for rank, size in enumerate(SIZES)}
    slots = [i for i, item in enumerate(items) if _HERE in Path(str(item.path)).resolve().parents]

    def rank(item):
        params = getattr(getattr(item, "callspec", None), "params", {})
        return size_rank.get(params.get("size"), len(size_rank))

    for slot, item in zip(slots, sorted((items[i] for i in slots), key=rank)):
        items[slot] = item
    gpu_only = pytest.mark.skip(reason="a GPU-only size (16M and 64M elements are timed on a GPU)")
    for i in slots:
        params = getattr(getattr(items[i], "callspec", None), "params", {})
        if params.get("size") in GPU_ONLY_SIZES and runs_on(params) == "cpu":
            items[i].add_marker(gpu_only)


@pytest.fixture(scope="session")
def step_inputs():
    """make_step_inputs(SIZES[size], eps_dtype, device), built once per session and shared."""
    cache = {}

    def get(size: str, eps_dtype: torch.dtype, device: str):
        key = (size, eps_dtype, device)
        if key not in cache:
            cache[key] = make_step_inputs(SIZES[size], eps_dtype, device, seed=0)
        return cache[key]

    return get


@pytest.fixture
def step_benchmark(benchmark, request):
    """Time fn (synchronised on its device) with pytest-benchmark and record the median for the summary.

    Rounds: about --benchmark-max-time seconds of calls, at least --benchmark-min-rounds (3 for calls
    slower than SLOW_CALL_S), after WARMUP_S of untimed calls (first touch of out=, lazy init, and time
    for the clock and the thread pool to wake up: otherwise whichever variant runs first pays for it).
    """

    def run(fn, *, device: str, size: str, label: str, bytes_moved: int, shape=None):
        fn = synchronized(fn, device)
        shape = SIZES[size] if shape is None else shape
        info = device_info(device)
        benchmark.group = f"{device} {size}"
        benchmark.extra_info.update(
            variant=label, size=size, shape=list(shape), elements=math.prod(shape), bytes_moved=bytes_moved, **info
        )
        if benchmark.disabled:  # --benchmark-disable: one plain call, nothing timed or recorded
            return benchmark.pedantic(fn)
        warm_until, calls = time.perf_counter() + WARMUP_S, 0
        while calls < 2 or time.perf_counter() < warm_until:
            fn()
            calls += 1
        start = time.perf_counter()
        fn()
        call_s = max(time.perf_counter() - start, 1e-9)
        config = request.config
        max_time = float(config.getoption("benchmark_max_time"))
        min_rounds = int(config.getoption("benchmark_min_rounds"))
        if call_s > SLOW_CALL_S:
            min_rounds = min(min_rounds, 3)
        iterations = max(1, int(MIN_ROUND_S / call_s))
        rounds = max(min_rounds, int(max_time / (call_s * iterations)))
        result = benchmark.pedantic(fn, rounds=rounds, iterations=iterations)
        median_s = benchmark.stats.stats.median
        gb_per_s = bytes_moved / median_s / 1e9
        benchmark.extra_info["gb_per_s"] = round(gb_per_s, 2)
        RESULTS.setdefault((device, size), {})[label] = Record(median_s, benchmark.stats.stats.min, rounds, gb_per_s)
        DEVICE_INFO[(device, size)] = info
        return result

    return run


_SPEEDUP = "target >= {:g}x"
_SAMPLE_SPEEDUP = "target >= {:g}x (stated for the digits model)"


def _ratio_lines(rows: dict[str, Record]) -> list[str]:
    # (name, numerator, denominator, target or None): a target is met where the ratio of the medians reaches it
    pairs = []
    for backend in FAST_BACKENDS:
        fused, noise = fused_label(backend), noise_label(backend)
        ddpm, dpm = sampler_label(backend, "ddpm"), sampler_label(backend, "dpmpp_2m")
        pairs += [
            (f"eager / fused {backend}", EAGER_LABEL, fused, (_SPEEDUP, TARGET_SPEEDUP)),
            (f"compiled eager / fused {backend}", COMPILED_LABEL, fused, None),
            (f"compiled eager, torch.randn / fused {backend}", COMPILED_FALLBACK_LABEL, fused, None),
            (f"diffusers step / fused {backend}", DIFFUSERS_LABEL, fused, None),
            (f"reference / fused {backend}", REFERENCE_LABEL, fused, None),
            (f"fused {backend} / copy floor", fused, COPY_LABEL, None),
            (f"fused {backend} / noise floor ({backend})", fused, noise, None),
            (f"randn / noise {backend}", RANDN_LABEL, noise, None),
            (f"eager / fused {backend} guided_step ddpm", EAGER_LABEL, ddpm, (_SPEEDUP, TARGET_SPEEDUP)),
            (f"guided_step ddpm / reverse_step ({backend})", ddpm, fused, None),
        ]
        for sampler, eta in SAMPLER_CASES:
            label = sampler_label(backend, sampler, eta)
            name = label.removeprefix(f"fused {backend} guided_step, ")
            if sampler != "ddpm":
                target = (_SPEEDUP, TARGET_NOISELESS_SPEEDUP) if sampler in ("ddim", "dpmpp_2m") and eta == 0 else None
                pairs.append((f"{backend} ddpm / {name}", ddpm, label, target))
            floor = COPY_MULTISTEP_LABEL if sampler in MULTISTEP else COPY_LABEL
            pairs.append((f"{backend} {name} / copy floor of its bytes", label, floor, None))
        pairs.append((f"eager dpmpp_2m (diffusers) / fused {backend}", DPM_DIFFUSERS_LABEL, dpm,
                      (_SPEEDUP, TARGET_SPEEDUP)))
    sample_target = (_SAMPLE_SPEEDUP, TARGET_SAMPLE_SPEEDUP)
    pairs += [
        ("reference twin / eager", TWIN_LABEL, EAGER_LABEL, None),
        ("eager / compiled eager", EAGER_LABEL, COMPILED_LABEL, None),
        ("eager / compiled eager, torch.randn", EAGER_LABEL, COMPILED_FALLBACK_LABEL, None),
        ("hand loop / sample", HAND_LOOP_LABEL, SAMPLE_LABEL, sample_target),
        ("hand loop / sample, CUDA graph", HAND_LOOP_LABEL, SAMPLE_GRAPH_LABEL, sample_target),
        ("sample / sample, CUDA graph", SAMPLE_LABEL, SAMPLE_GRAPH_LABEL, None),
        ("diffusers loop / sample (DiT)", DIT_DIFFUSERS_LABEL, DIT_SAMPLE_LABEL, None),
    ]
    lines = []
    for name, top, bottom, target in pairs:
        if top not in rows or bottom not in rows:
            continue
        by_median = rows[top].median_s / rows[bottom].median_s
        by_min = rows[top].min_s / rows[bottom].min_s
        note = ""
        if target is not None:
            text, bar = target
            note = "   " + text.format(bar) + ": " + ("met" if by_median >= bar else "NOT met")
        lines.append(f"  {name:<48} {by_median:8.2f}x {by_min:8.2f}x{note}")
    if SAMPLE_LABEL in rows and FORWARD_LABEL in rows:
        # what sample() adds to the model's own work: the step, the noise, the bookkeeping (eager forward passes
        # on both sides: against a CUDA graph, which also removes the passes' launch overhead, it says nothing)
        share = 1 - rows[FORWARD_LABEL].median_s / rows[SAMPLE_LABEL].median_s
        lines.append(f"  {'share of sample outside the forward passes':<48} {100 * share:8.1f}%")
    if lines:
        lines.insert(0, f"  {'ratio':<48} {'medians':>9} {'minima':>9}")
    return lines


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not RESULTS:  # --benchmark-disable, --benchmark-skip, or nothing ran: nothing to compare
        return
    write = terminalreporter.write_line
    terminalreporter.section("cfgfast step speed: medians and ratios, all measured in this run")
    if _LOAD_AT_START:
        write(f"load average before the run: {_LOAD_AT_START[0]:.2f} on {os.cpu_count()} CPUs "
              "(other work on the machine slows the multi-threaded variants most)")
    for (device, size), rows in RESULTS.items():
        info = DEVICE_INFO[(device, size)]
        isa = f", {info['cpu_isa']}" if info.get("cpu_isa") else ""
        write(f"{size} on {device}: {info['device']}, {info['threads']} threads{isa}")
        write(f"  {'variant':<62} {'median ms':>9} {'min ms':>9} {'GB/s':>8} {'rounds':>7}")
        for label, r in rows.items():
            write(f"  {label:<62} {r.median_s * 1e3:9.3f} {r.min_s * 1e3:9.3f} {r.gb_per_s:8.2f} {r.rounds:7d}")
        for line in _ratio_lines(rows):
            write(line)
        write("")
