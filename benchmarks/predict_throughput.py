"""What importances cost at prediction time, next to plain probabilities, in one run.

    python benchmarks/predict_throughput.py [--items 26000] [--labels 23] [--device auto] [--batch-size 256]

Generated features of MM-IMDb scale (the layout of train_throughput.py: ~21 elements per item of
1280-d and 384-d vectors) and a set model with max pooling, D=256. Variants, each over all items:

- probabilities only (the baseline: pipeline.bundle.predict)
- + argmax importances (modality shares and element wins)
- + label-conditional shares (one backward pass through the head per label and batch)
- ablation, naive: the whole model run again once per removed modality (pipeline.bundle.predict(drop=...))
- the predict stage's score_store: probabilities, argmax and label-conditional shares, element
  positions, and ablation by re-pooling the already encoded elements without each modality
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_throughput import LAYOUT, synthetic_store  # noqa: E402

from pipeline.bundle import Bundle, predict  # noqa: E402
from pipeline.config import from_dict  # noqa: E402
from pipeline.importance import explain  # noqa: E402
from pipeline.model import ModelConfig, SetModel  # noqa: E402
from pipeline.predict import PredictConfig, score_store  # noqa: E402
from pipeline.runtime import resolve_device  # noqa: E402


def timed(fn, device: torch.device) -> float:
    fn()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=26000)
    ap.add_argument("--labels", type=int, default=23)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch-size", type=int, default=256)
    args = ap.parse_args()
    device = resolve_device(args.device)
    torch.manual_seed(0)
    store = synthetic_store(args.items, torch.Generator().manual_seed(0)).to(device)
    cfg = from_dict(ModelConfig, {"dim": 256, "pooling": "max"}, "model")
    model = SetModel(cfg, {m: d for m, (d, _, _) in LAYOUT.items()}, {}, args.labels).to(device).eval()
    bundle = Bundle(
        model_config=cfg,
        train_config={},
        task="multilabel",
        label_names=[f"L{i}" for i in range(args.labels)],
        thresholds=[0.5] * args.labels,
        dims={m: d for m, (d, _, _) in LAYOUT.items()},
        categories={},
        provenance={},
    )
    idx = torch.arange(args.items, device=device)
    bs = args.batch_size

    def chunks(fn):
        def run():
            for s in range(0, args.items, bs):
                fn(idx[s : s + bs])

        return run

    variants = [
        ("probabilities only (baseline)", lambda: predict(model, store, idx, "multilabel", bs)),
        ("+ argmax importances", chunks(lambda b: explain(model, store.batch(b), label_conditional=False))),
        ("+ label-conditional shares", chunks(lambda b: explain(model, store.batch(b), label_conditional=True))),
        (
            "ablation, naive (model per modality)",
            chunks(lambda b: [predict(model, store, b, "multilabel", bs, frozenset({m})) for m in model.modalities]),
        ),
        (
            "predict stage score_store (all)",
            lambda: score_store(
                model, bundle, store, np.arange(args.items), ["test"] * args.items, PredictConfig(batch_size=bs)
            ),
        ),
    ]
    print(
        f"{args.items} items, {args.labels} labels, {len(LAYOUT)} modalities, batch {bs}, on {device}"
        f" ({torch.get_num_threads()} CPU threads)"
    )
    base = None
    print(f"{'variant':<36} {'seconds':>8} {'items/s':>10} {'x baseline time':>16}")
    for name, fn in variants:
        dt = timed(fn, device)
        base = base or dt
        print(f"{name:<36} {dt:>8.2f} {args.items / dt:>10.0f} {dt / base:>16.2f}")


if __name__ == "__main__":
    main()
