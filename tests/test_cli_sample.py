"""`cfgfast sample`: the ADM .npz and the PNG grid, every check before sampling starts, shards and --resume
(after an interruption and after a real SIGKILL), and torchrun with 2 CPU processes writing the
single-process file byte for byte."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import cfgfast
from cfgfast._images import read_image
from cfgfast.cli import main
from cfgfast.data import to_uint8
from cfgfast.models import checkpoint
from cfgfast.models.unet import UNet, UNetConfig

# the folder this cfgfast was imported from: subprocesses import the same one, installed or not
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(cfgfast.__file__)))
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])),
       "OMP_NUM_THREADS": "1"}
# "--": torchrun's own parser would read --num and --v as abbreviations of its --numa-binding, --virtual-local-rank
# a bound for a hung subprocess, not a speed check: a run takes ~10 s, but minutes on a loaded 2-core machine
TIMEOUT_S = 600
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "cfgfast",
            "--"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    """A tiny random U-Net checkpoint; its zero-initialised layers get random weights so labels and w matter."""
    config = UNetConfig(image_size=8, in_channels=1, num_classes=10, base_channels=8, channel_mult=(1,),
                        num_res_blocks=1, attention_resolutions=(), num_heads=1, groups=4)
    model = UNet(config)
    generator = torch.Generator().manual_seed(0)
    for p in model.parameters():
        p.data = torch.randn(p.shape, generator=generator) * 0.2
    path = str(tmp_path_factory.mktemp("model") / "tiny.pt")
    checkpoint.save(path, {"config": config.to_dict(), "ema": model.state_dict()})
    return path


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


def args(model, out, *extra, num=12):
    # --clip 1: a random model's x-prediction is far outside [-1, 1], and an image of only 0 and 255 shows little
    return ["sample", "--model", model, "--num", str(num), "--w", "2", "--steps", "4", "--clip", "1", "--device",
            "cpu", "--out", str(out), *extra]


def test_writes_adm_npz_and_grid_and_nothing_else(tiny, tmp_path, capsys):
    out, grid = tmp_path / "s.npz", tmp_path / "s.png"
    assert main(args(tiny, out, "--grid", str(grid))) == 0
    with np.load(out) as f:
        assert sorted(f.files) == ["arr_0", "arr_1"]
        images, labels = f["arr_0"], f["arr_1"]
    assert images.dtype == np.uint8 and images.shape == (12, 8, 8, 1)
    assert labels.dtype == np.int64 and labels.tolist() == [i % 10 for i in range(12)]
    x = cfgfast.sample(checkpoint.load_model(tiny), torch.arange(12) % 10, 2.0, 4, clip=1.0, progress=False)
    assert np.array_equal(images, to_uint8(x))
    picture = read_image(str(grid))
    assert picture.shape == (10 * 66 + 2, 66 + 2, 3)  # one row per class, 8x8 drawn 8x larger, 2-pixel gaps
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.npz", "s.png"]  # no parts folder, no temp file
    printed = capsys.readouterr().out
    assert "batch 64" in printed and "samples 0-11 done: 12/12" in printed
    # an existing file is not replaced without --overwrite (else a second run with another seed would replace it silently)
    before = out.read_bytes()
    assert main(args(tiny, out, "--seed", "1")) == 2
    assert f"--out {out} exists: add --overwrite to replace it" in capsys.readouterr().err
    assert out.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["s.npz", "s.png"]
    assert main(args(tiny, out, "--seed", "1", "--overwrite")) == 0 and out.read_bytes() != before
    assert main(args(tiny, tmp_path / "t.npz", "--grid", str(grid))) == 2  # the picture is protected too
    assert f"--grid {grid} exists: add --overwrite" in capsys.readouterr().err


def test_a_run_stopped_after_writing_its_file_finishes_with_resume(tiny, tmp_path, monkeypatch, capsys):
    """Stopped while drawing the grid, after the .npz was written, the run said "rerun with --resume"; --resume
    then refused the existing file."""
    import cfgfast._images

    out, grid = tmp_path / "s.npz", tmp_path / "s.png"

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(cfgfast._images, "save_png", interrupted)
        assert main(args(tiny, out, "--grid", str(grid))) == 130
    assert "rerun with --resume" in capsys.readouterr().err and out.exists()
    assert main(args(tiny, out, "--grid", str(grid), "--resume")) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.npz", "s.png"]


def test_sampler_options_reach_sample(tiny, tmp_path, monkeypatch):
    seen = {}
    sample = cfgfast.sample

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return sample(*args, **kwargs)

    monkeypatch.setattr(cfgfast, "sample", spy)
    assert main(args(tiny, tmp_path / "s.npz", "--sampler", "ddim", "--eta", "0.5", "--max-batch", "3",
                     "--guidance-interval", "-5", "5", "--guidance", "cfgpp", "--guidance-rescale", "0.5")) == 0
    assert seen["guidance_rescale"] == 0.5
    assert (seen["sampler"], seen["eta"], seen["max_batch"], seen["guidance_interval"], seen["guidance"]) == \
        ("ddim", 0.5, 3, [-5.0, 5.0], "cfgpp")
    assert seen["v"] is None  # the model's learned variance, else 0.3
    apg = args(tiny, tmp_path / "a.npz", "--sampler", "dpmpp_2m", "--guidance", "apg", "--apg-eta-parallel", "0.5",
               "--apg-momentum", "-0.5", "--threshold", "0.99", "1.5")
    del apg[apg.index("--clip"):apg.index("--clip") + 2]  # (--threshold replaces it)
    assert main(apg) == 0
    assert seen["guidance"] == cfgfast.APG(eta_parallel=0.5, norm_threshold=0.0, momentum=-0.5)
    assert seen["threshold"] == [0.99, 1.5] and seen["clip"] == "auto"


def test_labels_cycle(tiny, tmp_path):
    assert main(args(tiny, tmp_path / "c.npz", "--labels", "1", "4")) == 0
    assert main(args(tiny, tmp_path / "d.npz", "--labels", "4")) == 0
    with np.load(tmp_path / "c.npz") as c, np.load(tmp_path / "d.npz") as d:
        assert c["arr_1"].tolist() == [1, 4] * 6 and d["arr_1"].tolist() == [4] * 12
        # the same global index and class give the same sample; another class, another one
        assert np.array_equal(c["arr_0"][1::2], d["arr_0"][1::2])
        assert all(not np.array_equal(c["arr_0"][i], d["arr_0"][i]) for i in range(0, 12, 2))


@pytest.mark.parametrize("extra, message", [
    (["--num", "0"], "--num must be in [1, 2^32]"),
    (["--num", str(2**32 + 1)], "--num must be in [1, 2^32]"),
    (["--labels", "3", "10"], "--labels must lie in [0, 10) for this model of 10 classes, got 10"),
    (["--steps", "1"], "--steps must be at least 2, below 4294967296, got 1"),
    (["--steps", "99999999999999999999"], "--steps must be at least 2, below 4294967296"),  # an OverflowError before
    (["--w", "nan"], "--w must be finite"),
    (["--w", "1e39"], "--w must be finite in float32"),
    (["--v", "1.5"], "--v must be in [0, 1], got 1.5"),
    (["--clip", "-1"], "--clip must be positive and finite in float32 (or 0 for no clipping), got -1.0"),
    (["--clip", "inf"], "--clip must be positive and finite"),
    (["--clip", "1e39"], "--clip must be positive and finite in float32 (or 0 for no clipping), got 1e+39"),
    (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    (["--sampler", "euler"], "--sampler must be one of ddpm, ddim, dpmpp_2m, dpmpp_2m_sde, got euler"),
    (["--eta", "2"], "--eta must be in [0, 1], got 2.0"),
    (["--sampler", "dpmpp_2m", "--eta", "0.5"], "--eta is a setting of --sampler ddim only"),
    (["--sampler", "ddim", "--v", "0.3"], "--v is a setting of --sampler ddpm only"),
    (["--max-batch", "0"], "--max-batch must be at least 1, got 0"),
    (["--guidance", "pag"], "--guidance must be one of cfg, cfgpp, apg, got pag"),
    (["--apg-momentum", "0.5"], "--apg-momentum is a setting of --guidance apg, got --guidance cfg"),
    (["--guidance", "apg", "--apg-momentum", "1"], "--apg-momentum must lie in (-1, 1) (0: none), got 1.0"),
    (["--guidance", "apg", "--apg-eta-parallel", "2"], "--apg-eta-parallel must be in [0, 1], got 2.0"),
    (["--guidance", "apg", "--apg-norm-threshold", "-1"], "--apg-norm-threshold must be >= 0"),
    (["--threshold", "0", "1"], "--threshold's P (the quantile of |x~|) must lie in (0, 1], got 0.0"),
    (["--threshold", "0.9", "0.5"], "--threshold's M (the largest s) must be at least 1"),
    (["--threshold", "0.9", "1", "--clip", "1"], "--threshold replaces --clip"),
    (["--guidance-rescale", "2"], "--guidance-rescale must be in [0, 1], got 2.0"),
    (["--guidance", "cfgpp"], "--guidance cfgpp (CFG++) is a form of --sampler ddim only"),
    (["--guidance-interval", "3", "1"], "--guidance-interval must be two finite numbers LAM_LO <= LAM_HI"),
    (["--backend", "fast"], "backend must be 'auto' or one of"),
    (["--out", "OUT/s.txt"], "--out must name a .npz file"),
    (["--out", "OUT/missing/s.npz"], "does not exist"),
    (["--grid", "OUT/missing/s.png"], "--grid: folder"),
    (["--model", "OUT/none.pt"], "no such file"),
    (["--model", "OUT/bad.pt"], "is corrupt or not a torch file"),
])
def test_bad_input_is_named_before_sampling(tiny, tmp_path, capsys, monkeypatch, extra, message):
    def no_sampling(*args, **kwargs):
        raise AssertionError("sampling started")

    monkeypatch.setattr(cfgfast, "sample", no_sampling)
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    extra = [e.replace("OUT", str(tmp_path)) for e in extra]
    assert main(args(tiny, tmp_path / "s.npz") + extra) == 2
    assert message in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.pt"]


@pytest.mark.parametrize("error", [ValueError("refused by sample"), KeyboardInterrupt()])
def test_a_run_that_fails_before_its_first_shard_leaves_no_parts(tiny, tmp_path, monkeypatch, capsys, error):
    # nothing to resume: no parts folder to block the corrected rerun
    def failing(*args, **kwargs):
        raise error

    monkeypatch.setattr(cfgfast, "sample", failing)
    assert main(args(tiny, tmp_path / "s.npz")) == (2 if isinstance(error, ValueError) else 130)
    assert list(tmp_path.iterdir()) == []
    assert "--resume" not in capsys.readouterr().err


def test_an_interrupted_run_resumes_to_the_same_file(tiny, tmp_path, monkeypatch, capsys):
    assert main(args(tiny, tmp_path / "whole.npz", "--grid", str(tmp_path / "whole.png"), "--batch-size", "2")) == 0
    out, parts = tmp_path / "s.npz", tmp_path / "s.npz.parts"
    sample, calls = cfgfast.sample, []

    def interrupted(*args, **kwargs):
        calls.append(kwargs["index_offset"])
        if len(calls) == 3:
            raise KeyboardInterrupt  # Ctrl-C while the third shard is sampled
        return sample(*args, **kwargs)

    monkeypatch.setattr(cfgfast, "sample", interrupted)
    capsys.readouterr()
    assert main(args(tiny, out, "--batch-size", "2")) == 130
    assert "interrupted; the finished shards are in" in capsys.readouterr().err
    monkeypatch.setattr(cfgfast, "sample", sample)
    assert not out.exists() and sorted(p.name for p in parts.iterdir()) == [
        "0000000000-0000000002.npy", "0000000002-0000000004.npy", "manifest.json"]
    capsys.readouterr()
    assert main(args(tiny, out)) == 2
    assert "holds an interrupted run; add --resume" in capsys.readouterr().err
    assert main(args(tiny, out, "--resume", "--steps", "5", "--labels", "3", "--batch-size", "3")) == 2
    err = capsys.readouterr().err
    assert "--steps 4 there, 5 now" in err and "--labels unset there, [3] now" in err and "--w" not in err
    assert "--batch-size 2 there, 3 now" in err and not out.exists()
    # a damaged shard is named before any sampling: cut short, then of another shape
    shard = parts / "0000000002-0000000004.npy"
    whole, other = shard.read_bytes(), io.BytesIO()
    np.save(other, np.zeros((2, 8, 8, 3), np.uint8))
    monkeypatch.setattr(cfgfast, "sample", interrupted)
    for damaged, message in ((whole[:100], "cannot be read"), (other.getvalue(), r"expected uint8 \[2, 8, 8, 1\]")):
        shard.write_bytes(damaged)
        calls.clear()
        assert main(args(tiny, out, "--resume")) == 2
        assert re.search(f"{re.escape(str(shard))}: {message}.*delete it to start over", capsys.readouterr().err)
        assert calls == [] and not out.exists()
    monkeypatch.setattr(cfgfast, "sample", sample)
    shard.write_bytes(whole)
    assert main(args(tiny, out, "--resume", "--grid", str(tmp_path / "s.png"))) == 0  # batch size 2 from the parts
    assert "batch 2, 1 process(es) on cpu, resuming with 4 done" in capsys.readouterr().out
    assert out.read_bytes() == (tmp_path / "whole.npz").read_bytes()
    assert (tmp_path / "s.png").read_bytes() == (tmp_path / "whole.png").read_bytes()
    assert not parts.exists()


def test_a_stop_before_the_first_shard_or_a_damaged_manifest(tiny, tmp_path, monkeypatch, capsys):
    from cfgfast.cli import sample as sample_command

    out, parts = tmp_path / "s.npz", tmp_path / "s.npz.parts"

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    # Ctrl-C as the progress bar starts, after the parts folder is made: nothing is left to block the rerun
    monkeypatch.setattr(sample_command, "_Progress", stopped)
    assert main(args(tiny, out, "--batch-size", "4")) == 130
    assert capsys.readouterr().err.strip() == "cfgfast: interrupted"
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    # a parts folder whose manifest was edited by hand: named, before any sampling
    sample, calls = cfgfast.sample, []

    def interrupted(*args, **kwargs):
        calls.append(kwargs["index_offset"])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return sample(*args, **kwargs)

    monkeypatch.setattr(cfgfast, "sample", interrupted)
    assert main(args(tiny, out, "--batch-size", "4")) == 130
    monkeypatch.setattr(cfgfast, "sample", sample)
    manifest = (parts / "manifest.json").read_text()
    for edited in (manifest.replace('"batch_size": 4', '"batch_size": 0'),
                   manifest.replace('"batch_size": 4', '"batch_size": "4"'),
                   manifest.replace('"batch_size": 4', '"batch_size": 4.0')):
        assert edited != manifest
        (parts / "manifest.json").write_text(edited)
        assert main(args(tiny, out, "--resume")) == 2
        assert f"--resume: {parts}/manifest.json is damaged (batch_size" in capsys.readouterr().err
    (parts / "manifest.json").write_text(manifest)
    assert main(args(tiny, out, "--resume")) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.npz"]  # no parts folder, no hidden leftovers


def test_torchrun_writes_the_single_process_file(tiny, tmp_path):
    assert main(args(tiny, tmp_path / "one.npz", "--grid", str(tmp_path / "one.png"), "--batch-size", "3",
                     num=11)) == 0
    command = TORCHRUN + args(tiny, tmp_path / "two.npz", "--grid", str(tmp_path / "two.png"),
                                                  "--batch-size", "3", num=11)
    done = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "two.npz").read_bytes() == (tmp_path / "one.npz").read_bytes()
    assert (tmp_path / "two.png").read_bytes() == (tmp_path / "one.png").read_bytes()
    assert done.stdout.count("wrote") == 2  # rank 0 alone writes and reports
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.npz", "one.png", "two.npz", "two.png"]


def test_a_killed_run_resumes_under_torchrun(tiny, tmp_path):
    # 16 shards of 8 steps: the run is killed right after the first shard lands, long before the last
    out, parts = tmp_path / "s.npz", tmp_path / "s.npz.parts"
    run = args(tiny, out, "--batch-size", "1", num=16)
    run[run.index("--steps") + 1] = "8"
    killed = subprocess.Popen([sys.executable, "-m", "cfgfast"] + run, env=ENV, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE)
    deadline = time.monotonic() + TIMEOUT_S
    while not (parts.is_dir() and any(p.suffix == ".npy" for p in parts.iterdir())):
        assert killed.poll() is None, killed.stderr.read().decode()
        assert time.monotonic() < deadline, f"no shard within {TIMEOUT_S} s"
        time.sleep(0.005)
    killed.kill()
    killed.wait()
    killed.stderr.close()
    assert not out.exists()
    shards = [p for p in parts.iterdir() if p.suffix == ".npy"]
    assert 1 <= len(shards) < 16

    # without --resume rank 0 refuses the parts folder, and the other rank stops too instead of waiting for it
    refused = subprocess.run(TORCHRUN + run, env=ENV, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert refused.returncode != 0 and refused.stderr.count("holds an interrupted run; add --resume") == 2

    # another world size finishes it: shards are by global index (the batch size is the parts folder's)
    done = subprocess.run(TORCHRUN + run[:-2] + ["--resume"], env=ENV, capture_output=True,
                          text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, done.stderr
    whole = tmp_path / "whole.npz"
    assert main([str(whole) if a == str(out) else a for a in run]) == 0
    assert out.read_bytes() == whole.read_bytes() and not parts.exists()
