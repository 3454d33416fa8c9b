"""cfgfast evaluate: the metrics against hand-computed cases, the feature classifier, and a tiny end-to-end run."""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import sys

import numpy as np
import pytest
import torch

import cfgfast
import cfgfast.evaluate
from cfgfast.cli import main
from cfgfast.data import load_dataset
from cfgfast.evaluate import (feature_classifier, frechet_distance, gaussian_fit, inception_score, plot_metrics,
                              sweep)
from cfgfast.models import checkpoint
from cfgfast.models.classifier import Classifier, ClassifierConfig, save_classifier
from cfgfast.models.unet import UNet, UNetConfig


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


def tiny_model_file(tmp_path, varied: bool = False) -> str:
    """A checkpoint of a tiny random U-Net for 8x8 digits; varied: its zero-initialised parameters drawn at random
    too, so that its output is not zero (guidance rescale divides by the output's standard deviation)."""
    torch.manual_seed(0)
    model = UNet(UNetConfig(image_size=8, in_channels=1, num_classes=10, base_channels=8, channel_mult=(1,),
                            num_res_blocks=1, attention_resolutions=(), num_heads=1, groups=4))
    if varied:
        with torch.no_grad():
            for p in model.parameters():
                if not p.any():
                    p.normal_(0.0, 0.1)
    path = str(tmp_path / "model.pt")
    checkpoint.save(path, {"config": model.config.to_dict(), "ema": model.state_dict()})
    return path


def random_covariance(rng, d):
    a = rng.standard_normal((d, d))
    return a @ a.T + 0.1 * np.eye(d)


def sqrtm_2x2(m):
    """The principal square root of a 2x2 matrix with positive eigenvalues: (M + s I) / t, s = sqrt(det M),
    t = sqrt(tr M + 2 s) (Cayley-Hamilton), a formula independent of any eigendecomposition."""
    s = math.sqrt(np.linalg.det(m))
    return (m + s * np.eye(2)) / math.sqrt(np.trace(m) + 2 * s)


def test_fd_of_identical_gaussians_is_zero():
    rng = np.random.default_rng(0)
    mu, cov = rng.standard_normal(16), random_covariance(rng, 16)
    assert abs(frechet_distance(mu, cov, mu, cov)) < 1e-9


def test_fd_of_commuting_covariances_is_the_closed_form():
    # diagonal covariances: FD = |mu1 - mu2|^2 + sum (sqrt a - sqrt b)^2
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 0.25])
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    expected = 1 + 4 + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)


def test_fd_matches_a_direct_float64_computation():
    rng = np.random.default_rng(1)
    for _ in range(5):
        mu1, mu2 = rng.standard_normal(2), rng.standard_normal(2)
        c1, c2 = random_covariance(rng, 2), random_covariance(rng, 2)
        direct = ((mu1 - mu2) ** 2).sum() + np.trace(c1 + c2 - 2 * sqrtm_2x2(c1 @ c2))
        assert frechet_distance(mu1, c1, mu2, c2) == pytest.approx(direct, rel=1e-10)


def test_gaussian_fit_is_the_sample_mean_and_unbiased_covariance():
    f = np.array([[0.0, 1.0], [2.0, 1.0], [4.0, 4.0]])
    mu, cov = gaussian_fit(f)
    np.testing.assert_allclose(mu, [2.0, 2.0])
    np.testing.assert_allclose(cov, [[4.0, 3.0], [3.0, 3.0]])


def test_inception_score_bounds():
    k = 10
    uniform = np.full((50, k), -math.log(k))
    assert inception_score(uniform) == pytest.approx(1.0, abs=1e-12)
    # confident and balanced: each sample certain of one class, every class equally often -> K
    confident = np.log(np.eye(k)[np.arange(50) % k] * (1 - 1e-12) + 1e-13)
    assert inception_score(confident) == pytest.approx(k, rel=1e-6)
    # confident but all one class -> 1
    assert inception_score(np.log(np.eye(k)[np.zeros(50, dtype=int)] + 1e-30)) == pytest.approx(1.0, abs=1e-9)
    # probabilities of exactly 0 (log -inf): 0 log 0 = 0
    with np.errstate(divide="ignore"):
        assert inception_score(np.log(np.eye(4))) == pytest.approx(4.0, rel=1e-12)
        assert inception_score(np.log(np.eye(4)[[0, 0, 1]])) == pytest.approx(
            math.exp((2 * math.log(3 / 2) + math.log(3)) / 3), rel=1e-12)


