#!/usr/bin/env python3
"""Rebuild the bundled sample models (Fashion-MNIST CNNs) reproducibly.

Trains two small CNNs on the Fashion-MNIST training split and writes, into
``--out-dir`` (default: this script's folder):

* ``fashion_cnn.onnx``      VGG-style net, 3x3 Conv + separate BatchNormalization
* ``fashion_squeeze.onnx``  SqueezeNet-1.1-style net (Fire modules, Concat, Add)
* ``fashion_mnist_subset.npz``  1000 labelled test images (100 per class)
* ``golden/<stem>.npz``     ONNX Runtime logits for the first 8 subset images
* ``manifest.json``         accuracies, sizes, training settings, sha256

Development-only requirements: ``pip install torch==2.13.0`` (CPU) plus the
Debian package ``dataset-fashion-mnist``. The produced files need only numpy,
onnx and onnxruntime.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import random
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn as nn
import torch.nn.functional as F

DEFAULT_DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
# Statistics of the training images (scaled to [0, 1]); baked into the models
# so that consumers feed raw 0..255 pixels.
MEAN, STD = 0.2860, 0.3530
OPSET = 17
SEED = 20240521
SUBSET_PER_CLASS = 100
N_GOLDEN = 8


# --------------------------------------------------------------------------- data
def read_idx(path: Path) -> np.ndarray:
    """Read a gzipped IDX file (the MNIST container format) into a numpy array."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_split(data_dir: Path, prefix: str) -> tuple[np.ndarray, np.ndarray]:
    images = read_idx(data_dir / f"{prefix}-images-idx3-ubyte.gz")[:, None]  # NCHW
    labels = read_idx(data_dir / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64)
    return images, labels


def balanced_subset(labels: np.ndarray, per_class: int) -> np.ndarray:
    """First `per_class` test images of every class, kept in file order.

    A rule rather than a random draw, so the subset is obvious to re-derive.
    """
    idx = np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in range(10)])
    return np.sort(idx)


# ------------------------------------------------------------------------ models
class Normalize(nn.Module):
    """Raw 0..255 pixels -> standardised input; exported as Div/Sub/Div."""

    def forward(self, x):
        return (x / 255.0 - MEAN) / STD


class FashionCNN(nn.Module):
    """VGG-style: 5 x (conv3x3 -> BN -> ReLU), 2 max-pools, GAP, Linear.

    Widths are halved from the classic 32-64-128-128-256 so that training fits
    in a few CPU minutes; the 3x3 convolutions still dominate the FLOPs.
    Conv layers are bias-free: the following BatchNormalization supplies the
    shift, which is the Conv -> BN pattern the rewriter's BN-folding pass handles.
    """

    def __init__(self, widths=(16, 32, 64, 64, 128)):
        super().__init__()
        self.norm = Normalize()
        cin = 1
        for i, cout in enumerate(widths, start=1):
            # Attribute names become ONNX node names (conv1, bn1, ...).
            setattr(self, f"conv{i}", nn.Conv2d(cin, cout, 3, padding=1, bias=False))
            setattr(self, f"bn{i}", nn.BatchNorm2d(cout))
            cin = cout
        self.pool1 = nn.MaxPool2d(2)
        self.pool2 = nn.MaxPool2d(2)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, 10)

    def _block(self, i, x):
        return F.relu(getattr(self, f"bn{i}")(getattr(self, f"conv{i}")(x)))

    def forward(self, x):
        x = self.norm(x)
        x = self.pool1(self._block(2, self._block(1, x)))  # 28 -> 14
        x = self.pool2(self._block(4, self._block(3, x)))  # 14 -> 7
        x = self._block(5, x)
        return self.fc(torch.flatten(self.gap(x), 1))


class Fire(nn.Module):
    """SqueezeNet Fire module: 1x1 squeeze -> (1x1 expand || 3x3 expand) -> Concat."""

    def __init__(self, cin, squeeze, expand):
        super().__init__()
        self.squeeze = nn.Conv2d(cin, squeeze, 1)
        self.expand1x1 = nn.Conv2d(squeeze, expand, 1)
        self.expand3x3 = nn.Conv2d(squeeze, expand, 3, padding=1)

    def forward(self, x):
        s = F.relu(self.squeeze(x))
        return torch.cat([F.relu(self.expand1x1(s)), F.relu(self.expand3x3(s))], 1)


