"""Exported model files read without running what they hold: a `.pt2` or `.onnx` file (from a
colleague, a download) is checked against what `cifar100 export` writes before any library loads it.

A `.pt2` is a zip archive that `torch.export.load` reads with pickle in several places (weights,
constants, custom and opaque objects, example inputs, legacy records), loads compiled code from
(AOTInductor), and whose graph it turns into Python: symbolic sizes through `sympy.sympify` (which
evaluates text), guards through `exec`, operators by looking names up in `torch`. So an archive is
taken only when it is exactly what the exporter writes: raw tensor records, no example inputs,
a graph of ATen operators whose sizes are plain symbols, and nothing else; only then is it loaded,
from the bytes that were checked.

An `.onnx` file runs in onnxruntime, which reads external data files named in the model. It is
taken when every external file lies in the model's own folder, every node is an operator of the
standard ONNX domain, and nothing loops or branches (`Loop`, `If`, `Scan`, or any node holding a
subgraph), so the model is a plain feed-forward graph.
"""

from __future__ import annotations

import io
import json
import logging
import operator
import os
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cifar100.commands import images
from cifar100.data import cifar as cifar_data
from cifar100.errors import UserError, clip
from cifar100.runfolder.safe_files import MODEL_FILE_BYTES, TEXT_BYTES, read_bounded, read_json

EXTRA_HINT = 'pip install -e ".[export]"'
REFUSED = "cifar100 loads no file that could run code (nothing was loaded)"

# Every record a `.pt2` from `cifar100 export` holds, below the archive's one root folder.
PT2_RECORDS = re.compile(
    r"archive_format|archive_version|byteorder|\.data/version|\.data/serialization_id|models/model\.json"
    r"|data/weights/model_weights_config\.json|data/weights/weight_\d+"
    r"|data/constants/model_constants_config\.json|data/constants/tensor_\d+"
    r"|data/sample_inputs/model\.pt"  # present but empty: the exporter saves no example inputs
)
PAYLOADS = {"weights": "weight_", "constants": "tensor_"}  # the folder of raw tensor records, their prefix
ATEN_OPERATOR = re.compile(r"torch\.ops\.aten\.\w+\.\w+", re.ASCII)
PLAIN_NAME = re.compile(r"(?!__)[A-Za-z0-9_]+")  # a graph node's, a tensor's, one part of a weight's name
SYMBOL = r"Symbol\('[a-z]+\d*'(?:, (?:positive|integer|nonnegative)=True)*\)"
# A symbolic size as sympy writes it: symbols, integers, sums and products. Nothing else reaches
# sympify, which would evaluate any Python.
SIZE_EXPRESSION = re.compile(rf"(?:{SYMBOL}|Integer\(-?\d+\)|(?:Add|Mul)\(|\)|, )+")
SIGNATURE_KINDS = {"user_input", "parameter", "buffer", "tensor_constant", "user_output"}
UNTRUSTED_ARGUMENTS = ("as_graph", "as_custom_obj", "as_operator")  # subgraphs, pickled objects, operators by name

ONNX_DOMAINS = ("", "ai.onnx")
CLASS_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_ -]{0,63}")
BRANCHING = ("Loop", "If", "Scan")


def require_onnx() -> None:
    """Refuse ONNX work in one line when the optional packages are missing."""
    for name in ("onnx", "onnxscript", "onnxruntime"):
        try:
            __import__(name)
        except ImportError:
            raise UserError(f"ONNX needs the {name} package, part of the export extra: {EXTRA_HINT}") from None


def read_model_file(path: Path) -> bytes:
    """The bytes of an exported model file: a regular file of at most `MODEL_FILE_BYTES`."""
    try:
        return read_bounded(path, MODEL_FILE_BYTES, "model file")
    except FileNotFoundError:
        raise UserError(f"model={path}: no such file") from None


def _refused(path: Path, why: str) -> UserError:
    return UserError(f"{path}: refused, {why}; {REFUSED}")


def first_line(err: BaseException) -> str:
    """The first line of what a library raised, cut to a few hundred characters: its message in one line."""
    first = next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)
    return clip(first.strip())


# --- .pt2 -------------------------------------------------------------------------------------


def check_program(data: bytes, path: Path) -> None:
    """Refuse, in one line, a `.pt2` archive that holds anything `cifar100 export` does not write."""
    try:
        _check_archive(data, path)
    except UserError:
        raise
    except Exception as err:  # a zip or JSON so broken that Python's readers fail on it (a bad CRC, say)
        raise UserError(f"{path}: not a torch.export program ({type(err).__name__}: {first_line(err)})") from None