def test_metric_inputs_are_checked():
    for bad in (np.zeros((3,)), np.zeros((0, 4))):
        with pytest.raises(ValueError, match=r"log_probs must be \[N, K\] with N >= 1, got shape"):
            inception_score(bad)
    with pytest.raises(ValueError, match=r"features must be \[N, D\] with N >= 2, got shape \(1, 4\)"):
        gaussian_fit(np.zeros((1, 4)))
    with pytest.raises(ValueError, match="means and covariances must be"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))
    for bad in (math.nan, math.inf):
        with pytest.raises(ValueError, match="features must be finite"):
            gaussian_fit(np.array([[0.0, 1.0], [bad, 2.0], [1.0, 0.0]]))
        with pytest.raises(ValueError, match="log_probs must be log-probabilities"):
            inception_score(np.array([[0.0, -math.inf], [bad, 0.0]]))


def test_evaluate_refuses_a_dataset_with_a_class_of_no_images(tmp_path, capsys):
    pictures = np.random.default_rng(0).integers(0, 256, (20, 8, 8, 1), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", arr_0=pictures, arr_1=np.arange(20) % 2 * 9)  # classes 0 and 9 of 10
    assert main(["evaluate", "--model", tiny_model_file(tmp_path), "--dataset", str(tmp_path / "d.npz"),
                 "--out", str(tmp_path / "eval")]) == 2
    assert ("error: --dataset must hold images of each of its 10 classes to evaluate on; dataset d.npz has none of "
            "classes 1, 2, 3, 4, 5, 6, 7, 8") in capsys.readouterr().err
    assert not (tmp_path / "eval").exists()


def test_score_is_fd_is_and_accuracy_of_the_classifier():
    """score's accuracy and IS from a fixed linear classifier on fixed features, written out here in NumPy; FD 0
    against the images' own fit, and fd_matched over the first `matched` images alone."""
    from cfgfast.evaluate import score

    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.normal(size=(40, 1, 2, 2))).float()
    labels = torch.from_numpy(rng.integers(0, 3, 40))
    weight = rng.normal(size=(3, 4))

    class Linear:
        def features(self, x):
            return x.flatten(1)

        def out(self, f):
            return f.double() @ torch.from_numpy(weight).T

    f = images.flatten(1).double().numpy()
    logits = f @ weight.T
    log_probs = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    probs = np.exp(log_probs)
    marginal = probs.mean(0)
    expected_is = math.exp(np.mean((probs * (log_probs - np.log(marginal))).sum(1)))
    expected_accuracy = np.mean(logits.argmax(1) == labels.numpy())
    got = score(Linear(), images, labels, gaussian_fit(f), matched=10)
    assert got["accuracy"] == pytest.approx(expected_accuracy, abs=1e-6) and 0.1 < expected_accuracy < 0.9
    assert got["is"] == pytest.approx(expected_is, rel=1e-9)
    assert abs(got["fd"]) < 1e-9
    assert got["fd_matched"] == pytest.approx(frechet_distance(*gaussian_fit(f[:10]), *gaussian_fit(f)), rel=1e-9)
    assert got["fd_matched"] > 0.1


