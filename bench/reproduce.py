"""Regenerates the CIFAR-10 reproduction of the RGAN paper (Table 1, Table 2, Fig. 6a and the
default model's figures) into docs/reproduction.md and bench/results/reproduce.json.

    .venv/bin/python bench/reproduce.py --jobs 2 --epochs 4 --default-epochs 30

Every run lives in runs/reproduce/<name>/ and resumes from its checkpoint, so an interrupted
regeneration continues where it stopped; a finished run is only re-evaluated.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agent.rgan.config import ReducerConfig, TrainConfig  # noqa: E402


DR = {
    "NA": ReducerConfig(down=None),
    "conv / nearest, no skip": ReducerConfig(down="conv", up="nearest", skip=False),
    "conv / nearest, skip": ReducerConfig(down="conv", up="nearest", skip=True),
    "avg / nearest, skip": ReducerConfig(down="avg", up="nearest", skip=True),
    "conv / deconv, skip": ReducerConfig(down="conv", up="deconv", skip=True),
    "max / unpool, skip": ReducerConfig(down="max", up="unpool", skip=True),
}
RECOVER_LOSSES = [(1.0, 0.0), (0.0, 1.0), (1.0, 1.0), (10.0, 1.0)]
DEPTH_SPLITS = [(2, 6), (4, 4), (6, 2)]


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def experiments(ablation_epochs: int, default_epochs: int) -> tuple[dict[str, TrainConfig], dict[str, list]]:
    """The runs to make, and for each table its rows as (label, run name). Rows that share a
    configuration (the default reducer, loss and depth split) share one run."""
    base = TrainConfig().replace(epochs=ablation_epochs, lr_step=10**6)
    # the long default run first, so that it overlaps the ablations
    runs: dict[str, TrainConfig] = {
        "default": TrainConfig().replace(epochs=default_epochs, lr_step=max(1, default_epochs // 3)),
    }

    def add(name: str, config: TrainConfig) -> str:
        for existing, other in runs.items():
            if other == config:
                return existing
        runs[name] = config
        return name

    add("base", base)
    rows = {
        "table1": [(label, add(f"dr-{slug(label)}", base.replace(model=dataclasses.replace(base.model, reducer=r))))
                   for label, r in DR.items()],
        "table2": [((alpha, beta), add(f"loss-{alpha:g}-{beta:g}", base.replace(alpha=alpha, beta=beta)))
                   for alpha, beta in RECOVER_LOSSES],
        "fig6a": [((g, r), add(f"depth-{g}-{r}", base.replace(
                       model=dataclasses.replace(base.model, g_depth=g, r_depth=r))))
                  for g, r in DEPTH_SPLITS],
    }
    return runs, rows


def run_one(name: str, config: TrainConfig, threads: int) -> tuple[str, dict]:
    import torch

    from agent.experiments import train_and_evaluate

    torch.set_num_threads(threads)
    out = ROOT / "runs" / "reproduce" / name
    figures = train_and_evaluate(config, out, transfer=("cifar-resnet56",))
    history = json.loads((out / "history.json").read_text())
    return name, {"config": config.to_dict(), "metrics": figures, "history": history}


def training_time(history: list[dict]) -> str:
    seconds = [h["seconds"] for h in history if "seconds" in h]
    if len(seconds) != len(history):
        return ""
    return f" ({sum(seconds) / 60:.0f} min of training, {sum(seconds) / len(seconds):.0f} s an epoch)"


def fmt(value: float, kind: str) -> str:
    if kind == "pct":
        return f"{100 * value:.1f}%"
    if kind == "db":
        return f"{value:.2f}"
    return f"{value:.4f}"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def render(results: dict[str, dict], rows: dict[str, list], args: argparse.Namespace) -> str:
    def m(name: str) -> dict:
        return results[name]["metrics"]

    t1 = [[label, fmt(m(n)["L_G_adv"], ""), fmt(m(n)["L_G_mse"], ""), fmt(m(n)["L_R_adv"], ""),
           fmt(m(n)["L_R_mse"], ""), fmt(m(n)["asr"], "pct"), fmt(m(n)["psnr_adv"], "db"),
           fmt(m(n)["psnr_rec"], "db")] for label, n in rows["table1"]]
    t2 = [[f"({alpha:g}, {beta:g})", fmt(m(n)["psnr_adv"], "db"), fmt(m(n)["acc_adv"], "pct"),
           fmt(m(n)["psnr_rec"], "db"), fmt(m(n)["acc_rec"], "pct"), fmt(m(n)["L_R_mse"], "")]
          for (alpha, beta), n in rows["table2"]]
    f6 = [[f"{g} / {r}", fmt(m(n)["L_R_mse"], ""), fmt(m(n)["psnr_rec"], "db"), fmt(m(n)["asr"], "pct")]
          for (g, r), n in rows["fig6a"]]
    d = m("default")

    def met(ok: bool) -> str:
        return "met" if ok else "**missed**"

    default = [
        ["ASR on ResNet-20", fmt(d["asr"], "pct"), "≥ 95%: " + met(d["asr"] >= 0.95)],
        ["adversarial PSNR", fmt(d["psnr_adv"], "db") + " dB", "≥ 30 dB: " + met(d["psnr_adv"] >= 30)],
        ["adversarial SSIM / L2", f"{d['ssim_adv']:.4f} / {d['l2_adv']:.3f}", ""],
        ["recovered PSNR", fmt(d["psnr_rec"], "db") + " dB", "≥ 40 dB: " + met(d["psnr_rec"] >= 40)],
        ["recovered SSIM / L2", f"{d['ssim_rec']:.4f} / {d['l2_rec']:.3f}", ""],
        ["clean accuracy", fmt(d["acc_clean"], "pct"), ""],
        ["adversarial accuracy (CER)", f"{fmt(d['acc_adv'], 'pct')} ({fmt(d['cer_adv'], 'pct')})", ""],
        ["recovered accuracy", fmt(d["acc_rec"], "pct"),
         "within 1 point of clean: " + met(d["acc_rec"] >= d["acc_clean"] - 0.01)],
        ["recovered prediction = clean prediction", fmt(d["rec_same_prediction"], "pct"), ""],
        ["transfer ASR on ResNet-56", fmt(d["asr_cifar-resnet56"], "pct"), "reported"],
    ]
    return TEMPLATE.format(
        ablation_epochs=args.epochs, default_epochs=args.default_epochs, jobs=args.jobs,
        default_time=training_time(results["default"]["history"]),
        default_config=json.dumps(results["default"]["config"], indent=1),
        table_default=table(["metric (2,000 held-back images)", "value", "target"], default),
        table1=table(["DR (down / up)", "L_G_adv", "L_G_mse", "L_R_adv", "L_R_mse", "ASR",
                      "adv. PSNR (dB)", "rec. PSNR (dB)"], t1),
        table2=table(["(α, β)", "adv. PSNR (dB)", "adv. accuracy", "rec. PSNR (dB)", "rec. accuracy", "L_R_mse"], t2),
        fig6a=table(["G / R depth", "L_R_mse", "rec. PSNR (dB)", "ASR"], f6),
        claims=claims(results, rows),
    )


def claims(results: dict[str, dict], rows: dict[str, list]) -> str:
    """The paper's two structural claims, checked against this run's figures. A reducer only
    counts as recovering better if it attacks about as well as NA (ASR within 5 points): a
    perturbation that barely attacks is trivially easy to remove."""
    figures = {label: results[n]["metrics"] for label, n in rows["table1"]}
    na = figures.pop("NA")
    comparable = {label: m for label, m in figures.items() if m["asr"] >= na["asr"] - 0.05}
    better = [label for label, m in comparable.items() if m["psnr_rec"] > na["psnr_rec"]]
    weaker = [label for label in figures if label not in comparable]
    depth = {split: results[n]["metrics"]["L_R_mse"] for split, n in rows["fig6a"]}
    best_split = min(depth, key=depth.get)
    if not comparable:
        verdict = "cannot be judged (no reducer attacks about as well as NA)"
    elif len(better) == len(comparable):
        verdict = "holds"
    else:
        verdict = "holds for some reducers" if better else "does not hold"
    better_text = ", ".join(f"{label}: {comparable[label]['psnr_rec']:.2f} dB" for label in better)
    weaker_text = ", ".join(f"{label} ({100 * figures[label]['asr']:.1f}% ASR)" for label in weaker)
    return (
        f"- *DR improves recoverability*: {verdict} here. Without DR the recovered PSNR is "
        f"{na['psnr_rec']:.2f} dB at {100 * na['asr']:.1f}% ASR. Of the {len(comparable)} reducers that "
        f"attack about as well, {len(better)} recover better" + (f" ({better_text})" if better else "")
        + (f"; these recover more but attack far less: {weaker_text}" if weaker else "") + ".\n"
        f"- *Equal depths of G and R recover best*: {'holds' if best_split == (4, 4) else 'does not hold'} "
        f"here: the lowest L_R_mse is at G/R = {best_split[0]}/{best_split[1]} "
        f"({', '.join(f'{g}/{r}: {v:.4f}' for (g, r), v in depth.items())})."
    )


TEMPLATE = """# Reproducing the RGAN paper on CIFAR-10

