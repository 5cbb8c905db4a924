"""Per-defect-kind generalisation benchmark: promptmad against a training-free kNN peer on the same
frozen encoder and the same normal images, on the dataset's own defect kinds and on kinds that the
training augmentations never paint (``training/data/unseen.py``), over one run per seed.

Every kind is scored against its class's good test images (I-AUROC, P-AUROC, P-AP, AUPRO from
``training/metrics.py``), averaged over classes, then mean and std over the runs. The peer is fitted
on all of a class's normal training images (peer-full) and on k = 1, 2, 4 of them drawn with the
run's seed (peer-k1/k2/k4), so its k-shot spread follows the seeds as promptmad's does.
"""

from __future__ import annotations

import datetime
import json
import logging
import shutil
import time
import zlib
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

log = logging.getLogger(__name__)

SPLIT_VERSION = 1  # bump when the unseen generator changes: the cached split is rebuilt
FULL_PEER = "peer-full"  # the peer on every normal training image of the class


def peer_name(k: int) -> str:
    """The column of the peer fitted on k normal images."""
    return f"peer-k{k}"


PEER_SHOTS = {FULL_PEER: None, **{peer_name(k): k for k in (1, 2, 4)}}  # None: every normal training image
# promptmad's map and each of its two terms alone: the segmentor's probability (what the map was
# before the deviation term) and the deviation in normal standard deviations
TERMS = {"promptmad": "map", "promptmad-seg": "segmentor", "promptmad-dev": "deviation"}
# the diffusion refinement on the same weights: the segmentor term refined as served (DDIM from the
# coarse mask noised as in training), refined from the noise-free coarse mask (the inference before
# the fix: a mismatch with training), and the coarse head alone (no refinement)
# (the served refinement is the promptmad-seg column itself)
DIFFUSION = {"seg-refined-noise-free": "noise-free", "seg-coarse-only": "coarse"}
_DIFFUSION_COLUMNS = ("promptmad-seg", *DIFFUSION)
# pixel metrics on a fixed random subsample of this many pixels per kind (AUROC is unbiased under
# it, AP nearly so): the full 1.5 M pixels of a kind made sklearn's sorts most of the benchmark's time
_PIXELS_PER_KIND = 300_000
SYSTEMS = (*TERMS, *PEER_SHOTS)
ALL_SYSTEMS = (*SYSTEMS, *DIFFUSION)
REPORTED = ("I-AUROC", "P-AUROC", "P-AP", "AUPRO")
SEEN, UNSEEN = "seen-like (pasted)", "unseen"
_BATCH = 8


# ---- (a) the unseen-kinds test split -----------------------------------------------------------------
def build_unseen_split(data: str | Path, out: str | Path, *, classes: Sequence[str] | None = None,
                       per_kind: int | None = None) -> Path:
    """OUT in MVTec layout: for every class, one defect of each unseen kind on each of its first
    `per_kind` (default: all) good test images, seeded by (class, kind, image), with exact masks.
    train/ and test/good link to the source. Cached: rebuilt only when its recipe changes."""
    from promptmad.training.data.datasets import load_samples
    from promptmad.training.data.unseen import UNSEEN_KINDS

    out = Path(out)
    goods = [s for s in load_samples(data, split="test", classes=classes) if s.label == 0]
    by_class: dict[str, list] = {}
    for s in goods:
        by_class.setdefault(s.class_name, []).append(s)
    recipe = {"version": SPLIT_VERSION, "kinds": list(UNSEEN_KINDS), "per_kind": per_kind,
              "sources": {c: [str(s.image) for s in v] for c, v in by_class.items()}}
    stamp = out / "unseen_split.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == recipe:
        log.info("unseen split %s: cached", out)
        return out
    for cls, samples in by_class.items():
        _write_class_split(out, Path(data), cls, samples[:per_kind])
    stamp.write_text(json.dumps(recipe, indent=2) + "\n")  # last: an interrupted build is not cached
    return out


