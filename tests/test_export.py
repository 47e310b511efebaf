"""`cifar100 export`: files that onnxruntime or torch alone load in a fresh process and that give the
trained model's answers; a check that fails leaves nothing; every model the recipes train exports."""

from __future__ import annotations

import json
import re
import sys
import time

import numpy as np
import onnx
import pytest
import torch
from conftest import ROOT, run_cmd
from PIL import Image
from torch import nn

from cifar100.cli import main
from cifar100.commands import export
from cifar100.commands.predict import file_predictor, predict
from cifar100.commands.trained import load_trained
from cifar100.config import load_config
from cifar100.data.cifar import load
from cifar100.data.reference import normalize_batch
from cifar100.errors import UserError
from cifar100.training.models import build_model, whiten_stem

IMAGES = 300  # test images the fresh processes score

# Fresh processes that know neither torch (for ONNX) nor this project: they read the JSON beside the
# file, normalise uint8 images as it says and save the logits.
ONNX_ALONE = """
import json, sys
import numpy as np, onnxruntime
model, images, out = sys.argv[1:]
info = json.load(open(model[: -len(".onnx")] + ".json"))
x = ((np.load(images).astype(np.float32) / 255 - np.array(info["mean"], np.float32)[:, None, None])
     / np.array(info["std"], np.float32)[:, None, None])
session = onnxruntime.InferenceSession(model, providers=["CPUExecutionProvider"])
np.save(out, session.run(None, {info["input_name"]: x.astype(np.float32)})[0])
assert not any(m.split(".")[0] in ("torch", "cifar100") for m in sys.modules), "imported torch or cifar100"
"""
PROGRAM_ALONE = """
import json, sys
import numpy as np, torch
model, images, out = sys.argv[1:]
info = json.load(open(model[: -len(".pt2")] + ".json"))
x = (torch.from_numpy(np.load(images)).float() / 255 - torch.tensor(info["mean"])[:, None, None]) / torch.tensor(
    info["std"]
)[:, None, None]
with torch.no_grad():
    np.save(out, torch.export.load(model).module()(x).numpy())
assert not any(m.split(".")[0] == "cifar100" for m in sys.modules), "imported cifar100"
"""


@pytest.mark.slow
def test_exports_loaded_alone_in_fresh_processes_give_the_trained_models_answers(exported_run, real_data, tmp_path):
    trained = load_trained(str(exported_run), "best", [])
    test = load(real_data).test
    images = test.images[:IMAGES]
    with torch.no_grad():
        want = trained.model()(normalize_batch(images, trained.cfg.augment.mean, trained.cfg.augment.std)).numpy()
    np.save(tmp_path / "images.npy", images.numpy())
    for suffix, script in ((".onnx", ONNX_ALONE), (".pt2", PROGRAM_ALONE)):
        model = exported_run / "export" / f"tiny-best{suffix}"
        out = run_cmd(
            [sys.executable, "-I", "-c", script, str(model), str(tmp_path / "images.npy"), str(tmp_path / "l.npy")]
        )
        assert out.returncode == 0, out.stderr[-3000:]
        got = np.load(tmp_path / "l.npy")
        assert got.shape == (IMAGES, 100)
        assert np.abs(got - want).max() <= export.RELATIVE_TOLERANCE * np.abs(want).max(), suffix
        assert (got.argmax(1) == want.argmax(1)).all(), suffix


