"""Crafted model files are refused before anything in them runs: `.pt2` archives that torch would
unpickle, evaluate or execute, and ONNX files that read outside their folder or loop; a file that
passes and still runs for long is stopped at `timeout=`. Each is checked through the command line
with a marker file that the crafted code would create."""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import sys
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import run_cmd
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from cifar100.cli import main
from cifar100.commands import model_files

Records = dict[str, bytes]


class Touch:
    """Unpickled, it creates the file MARKER names (in the environment of the process that unpickles it)."""

    def __reduce__(self):
        return (os.system, ('touch "$MARKER"',))


TOUCH = pickle.dumps(Touch(), protocol=2)
RUN_TOUCH = "__import__('os').system('touch $MARKER')"  # goes into JSON text: no double quotes


def _config(records: Records, folder: str) -> dict:
    return json.loads(records[f"data/{folder}/model_{folder}_config.json"])


def _set_config(records: Records, folder: str, config: dict) -> None:
    records[f"data/{folder}/model_{folder}_config.json"] = json.dumps(config).encode()


def pickled_weight(records: Records) -> None:
    config = _config(records, "weights")
    entry = next(iter(config["config"].values()))
    entry["use_pickle"] = True
    records[f"data/weights/{entry['path_name']}"] = TOUCH
    _set_config(records, "weights", config)


def pickled_example_inputs(records: Records) -> None:
    records["data/sample_inputs/model.pt"] = TOUCH


def opaque_constant(records: Records) -> None:
    config = _config(records, "constants")
    config["config"]["evil"] = {"path_name": "opaque_obj_0", "is_param": False, "use_pickle": True, "tensor_meta": None}
    records["data/constants/opaque_obj_0"] = TOUCH
    _set_config(records, "constants", config)


def evaluated_size(records: Records) -> None:
    text = records["models/model.json"].decode()
    symbol = "Symbol('s77', positive=True, integer=True)"
    assert symbol in text
    records["models/model.json"] = text.replace(symbol, f"{RUN_TOUCH} and {symbol}", 1).encode()


def _graph(change: Callable[[dict], None]) -> Callable[[Records], None]:
    def craft(records: Records) -> None:
        program = json.loads(records["models/model.json"])
        change(program)
        records["models/model.json"] = json.dumps(program).encode()

    return craft


def _first_node(program: dict) -> dict:
    return program["graph_module"]["graph"]["nodes"][0]


def _calls(target: str) -> Callable[[Records], None]:
    """The graph's first node made to call `target`."""
    return _graph(lambda p: _first_node(p).update(target=target))


# Each: (how the archive is changed, what the refusal says, whether plain torch.export.load runs its code)
PT2_CRAFTS = {
    "pickled weight": (pickled_weight, "weights record stem.0.weight is pickled (use_pickle)", True),
    "pickled example inputs": (pickled_example_inputs, "pickled example inputs", True),
    "opaque object": (opaque_constant, "it holds data/constants/opaque_obj_0, not a record", True),
    "evaluated size": (evaluated_size, "that is not plain arithmetic", True),
    "guards": (_graph(lambda p: p.update(guards_code=[RUN_TOUCH])), "guards as Python source", False),
    "os.system": (_calls("torch.serialization.os.system"), "calls torch.serialization.os.system, not an ATen", False),
    "reads a file": (_calls("torch.ops.aten.from_file.default"), "from_file.default, which reaches files", False),
    "storage": (_calls("torch.ops.aten.set_.source_Storage"), "set_.source_Storage, which reaches files", False),
    "no such operator": (_calls("torch.ops.aten.nothing.default"), "no ATen operator torch.ops.aten.nothing", False),
    "subgraph": (
        _graph(lambda p: _first_node(p)["inputs"].append({"name": "f", "arg": {"as_graph": {}}, "kind": 1})),
        "an argument as_graph",
        False,
    ),
    "dunder weight": (
        lambda r: _set_config(
            r, "weights", {"config": {"__class__": next(iter(_config(r, "weights")["config"].values()))}}
        ),
        "a weight named '__class__'",
        False,
    ),
    "code in a name": (_graph(lambda p: _first_node(p).update(name="x; import os")), "a graph name", False),
    "custom object": (
        lambda r: r.update({"data/constants/custom_obj_0": TOUCH}),
        "data/constants/custom_obj_0, not a record",
        False,
    ),
    "legacy weights": (lambda r: r.update({"data/weights/model.pt": TOUCH}), "data/weights/model.pt", False),
    "compiled code": (lambda r: r.update({"data/aotinductor/model/model.so": b"\x7fELF"}), "aotinductor", False),
    "second model": (lambda r: r.update({"models/other.json": r["models/model.json"]}), "models/other.json", False),
    "a pickle": (lambda r: r.update({"data/model.pkl": TOUCH}), "data/model.pkl, not a record", False),
}