def _check_archive(data: bytes, path: Path) -> None:
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        records = _pt2_records(archive, path)
        for name in records:
            if not PT2_RECORDS.fullmatch(name):
                raise _refused(path, f"it holds {clip(name)}, not a record cifar100 export writes")
        listed = set(torch._C.PyTorchFileReader(io.BytesIO(data)).get_all_records())
        if listed != set(records):  # torch would read other records than the ones checked
            raise _refused(path, "torch reads other records in it than a zip reader does")
        if records.get("data/sample_inputs/model.pt", zipfile.ZipInfo()).file_size:
            raise _refused(path, "it holds pickled example inputs (data/sample_inputs/model.pt)")

        def read_json(name: str) -> Any:
            if name not in records:
                raise UserError(f"{path}: not a torch.export program (no {name})")
            return json.loads(archive.read(records[name]))

        for folder, prefix in PAYLOADS.items():
            _check_payloads(path, read_json(f"data/{folder}/model_{folder}_config.json"), records, folder, prefix)
        _check_graph(path, read_json("models/model.json"))


def _pt2_records(archive: zipfile.ZipFile, path: Path) -> dict[str, zipfile.ZipInfo]:
    """The archive's records by their name below its one root folder, each stored plain and listed once."""
    members = archive.infolist()
    names = [m.filename for m in members]
    if (
        len({n.split("/", 1)[0] for n in names}) != 1
        or len(set(names)) != len(names)
        or any("/" not in n for n in names)
    ):
        raise UserError(f"{path}: not a torch.export program (one root folder, each record once)")
    if any(m.compress_type != zipfile.ZIP_STORED for m in members):
        raise _refused(path, "it holds compressed records (cifar100 export stores them plain)")
    return {m.filename.split("/", 1)[1]: m for m in members}


def _check_payloads(path: Path, config: Any, records: dict[str, Any], folder: str, prefix: str) -> None:
    """Every weight and constant a raw tensor record (no pickle), named as the exporter names them."""
    entries = config.get("config") if isinstance(config, dict) else None
    if not isinstance(entries, dict):
        raise UserError(f"{path}: not a torch.export program (data/{folder}: no config of records)")
    _check_values(path, entries)
    for fqn, meta in entries.items():
        if not (isinstance(meta, dict) and isinstance(meta.get("tensor_meta"), dict)):
            raise _refused(path, f"{folder} record {clip(fqn)} is not a tensor")
        if meta.get("use_pickle") is not False:
            raise _refused(path, f"{folder} record {clip(fqn)} is pickled (use_pickle)")
        name = meta.get("path_name")
        if not (isinstance(name, str) and re.fullmatch(rf"{prefix}\d+", name) and f"data/{folder}/{name}" in records):
            raise _refused(path, f"{folder} record {clip(fqn)} is not a raw tensor record")
        if not all(PLAIN_NAME.fullmatch(part) for part in fqn.split(".")):
            raise _refused(path, f"a weight named {clip(fqn)!r}")


def _check_graph(path: Path, program: Any) -> None:
    """The graph: ATen operators only, plain names, sizes that are symbols and integers, no guards
    (they are Python source), no subgraphs or objects."""
    if not isinstance(program, dict) or not isinstance(program.get("graph_module"), dict):
        raise UserError(f"{path}: not a torch.export program (models/model.json)")
    if program.get("guards_code"):
        raise _refused(path, "its graph carries guards as Python source")
    ranges = program.get("range_constraints")
    if not isinstance(ranges, dict):
        raise UserError(f"{path}: not a torch.export program (models/model.json: range_constraints)")
    for symbol, bounds in ranges.items():
        if not (re.fullmatch(r"[a-z]+\d*", symbol) and _plain_bounds(bounds)):
            raise _refused(path, f"a size range {clip(str(symbol))} that is not plain numbers")
    graph = program["graph_module"].get("graph")
    if not isinstance(graph, dict) or graph.get("custom_obj_values"):
        raise _refused(path, "its graph holds custom objects")
    for node in graph.get("nodes") or []:
        target = node.get("target") if isinstance(node, dict) else None
        if target == "_operator.getitem":
            continue
        if not (isinstance(target, str) and ATEN_OPERATOR.fullmatch(target)):
            raise _refused(path, f"its graph calls {clip(str(target))}, not an ATen operator")
        _check_operator(path, target, _aten(target))
    _check_values(path, program)