def _write_class_split(out: Path, data: Path, cls: str, samples: Sequence) -> None:
    from PIL import Image

    from promptmad.training.data.datasets import read_rgb
    from promptmad.training.data.unseen import UNSEEN_KINDS, make_unseen

    for sub in ("train", "test/good"):  # links: the split is a whole dataset `promptmad eval` can read
        link = out / cls / sub
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.is_symlink():
            link.symlink_to((data / cls / sub).resolve(), target_is_directory=True)
    for k, kind in enumerate(UNSEEN_KINDS):
        for sub in ("test", "ground_truth"):  # emptied first: a smaller --per-kind leaves no stale images
            shutil.rmtree(out / cls / sub / kind, ignore_errors=True)
            (out / cls / sub / kind).mkdir(parents=True)
        for i, s in enumerate(samples):
            img, mask = make_unseen(read_rgb(s.image), kind, (zlib.crc32(cls.encode()), k, i))
            Image.fromarray(img).save(out / cls / "test" / kind / f"{i:03d}.png", compress_level=1)
            Image.fromarray(mask.astype(np.uint8) * 255).save(out / cls / "ground_truth" / kind / f"{i:03d}_mask.png")


# ---- (b) scoring ------------------------------------------------------------------------------------
def _load(samples: Sequence, size: int) -> dict[str, np.ndarray]:
    """Frames uint8 [N,S,S,3], masks bool [N,S,S], labels [N] and defect kinds [N] of `samples`."""
    from promptmad.training.data.datasets import TestDataset

    ds = TestDataset(samples, {s.class_name: 0 for s in samples}, size)
    frames, masks = zip(*(ds.load(i) for i in range(len(ds))))
    return {"frames": np.stack(frames), "masks": np.stack(masks), "labels": np.array([s.label for s in samples]),
            "kinds": np.array([s.defect for s in samples])}


def _chunk_terms(model, chunk: torch.Tensor, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Segmentor.maps taken apart: the served map, its two terms and the two diffusion variants."""
    seg = model.segmentor
    f4, f8, f16 = model.encoder(chunk)
    recon, text = model.forward_features(f16, ids)
    feats, cond = seg.features(f4, f8, f16, recon, text)
    coarse = seg.coarse_head(feats)
    prob = seg.upsample_smooth(torch.sigmoid(seg.refine(coarse, feats, cond)))
    noise = seg.start_noise.clone()
    seg.start_noise.zero_()
    try:
        noise_free = seg.upsample_smooth(torch.sigmoid(seg.refine(coarse, feats, cond)))
    finally:
        seg.start_noise.copy_(noise)
    units = seg.units(f4, f8, f16, *model.class_prompts(ids))
    return {"map": units + seg.fusion_weight * prob, "segmentor": prob, "deviation": units,
            "noise-free": noise_free, "coarse": seg.upsample_smooth(torch.sigmoid(coarse))}


@torch.no_grad()
def term_maps(model, class_id: int, frames: np.ndarray) -> dict[str, np.ndarray]:
    """{"map", "segmentor", "deviation", "noise-free", "coarse"}: [N, S, S] maps of the frames."""
    out: dict[str, list] = {}
    for chunk in torch.from_numpy(frames).split(_BATCH):
        for k, v in _chunk_terms(model, chunk, torch.full((len(chunk),), class_id, dtype=torch.long)).items():
            out.setdefault(k, []).append(v.numpy())
    return {k: np.concatenate(v) for k, v in out.items()}


def _promptmad(model, class_id: int, frames: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{system: (maps, image scores = max of the map)} of promptmad, its terms and the diffusion variants."""
    maps = term_maps(model, class_id, frames)
    return {system: (maps[t], maps[t].reshape(len(frames), -1).max(1)) for system, t in (TERMS | DIFFUSION).items()}


def kshot_indices(n: int, k: int | None, seed: int, cls: str) -> np.ndarray:
    """Which of a class's `n` normal training images a k-shot peer gets (all when k is None)."""
    if k is None or k >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng([seed, zlib.crc32(cls.encode())]).choice(n, k, replace=False))


def _peer(peer, cls: str, normal: torch.Tensor, test: torch.Tensor, k: int | None, seed: int, size: int):
    """(maps, scores) of the k-shot peer for the embedded test frames."""
    peer.fit_embedded(cls, normal[torch.from_numpy(kshot_indices(len(normal), k, seed, cls))])
    maps, scores = peer.predict_embedded(test, cls, size)
    return maps.numpy(), scores.numpy()


