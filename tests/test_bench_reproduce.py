import argparse
import importlib.util
from pathlib import Path

import pytest

from agent.rgan.config import TrainConfig

spec = importlib.util.spec_from_file_location("reproduce", Path(__file__).parents[1] / "bench" / "reproduce.py")
reproduce = importlib.util.module_from_spec(spec)
spec.loader.exec_module(reproduce)


def test_rows_sharing_a_configuration_share_one_run():
    runs, rows = reproduce.experiments(ablation_epochs=4, default_epochs=30)
    assert runs["default"] == TrainConfig().replace(epochs=30, lr_step=10)
    assert len(set(runs.values())) == len(runs)
    default_reducer = TrainConfig().model.reducer
    base = dict(rows["table1"])["conv / nearest, skip"]
    assert runs[base].model.reducer == default_reducer
    assert dict(rows["table2"])[(10.0, 1.0)] == base and dict(rows["fig6a"])[(4, 4)] == base
    assert runs[dict(rows["table1"])["NA"]].model.reducer.down is None


@pytest.mark.parametrize("na_asr, na_psnr, verdict", [
    (0.9, 41.0, "holds for some reducers"),
    (0.9, 50.0, "does not hold"),
    (0.99, 41.0, "cannot be judged"),
])
def test_report_checks_the_claims_against_comparable_attacks(na_asr, na_psnr, verdict):
    runs, rows = reproduce.experiments(ablation_epochs=4, default_epochs=30)
    metric_names = ["L_G_adv", "L_G_mse", "L_R_adv", "L_R_mse", "asr", "psnr_adv", "psnr_rec", "acc_adv",
                    "acc_rec", "acc_clean", "cer_adv", "ssim_adv", "l2_adv", "ssim_rec", "l2_rec",
                    "rec_same_prediction", "asr_cifar-resnet56"]
    results = {name: {"config": config.to_dict(), "history": [{"epoch": 1}],
                      "metrics": {m: 0.9 for m in metric_names} | {"psnr_rec": 40.0, "L_R_mse": 0.5}}
               for name, config in runs.items()}
    na = dict(rows["table1"])["NA"]
    results[na]["metrics"] |= {"asr": na_asr, "psnr_rec": na_psnr}
    results[dict(rows["table1"])["max / unpool, skip"]]["metrics"]["psnr_rec"] = 45.0
    results[dict(rows["fig6a"])[(4, 4)]]["metrics"]["L_R_mse"] = 0.1
    args = argparse.Namespace(epochs=4, default_epochs=30, jobs=2)
    report = reproduce.render(results, rows, args)
    assert f"*DR improves recoverability*: {verdict}" in report
    assert "*Equal depths of G and R recover best*: holds" in report
    assert "| ASR on ResNet-20 | 90.0% | ≥ 95%: **missed** |" in report