def _aten(target: str) -> Any:
    """The ATen operator a graph's `torch.ops.aten.<name>.<overload>` names (None when there is none)."""
    _, _, _, name, overload = target.split(".")
    try:
        return getattr(getattr(torch.ops.aten, name), overload)
    except (AttributeError, RuntimeError):
        return None


def _check_operator(path: Path, target: str, operator: Any) -> None:
    """An operator that reaches nothing but tensors: no file mapped (`from_file`, which with `shared`
    also writes it), no storage set, nothing printed."""
    if operator is None:
        raise UserError(f"{path}: not a torch.export program (no ATen operator {clip(target)})")
    schema = operator._schema
    outside = any(a.name == "filename" or "Storage" in str(a.type) for a in schema.arguments)
    if outside or schema.name == "aten::_print":
        raise _refused(path, f"its graph calls {clip(target)}, which reaches files, storages or the terminal")


def _plain_bounds(bounds: Any) -> bool:
    return isinstance(bounds, dict) and all(
        v is None or (isinstance(v, int) and not isinstance(v, bool)) for v in bounds.values()
    )


def _check_values(path: Path, value: Any) -> None:
    """Walk the whole graph: every size expression, name and argument kind checked."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(item)
        if not isinstance(item, dict):
            continue
        for key, inner in item.items():
            if key in UNTRUSTED_ARGUMENTS:
                raise _refused(path, f"its graph holds an argument {key}")
            if key == "expr_str" and not (isinstance(inner, str) and SIZE_EXPRESSION.fullmatch(inner)):
                raise _refused(path, f"a size {clip(str(inner))!r} that is not plain arithmetic")
            if key == "name" and not (isinstance(inner, str) and PLAIN_NAME.fullmatch(inner)):
                raise _refused(path, f"a graph name {clip(str(inner))!r}")
            if key in ("input_specs", "output_specs"):
                kinds = {k for spec in inner or [] if isinstance(spec, dict) for k in spec}
                if not kinds <= SIGNATURE_KINDS:
                    raise _refused(path, f"its signature takes {', '.join(sorted(kinds - SIGNATURE_KINDS))}")
            stack.append(inner)


def load_program(data: bytes, path: Path, device: torch.device | None = None) -> nn.Module:
    """The module of a `.pt2` archive's program, checked by `check_program` first and loaded from
    those same bytes (moved to `device` by torch's own pass), or a one-line refusal."""
    from torch.export.passes import move_to_device_pass

    check_program(data, path)
    logger = logging.getLogger("torch.export")  # it logs a traceback before it raises
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.export.load(io.BytesIO(data))
            _check_loaded(path, program)
            if device is not None and device.type != "cpu":
                program = move_to_device_pass(program, device)
            return program.module()
    except UserError:
        raise
    except Exception as err:
        raise UserError(f"{path}: not a torch.export program ({type(err).__name__}: {first_line(err)})") from None
    finally:
        logger.setLevel(level)


def _check_loaded(path: Path, program: Any) -> None:
    """What torch made of the graph: calls of ATen operators (and getitem) only."""
    for node in program.graph.nodes:
        target = node.target
        aten = isinstance(target, torch._ops.OpOverload) and target.namespace == "aten"
        if node.op == "call_function" and not (aten or target is operator.getitem):
            raise _refused(path, f"its graph calls {clip(str(target))}")
        if node.op in ("call_module", "call_method"):
            raise _refused(path, f"its graph calls {node.op} {clip(str(target))}")
        if aten:
            _check_operator(path, f"torch.ops.{target}", target)


# --- .onnx ------------------------------------------------------------------------------------


def check_onnx(data: bytes, path: Path) -> bool:
    """Refuse, in one line, an ONNX model that reads files outside its folder or is not a plain
    feed-forward graph of standard operators; returns whether it reads external data files."""
    require_onnx()
    import onnx

    try:
        model = onnx.load_model_from_string(data)
    except Exception as err:  # protobuf's DecodeError and friends
        raise UserError(f"{path}: not an ONNX model onnxruntime can load ({first_line(err)})") from None
    return _check_graph_proto(model, path)


def _check_graph_proto(model: Any, path: Path) -> bool:
    import onnx

    if len(model.functions) or len(model.training_info):
        raise UserError(f"{path}: refused, it defines its own functions or training graphs; only plain graphs are run")
    odd = sorted({o.domain for o in model.opset_import} - set(ONNX_DOMAINS))
    if odd:
        raise UserError(f"{path}: refused, it uses operators of the domain {clip(odd[0])!r}; only standard ONNX is run")
    external = False
    for tensor in _tensors(model.graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            _check_external(path, {e.key: e.value for e in tensor.external_data})
            external = True
    for node in model.graph.node:
        what = f"its {clip(node.domain + ':' if node.domain else '')}{clip(node.op_type)} node" + (
            f" {clip(node.name)!r}" if node.name else ""
        )
        if node.domain not in ONNX_DOMAINS:
            raise UserError(f"{path}: refused, {what} is not a standard ONNX operator; only standard ONNX is run")
        if node.op_type in BRANCHING or any(
            a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute
        ):
            raise UserError(f"{path}: refused, {what} loops or branches; only feed-forward graphs are run")
    return external


def _tensors(graph: Any) -> list[Any]:
    """Every tensor the graph holds: initializers and the values of constant-making attributes."""
    tensors = list(graph.initializer)
    for sparse in graph.sparse_initializer:
        tensors += [sparse.values, sparse.indices]
    for node in graph.node:
        for attribute in node.attribute:
            tensors += [attribute.t, *attribute.tensors]
            for sparse in (attribute.sparse_tensor, *attribute.sparse_tensors):
                tensors += [sparse.values, sparse.indices]
    return tensors


def _check_external(path: Path, entry: dict[str, str]) -> None:
    """An external data file: named relative to the model's folder, inside it (links resolved), a regular file."""
    location = entry.get("location", "")
    folder = Path(os.path.realpath(path.parent))
    target = Path(os.path.realpath(folder / location))
    inside = location and not os.path.isabs(location) and ".." not in Path(location).parts and folder in target.parents
    if not inside:
        raise UserError(f"{path}: refused, it reads external data from {clip(location)!r}, outside its own folder")
    if not target.is_file():
        raise UserError(f"{path}: its external data file {clip(location)!r} is missing or not a regular file")


def onnx_session(data: bytes, path: Path, external: bool, providers: list[str] | None = None) -> Any:
    """An onnxruntime session of the checked bytes (of the file, when it reads external data beside
    it), or a one-line refusal of a file onnxruntime cannot load."""
    require_onnx()
    import onnxruntime

    try:
        return onnxruntime.InferenceSession(
            str(path) if external else data, providers=providers or ["CPUExecutionProvider"]
        )
    except Exception as err:
        raise UserError(f"{path}: not an ONNX model onnxruntime can load ({first_line(err)})") from None


# --- the JSON beside --------------------------------------------------------------------------


def read_sidecar(model_file: Path) -> dict[str, Any]:
    """The JSON `export` wrote beside `model_file` (<stem>.json), checked for what predict needs."""
    path = model_file.with_suffix(".json")
    try:
        data = read_json(path, TEXT_BYTES, "export's description")
    except FileNotFoundError:
        raise UserError(
            f"{model_file}: no {path.name} beside it (cifar100 export writes one: the normalisation and class names)"
        ) from None
    problem = _sidecar_problem(data)
    if problem:
        raise UserError(f"{path}: not an export's description ({problem})")
    return data


def _sidecar_problem(data: Any) -> str | None:
    if not isinstance(data, dict):
        return "expected an object"
    for key in ("mean", "std"):
        value = data.get(key)
        if not (isinstance(value, list) and len(value) == 3 and all(_finite(v) for v in value)):
            return f"{key} must be 3 finite numbers"
    if any(v <= 0 for v in data["std"]):
        return "std must be positive"
    for key, count in (("classes", cifar_data.NUM_CLASSES), ("superclasses", 20)):
        value = data.get(key)
        if not (isinstance(value, list) and len(value) == count and all(_plain_class(v) for v in value)):
            return f"{key} must list {count} names of letters, digits, _, - and spaces"
    coarse = data.get("fine_to_coarse")
    if not (
        isinstance(coarse, list)
        and len(coarse) == cifar_data.NUM_CLASSES
        and all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c < 20 for c in coarse)
    ):
        return "fine_to_coarse must give each of the 100 classes a superclass 0..19"
    if data.get("input_size") != [3, images.SIZE, images.SIZE]:
        return f"input_size must be [3, {images.SIZE}, {images.SIZE}]"
    if data.get("tta", "none") not in ("none", "flip"):
        return "tta must be none or flip"
    return None


def _plain_class(name: Any) -> bool:
    """A class name as CIFAR-100 writes them (`maple_tree`, `large_man-made_outdoor_things`): nothing
    a table, a spreadsheet or a terminal could read as more than a word."""
    return isinstance(name, str) and CLASS_NAME.fullmatch(name) is not None


def _finite(value: Any) -> bool:
    return isinstance(value, float | int) and not isinstance(value, bool) and abs(value) < 1e300
