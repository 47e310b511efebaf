"""`cifar100 predict` on image files: the written-out test set gets eval's answers, every kind of
picture is read, and every bad input is one line with nothing written."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import struct
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import run_cmd
from PIL import Image

from cifar100.cli import main
from cifar100.commands.images import read_image
from cifar100.data.cifar import load


@pytest.mark.slow
def test_the_written_out_test_set_gets_evals_top1_image_by_image(exported_run, test_pngs, real_data, tmp_path):
    run = tmp_path / "tiny"
    shutil.copytree(exported_run, run, symlinks=True)  # eval writes into the run folder
    out = run_cmd([sys.executable, "-m", "cifar100", "eval", f"run={run}", "data.test_limit=0"])
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((run / "eval-best.json").read_text())
    with np.load(run / result["predictions"]) as npz:
        eval_top1 = npz["test_logits"].argmax(1)
        assert (npz["test_index"] == np.arange(10_000)).all()
    began = time.perf_counter()
    out = run_cmd(
        [sys.executable, "-m", "cifar100", "predict", f"run={run}", str(test_pngs), f"out={tmp_path / 'p.csv'}"]
    )
    seconds = time.perf_counter() - began
    assert out.returncode == 0, out.stderr[-3000:]
    with open(tmp_path / "p.csv") as f:
        rows = list(csv.DictReader(f))
    test = load(real_data)
    assert [Path(r["file"]).name for r in rows] == [f"{i:05d}.png" for i in range(10_000)]
    predicted = np.array([test.classes.index(r["class_1"]) for r in rows])
    assert (predicted == eval_top1).all()  # every image's answer, not only the count
    labels = test.test.labels.numpy()
    assert float((predicted == labels).mean()) == result["splits"]["test"]["top1"]
    print(f"predict: 10,000 PNG files in {seconds:.1f} s (process start included)")


def _png_16bit_rgb(path: Path, pixels: np.ndarray) -> None:
    """A 16-bit-per-channel RGB PNG, written by hand: PIL reads such files but cannot write them."""
    height, width, _ = pixels.shape
    raw = b"".join(b"\0" + row.astype(">u2").tobytes() for row in pixels)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    )


def test_every_kind_of_picture_becomes_32x32_rgb(tmp_path):
    rng = np.random.default_rng(0)
    photo = rng.integers(0, 256, (45, 70, 3), dtype=np.uint8)
    base = Image.fromarray(photo)
    base.save(tmp_path / "rgb.jpg", quality=95)
    base.convert("CMYK").save(tmp_path / "cmyk.jpg")
    base.convert("L").save(tmp_path / "grey.png")
    base.convert("P").save(tmp_path / "palette.gif")
    base.convert("RGBA").save(tmp_path / "rgba.webp", lossless=True)
    base.save(tmp_path / "rgb.bmp")
    frames = [Image.new("RGB", (40, 30), colour) for colour in ((250, 0, 0), (0, 0, 250))]
    frames[0].save(tmp_path / "animated.gif", save_all=True, append_images=frames[1:])
    Image.fromarray((np.arange(40 * 30).reshape(30, 40) * 50).astype(np.uint16)).save(tmp_path / "grey16.png")
    _png_16bit_rgb(tmp_path / "rgb16.png", photo.astype(np.uint16) * 257)
    for path in sorted(tmp_path.iterdir()):
        image = read_image(path)
        assert image.shape == (3, 32, 32) and image.dtype == np.uint8, path
    # 16-bit values are scaled, not clipped at 255 (PIL's own conversion would make it white).
    grey16 = read_image(tmp_path / "grey16.png")
    assert 80 < grey16.mean() < 180 and (grey16[0] == grey16[1]).all()
    assert np.abs(read_image(tmp_path / "rgb16.png").astype(int) - read_image(tmp_path / "rgb.bmp")).max() <= 1
    # A transparent picture lies over white; an animation gives its first frame.
    Image.new("RGBA", (50, 50), (0, 0, 0, 0)).save(tmp_path / "clear.png")
    assert (read_image(tmp_path / "clear.png") == 255).all()
    assert (read_image(tmp_path / "animated.gif")[:, 0, 0] == (250, 0, 0)).all()
    # 32 x 32 pictures are used as they are; others lose the long side's ends, evenly.
    Image.fromarray(photo[:32, :32]).save(tmp_path / "exact.png")
    assert (read_image(tmp_path / "exact.png") == photo[:32, :32].transpose(2, 0, 1)).all()
    wide = np.zeros((32, 96, 3), dtype=np.uint8)
    wide[:, 32:64] = 200  # only the middle third survives the crop
    Image.fromarray(wide).save(tmp_path / "wide.png")
    assert (read_image(tmp_path / "wide.png") == 200).all()


def test_predict_answers_in_a_table_csv_and_json_from_the_run_and_its_exports(exported_run, tmp_path, capsys):
    for i, colour in enumerate(((200, 30, 30), (30, 200, 30), (250, 250, 250))):
        Image.new("RGB", (64 + 16 * i, 48), colour).save(tmp_path / f"{i}.jpg")
    answers = {}
    for source in (f"run={exported_run}", f"model={exported_run / 'export' / 'tiny-best.onnx'}"):
        assert main(["predict", source, "topk=3", str(tmp_path), f"out={tmp_path / 'p.json'}"]) == 0
        result = json.loads((tmp_path / "p.json").read_text())
        answers[source.partition("=")[0]] = result
        assert result["images"] == 3 and [len(p["top"]) for p in result["predictions"]] == [3, 3, 3]
        for p in result["predictions"]:
            probabilities = [t["probability"] for t in p["top"]]
            assert probabilities == sorted(probabilities, reverse=True) and sum(probabilities) <= 1 + 1e-9
            assert p["superclass"]["probability"] >= probabilities[0]
    capsys.readouterr()
    run_answer, file_answer = answers["run"]["predictions"], answers["model"]["predictions"]
    assert [[t["class"] for t in p["top"]] for p in run_answer] == [[t["class"] for t in p["top"]] for p in file_answer]
    for a, b in zip(run_answer, file_answer):
        assert [t["probability"] for t in a["top"]] == pytest.approx([t["probability"] for t in b["top"]], abs=1e-4)
    assert main(["predict", f"model={exported_run / 'export' / 'tiny-best.pt2'}", str(tmp_path / "1.jpg")]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["file", "superclass", "top-1", "top-2", "top-3", "top-4", "top-5"]
    assert table[1].startswith(str(tmp_path / "1.jpg")) and run_answer[1]["top"][0]["class"] in table[1]
    assert main(["predict", f"run={exported_run}", str(tmp_path), f"out={tmp_path / 'p.csv'}", "eval.tta=flip"]) == 0
    with open(tmp_path / "p.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["file"] for r in rows] == [str(tmp_path / f"{i}.jpg") for i in range(3)]
    assert list(rows[0])[:5] == ["file", "superclass", "superclass_probability", "class_1", "probability_1"]


def bad_pictures(bad: Path) -> Path:
    """Pictures that cannot be read, in `bad`, beside one good one (returned)."""
    bad.mkdir()
    good = bad / "good.png"
    Image.new("RGB", (32, 32), (9, 99, 199)).save(good)
    (bad / "notes.png").write_text("a shopping list, not a picture\n")
    Image.new("RGB", (32, 32)).save(bad / "tiff.png", format="TIFF")  # PIL reads it, predict does not
    Image.new("RGB", (32, 32)).save(bad / "script.jpg", format="EPS")  # PIL would hand it to Ghostscript
    whole = bad / "whole.jpg"
    Image.effect_noise((200, 200), 60).convert("RGB").save(whole)
    (bad / "truncated.jpg").write_bytes(whole.read_bytes()[: whole.stat().st_size * 2 // 3])
    (bad / "empty.png").write_bytes(b"")
    Image.new("1", (10_000, 10_000)).save(bad / "bomb.png")  # 100 M pixels in 12 kB, over PIL's limit
    Image.new("1", (14_000, 14_000)).save(bad / "bigger-bomb.png")  # more than twice the limit
    os.mkfifo(bad / "fifo.png")
    return good


def bad_models(folder: Path, exported: Path) -> None:
    """Model files that are not models, or not classifiers, in `folder`, with the JSON beside each."""
    sidecar = exported / "tiny-best.json"
    (folder / "fake.onnx").write_bytes(b"\x08\x07 not a protobuf of a model")
    (folder / "lonely.onnx").write_bytes((exported / "tiny-best.onnx").read_bytes())
    (folder / "program.pt2").write_bytes(b"PK\x03\x04 not a zip")
    for name, shape in (("vector", ["N", 10]), ("identity", ["N", 3, 32, 32])):  # real models, not classifiers
        x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, shape)
        y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, shape)
        graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], name, [x], [y])
        onnx.save(
            onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)]), folder / f"{name}.onnx"
        )
    for name in ("fake", "program", "vector", "identity"):
        shutil.copy(sidecar, folder / f"{name}.json")


def test_every_bad_input_is_one_line_and_writes_nothing(exported_run, read_only_dir, tmp_path, capsys):
    bad = tmp_path / "bad"
    good = bad_pictures(bad)
    (empty := tmp_path / "no-images").mkdir()
    (empty / "readme.txt").write_text("no pictures here")
    (unfinished := tmp_path / "unfinished").mkdir()
    shutil.copy(exported_run / "config.yaml", unfinished)
    other = tmp_path / "other"
    shutil.copytree(exported_run, other, symlinks=True)
    out = tmp_path / "results"
    run = f"run={exported_run}"
    before = run_files(exported_run)
    assert_refused(
        {
            (run, str(bad / "notes.png")): "not a PNG, JPEG, WEBP, BMP, GIF picture",
            (run, str(bad / "tiff.png")): "tiff.png: not a PNG, JPEG, WEBP, BMP, GIF picture",
            (run, str(bad / "script.jpg")): "script.jpg: not a PNG, JPEG, WEBP, BMP, GIF picture",
            (run, str(bad / "truncated.jpg")): "image file is truncated",
            (run, str(bad / "empty.png")): "an empty file",
            (run, str(bad / "bomb.png")): "10,000 x 10,000 = 100,000,000 pixels, more than the 89,478,485 pixels",
            (run, str(bad / "bigger-bomb.png")): "refused, more than twice the 89,478,485 pixels predict decodes",
            (run, str(bad / "notes.png"), str(bad / "empty.png")): "none of the 2 images could be read",
            (run, str(bad / "fifo.png")): "fifo.png: not a regular file",
            (run, f"out={exported_run / 'summary.json'}", str(good)): "inside the run folder",
            (run, f"out={exported_run / 'checkpoints' / 'best' / 'meta.json'}", str(good)): "inside the run folder",
            (run, f"out={exported_run / 'export' / 'tiny-best.json'}", str(good)): "inside the run folder",
            (run, f"out={exported_run / 'predictions.csv'}", str(good)): "inside the run folder",
            (run, str(empty)): "no image files in this folder",
            (run, str(tmp_path / "missing.png")): "no such file or folder",
            (f"run={unfinished}", str(good)): "no checkpoints/best",
            (run, f"checkpoint={other / 'checkpoints' / 'best'}", str(good)): "belongs to run",
            (run, "weights=ema", str(good)): "weights=ema needs",
            (run, f"out={read_only_dir / 'p.csv'}", str(good)): "cannot write there",
            (run, f"out={good / 'p.csv'}", str(good)): "cannot write there",
            (run, f"out={out / 'p.txt'}", str(good)): "expected a .csv or .json file",
            (run, "topk=0", str(good)): "topk=0",
            (run, "recipe=smoke", str(good)): "drop recipe=",
        },
        out,
        capsys,
        read_only_dir,
    )
    assert run_files(exported_run) == before
    assert main(["predict", run, str(good), f"out={out / 'p.json'}"]) == 0  # and the good file alone is fine
    assert [p.name for p in out.iterdir()] == ["p.json"]


def test_every_bad_model_file_is_one_line_and_writes_nothing(exported_run, tmp_path, capsys):
    Image.new("RGB", (32, 32), (9, 99, 199)).save(good := tmp_path / "good.png")
    bad_models(tmp_path, exported_run / "export")
    fake = tmp_path / "fake.onnx"
    assert_refused(
        {
            (f"model={fake}", str(good)): "not an ONNX model",
            (f"model={tmp_path / 'lonely.onnx'}", str(good)): "no lonely.json beside it",
            (f"model={tmp_path / 'program.pt2'}", str(good)): "not a torch.export program",
            (f"model={tmp_path / 'vector.onnx'}", str(good)): "takes input ['N', 10], not a batch of [3, 32, 32]",
            (f"model={tmp_path / 'identity.onnx'}", str(good)): "gave outputs of shape (1, 3, 32, 32), not 1 x 100",
            (f"model={fake}", "optim.lr=1", str(good)): "model= takes no training config",
            (f"model={fake}", f"run={exported_run}", str(good)): "give it alone",
        },
        tmp_path / "results",
        capsys,
    )


def assert_refused(cases: dict[tuple[str, ...], str], out: Path, capsys, *untouched: Path) -> None:
    """Each case's predict ends in one `error:` line holding its message (after a warning per refused
    picture), and nothing is written to `out` (default `out=`) or the `untouched` folders."""
    out.mkdir()
    for args, message in cases.items():
        if not any(a.startswith("out=") for a in args):
            args = (*args, f"out={out / 'p.json'}")
        assert main(["predict", *args]) == 2, args
        err = capsys.readouterr().err.splitlines()
        assert err[-1].startswith("error: ") and message in err[-1], (args, err)
        assert all(line.startswith("warning: ") for line in err[:-1]), (args, err)  # each refused image
        assert not list(out.iterdir()) and not any(list(u.iterdir()) for u in untouched), args


def run_files(run: Path) -> dict[str, bytes]:
    """Every file of a run folder (links followed) and its bytes."""
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def test_each_picture_that_cannot_be_read_is_its_own_line_and_the_others_are_answered(exported_run, tmp_path, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    for name, colour in (("a.png", (200, 30, 30)), ("b.jpg", (30, 200, 30))):
        Image.new("RGB", (48, 40), colour).save(photos / name)
    (photos / "c.png").write_text("a shopping list, not a picture\n")
    Image.new("1", (10_000, 10_000)).save(photos / "d.png")  # 100 M pixels, past the limit
    whole = photos / "b.jpg"
    (photos / "e.jpg").write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    model = exported_run / "export" / "tiny-best.onnx"
    assert main(["predict", f"model={model}", str(photos), f"out={tmp_path / 'p.json'}"]) == 0
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [
        f"warning: {photos / 'c.png'}: not a PNG, JPEG, WEBP, BMP, GIF picture",
        f"warning: {photos / 'd.png'}: refused, 10,000 x 10,000 = 100,000,000 pixels, more than the 89,478,485 "
        "pixels predict decodes (PIL's decompression-bomb limit)",
        f"warning: {photos / 'e.jpg'}: unreadable image (Truncated File Read)",
    ]
    assert captured.out.startswith("2 image(s) predicted, 3 refused (named above) (")
    result = json.loads((tmp_path / "p.json").read_text())
    assert [p["file"] for p in result["predictions"]] == [str(photos / "a.png"), str(photos / "b.jpg")]
    assert [r["file"] for r in result["refused"]] == [str(photos / n) for n in ("c.png", "d.png", "e.jpg")]


def tall_png(path: Path, height: int) -> None:
    """A 1 x `height` greyscale PNG, compressed as it is written (PIL takes minutes and gigabytes to make one)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    packer, rows, parts = zlib.compressobj(9), b"\0\x80" * 1_000_000, []
    for start in range(0, height, 1_000_000):
        parts.append(packer.compress(rows[: 2 * min(1_000_000, height - start)]))
    header = struct.pack(">IIBBBBB", 1, height, 8, 0, 0, 0, 0)
    idat = b"".join([*parts, packer.flush()])
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