def rewrite(good: Path, target: Path, craft: Callable[[Records], None], compress: int = zipfile.ZIP_STORED) -> Path:
    """A copy of the archive `good` with its records changed by `craft`, and the JSON beside it."""
    with zipfile.ZipFile(good) as archive:
        records = {info.filename: archive.read(info) for info in archive.infolist()}
    root = next(iter(records)).split("/")[0]
    inner = {name.split("/", 1)[1]: data for name, data in records.items()}
    craft(inner)
    with zipfile.ZipFile(target, "w", compress) as archive:
        for name, data in inner.items():
            archive.writestr(f"{root}/{name}", data)
    shutil.copy(good.with_suffix(".json"), target.with_suffix(".json"))
    return target


@pytest.fixture
def picture(tmp_path) -> Path:
    Image.new("RGB", (40, 40), (200, 30, 30)).save(path := tmp_path / "red.png")
    return path


def refused(model: Path, picture: Path, capsys, *extra: str) -> str:
    assert main(["predict", f"model={model}", str(picture), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def craft_all(good: Path, folder: Path) -> dict[str, Path]:
    return {name: rewrite(good, folder / f"{i}.pt2", craft[0]) for i, (name, craft) in enumerate(PT2_CRAFTS.items())}


@pytest.mark.slow
def test_the_crafted_archives_run_their_code_in_plain_torch_export_load(exported_run, tmp_path):
    crafted = craft_all(exported_run / "export" / "tiny-best.pt2", tmp_path)
    loads = (
        "import os, sys, torch\nfor path in sys.argv[1:]:\n    os.environ['MARKER'] = path + '.ran'\n"
        "    try: torch.export.load(path)\n    except Exception: pass\n"
    )
    runs = [crafted[name] for name, (_, _, runs) in PT2_CRAFTS.items() if runs]
    out = run_cmd([sys.executable, "-c", loads, *map(str, runs)])
    assert out.returncode == 0, out.stderr[-2000:]
    assert [path.with_name(path.name + ".ran").exists() for path in runs] == [True] * len(runs)


def test_crafted_pt2_archives_are_refused_before_anything_in_them_runs(exported_run, tmp_path, picture, capsys):
    good = exported_run / "export" / "tiny-best.pt2"
    crafted = craft_all(good, tmp_path)
    marker = tmp_path / "MARKER"
    os.environ["MARKER"] = str(marker)
    try:
        for name, (_, message, _) in PT2_CRAFTS.items():
            err = refused(crafted[name], picture, capsys)
            assert message in err and (
                "cifar100 loads no file that could run code" in err or name == "no such operator"
            ), (name, err)
            assert not marker.exists(), name
        # Whatever its name says: a .pt2 given an ONNX name is no ONNX model, and is not unpickled either.
        shutil.copy(crafted["pickled weight"], disguised := tmp_path / "model.onnx")
        shutil.copy(good.with_suffix(".json"), disguised.with_suffix(".json"))
        assert "not an ONNX model onnxruntime can load" in refused(disguised, picture, capsys)
        assert not marker.exists()
    finally:
        del os.environ["MARKER"]


def test_an_archive_torch_would_read_otherwise_is_refused(exported_run, tmp_path, picture, capsys):
    good = exported_run / "export" / "tiny-best.pt2"
    deflated = rewrite(good, tmp_path / "deflated.pt2", lambda r: None, zipfile.ZIP_DEFLATED)
    assert "it holds compressed records" in refused(deflated, picture, capsys)
    with zipfile.ZipFile(good) as archive, zipfile.ZipFile(two := tmp_path / "two.pt2", "w") as out:
        for info in archive.infolist():
            out.writestr(info.filename, archive.read(info))
        out.writestr("other/data/weights/weight_0", b"\0" * 8)
    shutil.copy(good.with_suffix(".json"), two.with_suffix(".json"))
    assert "one root folder, each record once" in refused(two, picture, capsys)
    (noise := tmp_path / "noise.pt2").write_bytes(b"PK\x03\x04" + os.urandom(200))
    shutil.copy(good.with_suffix(".json"), noise.with_suffix(".json"))
    assert "not a torch.export program" in refused(noise, picture, capsys)


def test_cifar100_export_writes_no_pickled_record(exported_run):
    with zipfile.ZipFile(exported_run / "export" / "tiny-best.pt2") as archive:
        records = {info.filename.split("/", 1)[1]: archive.read(info) for info in archive.infolist()}
    assert records["data/sample_inputs/model.pt"] == b""  # torch saves example inputs as a pickle: none kept
    for folder in ("weights", "constants"):
        entries = json.loads(records[f"data/{folder}/model_{folder}_config.json"])["config"]
        assert all(entry["use_pickle"] is False for entry in entries.values())
    assert len([n for n in records if n.startswith("data/weights/weight_")]) == 40
    assert not any(n.endswith((".pt", ".pkl")) and records[n] for n in records)


# --- ONNX ---


def classifier(first: list, initializers: list, opsets: tuple = (("", 18),)) -> onnx.ModelProto:
    """images [N, 3, 32, 32] -> flatten @ W + bias -> logits [N, 100], with `first` making `bias`."""
    nodes = [
        *first,
        helper.make_node("Flatten", ["images"], ["flat"]),
        helper.make_node("MatMul", ["flat", "W"], ["product"]),
        helper.make_node("Add", ["product", "bias"], ["logits"]),
    ]
    weights = numpy_helper.from_array(np.zeros((3072, 100), np.float32), "W")
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 3, 32, 32])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 100])],
        [weights, *initializers],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets])
    model.ir_version = 8
    return model


