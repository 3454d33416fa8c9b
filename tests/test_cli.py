"""The command line: `cfgfast info` and `cfgfast toy` (a PNG written whole, or not at all)."""

from __future__ import annotations

import argparse
import json
import sys

import pytest

import cfgfast
from cfgfast.cli import main


def test_info_prints_build_facts(capsys):
    assert main(["info"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["version"] == cfgfast.__version__ and "reference" in info["available_backends"]


def test_toy_writes_a_png_with_one_panel_per_w(tmp_path, capsys):
    from PIL import Image

    out = tmp_path / "toy.png"
    assert main(["toy", "--out", str(out), "--num", "100", "--steps", "16", "--w", "0", "2", "--size", "100"]) == 0
    with Image.open(out) as im:
        assert im.format == "PNG" and im.mode in ("RGB", "RGBA")
        # three panels (the classes, w=0, w=2) of 100 pixels side by side, with titles and a legend
        assert 300 <= im.width <= 330 and 100 <= im.height <= 150
    assert "w=2" in capsys.readouterr().out
    assert [p.name for p in tmp_path.iterdir()] == ["toy.png"]  # no temporary file left


def test_a_missing_pillow_or_matplotlib_is_named_with_its_install_command(tmp_path, capsys, monkeypatch):
    from cfgfast._images import read_image

    # (an import raises ImportError where its module is None in sys.modules: submodules too, as they may be loaded)
    for module in ("PIL", "PIL.Image", "matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(ImportError, match="Pillow, which is not installed: pip install pillow"):
        read_image(str(tmp_path / "any.png"))
    for command in (["toy", "--out", str(tmp_path / "t.png")], ["demo", "--out", str(tmp_path)]):
        assert main(command + ["--steps", "4"]) == 2
        printed = capsys.readouterr()  # before sampling: no banner
        assert printed.err == ("cfgfast: error: cfgfast draws its plots with matplotlib, which is not installed: "
                               "pip install matplotlib\n") and printed.out == ""
    assert list(tmp_path.iterdir()) == []


def test_unwritable_output_fails_before_sampling(tmp_path, capsys):
    assert main(["toy", "--out", str(tmp_path / "missing" / "toy.png"), "--steps", "4"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_bad_arguments_give_a_clear_error(capsys):
    assert main(["toy", "--out", "/tmp/x.png", "--num", "10", "--steps", "1"]) == 2
    assert "cfgfast: error: --steps must be at least 2" in capsys.readouterr().err  # the flag, as the library names it


@pytest.mark.parametrize("command", [["toy", "--out", "t.png"], ["demo"], ["evaluate", "--model", "digits", "--out", "e"]])
@pytest.mark.parametrize("flag,value", [("--w", "nan"), ("--w", "inf"), ("--w", "1e39"), ("--v", "nan"), ("--w", "x")])
def test_non_finite_numbers_are_refused_while_parsing(tmp_path, capsys, monkeypatch, command, flag, value):
    # before any work (toy would otherwise sample every w before the bad one): nothing written where the commands write
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(command + [flag, "0", value] if flag == "--w" else command + [flag, value])
    assert exit_.value.code == 2
    expected = f"must be a number, got {value!r}" if value == "x" else f"must be finite in float32, got {value}"
    assert f"error: argument {flag}: {expected}" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_a_missing_optional_dependency_is_an_error_not_a_traceback(tmp_path, capsys, monkeypatch):
    import cfgfast.data

    def no_sklearn(*args, **kwargs):
        raise ImportError("the digits dataset is read from scikit-learn: pip install scikit-learn")

    monkeypatch.setattr(cfgfast.data, "load_dataset", no_sklearn)
    assert main(["train", "--dataset", "digits", "--out", str(tmp_path / "m.pt"), "--steps", "2"]) == 2
    assert "cfgfast: error: the digits dataset is read from scikit-learn: pip install scikit-learn" \
        in capsys.readouterr().err


def test_library_errors_are_told_in_the_command_flags(capsys):
    from cfgfast.cli import _in_flags

    parser = argparse.ArgumentParser(prog="cfgfast evaluate")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--num", type=int)
    parser.add_argument("out")
    parser.add_argument("--classifier")
    assert _in_flags("batch_size must be an int", parser) == "--batch-size must be an int"
    assert _in_flags("ws must be finite", parser) == "--w must be finite"  # evaluate's ERROR_NAMES
    assert _in_flags("out must be a folder", parser) == "out must be a folder"  # a positional keeps its name
    assert _in_flags("numbers must be", parser) == "numbers must be"  # whole words only
    assert _in_flags("num", parser) == "num"
    # only argument checks ("NAME must ..."): not a message that merely begins with a flag's name
    assert _in_flags("classifier training diverged at step 3", parser) == "classifier training diverged at step 3"
    # nor the compiled ops' checks of internal tensors (their "cfgfast: " not doubled)
    assert _in_flags("cfgfast: num must be float32", parser) == "num must be float32"


def test_bad_toy_arguments_are_named_before_sampling(tmp_path, capsys):
    for argv, message in (
        (["--out", str(tmp_path)], "is a folder"),
        (["--num", "0"], "--num must be at least 1"),
        (["--size", "99"], "--size must be at least 100"),
        (["--extent", "-1"], "--extent must lie in [1e-6, 1e6], got -1.0"),
        (["--extent", "inf"], "--extent must lie in [1e-6, 1e6], got inf"),
        (["--extent", "1e308"], "--extent must lie in [1e-6, 1e6], got 1e+308"),  # it drew empty panels
        (["--extent", "1e-320"], "--extent must lie in [1e-6, 1e6]"),
        (["--seed", str(2**64)], f"--seed must be at least 0, below {2**64}, got {2**64}"),  # an overflow before
        (["--size", "100000"], "--size must be at most 4096"),
        (["--size", "4096", "--w"] + ["1"] * 8, "--size 4096 x 9 panels (the classes and each --w) is wider than"),
        (["--out", str(tmp_path / "t.txt")], "--out must name a .png file"),
        (["--steps", "1"], "--steps must be at least 2"),  # before the banner that states the settings
        (["--backend", "fast"], "--backend must be 'auto' or one of"),
        (["--num", str(2**64)], "--num must be at most 1431655765"),  # an OverflowError's traceback before
    ):
        args = ["toy", "--out", str(tmp_path / "t.png"), "--steps", "4"] + argv
        assert main(args) == 2
        printed = capsys.readouterr()
        assert message in printed.err and printed.out == ""
    assert list(tmp_path.iterdir()) == []


def test_bad_demo_arguments_are_named_before_the_banner(tmp_path, capsys):
    for argv, message in ((["--steps", "-3"], "--steps must be at least 2"), (["--v", "2"], "--v must be in [0, 1]"),
                          (["--seed", "-1"], "--seed must be at least 0"),
                          (["--per-cell", str(2**64)], "--per-cell must be in [1, 1000]")):
        assert main(["demo", "--out", str(tmp_path)] + argv) == 2
        printed = capsys.readouterr()
        assert message in printed.err and printed.out == ""
    assert list(tmp_path.iterdir()) == []


def test_torchs_cpp_stack_is_left_out_of_an_error(monkeypatch, capsys):
    import cfgfast.cli.info as info

    def failing(args):
        raise RuntimeError("something went wrong\nException raised from f at x.cpp:1\nframe #0: c10::Error")

    monkeypatch.setattr(info, "run", failing)
    assert main(["info"]) == 2
    assert capsys.readouterr().err == "cfgfast: error: something went wrong\n"
