"""Training throughput of the packed set batches next to a padded DataLoader baseline, in one run.

    python benchmarks/train_throughput.py [--items 26000] [--device auto] [--epochs 1]

Generated features of MM-IMDb scale: 26k items with about 20 elements each of 1280-d (image,
faces) and 384-d (OCR boxes, plot sentences, title, tags) vectors plus metadata. Both variants
train the same set model (max pooling, D=256) for the same epochs with the same batch size:

- packed: the tensors live on the device; a batch is gathered with tensor ops (pipeline.setdata)
- padded: a torch DataLoader yields per-item tensors; collate pads every modality to the largest
  set in the batch, moves it to the device, and pooling uses the padding mask
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import from_dict  # noqa: E402
from pipeline.model import ModelConfig, SetModel  # noqa: E402
from pipeline.runtime import resolve_device  # noqa: E402
from pipeline.setdata import FeatureStore, PackedModality  # noqa: E402

# modality: (dim, min elements, max elements)
LAYOUT = {
    "image": (1280, 1, 1),
    "faces": (1280, 0, 3),
    "ocr": (384, 0, 8),
    "plot": (384, 4, 18),
    "title": (384, 1, 1),
    "tags": (384, 0, 3),
    "meta": (2, 1, 1),
}


def synthetic_store(n: int, gen: torch.Generator) -> FeatureStore:
    mods = {}
    for m, (dim, lo, hi) in LAYOUT.items():
        counts = torch.randint(lo, hi + 1, (n,), generator=gen)
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
        mods[m] = PackedModality(torch.randn(int(counts.sum()), dim, generator=gen), offsets, None)
    meta = {m: {"dim": d} for m, (d, _, _) in LAYOUT.items()}
    return FeatureStore([str(i) for i in range(n)], mods, meta)


class PerItem(Dataset):
    """The padded baseline's dataset: one dict of (n_i, d) tensors per item, as a per-item loader yields."""

    def __init__(self, store: FeatureStore, y: torch.Tensor):
        self.items = [
            {m: p.vectors[p.offsets[i] : p.offsets[i + 1]].clone() for m, p in store.modalities.items()}
            for i in range(len(store.ids))
        ]
        self.y = y

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i], self.y[i]


def collate(batch):
    out = {}
    for m in batch[0][0]:
        sets = [item[m] for item, _ in batch]
        width = max(1, max(s.shape[0] for s in sets))
        pad = torch.zeros(len(sets), width, sets[0].shape[1])
        mask = torch.zeros(len(sets), width, dtype=torch.bool)
        for i, s in enumerate(sets):
            pad[i, : s.shape[0]], mask[i, : s.shape[0]] = s, True
        out[m] = (pad, mask)
    return out, torch.stack([y for _, y in batch])


def padded_forward(model: SetModel, padded: dict, device: torch.device) -> torch.Tensor:
    pooled = None
    for m, (pad, mask) in padded.items():
        pad, mask = pad.to(device, non_blocking=True), mask.to(device, non_blocking=True)
        enc = model.encoders[m](pad)  # (B, W, D)
        enc = enc.masked_fill(~mask[..., None], float("-inf")).amax(1)
        pooled = enc if pooled is None else torch.maximum(pooled, enc)
    pooled = torch.where(torch.isinf(pooled), torch.zeros_like(pooled), pooled)
    return model.head(pooled)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=26000)
    ap.add_argument("--labels", type=int, default=23)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--workers", type=int, default=0, help="DataLoader workers of the padded baseline")
    args = ap.parse_args()
    device = resolve_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    gen = torch.Generator().manual_seed(0)
    store = synthetic_store(args.items, gen)
    y = (torch.rand(args.items, args.labels, generator=gen) < 0.1).float()
    n_el = sum(int(p.offsets[-1]) for p in store.modalities.values())
    print(
        f"device: {name}; {args.items} items, {n_el / args.items:.1f} elements/item, "
        f"{store.nbytes() / 1e9:.2f} GB of features, batch {args.batch_size}, torch {torch.__version__}"
    )
    cfg = from_dict(ModelConfig, {"dim": 256, "pooling": "max", "dropout": 0.0}, "model")
    dims = {m: d for m, (d, _, _) in LAYOUT.items()}
    crit = torch.nn.BCEWithLogitsLoss()

    def fresh():
        torch.manual_seed(0)
        model = SetModel(cfg, dims, {}, args.labels).to(device)
        return model, torch.optim.AdamW(model.parameters(), lr=1e-3)

    # packed
    model, opt = fresh()
    dstore, dy = store.to(device), y.to(device)
    idx_all = torch.arange(args.items, device=device)

    def step(loss: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def best_epoch(run_epoch) -> float:
        """Fastest of args.epochs timed epochs, after one untimed epoch that warms up kernels and caches."""
        times = []
        for _ in range(args.epochs + 1):
            sync(device)
            t0 = time.perf_counter()
            run_epoch()
            sync(device)
            times.append(time.perf_counter() - t0)
        return min(times[1:])

    def packed_epoch() -> None:
        perm = idx_all[torch.randperm(args.items, generator=gen).to(device)]
        for s in range(0, args.items, args.batch_size):
            b = perm[s : s + args.batch_size]
            step(crit(model(dstore.batch(b)), dy[b]))

    packed = best_epoch(packed_epoch)

    # padded DataLoader
    model, opt = fresh()
    loader = DataLoader(
        PerItem(store, y),
        batch_size=args.batch_size,
        shuffle=True,
        collate_fn=collate,
        num_workers=args.workers,
        pin_memory=device.type == "cuda",
    )

    def padded_epoch() -> None:
        for padded, yb in loader:
            step(crit(padded_forward(model, padded, device), yb.to(device)))

    padded_s = best_epoch(padded_epoch)
    print(f"{'variant':<22} {'epoch s':>9} {'items/s':>10}")
    print(f"{'packed (this project)':<22} {packed:>9.3f} {args.items / packed:>10.0f}")
    print(f"{'padded DataLoader':<22} {padded_s:>9.3f} {args.items / padded_s:>10.0f}")
    print(f"speed-up: {padded_s / packed:.1f}x")


if __name__ == "__main__":
    main()