# ---- (c) per-kind metrics ----------------------------------------------------------------------------
def per_kind(test: dict[str, np.ndarray], maps: np.ndarray, scores: np.ndarray) -> dict[str, dict[str, float]]:
    """{kind: metrics} of one class: each kind's defect images against the class's good ones."""
    from promptmad.training.metrics import compute_metrics

    good = test["labels"] == 0
    out = {}
    for kind in sorted(set(test["kinds"][~good])):
        sel = good | (test["kinds"] == kind)
        out[kind] = compute_metrics(test["labels"][sel], scores[sel], test["masks"][sel], maps[sel], max_pixels=_PIXELS_PER_KIND)
    return out


def _fingerprint(encoder, size: int) -> str:
    """Identity of a frozen encoder (its weights) at one frame size: runs of one architecture share
    it, so the peer-full figures are computed once for all seeds."""
    import hashlib

    h = hashlib.sha1(str(size).encode())
    for t in encoder.state_dict().values():
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _normal_frames(data: str | Path, cls: str, size: int) -> torch.Tensor:
    """Every normal training image of the class (sorted, as training reads them), resized."""
    from promptmad.training.data.datasets import load_samples, read_rgb, resize_rgb

    return torch.from_numpy(np.stack([resize_rgb(read_rgb(s.image), size) for s in load_samples(data, split="train", classes=[cls])]))


def _score_peers(encoder, cls: str, data, test: dict, seed: int, cache: dict,
                 shots: dict[str, int | None] = PEER_SHOTS) -> dict[str, dict]:
    """{peer variant: {kind: metrics}} of one class, a variant per entry of `shots` (name -> k, None:
    every normal image); the cache holds results keyed by encoder, class, variant and (k-shot only) seed."""
    from promptmad.training.knn_peer import KnnPeer

    size = test["frames"].shape[1]
    fp = _fingerprint(encoder, size)
    keys = {v: (fp, cls, v, None if k is None else seed) for v, k in shots.items()}
    todo = [v for v in shots if keys[v] not in cache]
    if todo:
        peer = KnnPeer(encoder)
        normal = peer.embed(_normal_frames(data, cls, size))
        feats = peer.embed(torch.from_numpy(test["frames"]))
        for v in todo:
            cache[keys[v]] = per_kind(test, *_peer(peer, cls, normal, feats, shots[v], seed, size))
    return {v: cache[keys[v]] for v in shots}


def score_run(run: str | Path, data, split: Path, classes: Sequence[str] | None, cache: dict,
              systems: Sequence[str] = ALL_SYSTEMS) -> dict:
    """One run: {"seed", "classes", "per_class": {system: {class: {kind: metrics}}}, "seconds"}; only
    `systems` are scored (the metrics, AUPRO above all, are most of the time; the peers are skipped
    when none is asked for)."""
    from promptmad.training.checkpoint import load_model
    from promptmad.training.data.datasets import load_samples

    model, info = load_model(run)
    seed = int(info.training.get("seed", 0))
    wanted = list(classes) if classes else info.classes
    per_class: dict[str, dict] = {s: {} for s in systems}
    peers = [v for v in PEER_SHOTS if v in systems]
    seconds = {"promptmad": 0.0, "peer": 0.0}
    for cls in wanted:
        samples = load_samples(data, split="test", classes=[cls])
        samples += [s for s in load_samples(split, split="test", classes=[cls]) if s.label]
        test = _load(samples, info.arch.image_size)
        t0 = time.perf_counter()
        for system, (maps, scores) in _promptmad(model, info.class_id(cls), test["frames"]).items():
            if system in per_class:
                per_class[system][cls] = per_kind(test, maps, scores)
        t1 = time.perf_counter()
        for v, rows in (_score_peers(model.encoder, cls, data, test, seed, cache) if peers else {}).items():
            if v in per_class:
                per_class[v][cls] = rows
        seconds["promptmad"] += t1 - t0
        seconds["peer"] += time.perf_counter() - t1
        log.info("%s %s: %d test images scored", run, cls, len(samples))
    return {"run": str(run), "seed": seed, "classes": wanted, "per_class": per_class, "seconds": seconds}