def test_feature_classifier_trains_reproducibly():
    data = load_dataset("digits")
    _, train, heldout, acc = feature_classifier(data, steps=20)
    assert sorted(torch.cat([train, heldout]).tolist()) == list(range(len(data.labels)))
    assert torch.bincount(data.labels[heldout]).tolist() == [36] * 10  # 20%, class-balanced
    assert acc > 0.5  # 20 steps from chance (10%) reach about 87%; the default 500 reach 99.4%
    first, second = (feature_classifier(data, steps=3)[0] for _ in range(2))
    for p, q in zip(first.parameters(), second.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_evaluate_end_to_end_writes_its_files(tmp_path, capsys, monkeypatch):
    model_path, clf_path, out = tiny_model_file(tmp_path), tmp_path / "clf.pt", tmp_path / "eval"
    save_classifier(str(clf_path), Classifier(ClassifierConfig(width=8, groups=4)))
    argv = ["evaluate", "--model", model_path, "--classifier", str(clf_path), "--num", "20", "--steps", "3",
            "--w", "0", "1", "--feature-steps", "5", "--batch-size", "12", "--out", str(out)]
    out.mkdir()
    (out / "grid_w7.png").write_bytes(b"an earlier sweep's")  # not listed by this one's results.md: removed
    (out / "notes.txt").write_text("the user's")
    with monkeypatch.context() as patch:  # ... but not before this sweep has written its own results
        patch.setattr(cfgfast.evaluate, "feature_classifier", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
        assert main(argv) == 130
    assert (out / "grid_w7.png").exists()
    assert main(argv) == 0
    assert (out / "notes.txt").read_text() == "the user's"
    (out / "notes.txt").unlink()
    printed = capsys.readouterr().out
    assert "[3/3] classifier ddpm 3 steps w=1" in printed
    names = sorted(p.name for p in out.iterdir())
    assert names == ["fd_is.png", "grid_w0.png", "grid_w1.png", "grid_w1_classifier.png", "metrics.json",
                     "results.md"]  # and no temporary file
    metrics = json.loads((out / "metrics.json").read_text())
    assert [(p["guidance"], p["w"]) for p in metrics["points"]] == [("classifier-free", 0.0), ("classifier-free", 1.0),
                                                                    ("classifier", 1.0)]
    assert all(math.isfinite(p["fd"]) and 1 <= p["is"] <= 10 for p in metrics["points"])
    assert metrics["complete"] and metrics["planned"] == 3
    table = (out / "results.md").read_text()
    assert "Incomplete" not in table
    assert "| real held-out (360 images) |" in table
    assert "| real, seen by the feature classifier (360 images) |" in table
    assert "| w | sampler | steps | FD (20 samples) | FD (first 20) | IS | accuracy | seconds |" in table
    assert "| 1 | ddpm | 3 |" in table
    assert [(p["sampler"], p["steps"]) for p in metrics["points"]] == [("ddpm", 3)] * 3
    assert metrics["runs"] == [{"sampler": "ddpm", "steps": 3}] and metrics["eta"] == 0
    assert (out / "fd_is.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # when, where and how it ran: the date, this CPU and the command line, which runs the same sweep again
    ran = metrics["ran"]
    assert ran["command"] == shlex.join(["cfgfast", *argv])
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d UTC", ran["date"])
    assert ran["device"] == f"{cfgfast.build_info()['cpu']}, {torch.get_num_threads()} threads"
    assert ran["torch"] == torch.__version__ and ran["cfgfast"] == cfgfast.__version__
    assert f"Ran {ran['date']} on {ran['device']} (torch {torch.__version__}, cfgfast {cfgfast.__version__}): " \
           f"`{ran['command']}`." in table


def test_a_stopped_sweep_says_its_files_are_incomplete(tmp_path):
    # the files are rewritten after every point: stopped after the first of two, they say so
    def log(line):
        if line.startswith("[1/2]"):
            raise KeyboardInterrupt

    out = tmp_path / "eval"
    with pytest.raises(KeyboardInterrupt):
        sweep(checkpoint.load_model(tiny_model_file(tmp_path)), load_dataset("digits"), str(out), ws=[0.0, 1.0], num=4, steps=2,
              batch_size=4, feature_steps=2, log=log)
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["complete"], metrics["planned"], len(metrics["points"])) == (False, 2, 1)
    assert "**Incomplete: 1 of the 2 planned points**" in (out / "results.md").read_text()


def test_evaluate_refuses_a_classifier_for_other_images(tmp_path, capsys):
    clf_path = tmp_path / "clf.pt"
    save_classifier(str(clf_path), Classifier(ClassifierConfig(image_size=16, width=8, groups=4)))
    assert main(["evaluate", "--model", tiny_model_file(tmp_path), "--classifier", str(clf_path),
                 "--out", str(tmp_path / "eval")]) == 2
    assert "classifier must be noise-conditional for 10 classes of shape (1, 8, 8)" in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [(["--w", "-1"], r"error: --w must be non-empty, finite and >= 0, got \[-1.0\]"),
                                          (["--num", "1"], "error: --num must be an int of at least 2 and below "
                                                           "4294967297, got 1"),
                                          (["--steps", "99999999999999999999"], "error: --steps must be an int of at "
                                                                                "least 2 and below 4294967296"),
                                          (["--v", "2"], r"error: --v must be in \[0, 1\], got 2.0"),
                                          (["--seed", "-1"], "error: --seed must be at least 0"),
                                          (["--batch-size", "0"], "error: --batch-size must be an int of at least 1"),
                                          (["--device", "gpu"], "--device must be a torch.device"),
                                          (["--device", "meta"], "--device must be cpu, cuda or cuda:N, got meta"),
                                          (["--device", f"cuda:{torch.cuda.device_count()}"],
                                           "--device cuda:.* is not available")])
def test_evaluate_refuses_bad_arguments_before_any_work(tmp_path, capsys, argv, message):
    _assert_refused_before_any_work(tmp_path, capsys, argv, message)


def _assert_refused_before_any_work(tmp_path, capsys, argv, message):
    """evaluate with these arguments exits with status 2, the message on stderr, and writes nothing."""
    try:
        code = main(["evaluate", "--model", tiny_model_file(tmp_path), "--out", str(tmp_path / "eval")] + argv)
    except SystemExit as exit:  # argparse's own refusal of a value its type does not parse
        code = exit.code
    assert code == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "eval").exists()


