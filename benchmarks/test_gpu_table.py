"""benchmarks/gpu_table.py's measuring logic on the CPU, with a stand-in timer (the table itself needs a GPU)."""

from __future__ import annotations

import torch

from .gpu_table import best_of_rounds


def test_rounds_are_interleaved_and_the_best_round_is_kept():
    calls = []
    # a machine that slows down and recovers: each call of the timer costs what the clock says at that moment
    clock = iter([5.0, 6.0, 7.0, 3.0, 9.0, 4.0, 8.0, 8.0, 2.0])

    def timer(fn):
        calls.append(fn())
        return next(clock)

    best = best_of_rounds({"a": lambda: "a", "b": lambda: "b", "c": lambda: "c"}, timer=timer, rounds=3)
    assert calls == ["a", "b", "c"] * 3
    assert best == {"a": 3.0, "b": 6.0, "c": 2.0}


def test_the_whole_table_runs(monkeypatch, tmp_path, capsys):
    """main() end to end with the GPU stood in for: every kernel call counted, the timer a constant per variant
    kind, the inputs tiny CPU tensors. Catches what would otherwise fail only on a lent GPU's clock."""
    import json
    import sys

    import torch

    import cfgfast

    from . import gpu_table

    calls = []
    from cfgfast import _ext

    module = _ext.load()

    def cuda_setting():
        """The CUDA knobs in force (each read by setting it and putting it back), or None without them."""
        if not hasattr(module, "set_cuda_blocks_per_sm"):
            return None
        groups, blocks = module.set_cuda_groups_per_thread(0), module.set_cuda_blocks_per_sm(0)
        module.set_cuda_groups_per_thread(groups), module.set_cuda_blocks_per_sm(blocks)
        return groups, blocks

    def fake_step(*args, backend, out, last=False, **kwargs):
        setting = gpu_table.triton_step_setting() if backend == "triton" else cuda_setting()
        calls.append(("last" if last else "step", backend, setting))
        return out

    def fake_guided_step(z, pred_cond, pred_uncond, coef, w, *, x_prev=None, backend, out, **kwargs):
        calls.append(("sampler", backend, x_prev is not None))
        return out

    def fake_noise(shape, seed, step, *, device, backend, out):
        calls.append(("noise", backend))
        return out

    def fake_timer(fn):
        fn()
        return 2.0

    small = gpu_table.make_step_inputs
    monkeypatch.setattr(gpu_table, "make_step_inputs", lambda shape, dtype, device, seed: small((2, 8), dtype, "cpu"))
    monkeypatch.setattr(gpu_table, "time_ms", fake_timer)
    monkeypatch.setattr(gpu_table.cfgfast, "reverse_step", fake_step)
    monkeypatch.setattr(gpu_table.cfgfast, "normal_noise", fake_noise)
    monkeypatch.setattr(gpu_table.cfgfast, "guided_step", fake_guided_step)
    monkeypatch.setattr(gpu_table.cfgfast, "available_backends", lambda: ["reference", "cpu", "triton", "cuda"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Stand-in GPU")
    out = tmp_path / "table.json"
    monkeypatch.setattr(sys, "argv", ["gpu_table", "--sizes", "1", "4", "--bf16", "4", "--sweep", "--out", str(out)])
    gpu_table.main()
    result = json.loads(out.read_text())
    assert [(r["backend"], r["eps"], r["elements"]) for r in result["rows"]] == [
        ("cuda", "float32", 2**20), ("triton", "float32", 2**20), ("cuda", "float32", 2**22),
        ("triton", "float32", 2**22), ("cuda", "bfloat16", 2**22), ("triton", "bfloat16", 2**22)]
    row = result["rows"][0]
    assert row["of_copy"] == 2.0 and row["speedup"] == 1.0  # 16 bytes per element against a copy's 8, same time
    # the noise alone and the step without noise (the last step) are timed for float32 eps only
    assert [(r["noise_ms"], r["last_ms"]) for r in result["rows"][:4]] == [(2.0, 2.0)] * 4
    assert all(r["noise_ms"] != r["noise_ms"] and r["last_ms"] != r["last_ms"] for r in result["rows"][4:])  # NaN
    assert {c[1] for c in calls if c[0] == "last"} == {"cuda", "triton"}
    # every sampler on both backends, the multistep ones with their state; GB/s of the bytes each moves
    assert [(r["sampler"], r["backend"]) for r in result["samplers"]] == [
        (s, b) for s in cfgfast.SAMPLERS for b in ("cuda", "triton")]
    assert [r["of_copy"] for r in result["samplers"]] == [2.0, 2.0, 2.0, 2.0, 3.0, 3.0, 3.0, 3.0]
    assert {c for c in calls if c[0] == "sampler"} == {("sampler", b, m) for b in ("cuda", "triton")
                                                       for m in (False, True)}
    if hasattr(module, "set_cuda_blocks_per_sm"):  # built with the CUDA kernels (CI is)
        settings = [(g, b) for g in (1, 2) for b in gpu_table.CUDA_BLOCKS_PER_SM]
        assert len(settings) == 12 and gpu_table.cuda_settings() == settings
        assert [(r["eps"], r["groups_per_thread"], r["blocks_per_sm"]) for r in result["cuda_sweep"]] == [
            (eps, *setting) for eps in ("float32", "bfloat16") for setting in settings]
        # each CUDA setting was in force while its own variant ran, and the knobs are back at their defaults after
        swept_cuda = {c[2] for c in calls if c[:2] == ("step", "cuda")}
        assert set(settings) <= swept_cuda
        assert cuda_setting() == (0, 0)
    else:
        assert result["cuda_sweep"] == []
    assert len(result["triton_sweep"]) == 8
    # each Triton setting was in force while its own variant ran, and the module's setting is restored after
    swept = {c[2] for c in calls if c[:2] == ("step", "triton")}
    assert {(r["block_groups"], r["num_warps"]) for r in result["triton_sweep"]} <= swept
    assert gpu_table.triton_step_setting() == (256, 4)
    assert "Stand-in GPU" in capsys.readouterr().out
    assert cfgfast.reverse_step is fake_step  # the stand-ins were the ones called


def test_time_ms_times_calls_back_to_back(monkeypatch):
    """time_ms: each timing spans `calls` calls between two events, behind an untimed call (the GPU is busy when
    the first event is recorded), none waiting for the GPU in between, and is divided by them (a call's host time
    then overlaps the kernels queued before it)."""
    from benchmarks import gpu_table

    log = []

    class Event:
        def __init__(self, enable_timing):
            assert enable_timing

        def record(self):
            self.at = len(log)
            log.append("record")

        def synchronize(self):
            log.append("sync")

        def elapsed_time(self, end):
            return 1.0 * sum(entry == "call" for entry in log[self.at:end.at])  # 1 ms a call

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: log.append("sync"))
    assert gpu_table.time_ms(lambda: log.append("call"), warmup_ms=0.0, repeat=3, calls=4) == 1.0
    timed = log[log.index("record") - 1:]
    assert timed == (["call", "record"] + ["call"] * 4 + ["record", "sync"]) * 3