def test_the_json_beside_says_what_a_caller_needs_and_the_onnx_file_is_whole(exported_run, real_data):
    folder = exported_run / "export"
    assert sorted(p.name for p in folder.iterdir()) == ["tiny-best.json", "tiny-best.onnx", "tiny-best.pt2"]
    info = json.loads((folder / "tiny-best.json").read_text())
    data = load(real_data)
    assert info["input_size"] == [3, 32, 32] and info["channel_order"] == "RGB" and info["dtype"] == "float32"
    assert (info["mean"], info["std"]) == (
        list(load_config("smoke", []).augment.mean),
        list(load_config("smoke", []).augment.std),
    )
    assert info["classes"] == list(data.classes) and info["superclasses"] == list(data.superclasses)
    assert info["checkpoint"] == str((exported_run / "checkpoints" / "best").resolve())
    row = json.loads((exported_run / "metrics.jsonl").read_text().splitlines()[info["epoch"] - 1])
    assert info["test_top1"] == row["test_top1"] and "on 200 test images" in info["test_top1_measured"]
    for fmt in ("onnx", "pt2"):
        check = info["checks"][fmt]
        assert check["batch_sizes"] == [1, 2, 37] and check["max_abs_logit_diff"] <= check["tolerance"]
    # One self-contained fp32 file (the run trained in channels_last), with a batch dimension left open.
    graph = onnx.load(str(folder / "tiny-best.onnx"), load_external_data=False).graph
    assert all(t.data_location == onnx.TensorProto.DEFAULT for t in graph.initializer)
    assert {t.data_type for t in graph.initializer if len(t.dims) > 1} == {onnx.TensorProto.FLOAT}
    (images,) = graph.input
    assert images.name == "images" and images.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert [d.dim_param or d.dim_value for d in images.type.tensor_type.shape.dim][1:] == [3, 32, 32]
    assert images.type.tensor_type.shape.dim[0].dim_param  # a name, not a number


class ExportsOtherwise(nn.Module):
    """Adds 1 to every logit when run eagerly but not in an exported graph: an export that computes
    something else than the model, as a buggy exporter would."""

    def __init__(self) -> None:
        super().__init__()
        self.net = build_model(load_config("smoke", []).model, 100)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) + (0.0 if torch.compiler.is_exporting() else 1.0)


@pytest.mark.parametrize("fmt", export.FORMATS)
def test_an_export_that_fails_its_check_says_by_how_much_and_leaves_nothing(fmt, real_data, tmp_path):
    batches = export.check_batches(load(real_data), load_config("smoke", []).augment)
    with pytest.raises(UserError, match=rf"^{fmt} export failed its check .* differ by up to 1 \(tolerance"):
        export.export_model(ExportsOtherwise().eval(), (fmt,), tmp_path / "out", "broken", batches, {})
    assert list((tmp_path / "out").iterdir()) == []


MODELS = {
    "seresnet50 + Mish + CIFAR stem": ["model.name=seresnet50", "model.act=mish", "model.cifar_stem=true"],
    "resnet50": ["model.name=resnet50", "model.act=null", "model.cifar_stem=true"],
    "cifarnet_s, whitened stem": ["model.name=cifarnet_s", "model.act=null", "model.whiten=true"],
    "cifarnet_tiny": ["model.name=cifarnet_tiny"],
}


@pytest.mark.slow
def test_every_model_the_recipes_train_exports_and_passes_its_check(real_data, tmp_path):
    data = load(real_data)
    mean, std = load_config("best", []).augment.mean, load_config("best", []).augment.std
    batches = export.check_batches(data, load_config("best", []).augment)
    torch.manual_seed(0)
    seconds = {}
    for name, overrides in MODELS.items():
        cfg = load_config("best", overrides)
        model = build_model(cfg.model, 100)
        if cfg.model.whiten:
            whiten_stem(model, normalize_batch(data.train.images[:2000], mean, std))
        with torch.no_grad():  # trained-looking normalisation statistics, so a wrong Conv+BN fusion shows
            for module in model.modules():
                if isinstance(module, nn.BatchNorm2d):
                    module.running_mean.uniform_(-0.5, 0.5)
                    module.running_var.uniform_(0.5, 2.0)
                    module.weight.uniform_(0.5, 1.5)
                    module.bias.uniform_(-0.2, 0.2)
        # As bf16 channels_last training leaves it: neither may reach the files.
        model = model.eval().to(torch.bfloat16, memory_format=torch.channels_last)
        began = time.perf_counter()
        stem = re.sub(r"\W+", "-", name)
        export.export_model(model, export.FORMATS, tmp_path, stem, batches, {})
        seconds[name] = time.perf_counter() - began
        info = json.loads((tmp_path / f"{stem}.json").read_text())
        assert all(info["checks"][fmt]["top1_identical"] for fmt in export.FORMATS), name
        graph = onnx.load(str(tmp_path / f"{stem}.onnx")).graph
        assert {t.data_type for t in graph.initializer if len(t.dims) > 1} == {onnx.TensorProto.FLOAT}, name
        program = torch.export.load(str(tmp_path / f"{stem}.pt2"))
        assert {p.dtype for p in program.state_dict.values() if p.is_floating_point()} == {torch.float32}, name
        for fmt in ("onnx", "pt2"):
            (tmp_path / f"{stem}.{fmt}").unlink()  # ~100 MB each for the ResNets
    print("export seconds (onnx + pt2, with checks):", {k: round(v, 1) for k, v in seconds.items()})