# ---- (d) aggregation ----------------------------------------------------------------------------------
def kind_means(per_class: dict[str, dict[str, dict[str, float]]], unseen: Sequence[str]) -> dict[str, dict[str, float]]:
    """{class: {kind: metrics}} -> {kind: metrics averaged over classes} plus the mean rows over the
    seen-like kinds, the unseen kinds and all kinds."""
    from promptmad.training.metrics import METRIC_NAMES

    kinds = sorted({k for rows in per_class.values() for k in rows}, key=lambda k: (k in unseen, k))
    rows = {k: {m: float(np.nanmean([r[k][m] for r in per_class.values() if k in r])) for m in METRIC_NAMES} for k in kinds}
    groups = {f"mean {SEEN}": [k for k in kinds if k not in unseen], f"mean {UNSEEN}": [k for k in kinds if k in unseen],
              "mean all": kinds}
    for name, members in groups.items():
        if members:
            rows[name] = {m: float(np.nanmean([rows[k][m] for k in members])) for m in METRIC_NAMES}
    return rows


def aggregate(per_run: Sequence[dict[str, dict[str, dict[str, float]]]]) -> dict:
    """[{system: {kind: metrics}} per run] -> {system: {kind: {metric: {"mean", "std", "n"}}}};
    std is the sample std over runs (0 for one run)."""
    out: dict = {}
    for system in per_run[0]:
        for kind, metrics in per_run[0][system].items():
            for m in metrics:
                vals = np.array([r[system][kind][m] for r in per_run], dtype=np.float64)
                vals = vals[~np.isnan(vals)]
                std = float(vals.std(ddof=1)) if len(vals) > 1 else 0.0
                out.setdefault(system, {}).setdefault(kind, {})[m] = {
                    "mean": float(vals.mean()) if len(vals) else float("nan"), "std": std, "n": int(len(vals))}
    return out


# ---- (e) report ----------------------------------------------------------------------------------------
def machine() -> dict[str, str]:
    """benchmarks.machine's description plus the vector instruction sets the CPU has."""
    from promptmad.benchmarks.machine import machine_description

    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as fh:
            flags = set(next((line for line in fh if line.startswith("flags")), ":").split(":", 1)[1].split())
    except OSError:
        pass
    isa = [f for f in ("avx2", "avx512f", "avx512_vnni") if f in flags]
    return {**machine_description(), "instruction_sets": ", ".join(isa) or "none of avx2/avx512f/avx512_vnni"}


def _cell(v: dict) -> str:
    if v["n"] == 0:
        return "n/a"
    return f"{100 * v['mean']:.1f}" + (f" ± {100 * v['std']:.1f}" if v["n"] > 1 else "")


def format_markdown(summary: dict) -> str:
    """One table per metric: rows = defect kinds (tagged) and the mean rows, columns = the systems."""
    from promptmad.training.data.unseen import UNSEEN_KINDS

    m, agg = summary["machine"], summary["aggregate"]
    seeds = ", ".join(str(r["seed"]) for r in summary["runs"])
    lines = [
        "# Generalisation per defect kind: promptmad vs a kNN peer on the same frozen encoder", "",
        f"{summary['date']}; {m['cpu']} ({m['instruction_sets']}), {m['cores']} cores, GPU {m['gpu']}, torch {m['torch']}.",
        f"Dataset {summary['data']}; {len(summary['runs'])} run(s), seeds {seeds}; values in %, mean ± std over runs.",
        f"Wall time: {summary['seconds']['total']:.0f} s in all; training {summary['seconds']['training']:.0f} s; scoring "
        + ", ".join(f"seed {r['seed']}: promptmad {r['seconds']['promptmad']:.0f} s, peers {r['seconds']['peer']:.0f} s"
                    for r in summary["runs"]) + ".",
        f"Tags: *{SEEN}* = the dataset's own kinds, which paint something foreign on the surface as the training "
        f"augmentations do; *{UNSEEN}* = `training/data/unseen.py`, nothing the training paints looks like them.",
    ]
    for metric in REPORTED:
        lines += ["", f"## {metric}", "", "| kind | tag | " + " | ".join(SYSTEMS) + " |", "|---|---|" + "---:|" * len(SYSTEMS)]
        for kind in agg["promptmad"]:
            tag = "" if kind.startswith("mean") else (UNSEEN if kind in UNSEEN_KINDS else SEEN)
            name = f"**{kind}**" if kind.startswith("mean") else kind
            lines.append(f"| {name} | {tag} | " + " | ".join(_cell(agg[s][kind][metric]) for s in SYSTEMS) + " |")
    return "\n".join(lines + _diffusion_table(agg)) + "\n"