def test_evaluate_sweeps_samplers_and_step_counts(tmp_path, capsys):
    """Each sampler at each of its step counts, at each w: the points, the table rows, a grid per point and the plot
    against model evaluations (an earlier single-run sweep's fd_is.png and grid_w<w>.png removed)."""
    model_path, out = tiny_model_file(tmp_path), tmp_path / "eval"
    out.mkdir()
    for name in ("fd_is.png", "grid_w1.png"):
        (out / name).write_bytes(b"an earlier sweep's")
    assert main(["evaluate", "--model", model_path, "--classifier", "none", "--num", "10", "--w", "0", "1",
                 "--sampler", "ddpm,ddim,dpmpp_2m_sde", "--steps", "2,3", "ddpm=4", "--eta", "0.5",
                 "--feature-steps", "2", "--batch-size", "6", "--out", str(out)]) == 0
    assert "ddpm 4, ddim 2, ddim 3, dpmpp_2m_sde 2, dpmpp_2m_sde 3 steps" in capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    runs = [("ddpm", 4), ("ddim", 2), ("ddim", 3), ("dpmpp_2m_sde", 2), ("dpmpp_2m_sde", 3)]
    assert [(r["sampler"], r["steps"]) for r in metrics["runs"]] == runs and metrics["eta"] == 0.5
    assert [(p["sampler"], p["steps"], p["w"]) for p in metrics["points"]] == [(*r, w) for r in runs for w in (0, 1)]
    assert metrics["complete"] and all(math.isfinite(p["fd"]) for p in metrics["points"])
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(["fd_is_evaluations.png", "metrics.json", "results.md"]
                           + [f"grid_{s}_{n}_w{w}.png" for s, n in runs for w in (0, 1)])
    table = (out / "results.md").read_text()
    for row in ("| 0 | ddpm | 4 |", "| 1 | ddim (η = 0.5) | 3 |", "| 1 | dpmpp_2m_sde | 2 |"):
        assert row in table
    assert table.index("| 0 | dpmpp_2m_sde | 3 |") < table.index("| 1 | ddpm | 4 |")  # by w, then by run
    assert "![FD and IS](fd_is_evaluations.png)" in table
    assert (out / "fd_is_evaluations.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sweep_gives_each_sampler_its_own_settings(tmp_path, monkeypatch):
    """v goes to ddpm, eta to ddim, neither to the DPM-Solver++ samplers (sample() refuses a setting its sampler
    ignores); steps is the run's own."""
    calls = []

    def recording_sample(model, labels, w, steps, **kwargs):
        calls.append((kwargs["sampler"], steps, {k: kwargs[k] for k in ("v", "eta") if k in kwargs}))
        return cfgfast.sample(model, labels, w, steps, **kwargs)

    monkeypatch.setattr(cfgfast.evaluate, "sample", recording_sample)
    sweep(checkpoint.load_model(tiny_model_file(tmp_path)), load_dataset("digits"), str(tmp_path / "eval"), ws=[1.0],
          num=4, steps={"ddpm": 3, "ddim": [2], "dpmpp_2m": 2}, samplers=["ddpm", "ddim", "dpmpp_2m"], eta=0.25,
          v=0.5, batch_size=4, feature_steps=2, log=lambda line: None)
    assert calls == [("ddpm", 3, {"v": 0.5}), ("ddim", 2, {"eta": 0.25}), ("dpmpp_2m", 2, {})]


@pytest.mark.parametrize("argv,message", [
    (["--sampler", "ddpm,euler"], "argument --sampler: must be comma-separated names from ddpm, ddim, dpmpp_2m, "
                                  "dpmpp_2m_sde, got 'euler'"),
    (["--sampler", "ddpm,ddpm"], r"error: --sampler must be distinct names from \['ddpm', 'ddim', 'dpmpp_2m', "
                                 r"'dpmpp_2m_sde'\], got \['ddpm', 'ddpm'\]"),
    (["--sampler", "ddim", "--eta", "1.5"], r"error: --eta must be in \[0, 1\], got 1.5"),
    (["--sampler", "ddpm,dpmpp_2m", "--steps", "10", "--eta", "0.5"],
     r"error: --eta must be 0 unless 'ddim' is among the samplers \(eta is ddim's setting\), got eta=0.5 with "
     r"samplers \['ddpm', 'dpmpp_2m'\]"),
    (["--steps", "10,x"], "argument --steps: must be comma-separated step counts, optionally after SAMPLER=, such as "
                          "10,20,50 or ddpm=256, got '10,x'"),
    (["--steps", "euler=10"], "argument --steps: must name a sampler from ddpm, ddim, dpmpp_2m, dpmpp_2m_sde before "
                              "'=', got 'euler'"),
    (["--sampler", "ddpm,ddim", "--steps", "ddpm=10"], r"error: --steps must give step counts for each sampler of "
                                                        r"--sampler \(ddpm, ddim\) and no other, got none beyond them "
                                                        "and none for ddim"),
    (["--steps", "10", "ddim=10"], r"error: --steps must give step counts for each sampler of --sampler \(ddpm\) "
                                   "and no other, got ddim beyond them"),
    (["--steps", "10", "20"], "error: --steps must give one list for all samplers and at most one SAMPLER=list for "
                              "each, got 2 lists"),
    (["--steps", "10,10"], r"error: --steps must be distinct step counts for each sampler, got \[10, 10\] for 'ddpm'"),
    (["--sampler", "dpmpp_2m", "--steps", "1"], "error: --steps must be an int of at least 2 and below 4294967296, "
                                                "got 1"),
])
def test_evaluate_refuses_bad_sampler_options_before_any_work(tmp_path, capsys, argv, message):
    _assert_refused_before_any_work(tmp_path, capsys, argv, message)


DOCS = os.path.join(os.path.dirname(__file__), "..", "docs", "evaluation")


def sweep_metrics(runs, ws, classifier: bool) -> dict:
    """A metrics dict as sweep writes it, with made-up scores."""
    kinds = ("classifier-free", "classifier") if classifier else ("classifier-free",)
    points = [{"guidance": kind, "sampler": s, "steps": n, "w": w, "fd": 0.05 + 0.01 * w + 1 / n,
               "fd_matched": 0.06, "is": 9.8 + 0.01 * w - 1 / n, "accuracy": 1.0, "seconds": 1.0}
              for kind in kinds for s, n in runs for w in ws if not (kind == "classifier" and w == 0)]
    real = {"images": 360, "fd": 0.07, "is": 9.6, "accuracy": 0.99}
    return {"dataset": "digits", "model": "m", "num": 100, "seed": 0, "eta": 0.5,
            "runs": [{"sampler": s, "steps": n} for s, n in runs], "reference": {"heldout": real, "train": real},
            "points": points}


@pytest.mark.parametrize("runs,name,size", [([("ddpm", 8)], "fd_is.png", (1100, 462)),
                                            ([("ddpm", 8), ("ddim", 4), ("ddim", 8), ("dpmpp_2m", 4)],
                                             "fd_is_evaluations.png", (1947, 825))])
def test_plot_metrics_draws_the_sweeps_plot(tmp_path, runs, name, size):
    """Against w for one run, against model evaluations for several (a column per guidance kind and w): one PNG,
    written whole, named as results.md names it."""
    from PIL import Image

    path = plot_metrics(sweep_metrics(runs, [0.0, 1.0, 3.0], classifier=True), str(tmp_path))
    assert path == str(tmp_path / name) and [p.name for p in tmp_path.iterdir()] == [name]  # no temporary file
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == size


def test_plot_metrics_redraws_a_single_run_metrics_json_that_names_its_steps_at_the_top(tmp_path):
    with open(os.path.join(DOCS, "metrics.json")) as f:
        metrics = json.load(f)
    assert "runs" not in metrics and "sampler" not in metrics["points"][0]
    assert plot_metrics(metrics, str(tmp_path)) == str(tmp_path / "fd_is.png")


def test_a_missing_matplotlib_is_told_before_any_work(tmp_path, capsys, monkeypatch):
    model_path = tiny_model_file(tmp_path)
    for module in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, module, None)
    assert main(["evaluate", "--model", model_path, "--out", str(tmp_path / "eval"), "--steps", "2"]) == 2
    assert "draws its plots with matplotlib, which is not installed: pip install matplotlib" in capsys.readouterr().err
    assert not (tmp_path / "eval").exists()