class FashionSqueeze(nn.Module):
    """SqueezeNet-1.1-style: stem, 3 Fire modules (one residual Add), 1x1 classifier."""

    def __init__(self):
        super().__init__()
        self.norm = Normalize()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.pool1 = nn.MaxPool2d(2)                    # 28 -> 14
        self.fire2 = Fire(32, 16, 32)                   # -> 64 ch
        self.fire3 = Fire(64, 16, 32)                   # -> 64 ch, + fire2 (residual)
        self.pool3 = nn.MaxPool2d(2)                    # 14 -> 7
        self.fire4 = Fire(64, 32, 64)                   # -> 128 ch
        self.dropout = nn.Dropout(0.2)
        self.conv10 = nn.Conv2d(128, 10, 1)
        self.gap = nn.AdaptiveAvgPool2d(1)
        # SqueezeNet's own init: without BN, PyTorch's default (scaled-down
        # kaiming-uniform) shrinks the signal layer by layer and training
        # starts very slowly. A small final conv keeps the ReLU'd logits alive.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                if m is self.conv10:
                    nn.init.normal_(m.weight, std=0.01)
                else:
                    nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, x):
        x = self.pool1(F.relu(self.conv1(self.norm(x))))
        f2 = self.fire2(x)
        x = self.pool3(f2 + self.fire3(f2))
        x = self.fire4(x)
        x = F.relu(self.conv10(self.dropout(x)))
        return torch.flatten(self.gap(x), 1)


MODELS = {
    # stem -> (constructor, learning rate); both use Adam + one-cycle schedule.
    "fashion_cnn": (FashionCNN, 3e-3),
    "fashion_squeeze": (FashionSqueeze, 3e-3),
}