def _diffusion_table(agg: dict) -> list[str]:
    """The segmentor term alone, same weights: refined as served, refined from a noise-free start
    (the old inference), coarse head only; mean rows, every reported metric."""
    rows = [k for k in agg["promptmad"] if k.startswith("mean")]
    head = " | ".join(f"{m} {v}" for m in REPORTED for v in ("noised", "noise-free", "coarse"))
    lines = ["", "## Diffusion refinement (segmentor term alone, same weights)", "",
             "noised = DDIM from the coarse mask noised as in training (served); noise-free = DDIM from the "
             "noise-free coarse mask (the inference before the fix); coarse = no refinement.", "",
             f"| kinds | {head} |", "|---|" + "---:|" * (3 * len(REPORTED))]
    for kind in rows:
        lines.append(f"| {kind} | " + " | ".join(_cell(agg[s][kind][m]) for m in REPORTED for s in _DIFFUSION_COLUMNS) + " |")
    return lines


def _train_runs(data, out: Path, seeds: Sequence[int], steps: int, arch: str) -> tuple[list[Path], dict[str, float]]:
    """One run per seed under OUT/runs/seed<N> (TrainConfig's defaults otherwise); wall time each."""
    from promptmad.training.train import TrainConfig, train

    runs, seconds = [], {}
    for seed in seeds:
        t0 = time.perf_counter()
        runs.append(train(TrainConfig(data=str(data), out=str(out / "runs" / f"seed{seed}"), arch=arch, steps=steps, seed=seed)))
        seconds[f"seed{seed}"] = time.perf_counter() - t0
        log.info("trained seed %d (%d steps) in %.0f s", seed, steps, seconds[f"seed{seed}"])
    return runs, seconds


def run_generalisation(data: str | Path, out: str | Path, *, runs: Sequence[str | Path] = (), seeds: Sequence[int] = (),
                       train_steps: int | None = None, arch: str = "default", classes: Sequence[str] | None = None,
                       per_kind_images: int | None = None) -> dict:
    """Trains the seed runs if asked, builds the unseen split, scores every run and the peers, and
    writes OUT/results.json and OUT/results.md. Returns the summary written to results.json."""
    from promptmad.training.checkpoint import atomic_write_text
    from promptmad.training.data.unseen import UNSEEN_KINDS

    t0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    trained, train_s = _train_runs(data, out, seeds, train_steps, arch) if seeds else ([], {})
    runs = [Path(r) for r in runs] + trained
    if not runs:
        raise ValueError("give --runs RUN [RUN ...] or --seeds N [N ...] with --train-steps")
    split = build_unseen_split(data, out / "unseen_data", classes=classes, per_kind=per_kind_images)
    cache: dict = {}
    scored = [score_run(r, data, split, classes, cache) for r in runs]
    means = [{s: kind_means(r["per_class"][s], list(UNSEEN_KINDS)) for s in ALL_SYSTEMS} for r in scored]
    summary = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "machine": machine(),
        "data": str(data), "unseen_split": str(split), "runs": [{k: r[k] for k in ("run", "seed", "classes", "seconds")} for r in scored],
        "aggregate": aggregate(means), "per_run": means, "per_class": [r["per_class"] for r in scored],
        "seconds": {"training": sum(train_s.values()), "training_per_seed": train_s, "total": time.perf_counter() - t0},
    }
    atomic_write_text(out / "results.json", json.dumps(summary, indent=2))
    atomic_write_text(out / "results.md", format_markdown(summary))
    return summary