def external_bias(location: str) -> onnx.ModelProto:
    bias = numpy_helper.from_array(np.zeros(100, np.float32), "bias")
    bias.ClearField("raw_data")
    bias.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "400")):
        entry = bias.external_data.add()
        entry.key, entry.value = key, value
    return classifier([], [bias])


def looping() -> onnx.ModelProto:
    body = helper.make_graph(
        [helper.make_node("Identity", ["c"], ["c_out"]), helper.make_node("Identity", ["acc"], ["acc_out"])],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("c", TensorProto.BOOL, []),
            helper.make_tensor_value_info("acc", TensorProto.FLOAT, [100]),
        ],
        [
            helper.make_tensor_value_info("c_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, [100]),
        ],
    )
    start = [
        numpy_helper.from_array(np.array(2**62, np.int64), "trips"),
        numpy_helper.from_array(np.array(True), "go"),
        numpy_helper.from_array(np.zeros(100, np.float32), "zero"),
    ]
    return classifier([helper.make_node("Loop", ["trips", "go", "zero"], ["bias"], body=body)], start)


def branching() -> onnx.ModelProto:
    zero = numpy_helper.from_array(np.zeros(100, np.float32), "zero")
    out = helper.make_tensor_value_info("b", TensorProto.FLOAT, [100])
    arm = helper.make_graph([helper.make_node("Identity", ["zero"], ["b"])], "arm", [], [out])
    go = numpy_helper.from_array(np.array(True), "go")
    return classifier([helper.make_node("If", ["go"], ["bias"], then_branch=arm, else_branch=arm)], [zero, go])


def custom_operator(domain: str) -> onnx.ModelProto:
    node = helper.make_node("Evil", [], ["bias"], domain=domain)
    return classifier([node], [], (("", 18), (domain, 1)))


def slow(size: int = 2000, count: int = 200) -> onnx.ModelProto:
    """Feed-forward, standard and fed by the input (so nothing is computed while loading), and slow:
    `count` products of size x size matrices."""
    nodes = [
        helper.make_node("ReduceSum", ["images"], ["s"], keepdims=0),
        helper.make_node("ConstantOfShape", ["shape"], ["ones"], value=numpy_helper.from_array(np.ones(1, np.float32))),
        helper.make_node("Mul", ["ones", "s"], ["m0"]),
    ]
    nodes += [helper.make_node("MatMul", [f"m{i}", "ones"], [f"m{i + 1}"]) for i in range(count)]
    nodes += [
        helper.make_node("ReduceSum", [f"m{count}"], ["total"], keepdims=0),
        helper.make_node("Mul", ["zero", "total"], ["bias"]),
    ]
    shape = numpy_helper.from_array(np.array([size, size], np.int64), "shape")
    return classifier(nodes, [shape, numpy_helper.from_array(np.zeros(100, np.float32), "zero")])


