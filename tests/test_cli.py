"""The ``lsms`` command line, run in-process through ``main([...])`` (and once as a subprocess)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from lsms_core import checkpoint
from lsms_core.cli import build_parser, build_train_configs, main
from lsms_core.infer import DEFAULT_SCALES
from lsms_core.io import Volume, read_volume, write_volume

# x flipped, y and z swapped: a non-identity, non-diagonal direction (columns are unit axes).
DIRECTION = (-1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 1.0, 0.0)


@pytest.fixture(scope="module")
def model_file(tiny_encoder_dir, tmp_path_factory):
    from lsms_core.model import LSMS
    from lsms_core.testing import tiny_config

    model = LSMS(tiny_config(tiny_encoder_dir, image_size=32))
    return checkpoint.save_model(model, tmp_path_factory.mktemp("models") / "tiny.safetensors", version="3.1")


@pytest.fixture(scope="module")
def present_model_file(tiny_encoder_dir, tmp_path_factory, biased_model):
    """A model that always answers "here": its mask covers every body slice it segments."""
    from lsms_core.testing import tiny_config

    model = biased_model(tiny_config(tiny_encoder_dir, image_size=32), present=True)
    return checkpoint.save_model(
        model, tmp_path_factory.mktemp("models") / "present.safetensors", version="p1"
    )


@pytest.fixture()
def ct_file(tmp_path):
    """A small CT NIfTI with an ellipse of soft tissue and non-identity geometry."""
    hu = np.full((6, 30, 36), -1000, dtype=np.int16)
    yy, xx = np.mgrid[:30, :36]
    hu[:, ((yy - 15) / 13) ** 2 + ((xx - 18) / 16) ** 2 <= 1] = 60
    volume = Volume(hu, spacing=(0.7, 0.8, 3.0), origin=(10.0, -20.0, 5.0), direction=DIRECTION)
    path = tmp_path / "ct.nii.gz"
    write_volume(path, hu, like=volume)
    return path


def test_predict_writes_a_mask_on_the_input_grid(
    present_model_file, one_torch_thread, ct_file, tmp_path, capsys
):
    out = tmp_path / "out" / "mask.nii.gz"
    code = main(
        [
            "predict",
            str(ct_file),
            "--text",
            "the largest lesion",
            "--out",
            str(out),
            "--model",
            str(present_model_file),
            "--device",
            "cpu",
        ]
    )
    stdout = capsys.readouterr().out
    assert code == 0
    lines = stdout.splitlines()
    assert lines[0] == "'the largest lesion': found"  # not "not found (the mask is empty)"
    assert " ml" in lines[1] and lines[1].startswith("voxels: ") and lines[2] == f"mask: {out}"

    ct, mask = read_volume(ct_file), read_volume(out)
    assert mask.array.shape == ct.array.shape and mask.array.dtype == np.uint8
    np.testing.assert_allclose(mask.spacing, ct.spacing, atol=1e-4)
    np.testing.assert_allclose(mask.origin, ct.origin, atol=1e-4)
    np.testing.assert_allclose(mask.direction, ct.direction, atol=1e-6)

    from lsms_core.infer import Segmenter

    expected = Segmenter(present_model_file, device="cpu").segment(ct, "the largest lesion").mask
    assert expected.any() and mask.array[ct.array > 0].all()  # the "always here" model: all the body
    np.testing.assert_array_equal(mask.array, expected)
    assert f"voxels: {int(expected.sum())} " in stdout
    ml = int(expected.sum()) * 0.7 * 0.8 * 3.0 / 1000.0  # voxels x voxel volume (mm^3) -> ml
    assert f"volume: {ml:.2f} ml" in stdout


def test_predict_slice_range(present_model_file, one_torch_thread, ct_file, tmp_path):
    out = tmp_path / "mask.nii.gz"
    assert (
        main(
            [
                "predict",
                str(ct_file),
                "--text",
                "all lesions",
                "--out",
                str(out),
                "--model",
                str(present_model_file),
                "--device",
                "cpu",
                "--slices",
                "1:3",
            ]
        )
        == 0
    )
    from lsms_core.infer import Segmenter

    ct = read_volume(ct_file)
    mask = read_volume(out).array
    assert not mask[:1].any() and not mask[3:].any()  # z1 exclusive: slices 1 and 2 only
    for z in (1, 2):  # the "always here" model marks all the body inside the range
        assert mask[z][ct.array[z] > 0].all()
    expected = Segmenter(present_model_file, device="cpu").segment(ct, "all lesions", slices=(1, 3)).mask
    np.testing.assert_array_equal(mask, expected)


def test_bad_model_files_are_clear_errors(model_file, ct_file, tmp_path, capsys):
    fake = tmp_path / "weights.safetensors"
    fake.write_bytes(np.random.default_rng(1).bytes(1000))
    args = [
        "predict",
        str(ct_file),
        "--text",
        "the lesion",
        "--out",
        str(tmp_path / "m.nii.gz"),
        "--device",
        "cpu",
    ]
    assert main([*args, "--model", str(fake)]) == 2
    err = capsys.readouterr().err
    assert "lsms predict: error:" in err and "not an LSMS model" in err and "Traceback" not in err

    # A model whose sidecar config does not match its weights.
    wrong = tmp_path / "wrong.safetensors"
    wrong.write_bytes(model_file.read_bytes())
    card = json.loads(checkpoint.sidecar_path(model_file).read_text())
    card["config"]["embed_dims"] = [16, 16, 24, 32]
    checkpoint.sidecar_path(wrong).write_text(json.dumps(card))
    assert main([*args, "--model", str(wrong)]) == 2
    err = capsys.readouterr().err
    assert "do not match the config" in err and "shape mismatches" in err
    assert not (tmp_path / "m.nii.gz").exists()


def test_unknown_device_and_missing_image(model_file, ct_file, tmp_path, capsys):
    out = str(tmp_path / "m.nii.gz")
    assert (
        main(
            [
                "predict",
                str(ct_file),
                "--text",
                "the lesion",
                "--out",
                out,
                "--model",
                str(model_file),
                "--device",
                "tpu",
            ]
        )
        == 2
    )
    assert "'tpu' is not available" in capsys.readouterr().err
    assert (
        main(
            [
                "predict",
                str(tmp_path / "nope.nii.gz"),
                "--text",
                "x",
                "--out",
                out,
                "--model",
                str(model_file),
                "--device",
                "cpu",
            ]
        )
        == 2
    )
    assert "no such file" in capsys.readouterr().err
    assert main(["predict", str(ct_file), "--text", "x", "--out", out, "--slices", "3"]) == 2  # usage error
    assert "z0:z1" in capsys.readouterr().err


def test_info_shows_versions_devices_and_model_card(model_file, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("LSMS_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(checkpoint, "default_model_path", lambda: tmp_path / "none.safetensors")
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "lsms_core: " in out and "torch: " in out and "devices: " in out and "cpu" in out
    assert "no default model installed" in out
    scales = ", ".join(f"{scale:g}" for scale in DEFAULT_SCALES)
    assert f"inference scales (lsms predict|evaluate, the plugin): {scales}; --scales 1 for one pass" in out

    assert main(["info", "--model", str(model_file)]) == 0
    out = capsys.readouterr().out
    assert "version: 3.1" in out and "image_size=32" in out and "metrics: (none recorded)" in out


def test_train_config_precedence(tiny_encoder_dir, tmp_path, model_file):
    spec = tmp_path / "cfg.json"
    spec.write_text(
        json.dumps({"model": {"in_slices": 3, "image_size": 96}, "train": {"lr": 0.01, "epochs": 4}})
    )
    args = build_parser().parse_args(
        [
            "train",
            "--data",
            "d",
            "--out",
            "o",
            "--preset",
            "tiny",
            "--config",
            str(spec),
            "--image-size",
            "128",
            "--epochs",
            "2",
        ]
    )
    model, train = build_train_configs(args)
    assert (model.in_slices, model.image_size, model.embed_dims) == (3, 128, (8, 16, 24, 32))
    assert (train.lr, train.epochs) == (0.01, 2)

    # Fine-tuning: the saved model's config is the base; explicit options change it.
    args = build_parser().parse_args(
        ["train", "--data", "d", "--out", "o", "--init-from", str(model_file), "--text-trainable", "last_k"]
    )
    model, _ = build_train_configs(args)
    saved = json.loads(checkpoint.sidecar_path(model_file).read_text())["config"]
    assert model.text_trainable == "last_k"
    assert model.to_dict() | {"text_trainable": saved["text_trainable"]} == saved

    # ... training fields and switching a module on are allowed; the architecture and inputs are not
    def fine_tune(*options):
        argv = ["train", "--data", "d", "--out", "o", "--init-from", str(model_file), *options]
        return build_train_configs(build_parser().parse_args(argv))[0]

    spec.write_text(json.dumps({"model": {"refine_head": True, "contrastive_weight": 0.2}}))
    grown = fine_tune("--config", str(spec), "--image-size", "64")
    assert (grown.refine_head, grown.contrastive_weight, grown.image_size) == (True, 0.2, 64)
    assert grown.embed_dims == tuple(saved["embed_dims"])
    more = saved["in_slices"] + 2  # more adjacent slices widen the model (fewer: see test_train)
    assert fine_tune("--in-slices", str(more)).in_slices == more
    with pytest.raises(ValueError, match=r"--init-from .*embed_dims=.*Drop those options \(and --preset"):
        fine_tune("--preset", "default")  # a new model's sizes, not the saved one's
    spec.write_text(json.dumps({"model": {"use_scale_branch": not saved["use_scale_branch"]}}))
    with pytest.raises(ValueError, match="use_scale_branch"):
        fine_tune("--config", str(spec))

    spec.write_text(json.dumps({"optimizer": {}}))
    with pytest.raises(ValueError, match="unknown keys"):
        build_train_configs(
            build_parser().parse_args(["train", "--data", "d", "--out", "o", "--config", str(spec)])
        )


def test_help_is_fast_and_imports_no_torch():
    code = "import sys; from lsms_core.cli import main; rc = main(['--help']); print('TORCH', 'torch' in sys.modules, rc)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "predict" in proc.stdout and "TORCH False 0" in proc.stdout
    proc = subprocess.run(
        [sys.executable, "-m", "lsms_core.cli", "predict", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0 and "--slices" in proc.stdout


def test_train_json_progress_then_evaluate(tiny_encoder_dir, tmp_path, capsys):
    """The wiring the napari fine-tune widget relies on: JSON events on stdout, a best model file."""
    from _datasets import make_tiny_dataset

    data = make_tiny_dataset(tmp_path / "data", cases=3)
    spec = tmp_path / "run.json"
    spec.write_text(
        json.dumps({"train": {"val_max_items": 4, "checkpoint_every_steps": 0, "augment": False}})
    )
    out = tmp_path / "run"
    code = main(
        ["train", "--data", str(data), "--out", str(out), "--preset", "tiny", "--text-encoder", str(tiny_encoder_dir),
         "--config", str(spec), "--max-steps", "2", "--batch-size", "2", "--device", "cpu", "--json-progress"]
    )  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    events = [json.loads(line) for line in captured.out.splitlines()]  # every stdout line is one event
    kinds = [e["event"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "end" and kinds.count("step") == 2
    assert events[0]["model_config"]["embed_dims"] == [8, 16, 24, 32]
    assert events[0]["train_config"]["val_max_items"] == 4
    assert (out / "model.safetensors").is_file() and "model:" in captured.err

    report = tmp_path / "report.json"
    args = ["evaluate", "--data", str(data), "--model", str(out / "model.safetensors"), "--split", "test"]
    assert main([*args, "--json", str(report), "--device", "cpu", "--max-items", "4"]) == 0
    assert "test: " in capsys.readouterr().out
    assert "mIoU" in json.loads(report.read_text())["overall"]
    volume_report = tmp_path / "volume.json"
    assert main([*args, "--level", "volume", "--json", str(volume_report), "--max-items", "2"]) == 0
    saved = json.loads(volume_report.read_text())
    assert saved["level"] == "volume" and saved["items"] == 2 and "mIoU" in saved["overall"]
    assert saved["scales"] == list(DEFAULT_SCALES)  # what lsms predict answers with
    multi = ["--json", str(report), "--max-items", "4", "--scales", "1", "1.25"]
    assert main([*args, *multi]) == 0
    assert json.loads(report.read_text())["scales"] == [1.0, 1.25]
    assert main([*args, "--scales", "0"]) == 2
    assert "scales must be" in capsys.readouterr().err


def test_gui_passes_its_arguments_to_napari_lsms(monkeypatch, capsys):
    import napari_lsms._main

    seen = []
    monkeypatch.setattr(napari_lsms._main, "main", lambda argv: seen.append(argv) or 0)
    assert main(["gui", "--image", "ct.nii.gz", "--no-sample"]) == 0
    assert seen == [["--image", "ct.nii.gz", "--no-sample"]]
    assert main(["info", "--bogus"]) == 2  # other commands still reject unknown options
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_predict_checks_the_output_and_image_before_loading_the_model(ct_file, tmp_path, capsys, monkeypatch):
    import lsms_core.infer

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was reported")

    monkeypatch.setattr(lsms_core.infer, "Segmenter", no_model)
    base = ["predict", "--text", "the lesion", "--device", "cpu"]
    assert main([*base, str(ct_file), "--out", str(tmp_path / "mask.png")]) == 2
    assert "unsupported output format .png" in capsys.readouterr().err
    assert main([*base, str(ct_file), "--out", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err
    assert main([*base, str(tmp_path / "absent.nii.gz"), "--out", str(tmp_path / "m.nii.gz")]) == 2
    assert "absent.nii.gz" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("error", "code", "line"),
    [
        (
            "oom",
            2,
            "lsms predict: error: cpu ran out of memory segmenting 4 slices; lower --batch-size",
        ),
        ("interrupt", 130, "interrupted"),
    ],
)
def test_predict_out_of_memory_and_ctrl_c_are_one_line(
    model_file, ct_file, tmp_path, capsys, monkeypatch, error, code, line
):
    from lsms_core.infer import DeviceOutOfMemoryError, Segmenter

    def fail(self, volume, text, **kwargs):
        if error == "oom":
            raise DeviceOutOfMemoryError("cpu ran out of memory segmenting 4 slices; lower --batch-size")
        raise KeyboardInterrupt

    monkeypatch.setattr(Segmenter, "segment", fail)
    out = tmp_path / "m.nii.gz"
    argv = ["predict", str(ct_file), "--text", "the lesion", "--out", str(out), "--model", str(model_file)]
    assert main([*argv, "--device", "cpu"]) == code
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [line]  # one line, no traceback
    assert captured.out == "" and not out.exists()


def test_train_and_evaluate_report_bad_data_and_model_paths_in_one_line(tiny_encoder_dir, tmp_path, capsys):
    from _datasets import make_tiny_dataset

    not_data = tmp_path / "scans"
    not_data.mkdir()
    (not_data / "ct.nii.gz").write_bytes(b"")
    run = tmp_path / "run"
    argv = ["train", "--data", str(not_data), "--out", str(run), "--preset", "tiny",
            "--text-encoder", str(tiny_encoder_dir), "--device", "cpu"]  # fmt: skip
    for progress in ([], ["--json-progress"]):  # no progress bar is drawn before the error
        assert main([*argv, *progress]) == 2
        captured = capsys.readouterr()
        assert captured.err.splitlines() == [
            f"lsms train: error: {not_data} is not an LSMS dataset: it has no dataset.json. Create one with "
            "`lsms data synth`, `lsms data import` or lsms_core.data.dataset.DatasetWriter"
        ]
        assert captured.out == "" and not run.exists()

    data = make_tiny_dataset(tmp_path / "data", cases=3)
    missing = tmp_path / "no_such_model.safetensors"
    report = tmp_path / "report.json"
    argv = ["evaluate", "--data", str(data), "--model", str(missing), "--device", "cpu",
            "--json", str(report)]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("lsms evaluate: error: ")
    assert str(missing) in err and "Traceback" not in err and not report.exists()


def test_train_progress_bar_of_a_resumed_run_counts_from_its_step(capsys):
    """A run resumed at step 2,700 must not report 2,700 steps done in its first second."""
    import re
    import time

    from lsms_core.cli import _train_reporter

    show, close = _train_reporter(json_progress=False)
    show({"event": "start", "step": 2700, "total_steps": 10000, "resumed": True})
    for step in range(2701, 2711):
        time.sleep(0.02)  # at most 50 steps/s
        show({"event": "step", "step": step, "total_steps": 10000, "loss": 0.5})
    close()
    err = capsys.readouterr().err
    assert "resuming at step 2700" in err and "2710/10000" in err
    rates = [float(r) for r in re.findall(r"([\d.]+)step/s", err)]
    assert rates and max(rates) < 100, rates