Generated by `bench/reproduce.py --jobs {jobs} --epochs {ablation_epochs} --default-epochs {default_epochs}`
(raw figures in `bench/results/reproduce.json`). Target classifier C = ResNet-20, transfer measured on
ResNet-56 (both from `../shared/models/cifar10-resnet`). Training set: the first 8,000 of the 10,000
CIFAR-10 test images in sorted-path order; every figure is on the other 2,000, rounded to 8 bits as
a saved file would be. Sorted paths put whole classes together, so the held-back images are the
*ship* and *truck* classes, which G and R never saw in training: the figures measure
generalisation to unseen classes as well as unseen images.

Hardware: the 2-core CPU development machine, no GPU. The paper trains 150 epochs; on this budget
the ablations train {ablation_epochs} epochs each at a constant learning rate and the default model
{default_epochs} epochs{default_time}, with the learning rate ×0.1 every third of its run. The ablations are therefore comparisons at equal (short) training, not converged values.

## The default configuration

{table_default}

Its configuration (`agent train` options reproduce it; `bench/reproduce.py` passes the same):

```json
{default_config}
```

## Table 1: the dimension reducer

Losses as defined in `agent/rgan/losses.py` (distortions in units of ε², L_G_adv the C&W margin
with κ, L_R_adv the cross-entropy of the recovered image against the clean prediction).