def save_onnx(model: onnx.ModelProto, path: Path, sidecar: Path) -> Path:
    onnx.save(model, path)
    shutil.copy(sidecar, path.with_suffix(".json"))
    return path


def test_onnx_files_that_read_outside_their_folder_or_loop_are_refused(exported_run, tmp_path, picture, capsys):
    sidecar = exported_run / "export" / "tiny-best.json"
    folder = tmp_path / "models"
    folder.mkdir()
    (tmp_path / "secret.bin").write_bytes(b"\1" * 400)
    (folder / "inside.bin").write_bytes(b"\0" * 400)
    (folder / "link.bin").symlink_to(tmp_path / "secret.bin")
    os.mkfifo(folder / "fifo.bin")
    cases = {
        "up": (external_bias("../secret.bin"), "reads external data from '../secret.bin', outside its own folder"),
        "absolute": (external_bias(str(tmp_path / "secret.bin")), "outside its own folder"),
        "link": (external_bias("link.bin"), "reads external data from 'link.bin', outside its own folder"),
        "missing": (external_bias("gone.bin"), "its external data file 'gone.bin' is missing or not a regular file"),
        "fifo": (external_bias("fifo.bin"), "its external data file 'fifo.bin' is missing or not a regular file"),
        "loop": (looping(), "its Loop node loops or branches; only feed-forward graphs are run"),
        "if": (branching(), "its If node loops or branches"),
        "domain": (custom_operator("com.microsoft"), "uses operators of the domain 'com.microsoft'"),
        "no opset": (classifier([helper.make_node("Evil", [], ["bias"], domain="x.y")], []), "x.y:Evil node is not"),
    }
    for name, (model, message) in cases.items():
        path = save_onnx(model, folder / f"{name}.onnx", sidecar)
        began = time.monotonic()
        err = refused(path, picture, capsys)
        assert message in err and time.monotonic() - began < 20, (name, err)
    (folder / "noise.onnx").write_bytes(b"\x08\x07 not a protobuf")
    shutil.copy(sidecar, folder / "noise.json")
    assert "not an ONNX model onnxruntime can load" in refused(folder / "noise.onnx", picture, capsys)
    inside = save_onnx(external_bias("inside.bin"), folder / "inside.onnx", sidecar)
    assert main(["predict", f"model={inside}", str(picture)]) == 0  # its own folder's data is fine
    assert "1.0%" in capsys.readouterr().out  # zero logits: every class 1 %


@pytest.mark.slow
def test_a_model_file_that_runs_too_long_is_stopped_at_the_timeout(exported_run, tmp_path, picture):
    path = save_onnx(slow(), tmp_path / "slow.onnx", exported_run / "export" / "tiny-best.json")
    began = time.monotonic()
    out = run_cmd([sys.executable, "-m", "cifar100", "predict", f"model={path}", "timeout=10", str(picture)])
    assert out.returncode == 2 and out.stdout == "", out.stderr[-2000:]
    assert out.stderr == (
        f"error: {path}: a batch of 1 images took longer than timeout=10 s; predict stops (nothing was written): "
        "a file from cifar100 export answers in seconds; give a larger timeout= for a slower one\n"
    )
    assert time.monotonic() - began < 60  # the model itself would take minutes


def test_timeout_is_a_whole_number_of_seconds_for_a_model_file(exported_run, picture, capsys):
    model = f"model={exported_run / 'export' / 'tiny-best.onnx'}"
    for value in ("0", "-1", "1.5", "x", "10000000"):
        assert "expected a whole number from 1 to 1000000" in refused_args(
            ["predict", model, f"timeout={value}", str(picture)], capsys
        )
    assert "timeout= bounds an exported model file's batches" in refused_args(
        ["predict", f"run={exported_run}", "timeout=5", str(picture)], capsys
    )


def refused_args(argv: list[str], capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_the_checks_accept_every_file_cifar100_export_writes(exported_run, tmp_path):
    for suffix in (".pt2", ".onnx"):
        path = exported_run / "export" / f"tiny-best{suffix}"
        data = path.read_bytes()
        if suffix == ".pt2":
            module = model_files.load_program(data, path)
            assert module(torch.zeros(3, 3, 32, 32)).shape == (3, 100)
        else:
            assert model_files.check_onnx(data, path) is False  # self-contained
    program = torch.export.load(io.BytesIO((exported_run / "export" / "tiny-best.pt2").read_bytes()))
    assert program.example_inputs is None
