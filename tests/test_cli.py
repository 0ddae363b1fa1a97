import json

import pytest
import torch
from typer.testing import CliRunner

from agent.cli import app
from agent.demo import packaged, run_demo

runner = CliRunner()


def test_the_shipped_model_protects_and_recovers_the_bundled_sample(tmp_path):
    figures = run_demo(tmp_path)
    assert (figures["width"], figures["height"]) == (451, 300)
    assert figures["max_change_protected"] <= 8.5
    assert 30 <= figures["psnr_protected"] < 60
    assert figures["psnr_recovered"] > figures["psnr_protected"] + 5
    # the wrong key makes it worse than not recovering at all
    assert figures["psnr_wrong_key"] < figures["psnr_protected"]
    for name in ("original", "protected", "recovered", "wrong-key"):
        assert (tmp_path / f"{name}.png").stat().st_size > 0


def test_demo_command_prints_figures_and_writes_images(tmp_path):
    result = runner.invoke(app, ["demo", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "psnr_recovered" in result.output
    assert (tmp_path / "protected.png").exists()


@pytest.mark.parametrize("content", [None, b"not an image"], ids=["missing", "garbage"])
def test_demo_names_a_bad_image_and_exits_non_zero(tmp_path, content):
    image = tmp_path / "photo.jpg"
    if content is not None:
        image.write_bytes(content)
    result = runner.invoke(app, ["demo", "--out", str(tmp_path / "out"), "--image", str(image)])
    assert result.exit_code == 2
    assert "photo.jpg" in result.output
    assert not (tmp_path / "out").exists()


def test_demo_refuses_a_photo_too_large_for_it(tmp_path, monkeypatch):
    from PIL import Image

    import agent.images

    monkeypatch.setattr(agent.images, "MAX_PIXELS", 100)
    Image.new("RGB", (11, 10)).save(tmp_path / "big.png")
    result = runner.invoke(app, ["demo", "--out", str(tmp_path / "out"), "--image", str(tmp_path / "big.png")])
    assert result.exit_code == 2 and "11×10 pixels" in result.output


@pytest.mark.parametrize("args, message", [
    (["--down", "bogus"], "down-sampling"),
    (["--up", "bogus"], "up-sampling"),
    (["--alpha", "0", "--beta", "0"], "R needs a loss"),
    (["--epsilon", "0"], "epsilon"),
    (["--lr", "0"], "learning rate"),
    (["--target", "no-such-net"], "unknown classifier"),
    (["--warm-start", "no/such/run"], "no run folder or checkpoint at no/such/run"),
])
def test_train_rejects_bad_options(tmp_path, args, message):
    result = runner.invoke(app, ["train", "--out", str(tmp_path), *args])
    assert result.exit_code == 2
    assert message in result.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_train_refuses_cuda_without_a_gpu(tmp_path):
    result = runner.invoke(app, ["train", "--out", str(tmp_path), "--device", "cuda"])
    assert result.exit_code == 2 and "no CUDA GPU" in result.output


def test_train_then_evaluate_end_to_end(tmp_path, cifar_train):
    run = tmp_path / "run"
    result = runner.invoke(app, ["train", "--out", str(run), "--epochs", "1", "--limit", "32",
                                 "--batch-size", "16", "--width", "4", "--g-depth", "1", "--r-depth", "1"])
    assert result.exit_code == 0, result.output
    saved = json.loads((run / "metrics.json").read_text())
    assert 0 <= saved["asr"] <= 1 and "asr_cifar-resnet56" in saved
    result = runner.invoke(app, ["evaluate", str(run / "model.safetensors"), "--json", "--transfer", "cifar-resnet32"])
    assert result.exit_code == 0, result.output
    figures = json.loads(result.output)
    assert figures["psnr_adv"] == pytest.approx(saved["psnr_adv"], abs=1e-4)


def test_evaluate_names_a_missing_model(tmp_path):
    result = runner.invoke(app, ["evaluate", str(tmp_path / "none.safetensors")])
    assert result.exit_code == 2 and "none.safetensors" in result.output


def test_the_default_models_ship_as_safetensors_inside_the_package():
    for name in ("photo-rgan", "cifar10-rgan"):
        path = packaged("weights", f"{name}.safetensors")
        assert path.stat().st_size < 10 * 2**20
