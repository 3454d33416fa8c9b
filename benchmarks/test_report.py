"""benchmarks/report.py on a tiny synthetic --benchmark-json file (runs under --benchmark-disable)."""

from __future__ import annotations

import json
import sys

from . import report
from .utils import COPY_LABEL


def _bench(group, variant, median_s, bytes_moved):
    return {"group": group, "name": f"test_x[{variant}]", "stats": {"median": median_s, "min": median_s},
            "extra_info": {"variant": variant, "bytes_moved": bytes_moved, "device": "Test CPU 9000"}}


def _write(tmp_path):
    data = {
        "machine_info": {"node": "bench-box", "cpu": {"brand_raw": "Test CPU 9000"}},
        "benchmarks": [
            _bench("cpu 8x3x16x16", "fused cpu, out=", 2e-3, 4_000_000),
            _bench("cpu 8x3x16x16", COPY_LABEL, 1e-3, 4_000_000),
            _bench("cpu toy 64x2, 8 steps", "cfgfast.sample", 0.5, None),
            {"group": "cpu 8x3x16x16", "name": "test_untimed", "stats": None, "extra_info": {}},
        ],
    }
    path = tmp_path / "results.json"
    path.write_text(json.dumps(data))
    return path


def test_markdown_rows(tmp_path):
    rows, machine = report.load(_write(tmp_path))
    assert len(rows) == 3  # the untimed benchmark is left out
    lines = report.markdown(rows, machine).splitlines()
    assert lines[0] == "Measured on Test CPU 9000 (host bench-box)."
    assert "| variant | size | median ms | GB/s | / copy floor |" in lines
    assert f"| {COPY_LABEL} | cpu 8x3x16x16 | 1.000 | 4.00 | 1.00x |" in lines
    assert "| fused cpu, out= | cpu 8x3x16x16 | 2.000 | 2.00 | 2.00x |" in lines
    assert "| cfgfast.sample | cpu toy 64x2, 8 steps | 500.000 | – | – |" in lines  # no floor, no bytes


def test_main_without_matplotlib(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    out = tmp_path / "out"
    assert report.main([str(_write(tmp_path)), "--out", str(out)]) == 0
    assert "plot skipped" in capsys.readouterr().out
    text = (out / report.MARKDOWN_NAME).read_text()
    assert "fused cpu, out=" in text and "![" not in text
    assert not (out / report.PLOT_NAME).exists()


def test_ratio_lines_state_the_targets():
    """The summary's ratios: each sampler against ddpm (>= 2x for the steps without noise), the eager dpmpp_2m
    composition against the fused one (>= 10x), and each step against the copy floor of its own bytes."""
    from .conftest import Record, _ratio_lines
    from .utils import COPY_MULTISTEP_LABEL, DPM_DIFFUSERS_LABEL, EAGER_LABEL, sampler_label

    def record(ms):
        return Record(median_s=ms / 1e3, min_s=ms / 1e3, rounds=5, gb_per_s=1.0)

    rows = {EAGER_LABEL: record(40.0), COPY_LABEL: record(1.0), COPY_MULTISTEP_LABEL: record(1.5),
            sampler_label("cpu", "ddpm"): record(3.0), sampler_label("cpu", "ddim"): record(1.0),
            sampler_label("cpu", "dpmpp_2m"): record(2.0), sampler_label("cpu", "dpmpp_2m_sde"): record(3.0),
            DPM_DIFFUSERS_LABEL: record(10.0)}
    lines = {line.split("  ")[1].strip(): line for line in _ratio_lines(rows)[1:]}
    assert lines["eager / fused cpu guided_step ddpm"].endswith("13.33x   target >= 10x: met")
    assert lines["cpu ddpm / ddim eta=0"].endswith("3.00x   target >= 2x: met")
    assert lines["cpu ddpm / dpmpp_2m"].endswith("1.50x   target >= 2x: NOT met")
    assert lines["cpu ddpm / dpmpp_2m_sde"].endswith("1.00x")  # it draws noise: no target
    assert lines["eager dpmpp_2m (diffusers) / fused cpu"].endswith("5.00x   target >= 10x: NOT met")
    assert "2.00x" in lines["cpu dpmpp_2m_sde / copy floor of its bytes"]  # against the three-copy floor
    assert "3.00x" in lines["cpu ddpm / copy floor of its bytes"]  # against the two-copy floor
