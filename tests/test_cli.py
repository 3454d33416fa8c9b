"""The command line: `cfgfast info` and `cfgfast toy` (a PNG written whole, or not at all)."""

from __future__ import annotations

import json
import zlib

import cfgfast
from cfgfast.cli import main


def test_info_prints_build_facts(capsys):
    assert main(["info"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["version"] == cfgfast.__version__ and "reference" in info["available_backends"]


def test_toy_writes_a_png_with_one_panel_per_w(tmp_path, capsys):
    out = tmp_path / "toy.png"
    assert main(["toy", "--out", str(out), "--num", "100", "--steps", "16", "--w", "0", "2", "--size", "64"]) == 0
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (3 * 64 + 2 * 8, 64)  # the classes, w=0, w=2
    raw = zlib.decompress(data[data.index(b"IDAT") + 4:data.index(b"IEND") - 8])
    assert len(raw) == height * (1 + 3 * width)
    assert "w=2" in capsys.readouterr().out
    assert [p.name for p in tmp_path.iterdir()] == ["toy.png"]  # no temporary file left


def test_unwritable_output_fails_before_sampling(tmp_path, capsys):
    assert main(["toy", "--out", str(tmp_path / "missing" / "toy.png"), "--steps", "4"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_bad_arguments_give_a_clear_error(capsys):
    assert main(["toy", "--out", "/tmp/x.png", "--num", "10", "--steps", "1"]) == 2
    assert "steps must be at least 2" in capsys.readouterr().err


def test_bad_toy_arguments_are_named_before_sampling(tmp_path, capsys):
    for argv, message in (
        (["--out", str(tmp_path)], "is a folder"),
        (["--num", "0"], "--num must be at least 1"),
        (["--size", "0"], "--size must be at least 8"),
        (["--extent", "-1"], "--extent must be positive"),
        (["--extent", "inf"], "--extent must be positive and finite"),
        (["--size", "100000"], "--size must be at most 4096"),
        (["--out", str(tmp_path / "t.txt")], "--out must name a .png file"),
    ):
        args = ["toy", "--out", str(tmp_path / "t.png"), "--steps", "4"] + argv
        assert main(args) == 2
        assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