{table1}

## Table 2: R's loss α·L_R_mse + β·L_R_adv

{table2}

## Fig. 6a: splitting a fixed depth of 8 residual blocks between G and R

{fig6a}

## Do the paper's claims hold here?

{claims}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=4, help="epochs of each ablation run")
    parser.add_argument("--default-epochs", type=int, default=30, help="epochs of the default model")
    parser.add_argument("--jobs", type=int, default=2, help="runs in parallel")
    parser.add_argument("--only", nargs="*", help="run only these run names (see runs/reproduce/)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "reproduction.md")
    parser.add_argument("--report-only", action="store_true", help="only rewrite the report from the JSON")
    args = parser.parse_args()

    runs, rows = experiments(args.epochs, args.default_epochs)
    todo = {name: config for name, config in runs.items()
            if not args.report_only and (not args.only or name in args.only)}
    threads = max(1, (os.cpu_count() or 2) // args.jobs)
    out_json = ROOT / "bench" / "results" / "reproduce.json"
    out_json.parent.mkdir(parents=True, exist_ok=True)
    results = json.loads(out_json.read_text()) if out_json.exists() else {}
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        futures = [pool.submit(run_one, name, config, threads) for name, config in todo.items()]
        for future in futures:
            name, result = future.result()
            print(f"{name}: " + json.dumps({k: round(v, 4) for k, v in result["metrics"].items()}), flush=True)
            # re-read before each write: another invocation (--only) may have added its runs
            results = json.loads(out_json.read_text()) if out_json.exists() else {}
            results[name] = result
            out_json.write_text(json.dumps(results, indent=2))
    if all(name in results and TrainConfig.from_dict(results[name]["config"]) == config
           for name, config in runs.items()):
        args.out.write_text(render(results, rows, args))
        print(f"wrote {args.out}")
    else:
        print("some runs are missing from bench/results/reproduce.json; the report is written once all exist")


if __name__ == "__main__":
    main()