def test_without_the_export_extra_onnx_says_which_to_install(exported_run, tmp_path):
    blocked = (
        "import sys; sys.modules['onnxscript'] = None; from cifar100.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    out = run_cmd([sys.executable, "-c", blocked, "export", f"run={exported_run}", "format=onnx", f"out={tmp_path}"])
    assert out.returncode == 2 and out.stderr.count("\n") == 1
    assert (
        out.stderr == 'error: ONNX needs the onnxscript package, part of the export extra: pip install -e ".[export]"\n'
    )
    assert list(tmp_path.iterdir()) == []


def test_export_mistakes_are_one_line(exported_run, read_only_dir, tmp_path, capsys):
    cases = {
        (f"run={exported_run}", "format=tflite"): "expected onnx, pt2 or all",
        (f"run={exported_run}", "weights=ema"): "weights=ema needs",
        (f"run={exported_run}", f"out={read_only_dir}"): "cannot write there",
        (f"run={exported_run}", f"out={tmp_path / 'a-file' / 'x'}"): "cannot write there",
        (f"run={exported_run}", f"out={exported_run}"): "inside the run folder",
        (f"run={exported_run}", f"out={exported_run / 'checkpoints' / 'best'}"): "inside the run folder",
        (f"run={tmp_path}",): "not a run folder",
        (f"run={exported_run}", "recipe=smoke"): "drop recipe=",
        ("format=onnx",): "usage: cifar100 export",
    }
    (tmp_path / "a-file").write_text("not a folder\n")
    before = {p: p.read_bytes() for p in exported_run.rglob("*") if p.is_file()}
    for args, message in cases.items():
        assert main(["export", *args]) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and message in err, (args, err)
    assert list(read_only_dir.iterdir()) == [] and sorted(tmp_path.iterdir()) == [tmp_path / "a-file", read_only_dir]
    assert {p: p.read_bytes() for p in exported_run.rglob("*") if p.is_file()} == before


def test_the_docs_onnx_snippet_runs_alone_and_answers_as_predict(exported_run, real_data, tmp_path):
    page = (ROOT / "docs" / "using-a-model.md").read_text()
    snippet = re.search(r"```python\n(.*?)```", page, re.S).group(1)
    assert "cifar100" not in snippet.replace("`cifar100 export", "")  # only in the comment naming the command
    model = exported_run / "export" / "tiny-best.onnx"
    picture = tmp_path / "test-image-7.jpg"  # a real test image, enlarged and made wide: resizing has work to do
    Image.fromarray(load(real_data).test.images[7].permute(1, 2, 0).numpy()).resize((80, 48)).save(picture)
    code = re.sub(r'^MODEL = ".*"', f"MODEL = {str(model)!r}", snippet, flags=re.M)
    code = re.sub(r'^IMAGE = ".*"', f"IMAGE = {str(picture)!r}", code, flags=re.M)
    assert code.count(str(tmp_path)) == 1 and code.count(str(model)) == 1
    check = "\nimport sys\nassert not any(m.split('.')[0] in ('torch', 'cifar100') for m in sys.modules)\n"
    out = run_cmd([sys.executable, "-I", "-c", code + check], cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    answer = predict(file_predictor(str(model), []), [picture], 5)["predictions"][0]
    assert [line.split()[0] for line in lines] == [t["class"] for t in answer["top"]]
    assert [float(line.split()[1]) for line in lines] == pytest.approx(
        [t["probability"] for t in answer["top"]], abs=1e-4
    )