# ---------------------------------------------------------------------- training
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Light augmentation: random horizontal flip and +-2 px translation.

    Done with a dedicated generator so the data stream does not depend on how
    many random numbers model initialisation consumed.
    """
    n = x.shape[0]
    flip = torch.rand(n, generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    padded = F.pad(x, (2, 2, 2, 2))  # zero = background in raw pixel space
    dx = torch.randint(0, 5, (n,), generator=gen)
    dy = torch.randint(0, 5, (n,), generator=gen)
    # Gather-based crop: one vectorised op instead of a Python loop per image.
    rows = (dy[:, None] + torch.arange(28))[:, None, :, None].expand(n, 1, 28, 32)
    x = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(28))[:, None, None, :].expand(n, 1, 28, 28)
    return x.gather(3, cols)


def train(model: nn.Module, images: np.ndarray, labels: np.ndarray, *, epochs: int,
          lr: float, batch_size: int, seed: int) -> dict:
    x_all = torch.from_numpy(images.astype(np.float32))
    y_all = torch.from_numpy(labels)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=1e-4)
    steps_per_epoch = len(x_all) // batch_size  # drop the ragged last batch
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=lr, total_steps=epochs * steps_per_epoch)
    model.train()
    t0 = time.time()
    for epoch in range(epochs):
        perm = torch.randperm(len(x_all), generator=gen)
        total, correct, loss_sum = 0, 0, 0.0
        for i in range(steps_per_epoch):
            idx = perm[i * batch_size:(i + 1) * batch_size]
            xb, yb = augment(x_all[idx], gen), y_all[idx]
            out = model(xb)
            loss = F.cross_entropy(out, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item() * len(yb)
            correct += (out.argmax(1) == yb).sum().item()
            total += len(yb)
        print(f"  epoch {epoch + 1}/{epochs}: loss {loss_sum / total:.4f} "
              f"train-acc {correct / total:.4f} ({time.time() - t0:.0f}s)", flush=True)
    model.eval()
    return {
        "optimizer": "Adam", "max_lr": lr, "weight_decay": 1e-4,
        "lr_schedule": "OneCycleLR", "epochs": epochs, "batch_size": batch_size,
        "augmentation": "random horizontal flip, random translation +-2 px",
        "seed": seed, "train_images": int(len(x_all)), "torch_threads": 2,
    }  # no wall-clock time here: the manifest should not change between rebuilds


# ------------------------------------------------------------------------ export
def export_onnx(model: nn.Module, path: Path) -> onnx.ModelProto:
    dummy = torch.zeros(1, 1, 28, 28)
    # Legacy TorchScript exporter (the dynamo one needs onnxscript).
    # TrainingMode.PRESERVE on an eval() model exports inference-mode BN but
    # skips the eval-mode peephole pass that would fold BN into the Conv
    # weights; do_constant_folding=False keeps it that way. Real BN nodes are
    # needed to exercise the rewriter's own BN-folding pass.
    torch.onnx.export(
        model, (dummy,), str(path), dynamo=False, opset_version=OPSET,
        input_names=["image"], output_names=["logits"],
        dynamic_axes={"image": {0: "N"}, "logits": {0: "N"}},
        training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False,
    )
    m = onnx.load(str(path))
    # The exporter turns bit-identical parameters into one initializer plus
    # Identity nodes; trained weights never coincide, so treat it as a bug.
    assert not any(n.op_type == "Identity" for n in m.graph.node), "unexpected Identity nodes"
    rename_nodes(m)
    m.doc_string = ""  # keep the file free of machine-specific text
    onnx.checker.check_model(m, full_check=True)
    onnx.save(m, str(path))
    return m


def rename_nodes(m: onnx.ModelProto) -> None:
    """Give Conv nodes readable module-path names: '/fire2/expand3x3/Conv' -> 'fire2/expand3x3'.

    Other nodes keep the exporter's names (minus the leading '/'); names stay unique.
    """
    used: set[str] = set()
    for i, node in enumerate(m.graph.node):
        name = node.name.lstrip("/") or f"{node.op_type}_{i}"
        if node.op_type == "Conv" and name.endswith("/Conv"):
            name = name[: -len("/Conv")]
        base, k = name, 1
        while name in used:
            name, k = f"{base}_{k}", k + 1
        used.add(name)
        node.name = name


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def ort_logits(path: Path, images: np.ndarray, batch: int = 500) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = images.astype(np.float32)
    return np.concatenate([sess.run(["logits"], {"image": x[i:i + batch]})[0]
                           for i in range(0, len(x), batch)])


# -------------------------------------------------------------------------- main
def main() -> None:
    here = Path(__file__).resolve().parent
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", type=Path, default=here)
    ap.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR,
                    help="folder with the Fashion-MNIST *-ubyte.gz files")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    args = ap.parse_args()

    # Determinism: fixed seeds, deterministic kernels, fixed thread count
    # (float reduction order depends on the number of threads).
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(2)

    out: Path = args.out_dir
    (out / "golden").mkdir(parents=True, exist_ok=True)
    train_x, train_y = load_split(args.data_dir, "train")
    test_x, test_y = load_split(args.data_dir, "t10k")

    sub = balanced_subset(test_y, SUBSET_PER_CLASS)
    sub_x, sub_y = np.ascontiguousarray(test_x[sub]), test_y[sub]
    np.savez_compressed(out / "fashion_mnist_subset.npz", images=sub_x, labels=sub_y,
                        classes=np.array(CLASSES), test_indices=sub.astype(np.int64))

    manifest_path = out / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    manifest.update({
        "dataset": {
            "name": "Fashion-MNIST", "license": "MIT", "source": "Zalando Research",
            "subset_file": "fashion_mnist_subset.npz",
            "subset": f"first {SUBSET_PER_CLASS} images of each class in the test split",
            "classes": CLASSES,
        },
    })
    manifest.setdefault("models", {})

    for stem in args.models:
        ctor, lr = MODELS[stem]
        print(f"[{stem}]", flush=True)
        seed_everything(SEED)
        model = ctor()
        settings = train(model, train_x, train_y, epochs=args.epochs, lr=lr,
                         batch_size=args.batch_size, seed=SEED)
        path = out / f"{stem}.onnx"
        m = export_onnx(model, path)

        logits_sub = ort_logits(path, sub_x)
        acc_sub = float((logits_sub.argmax(1) == sub_y).mean())
        acc_test = float((ort_logits(path, test_x).argmax(1) == test_y).mean())
        np.savez(out / "golden" / f"{stem}.npz",
                 input=sub_x[:N_GOLDEN].astype(np.float32),
                 output=ort_logits(path, sub_x[:N_GOLDEN]))
        ops = [n.op_type for n in m.graph.node]
        manifest["models"][stem] = {
            "file": path.name,
            "input": {"name": "image", "shape": ["N", 1, 28, 28], "dtype": "float32",
                      "range": "raw pixels 0..255 (normalised inside the model)"},
            "output": {"name": "logits", "shape": ["N", 10]},
            "dataset": "Fashion-MNIST",
            "opset": OPSET,
            "subset_top1": round(acc_sub, 4),
            "test_top1": round(acc_test, 4),
            "parameters": int(sum(p.numel() for p in model.parameters())),
            "conv_nodes": ops.count("Conv"),
            "batchnorm_nodes": ops.count("BatchNormalization"),
            "conv_names": [n.name for n in m.graph.node if n.op_type == "Conv"],
            "training": settings,
            "torch_version": torch.__version__,
            "golden": f"golden/{stem}.npz",
            "sha256": sha256(path),
            "size_bytes": path.stat().st_size,
        }
        print(f"  subset top-1 {acc_sub:.4f}, test top-1 {acc_test:.4f}, "
              f"{ops.count('Conv')} Conv, {ops.count('BatchNormalization')} BN", flush=True)

    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")


if __name__ == "__main__":
    main()