@pytest.mark.slow
def test_a_picture_that_does_not_fit_in_memory_is_its_own_line_under_a_real_limit(exported_run, tmp_path):
    tall_png(tall := tmp_path / "tall.png", 89_000_000)  # under the pixel limit, 170 kB on disk
    tall_png(taller := tmp_path / "taller.png", 90_000_000)  # over it
    Image.new("RGB", (40, 40), (200, 30, 30)).save(red := tmp_path / "red.png")
    model = exported_run / "export" / "tiny-best.onnx"
    command = f"{sys.executable} -m cifar100 predict model={model} {tall} {taller} {red} out={tmp_path / 'p.json'}"
    out = run_cmd(["bash", "-c", f"ulimit -v 4000000 && exec {command}"])  # 4 GB of address space
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert out.stderr.splitlines() == [
        f"warning: {tall}: refused, out of memory decoding 1 x 89,000,000 pixels",
        f"warning: {taller}: refused, 1 x 90,000,000 = 90,000,000 pixels, more than the 89,478,485 pixels predict "
        "decodes (PIL's decompression-bomb limit)",
    ]
    assert [p["file"] for p in json.loads((tmp_path / "p.json").read_text())["predictions"]] == [str(red)]


def test_any_file_name_is_written_safely_and_drives_no_terminal(exported_run, tmp_path, capsys, monkeypatch):
    photos = tmp_path / "photos"
    photos.mkdir()
    names = [b"caf\xe9.png", b"new\nline.png", b"esc\x1b[2J\x1b[31mred.png", b"=HYPERLINK(1).png", b'a,"b".png']
    for name in names:
        Image.new("RGB", (32, 32), (9, 99, 199)).save(os.path.join(os.fsencode(photos), name))
    os.mkfifo(photos / "pipe.png")  # not a regular file: passed over, never opened
    monkeypatch.chdir(photos)
    model = f"model={exported_run / 'export' / 'tiny-best.onnx'}"
    inputs = sorted(os.fsdecode(n) for n in names)
    assert main(["predict", model, *inputs]) == 0
    table = capsys.readouterr().out
    assert "\x1b" not in table and table.count("\n") == 1 + len(names)
    assert {line.split()[0] for line in table.splitlines()[1:]} == {
        "caf\\xe9.png",
        "new\\nline.png",
        "esc\\x1b[2J\\x1b[31mred.png",
        "=HYPERLINK(1).png",
        'a,"b".png',
    }
    assert main(["predict", model, *inputs, "out=p.csv"]) == 0
    text = (photos / "p.csv").read_bytes().decode("utf-8")  # UTF-8 throughout
    assert "\x1b" not in text and text.count("\n") == 1 + len(names)
    files = [row["file"] for row in csv.DictReader(io.StringIO(text))]
    assert sorted(files) == sorted(
        ["caf\\xe9.png", "new\\nline.png", "esc\\x1b[2J\\x1b[31mred.png", "./=HYPERLINK(1).png", 'a,"b".png']
    )
    assert main(["predict", model, str(photos), "out=p.json"]) == 0  # the folder: the FIFO is passed over
    result = json.loads((photos / "p.json").read_text())
    assert sorted(p["file"] for p in result["predictions"]) == sorted(
        str(photos / os.fsdecode(n).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace"))
        for n in names
    )


def test_predict_leaves_the_users_files_beside_out_alone(exported_run, tmp_path, capsys):
    Image.new("RGB", (32, 32), (9, 99, 199)).save(good := tmp_path / "good.png")
    out = tmp_path / "answers"
    out.mkdir()
    (out / ".p.csv.tmp").write_text("the user's\n")  # the name an older predict probed with, then deleted
    (out / "p.csv").symlink_to(good)  # replaced by the answer, never written through
    model = f"model={exported_run / 'export' / 'tiny-best.onnx'}"
    assert main(["predict", model, str(good), f"out={out / 'p.csv'}"]) == 0
    assert (out / ".p.csv.tmp").read_text() == "the user's\n" and sorted(p.name for p in out.iterdir()) == [
        ".p.csv.tmp",
        "p.csv",
    ]
    assert not (out / "p.csv").is_symlink() and Image.open(good).size == (32, 32)
