"""Built-in synthetic dataset: procedurally drawn "radiology-like" images, no download. (One module
past 300 lines on purpose: the drawing code and the class layout it draws for change together.)

Cues by strength, so that a good encoder beats a weak one and coarse levels are easier:
- modality (strongest): intensity mapping, noise type (Gaussian, Rician-like, speckle),
  field of view (ultrasound sector), projection blur (X-ray);
- anatomy (strong): body outline and organ layout (skull ring, two lungs, abdominal organs);
- pathology (subtle): normal, a small round lesion, or a cluster of tiny calcifications,
  whose size and contrast shrink as `difficulty` grows.
Class sizes fall geometrically from `max_per_class` to `min_per_class` in a seeded order
(long tail, so micro and macro P@N differ).

Images are written once as 8-bit PNGs, with a manifest, into a folder of their own under `root`
named after a hash of the parameters (`root/<name>-<hash>/`): a later call with the same parameters
reuses them (a marker file records the parameters), other parameters never overwrite them (runs,
galleries and saved indexes made from them keep pointing at the same pixels).

`labels=multi` adds, for every modality and anatomy, images carrying two findings (each pair
of non-normal pathologies, e.g. a lesion and calcifications) in folders `<p1>+<p2>/`, sized
as the smaller of the two single-finding classes; the manifest gets a `findings` column. The
single-finding images have the same pixels in both modes (each mode has its own folder).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
from filelock import FileLock
from PIL import Image

from cbir.data.findings import check_labels_mode, join_findings, multi_label
from cbir.data.manifest import Manifest, class_name

GENERATOR_VERSION = 1


class SyntheticDataset:
    writes_root = True  # the images are generated into `root` (checked writable before any work)

    def __init__(
        self,
        root: str | os.PathLike,
        name: str = "synthetic",
        modalities=("CT", "MR", "US", "XR"),
        anatomies=("head", "chest", "abd"),
        pathologies=("normal", "lesion", "calcification"),
        max_per_class: int = 120,
        min_per_class: int = 12,
        split_fractions=None,
        image_size: int = 96,
        difficulty: float = 0.5,
        seed: int = 0,
        labels: str = "single",
    ) -> None:
        self.root = Path(root)
        self.labels = check_labels_mode(labels)
        self.name = name
        self.modalities = list(modalities)
        self.anatomies = list(anatomies)
        self.pathologies = list(pathologies)
        unknown = (
            set(self.modalities) - set(_MODALITY_STYLE),
            set(self.anatomies) - set(_ANATOMY_DRAW),
            set(self.pathologies) - set(_PATHOLOGY_DRAW),
        )
        for kind, names, known in zip(
            ("modalities", "anatomies", "pathologies"),
            unknown,
            (_MODALITY_STYLE, _ANATOMY_DRAW, _PATHOLOGY_DRAW),
        ):
            if names:
                raise ValueError(f"dataset.{kind}: unknown value(s) {sorted(names)}; choose from {sorted(known)}")
        if not 1 <= min_per_class <= max_per_class:
            raise ValueError(
                "dataset.min_per_class and dataset.max_per_class: need 1 <= min <= max, "
                f"got {min_per_class} and {max_per_class}"
            )
        self.max_per_class = int(max_per_class)
        self.min_per_class = int(min_per_class)
        self.split_fractions = dict(split_fractions or {"train": 0.7, "val": 0.1, "test": 0.2})
        self.image_size = int(image_size)
        self.difficulty = float(difficulty)
        self.seed = int(seed)

    # ------------------------------------------------------------------ public
    def params(self) -> dict:
        return {
            "version": GENERATOR_VERSION,
            "modalities": self.modalities,
            "anatomies": self.anatomies,
            "pathologies": self.pathologies,
            "max_per_class": self.max_per_class,
            "min_per_class": self.min_per_class,
            "split_fractions": self.split_fractions,
            "image_size": self.image_size,
            "difficulty": self.difficulty,
            "seed": self.seed,
            **({"labels": self.labels} if self.labels != "single" else {}),
        }

    @property
    def folder(self) -> Path:
        """Where the images of these parameters live: one folder per parameter set."""
        blob = json.dumps({**self.params(), "name": self.name}, sort_keys=True)
        return self.root / f"{self.name}-{hashlib.sha256(blob.encode()).hexdigest()[:10]}"

    def load_manifest(self) -> Manifest:
        """Generate the images if needed (once, under a lock) and return the manifest."""
        folder = self.folder
        folder.parent.mkdir(parents=True, exist_ok=True)
        marker = folder / "generator.json"
        with FileLock(str(folder) + ".lock"):
            if not (marker.exists() and json.loads(marker.read_text()) == self.params()):
                self._generate(folder)
        table = pd.read_csv(folder / "manifest.csv", dtype=str, keep_default_na=False)
        return Manifest(table=table, root=folder, source=str(folder / "manifest.csv"), generator=self.params())

    def class_sizes(self) -> dict[str, int]:
        classes = [class_name(m, a, p) for m in self.modalities for a in self.anatomies for p in self.pathologies]
        n = len(classes)
        ratio = self.min_per_class / self.max_per_class
        sizes = [int(round(self.max_per_class * ratio ** (r / max(n - 1, 1)))) for r in range(n)]
        order = np.random.default_rng(self.seed).permutation(n)
        return {classes[i]: sizes[rank] for rank, i in enumerate(order)}

    def two_finding_sizes(self) -> dict[tuple[str, str, str, str], int]:
        """labels=multi: (modality, anatomy, finding 1, finding 2) -> number of images."""
        sizes = self.class_sizes()
        found = [p for p in self.pathologies if p != "normal"]
        return {
            (m, a, p1, p2): min(sizes[class_name(m, a, p1)], sizes[class_name(m, a, p2)])
            for m in self.modalities
            for a in self.anatomies
            for i, p1 in enumerate(found)
            for p2 in found[i + 1 :]
        }

    # ----------------------------------------------------------------- private
    def _generate(self, folder: Path) -> None:
        tmp = folder.with_name(folder.name + f".tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        rows = []
        groups = [(*label.split("/"), size) for label, size in self.class_sizes().items()]
        if self.labels == "multi":  # appended: the single-finding images keep their seeds
            groups += [(m, a, f"{p1}|{p2}", size) for (m, a, p1, p2), size in self.two_finding_sizes().items()]
        for class_index, (modality, anatomy, pathology, size) in enumerate(groups):
            splits = self._split_labels(size, class_index)
            folder_name = pathology.replace("|", "+")
            (tmp / modality / anatomy / folder_name).mkdir(parents=True)
            for i in range(size):
                rng = np.random.default_rng([self.seed, class_index, i])
                image = draw_image(modality, anatomy, pathology, self.image_size, self.difficulty, rng)
                rel = f"{modality}/{anatomy}/{folder_name}/{i:05d}.png"
                Image.fromarray(image, mode="L").save(tmp / rel)
                findings = pathology.split("|")
                rows.append(
                    (
                        rel,
                        self.name,
                        splits[i],
                        modality,
                        anatomy,
                        multi_label(modality, anatomy, findings),
                        join_findings(findings),
                    )
                )
        table = pd.DataFrame(rows, columns=["path", "dataset", "split", "modality", "anatomy", "label", "findings"])
        if self.labels == "single":
            table = table.drop(columns="findings")
        table.to_csv(tmp / "manifest.csv", index=False)
        (tmp / "generator.json").write_text(json.dumps(self.params()))
        shutil.rmtree(folder, ignore_errors=True)  # an incomplete folder (no or other marker)
        os.replace(tmp, folder)

    def _split_labels(self, size: int, class_index: int) -> list[str]:
        """Per-class stratified split; every class gets at least one train and one test row
        when it has >= 2 images."""
        fr = self.split_fractions
        n_test = max(1, int(round(size * fr.get("test", 0.0)))) if size >= 2 else 0
        n_val = int(round(size * fr.get("val", 0.0))) if size >= 3 else 0
        n_val = min(n_val, size - n_test - 1)
        labels = ["test"] * n_test + ["val"] * n_val + ["train"] * (size - n_test - n_val)
        order = np.random.default_rng([self.seed, class_index, 10**6]).permutation(size)
        return [labels[j] for j in order]


# ---------------------------------------------------------------------- drawing
def _grid(size: int):
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    return (x + 0.5) / size * 2 - 1, (y + 0.5) / size * 2 - 1  # coordinates in [-1, 1]


def _ellipse(x, y, cx, cy, rx, ry, soft=0.04):
    d = np.sqrt(((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2)
    return np.clip((1 - d) / soft + 0.5, 0, 1)


def _draw_head(x, y, rng):
    """Tissue maps in [0, 1]: returns (soft tissue, bone, air) masks."""
    s = 1 + rng.normal(0, 0.04)
    outer = _ellipse(x, y, 0, 0, 0.78 * s, 0.88 * s)
    inner = _ellipse(x, y, 0, 0, 0.68 * s, 0.78 * s)
    bone = outer - inner
    ventricles = _ellipse(x, y, -0.12, -0.05, 0.08, 0.2) + _ellipse(x, y, 0.12, -0.05, 0.08, 0.2)
    tissue = inner * (1 - 0.6 * np.clip(ventricles, 0, 1))
    return tissue, bone, 1 - outer, inner


def _draw_chest(x, y, rng):
    s = 1 + rng.normal(0, 0.04)
    body = _ellipse(x, y, 0, 0.05, 0.92 * s, 0.72 * s)
    lungs = _ellipse(x, y, -0.4, 0.0, 0.3, 0.5) + _ellipse(x, y, 0.4, 0.0, 0.3, 0.5)
    lungs = np.clip(lungs, 0, 1) * body
    spine = _ellipse(x, y, 0, 0.55, 0.1, 0.1)
    ribs = body * (0.5 + 0.5 * np.sin(y * 18 + rng.uniform(0, 6))) * (np.abs(x) > 0.2) * 0.35
    heart = _ellipse(x, y, 0.08, 0.12, 0.25, 0.28)
    tissue = body * (1 - lungs) + 0.3 * heart
    bone = np.clip(spine + ribs * lungs, 0, 1)
    return np.clip(tissue, 0, 1), bone, (1 - body) + 0.9 * lungs, lungs


def _draw_abd(x, y, rng):
    s = 1 + rng.normal(0, 0.04)
    body = _ellipse(x, y, 0, 0.05, 0.9 * s, 0.65 * s)
    liver = _ellipse(x, y, -0.38, -0.1, 0.38, 0.3)
    kidneys = _ellipse(x, y, -0.35, 0.35, 0.12, 0.16) + _ellipse(x, y, 0.35, 0.35, 0.12, 0.16)
    bowel = body * (0.5 + 0.5 * np.sin(x * 11) * np.sin(y * 13 + rng.uniform(0, 6))) * 0.3
    spine = _ellipse(x, y, 0, 0.45, 0.11, 0.11)
    tissue = np.clip(body * 0.7 + 0.35 * liver + 0.45 * kidneys - bowel, 0, 1)
    return tissue, spine, 1 - body, np.clip(liver + kidneys, 0, 1)


_ANATOMY_DRAW = {"head": _draw_head, "chest": _draw_chest, "abd": _draw_abd}


def _point_in(region, rng):
    """A random pixel of the organ region, in [-1, 1] coordinates (None if the region is empty)."""
    ys, xs = np.nonzero(region > 0.5)
    if len(xs) == 0:
        return None
    j = rng.integers(len(xs))
    size = region.shape[0]
    return xs[j] / size * 2 - 1, ys[j] / size * 2 - 1


def _lesion(x, y, region, rng, difficulty):
    """A small round focus placed inside the organ region."""
    point = _point_in(region, rng)
    if point is None:
        return np.zeros_like(x)
    r = (0.16 - 0.08 * difficulty) * rng.uniform(0.8, 1.2)
    return _ellipse(x, y, *point, r, r, soft=0.3)


def _calcifications(x, y, region, rng, difficulty):
    """A cluster of 3-6 tiny bright specks."""
    point = _point_in(region, rng)
    if point is None:
        return np.zeros_like(x)
    out = np.zeros_like(x)
    for _ in range(rng.integers(3, 7)):
        px, py = point[0] + rng.normal(0, 0.08), point[1] + rng.normal(0, 0.08)
        r = 0.035 + 0.02 * (1 - difficulty)
        out = np.maximum(out, _ellipse(x, y, px, py, r, r, soft=0.5))
    return out


_PATHOLOGY_DRAW = {
    "normal": None,
    "lesion": _lesion,
    "calcification": _calcifications,
}

# intensity of (soft tissue, bone, air, finding) and noise per modality
_MODALITY_STYLE = {
    "CT": dict(tissue=0.45, bone=1.0, air=0.0, finding=0.35, noise="gauss", sigma=0.03, blur=0),
    "MR": dict(tissue=0.75, bone=0.1, air=0.0, finding=-0.35, noise="rician", sigma=0.05, blur=0),
    "US": dict(tissue=0.5, bone=0.9, air=0.05, finding=-0.3, noise="speckle", sigma=0.35, blur=1),
    "XR": dict(tissue=0.7, bone=0.95, air=0.08, finding=0.3, noise="gauss", sigma=0.02, blur=2),
}


def _box_blur(a: np.ndarray, radius: int) -> np.ndarray:
    if radius <= 0:
        return a
    k = 2 * radius + 1
    p = np.pad(a, radius, mode="edge")
    c = p.cumsum(0).cumsum(1)
    c = np.pad(c, ((1, 0), (1, 0)))
    return (c[k:, k:] - c[:-k, k:] - c[k:, :-k] + c[:-k, :-k]) / (k * k)


def draw_image(modality, anatomy, pathology, size, difficulty, rng) -> np.ndarray:
    x, y = _grid(size)
    # small random pose: shift and rotation
    angle = rng.normal(0, 0.08)
    dx, dy = rng.normal(0, 0.05, size=2)
    xr = np.cos(angle) * (x - dx) - np.sin(angle) * (y - dy)
    yr = np.sin(angle) * (x - dx) + np.cos(angle) * (y - dy)
    tissue, bone, air, organ = _ANATOMY_DRAW[anatomy](xr, yr, rng)
    style = _MODALITY_STYLE[modality]
    image = style["tissue"] * tissue + style["bone"] * bone + style["air"] * np.clip(air, 0, 1)
    for name in pathology.split("|"):  # several findings: "lesion|calcification"
        draw = _PATHOLOGY_DRAW[name]
        if draw is not None:
            finding = draw(xr, yr, organ, rng, difficulty)
            contrast = style["finding"] * (1.0 - 0.6 * difficulty) * rng.uniform(0.8, 1.2)
            image = image + contrast * finding
    image = image * rng.uniform(0.9, 1.1)
    image = _box_blur(image, style["blur"] * max(1, size // 64))
    sigma = style["sigma"] * (0.5 + difficulty)
    if style["noise"] == "gauss":
        image = image + rng.normal(0, sigma, image.shape)
    elif style["noise"] == "rician":
        image = np.hypot(image + rng.normal(0, sigma, image.shape), rng.normal(0, sigma, image.shape))
    elif style["noise"] == "speckle":
        image = image * rng.rayleigh(1.0, image.shape) * (1 - sigma) + sigma * image
    if modality == "US":  # sector-shaped field of view from the top centre
        theta = np.arctan2(x, y + 1.05)
        radius = np.hypot(x, y + 1.05)
        image = image * ((np.abs(theta) < 0.6) & (radius < 2.0))
    return np.clip(image * 255, 0, 255).astype(np.uint8)
