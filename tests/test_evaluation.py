"""`agent eval` end to end on a handful of images: every section of the report is filled in, from
figures that hold what they claim (the owner recovers, a wrong key does not, ASR is a share)."""

import json

import pytest
from conftest import single_thread
from typer.testing import CliRunner

from agent.adversaries.input_transforms import INPUT_TRANSFORMS
from agent.classifiers import load_classifier
from agent.cli import app
from agent.data import PhotoSet, centre_crops
from agent.evaluation import EvalOptions, Setting, evaluate_and_report, run_evaluation
from agent.platforms import PLATFORM_TRANSFORMS
from agent.rgan.model import load_model

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(images=6, attack_images=3, purifier_steps=2, batch_size=2, attack_steps=2, projection_steps=2, restarts=1)


def photo_setting(photos):
    from agent.pipeline import DEFAULT_MODEL_PATH

    # a few photos on each side of the split keep this quick; the real run loads them all
    held_back = centre_crops(photos.subset(6))
    train = PhotoSet(photos.images[-8:], photos.labels[-8:], photos.names[-8:])
    return Setting(name="photos", model=load_model(DEFAULT_MODEL_PATH)[0], model_name="photo-rgan.safetensors",
                   classifier=load_classifier("imagenet-mobilenetv2"), classifier_name="imagenet-mobilenetv2",
                   held_back=held_back, train=train, crop=48, defense_gan_size=16, transfer={}, batch=4)


@pytest.fixture(scope="module")
def photo_results(imagenet_val):
    # module fixtures are set up before the one_thread fixture of the first test
    with single_thread():
        return run_evaluation(EvalOptions(datasets=("photos",), **TINY), settings=[photo_setting(imagenet_val)])


def test_every_transform_purifier_and_attack_is_measured(photo_results):
    results, samples = photo_results
    photos = results["datasets"]["photos"]
    assert list(photos["platforms"]) == list(PLATFORM_TRANSFORMS)
    learned = ["APE-GAN++", "Robust Recovery", "NRP", "Defense-GAN", "key-less R"]
    assert list(photos["purifiers"]) == learned + list(INPUT_TRANSFORMS)
    assert [p for p, f in photos["purifiers"].items() if f["learned"]] == learned
    assert list(photos["table3"]) == ["DDN", "PGD", "C&W", "RGAN"]
    assert list(photos["table3"]["RGAN"]) == ["attacked", "owner's recovery"] + learned
    shares = [f["asr"] for f in photos["platforms"].values()] + [f["asr"] for f in photos["purifiers"].values()]
    assert all(0 <= share <= 1 for share in shares)
    # "none" changes nothing, so its ASR is the protection's own
    assert photos["platforms"]["none"]["asr"] == photos["protection"]["protected"]["asr"]
    assert set(samples["photos"]) >= {"original", "protected", "recovered"}


def test_only_the_key_holder_recovers(photo_results):
    photos = photo_results[0]["datasets"]["photos"]
    owner = photos["protection"]["recovered with the key"]["psnr"]
    assert owner >= 45
    assert photos["goals"]["owner_psnr"] == owner
    assert photos["protection"]["recovered with a wrong key"]["psnr"] < owner - 5
    # the library's refinement of R's estimate (RGAN.refine_step) is what the owner gets
    assert owner > photos["protection"]["recovered with the key, R alone"]["psnr"] + 2
    # two steps of training make no attacker; the best one is whichever keeps closest to the original
    best = photos["goals"]["best_attacker"]
    assert photos["goals"]["best_attacker_psnr"] == max(f["psnr"] for f in photos["purifiers"].values())
    assert photos["purifiers"][best]["psnr"] < owner
    assert len(photos["psnr_per_image"]["recovered with the key"]) == photos["images"] == 6


def test_the_report_has_its_tables_plots_and_figures(photo_results, tmp_path):
    from agent.evaluation_report import write_report

    results, samples = photo_results
    written = write_report(results, samples, tmp_path / "evaluation.md")
    text = (tmp_path / "evaluation.md").read_text()
    for section in ("### Goals", "### Platform transforms (Fig. 7)", "### Purifiers (Fig. 8)",
                    "### Table 3", "### Samples (Fig. 11)", "social pipeline", "Defense-GAN"):
        assert section in text
    assert json.loads((tmp_path / "evaluation" / "evaluation.json").read_text()) == json.loads(json.dumps(results))
    for path in written:
        assert path.stat().st_size > 0
    pngs = sorted(p.name for p in (tmp_path / "evaluation").glob("*.png"))
    assert pngs == ["photos-grid.png", "photos-platforms.png", "photos-psnr.png", "photos-purifiers.png"]
    # written atomically, and nothing else (no temporary or lock files) left beside the report
    assert sorted(p.name for p in (tmp_path / "evaluation").iterdir()) == ["evaluation.json", *pngs]


def test_a_report_keeps_the_sections_of_data_sets_this_run_did_not_measure(photo_results, tmp_path):
    from agent.evaluation_report import write_report

    results, samples = photo_results
    write_report(results, samples, tmp_path / "evaluation.md")
    # another run, of another data set (here a relabelled copy), written to the same report
    other = {"datasets": {"cifar10": results["datasets"]["photos"]}}
    write_report(other, {"cifar10": samples["photos"]}, tmp_path / "evaluation.md")
    saved = json.loads((tmp_path / "evaluation" / "evaluation.json").read_text())
    assert list(saved["datasets"]) == ["photos", "cifar10"]
    text = (tmp_path / "evaluation.md").read_text()
    assert "## Photos" in text and "## CIFAR-10" in text


def test_cifar_end_to_end_through_the_library(cifar_test, tmp_path):
    results = evaluate_and_report(EvalOptions(datasets=("cifar10",), **TINY), tmp_path / "report.md")
    cifar = results["datasets"]["cifar10"]
    assert cifar["keyed"] is False and "recovered by R" in cifar["protection"]
    assert "key-less R" not in cifar["purifiers"]  # an unkeyed model's R is public already
    assert set(cifar["transfer"]) == {"cifar-resnet32", "cifar-resnet44", "cifar-resnet56"}
    assert (tmp_path / "report" / "cifar10-grid.png").exists()


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="datasets"):
        EvalOptions(datasets=("mnist",))
    with pytest.raises(ValueError, match="purifier_steps"):
        EvalOptions(purifier_steps=0)


def test_the_command_names_what_is_wrong(tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["eval", "--data", "mnist", "--out", str(tmp_path / "e.md")])
    assert result.exit_code == 2 and "datasets" in result.output
    result = runner.invoke(app, ["eval", "--photo-model", str(tmp_path / "missing.safetensors")])
    assert result.exit_code == 2 and "no such model file" in result.output
    assert not (tmp_path / "e.md").exists()