METHODS = ["cfg", "rescale", "apg", "cfgpp", "threshold"]


def test_evaluate_compares_guidance_methods(tmp_path, capsys):
    """--guidance: each method at each w (by w, the methods side by side), a grid per point, the methods' settings
    in metrics.json and results.md, and the plot against w (an earlier sweep's fd_is.png and grids removed)."""
    model_path, out = tiny_model_file(tmp_path, varied=True), tmp_path / "eval"
    out.mkdir()
    for name in ("fd_is.png", "grid_w1.png", "grid_ddim_2_w1.png"):
        (out / name).write_bytes(b"an earlier sweep's")
    assert main(["evaluate", "--model", model_path, "--guidance", ",".join(METHODS), "--sampler", "ddim",
                 "--steps", "2", "--w", "0", "1", "--num", "10", "--feature-steps", "2", "--batch-size", "6",
                 "--apg-momentum", "-0.25", "--threshold", "0.9", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "guidance cfg, rescale, apg, cfgpp, threshold" in printed and "[10/10] threshold ddim 2 steps w=1" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert [(p["w"], p["method"]) for p in metrics["points"]] == [(w, m) for w in (0, 1) for m in METHODS]
    assert all(p["guidance"] == "classifier-free" and (p["sampler"], p["steps"]) == ("ddim", 2)
               and math.isfinite(p["fd"]) for p in metrics["points"])
    assert metrics["methods"] == {"cfg": {}, "rescale": {"guidance_rescale": 0.7},
                                  "apg": {"eta_parallel": 0.0, "norm_threshold": 1.0, "momentum": -0.25},
                                  "cfgpp": {}, "threshold": {"threshold": [0.9, 2.0]}}
    settings = {p["method"]: p["settings"] for p in metrics["points"]}
    assert settings["apg"] == {"guidance": "apg", "apg": {"eta_parallel": 0.0, "norm_threshold": 1.0,
                                                          "momentum": -0.25},
                               "guidance_rescale": 0.0, "threshold": None, "clip": 1.0}
    assert settings["threshold"] == {"guidance": "cfg", "apg": None, "guidance_rescale": 0.0,
                                     "threshold": [0.9, 2.0], "clip": None}
    assert (settings["rescale"]["guidance_rescale"], settings["cfgpp"]["guidance"]) == (0.7, "cfgpp")
    assert metrics["complete"] and metrics["planned"] == 10 and metrics["classifier"] is None
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(["fd_is_methods.png", "metrics.json", "results.md"]
                           + [f"grid_{m}_w{w}.png" for m in METHODS for w in (0, 1)])
    table = (out / "results.md").read_text()
    assert "| w | method | FD (10 samples) | FD (first 10) | IS | accuracy | seconds |" in table
    assert "| real held-out (360 images) | | – |" in table
    assert "| apg | `guidance=cfgfast.APG(eta_parallel=0, norm_threshold=1, momentum=-0.25)` |" in table
    assert "| threshold | `guidance='cfg', threshold=(0.9, 2), clip=None` |" in table
    assert f"): `cfgfast evaluate --model {model_path} --guidance cfg,rescale,apg,cfgpp,threshold" in table
    rows = [line for line in table.splitlines() if re.match(r"\| [01] \| ", line)]
    assert [row.split(" | ")[:2] for row in rows] == [[f"| {w}", m] for w in (0, 1) for m in METHODS]
    assert "![FD, IS and accuracy](fd_is_methods.png)" in table
    assert (out / "fd_is_methods.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sweep_gives_each_guidance_method_its_settings_and_the_same_noise(tmp_path, monkeypatch):
    """Every method samples with the sweep's seed (the same initial noise), the run's sampler and steps, and its
    own guidance keywords: the clip of [-1, 1] for all but threshold, which replaces it."""
    calls = []

    def recording_sample(model, labels, w, steps, **kwargs):
        calls.append((w, steps, kwargs["sampler"], kwargs["seed"], kwargs["index_offset"],
                      *(kwargs[key] for key in ("guidance", "guidance_rescale", "threshold", "clip"))))
        return cfgfast.sample(model, labels, w, steps, **kwargs)

    monkeypatch.setattr(cfgfast.evaluate, "sample", recording_sample)
    sweep(checkpoint.load_model(tiny_model_file(tmp_path, varied=True)), load_dataset("digits"), str(tmp_path / "eval"),
          ws=[2.0],
          num=6, steps=3, samplers="ddim", seed=5, batch_size=4, feature_steps=2, log=lambda line: None,
          methods={"cfg": {}, "rescale": {"guidance_rescale": 0.5}, "apg": {"norm_threshold": 0.0},
                   "cfgpp": None, "threshold": {}})
    apg = cfgfast.APG(eta_parallel=0.0, norm_threshold=0.0, momentum=-0.5)
    expected = [("cfg", 0.0, None, 1.0), ("cfg", 0.5, None, 1.0), (apg, 0.0, None, 1.0), ("cfgpp", 0.0, None, 1.0),
                ("cfg", 0.0, (0.995, 1.5), None)]
    assert calls == [(2.0, 3, "ddim", 5, offset, *options) for options in expected for offset in (0, 4)]


def test_guidance_methods_at_w_0_that_reduce_to_cfg_give_its_samples(tmp_path):
    # rescale (k = 1 where g = eps_c) and APG (x~ = x~_c) at w = 0 are cfg's samples from the same noise, to rounding
    model = checkpoint.load_model(tiny_model_file(tmp_path, varied=True))
    metrics = sweep(model, load_dataset("digits"), str(tmp_path / "eval"), ws=[0.0], num=10, steps=3, samplers="ddim",
                    batch_size=10, feature_steps=2, methods=["cfg", "rescale", "apg"], log=lambda line: None)
    fd = [p["fd"] for p in metrics["points"]]
    assert fd[1] == pytest.approx(fd[0], rel=1e-4) and fd[2] == pytest.approx(fd[0], rel=1e-4)


@pytest.mark.parametrize("argv,message", [
    (["--guidance", "cfg,cfg2"], "argument --guidance: must be distinct comma-separated names from cfg, rescale, apg, "
                                 "cfgpp, threshold, got 'cfg2'"),
    (["--guidance", "apg,cfg,apg"], "argument --guidance: must be distinct comma-separated names from cfg, rescale, "
                                    "apg, cfgpp, threshold, got 'apg' 2 times"),
    (["--guidance", "cfg,cfgpp", "--sampler", "ddpm"], r"error: --guidance cfgpp \(CFG\+\+\) is a form of --sampler "
                                                       "ddim only, got --sampler ddpm: give --sampler ddim, or "
                                                       "--guidance cfg"),
    (["--guidance", "cfg", "--sampler", "ddim", "--steps", "2,3"],
     "error: --sampler must be one sampler at one step count when guidance methods are compared, got ddim 2, ddim 3"),
    (["--guidance", "cfg", "--apg-momentum", "-0.5"], r"error: --apg-momentum is a setting of the apg method: give "
                                                      "--guidance with apg among its methods, got --guidance cfg"),
    (["--threshold", "0.9", "2"], r"error: --threshold is a setting of the threshold method: give --guidance with "
                                  r"threshold among its methods, got --guidance \(none\)"),
    (["--guidance", "apg", "--apg-momentum", "1"], r"error: --apg-momentum must lie in \(-1, 1\) \(0: none\), got 1.0"),
    (["--guidance", "apg", "--apg-norm-threshold", "-1"], "error: --apg-norm-threshold must be >= 0"),
    (["--guidance", "rescale", "--guidance-rescale", "2"], r"error: --guidance-rescale must be in \[0, 1\], got 2.0"),
    (["--guidance", "threshold", "--threshold", "0.9", "0.5"],
     r"error: --threshold must be a pair \(p, M\) with p in \(0, 1\] and M at least 1, finite in float32, got "
     r"\[0.9, 0.5\]"),
    (["--guidance", "cfg", "--classifier", "digits"], "error: --classifier must be none with --guidance"),
])
def test_evaluate_refuses_bad_guidance_options_before_any_work(tmp_path, capsys, argv, message):
    _assert_refused_before_any_work(tmp_path, capsys, argv, message)


def test_sweep_refuses_bad_guidance_methods(tmp_path):
    from cfgfast.evaluate import check_methods

    with pytest.raises(ValueError, match=r"methods\['apg'\] must hold settings from \['eta_parallel', "
                                         r"'norm_threshold', 'momentum'\], got \['guidance_rescale'\]"):
        check_methods({"apg": {"guidance_rescale": 0.7}}, [("ddim", 10)])
    with pytest.raises(ValueError, match=r"methods must hold 'cfgpp' \(CFG\+\+, a form of ddim\) only with sampler "
                                         r"'ddim', got sampler 'dpmpp_2m'; with it, choose from \['cfg', 'rescale', "
                                         r"'apg', 'threshold'\]"):
        check_methods(["cfgpp"], [("dpmpp_2m", 10)])
    with pytest.raises(TypeError, match=r"methods\['apg'\]\['momentum'\] must be a real number, got str"):
        check_methods({"apg": {"momentum": "-0.5"}}, [("ddim", 10)])
    for bad in ([], ["cfg", "cfg"], ["cfg", "pag"]):
        with pytest.raises(ValueError, match="methods must be distinct names from"):
            check_methods(bad, [("ddim", 10)])
    with pytest.raises(ValueError, match=r"classifier must be None when guidance methods are compared"):
        sweep(checkpoint.load_model(tiny_model_file(tmp_path)), load_dataset("digits"), str(tmp_path / "eval"),
              ws=[1.0], num=4, steps=2, samplers="ddim", classifier=Classifier(ClassifierConfig(width=8, groups=4)),
              methods=["cfg"], log=lambda line: None)
    assert not (tmp_path / "eval").exists()


def methods_metrics(ws) -> dict:
    """A metrics dict of a comparison of guidance methods as sweep writes it, with made-up scores."""
    metrics = sweep_metrics([("ddim", 50)], [], classifier=False)
    from cfgfast.evaluate import GUIDANCE_METHODS

    metrics["methods"] = {name: {key: list(value) if isinstance(value, tuple) else value
                                 for key, value in settings.items()} for name, settings in GUIDANCE_METHODS.items()}
    metrics["points"] = [{"guidance": "classifier-free", "method": m, "sampler": "ddim", "steps": 50, "w": w,
                          "fd": 0.05 + 0.01 * w + 0.002 * i, "fd_matched": 0.06, "is": 9.8 - 0.01 * i,
                          "accuracy": 1.0 - 0.002 * i * w, "seconds": 1.0}
                         for w in ws for i, m in enumerate(METHODS)]
    return metrics


def test_plot_metrics_draws_a_comparison_of_guidance_methods(tmp_path):
    from PIL import Image

    path = plot_metrics(methods_metrics([3.0, 6.0, 10.0]), str(tmp_path))
    assert path == str(tmp_path / "fd_is_methods.png") and [p.name for p in tmp_path.iterdir()] == [
        "fd_is_methods.png"]
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == (1540, 484)
