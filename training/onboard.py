"""A new product class without retraining (`promptmad classes add`): the rows it adds to prompt_bank's
five per-class tables and its score threshold, computed by the trained model from a few normal images.

Each row is made the way training and export make the trained classes' rows, so the served model cannot
tell an onboarded class from a trained one by how its prompts were made:
- text row [2, D]: the run's CLIP text tower and prompt ensemble (its seed, templates and state words;
  for a trained class's name this gives that class's row to float rounding, which `reference` checks), with
  the product words in place of the name (`words`) and optional defect words (PromptSet.defects);
- prompt-token row [N, H]: the reconstructor's encoding of the FIRST image's encoder features (training
  prompts each class with one normal image; further images only feed the bank);
- normal bank [K, P]: the greedy coreset of the patch features of all the images and of their views
  (classes add --augment: shifted, mirrored, rotated; onboard_images.AUGMENTS) (model.set_normal_bank's recipe);
- units [2] (mean, std of the distance map; the std scaled so the map weighs the segmentor by
  ONBOARD_FUSION_WEIGHT, see weighted_stats) and threshold from normal images the bank was not built
  from, as training calibrates: `held_out` images when given; else leave-one-out (image i against the
  bank of the others and their views: K - 1 images, a bank thinner than the served one, and only K scores: a loose
  threshold); with one image and nothing held out, the image itself (its distances are 0, so the units
  are tiny and nearly every frame of the class will be flagged: a loud warning says so);
- position gain [S/2] (a run with position gains, the default; ones otherwise): the deviation's gain per ring
  from those same normal maps in the class's units, with leave-one-out from every view of each image
  (deviation.ring_gain; the trained classes' mean with one image): a trained class's gain comes from its
  held-out maps, so this is the same recipe on what the class has.
Threshold = max(mean + 3 std, max) of those images' scores with the full map (calibration.METHOD).

The model given is modified (its per-class buffers become the new class's): load a fresh one per call.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from dataclasses import dataclass

import numpy as np
import torch

from promptmad import contract
from promptmad.errors import ConfigError
from promptmad.training.deviation import PatchDeviation, build_bank, identity_gain, is_identity, normal_stats, ring_gain
from promptmad.training.onboard_images import (AUGMENTS, DEFAULT_AUGMENT, ONBOARD_FUSION_WEIGHT, ONBOARD_FUSION_WEIGHT_PROFILED,
                                               SHIFT_PX)

log = logging.getLogger(__name__)

CALIBRATIONS = ("held-out", "leave-one-out", "self")  # where a class's units and threshold came from

_CHUNK = 16  # frames per forward pass
_TEXT_ATOL = 1e-5  # a recomputed trained row must match this closely (unit vectors; BLAS may differ in the last bits)


@dataclass(frozen=True)
class ClassRows:
    """One class's row of each prompt_bank table, its threshold and how it was calibrated."""

    text: np.ndarray  # [2, D]
    prompt: np.ndarray  # [N, H]
    bank: np.ndarray  # [K, P]
    stats: np.ndarray  # [2]
    gain: np.ndarray  # [S/2], the deviation's gain per ring (ones for a run without position gains)
    threshold: float
    calibration: str  # one of CALIBRATIONS
    scores: tuple[float, ...]  # the calibration images' scores
    fusion_weight: float = 0.0  # the segmentor's weight in this class's map (fusion_weight_of)
    text_tower_sha256: str = ""  # the CLIP text tower that made `text` (checked against the run's rows)

    def tables(self) -> dict[str, np.ndarray]:
        """The rows keyed by table file (contract.PROMPT_BANK_TABLES)."""
        rows = {contract.TEXT_EMBEDDING.name: self.text, contract.PROMPT_TOKENS.name: self.prompt,
                contract.NORMAL_BANK.name: self.bank, contract.NORMAL_STATS.name: self.stats,
                contract.POSITION_GAIN.name: self.gain}
        return {contract.PROMPT_BANK_TABLES[k]: v for k, v in rows.items()}


def tower_sha256(model) -> str:
    """Fingerprint of a CLIP text tower: its weights (the vision tower is not used)."""
    h = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        if not key.startswith("visual."):
            h.update(key.encode())
            h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def text_row(model, info, words: str, *, defects: tuple[str, ...] = (), clip_weights: str | None = None,
             reference: tuple[str, np.ndarray] | None = None, verified_tower: str = "") -> tuple[np.ndarray, str]:
    """(the [2, D] text row of a product described by `words`, the text tower's fingerprint).
    `reference`: (a trained class's name, its served row); recomputing it with the same tower must give
    that row, else the tower is not the one the run was trained with (other CLIP weights, seed or
    open_clip initialisation) and the new row would not fit the model. That costs a second class's
    encoding (a third of `classes add` on CPU), so it is skipped when the tower's fingerprint is
    `verified_tower`, one that passed the check before."""
    from promptmad.training.prompts import PromptSet, seeded_text_model, text_rows

    prompt_set = PromptSet.from_dict(info.prompts)
    if defects:
        prompt_set = dataclasses.replace(prompt_set, defects={**prompt_set.defects, words: tuple(defects)})
    tower, tokenizer = seeded_text_model(model.cfg.clip_model, clip_weights, int(info.training.get("seed", 0)))
    fingerprint = tower_sha256(tower)
    check = reference is not None and fingerprint != verified_tower
    table = text_rows(tower, tokenizer, [words] + ([reference[0]] if check else []), prompt_set).numpy().astype(np.float32)
    if check and not np.allclose(table[1], reference[1], atol=_TEXT_ATOL):
        trained_with = info.training.get("clip_weights")
        fix = f"pass --clip-weights {trained_with}" if trained_with else "drop --clip-weights (the run was trained without)"
        raise ConfigError("clip_weights", f"this CLIP text tower does not reproduce the run's row of class {reference[0]!r}, "
                          f"so a new row would not fit the model; {fix}")
    return table[0], fingerprint


def _bank(model, emb: torch.Tensor) -> torch.Tensor:
    """A bank from patch embeddings [k, P, dim] of k images (model.set_normal_bank's recipe)."""
    return build_bank(emb.reshape(-1, emb.shape[-1]), model.cfg.bank_size)


def _shift(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """Frames [N, S, S, 3] moved by dy pixels down (up when negative) and dx right (left when negative);
    the uncovered edge is the mirror image of the frame's own edge (no black border, which would be a
    patch the product never shows)."""
    for axis, d in ((1, dy), (2, dx)):
        n = x.shape[axis]
        if d > 0:
            x = torch.cat([x.narrow(axis, 1, d).flip(axis), x.narrow(axis, 0, n - d)], axis)
        elif d < 0:
            x = torch.cat([x.narrow(axis, -d, n + d), x.narrow(axis, n + d - 1, -d).flip(axis)], axis)
    return x


SHIFTS = tuple((dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx)  # the 8 directions, in SHIFT_PX


def _shifts(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x] + [_shift(x, dy * SHIFT_PX, dx * SHIFT_PX) for dy, dx in SHIFTS])


def _flips(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, x.flip(2), x.flip(1), x.flip(1, 2)])


def _dihedral(x: torch.Tensor) -> torch.Tensor:
    """The 8 rotations and mirror images: the 4 flips of the frame and of its transpose."""
    return _flips(torch.cat([x, x.transpose(1, 2)]))


_VIEWS = {"none": lambda x: x, "shifts": _shifts, "flips": _flips, "texture": _dihedral}


def views(frames: torch.Tensor, augment: str) -> torch.Tensor:
    """[V * K, S, S, 3]: the K frames, then each other view of all K (view v of image i is row v * K + i,
    which leave-one-out relies on); V = AUGMENTS[augment]."""
    if augment not in AUGMENTS:
        raise ConfigError("augment", f"{augment!r}: choose one of {', '.join(AUGMENTS)}")
    out = _VIEWS[augment](frames)
    assert len(out) == AUGMENTS[augment] * len(frames), augment
    return out


def _ids(n_frames: int, n_banks: int) -> torch.Tensor:
    """Frame i goes with bank i when there is one bank per frame, else all with bank 0."""
    return torch.arange(n_frames) % n_banks


def _distance_maps(model, frames: torch.Tensor, banks: torch.Tensor) -> torch.Tensor:
    """Smoothed distance maps [M, S, S] of frames [M, S, S, 3] to their banks (see _ids)."""
    ids = _ids(len(frames), len(banks))
    return torch.cat([model.segmentor.deviation_map(*model.encoder(f), banks[i])
                      for f, i in zip(frames.split(_CHUNK), ids.split(_CHUNK))])


def _calibration_set(model, frames: torch.Tensor, held_out: torch.Tensor | None, emb: torch.Tensor,
                     bank: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(images to calibrate on, their banks, CALIBRATIONS entry)."""
    if held_out is not None:
        return held_out, bank[None], "held-out"
    k = len(frames)
    image_of = torch.arange(len(emb)) % k  # emb holds every view of the k images (views)
    if k > 1:
        log.warning("class %s: no --held-out images: units and threshold from leave-one-out over the %d images (each "
                    "scored against a bank of the other %d); the threshold is loose. Pass --held-out DIR (normal images "
                    "not in --images) for a calibrated one", name, k, k - 1)
        # image i against a bank without ANY view of it: its mirror image would be a near-duplicate
        folds = torch.stack([_bank(model, emb[image_of != i]) for i in range(k)])
        return frames, folds, "leave-one-out"
    log.warning("\n%s\n!! class %s: ONE image and no --held-out: its units and threshold come from the image itself,\n"
                "!! whose patches are all in its own bank (distance 0). Other frames of the class will score far\n"
                "!! above the threshold: nearly all will be flagged. Pass --held-out DIR or more --images.\n%s",
                "!" * 78, name, "!" * 78)
    return frames, bank[None], "self"


def _view_maps(model, emb: torch.Tensor, folds: torch.Tensor) -> torch.Tensor:
    """Smoothed distance maps [V * K, S, S] of every view of the K images (patch embeddings `emb`, see views)
    to the bank without any view of its image (folds [K, ...]): the leave-one-out maps, from the
    embeddings the bank was built from (no second encoder pass)."""
    seg, grid = model.segmentor, model.cfg.image_size // 8
    ids = _ids(len(emb), len(folds))
    return torch.cat([seg.upsample_smooth(seg.deviation.distance(e, folds[i], grid))
                      for e, i in zip(emb.split(_CHUNK), ids.split(_CHUNK))])


def _class_gain(model, method: str, check_maps: torch.Tensor, plain: torch.Tensor, emb: torch.Tensor,
                banks: torch.Tensor, trained_gains: torch.Tensor) -> torch.Tensor:
    """The new class's position gain [S/2] (deviation.ring_gain) on its own normal maps in its plain units:
    the held-out images' maps, or with leave-one-out every view of each image against the bank without it
    (a ring is then fitted on V x K maps, as many as the bank has images); with "self" units there is
    no map a bank was not built from, so the trained classes' mean gain."""
    if method == "self":
        return trained_gains.mean(0)
    maps = check_maps if method == "held-out" else _view_maps(model, emb, banks)
    return ring_gain(PatchDeviation.to_units(maps, plain[None].expand(len(maps), -1)))


def _use_rows(model, text: torch.Tensor, feat16: torch.Tensor, banks: torch.Tensor, stats: torch.Tensor,
              gain: torch.Tensor) -> None:
    """Makes `model` serve len(banks) classes that share the new class's text, prompt and units,
    class i with bank i (so model.predict(frames, _ids(...)) scores each frame against its bank)."""
    n = len(banks)
    model.text_table = text[None].expand(n, -1, -1).contiguous()
    model.prompt_feat16 = feat16.expand(n, -1, -1, -1).contiguous()
    model.normal_bank = banks.contiguous()
    model.normal_stats = stats[None].expand(n, -1).contiguous()
    model.position_gain = gain[None].expand(n, -1).contiguous()


@torch.no_grad()
def use_class(model, rows: ClassRows, prompt_frame: np.ndarray) -> None:
    """Makes `model` serve the one class of `rows` as class 0 (its prompt image `prompt_frame` uint8
    [1, S, S, 3], the first of its images), so PyTorch scores it as the server would."""
    feat16 = model.encoder(torch.from_numpy(np.ascontiguousarray(prompt_frame)))[2]
    _use_rows(model, torch.from_numpy(rows.text), feat16, torch.from_numpy(rows.bank)[None], torch.from_numpy(rows.stats),
              torch.from_numpy(rows.gain))


def _scores(model, frames: torch.Tensor, n_banks: int) -> np.ndarray:
    ids = _ids(len(frames), n_banks)
    return torch.cat([model.predict(f, i)["anomaly_score"][:, 0] for f, i in zip(frames.split(_CHUNK), ids.split(_CHUNK))]).numpy()


def fusion_weight_of(run_weight: float, calibration: str, asked: float | None = None, *, profiled: bool = False) -> float:
    """The segmentor's weight in an onboarded class's map: `asked` when given (classes add --fusion-weight),
    else ONBOARD_FUSION_WEIGHT (ONBOARD_FUSION_WEIGHT_PROFILED for a run with a position profile), never above
    the run's, and the run's with "self" units."""
    if asked is not None:
        return float(asked)
    if calibration == "self":
        return run_weight
    return min(run_weight, ONBOARD_FUSION_WEIGHT_PROFILED if profiled else ONBOARD_FUSION_WEIGHT)


def weighted_stats(stats: torch.Tensor, run_weight: float, weight: float) -> torch.Tensor:
    """Units (mean, std) under which the served map, deviation + run_weight x probability with the weight
    baked into the engines, equals (run_weight / weight) x (deviation + weight x probability): the std
    scaled by weight / run_weight. A positive factor per class changes no ranking within the class and
    its threshold is set in these units, so a per-class weight needs no new tensor in the contract."""
    if weight == run_weight:
        return stats
    if run_weight <= 0 or weight <= 0:
        raise ConfigError("fusion_weight", f"{weight:g} with the run's {run_weight:g}: a weight is a scale of the run's "
                          "segmentor term, so both must be above 0; leave --fusion-weight out")
    return torch.stack([stats[0], stats[1] * (weight / run_weight)])


def threshold_of(scores: np.ndarray) -> float:
    """max(mean + 3 std, max) of normal images' scores: calibration.calibrate's rule."""
    return float(max(scores.max(), scores.mean() + 3 * scores.std()))


@torch.no_grad()
def class_rows(model, info, name: str, frames: np.ndarray, held_out: np.ndarray | None = None, *,
               words: str | None = None, defects: tuple[str, ...] = (), clip_weights: str | None = None,
               reference: tuple[str, np.ndarray] | None = None, verified_tower: str = "",
               augment: str = DEFAULT_AUGMENT, fusion_weight: float | None = None) -> ClassRows:
    """Rows and threshold of class `name` from normal frames uint8 [K, S, S, 3] (resized for the
    model) and optional held-out normal frames [M, S, S, 3]. `words`: the product words of its text
    prompts (default: the name); see text_row for `reference` and `verified_tower`; `augment`: which
    views of each image feed the bank (AUGMENTS); `fusion_weight`: the segmentor's weight in the class's
    map (fusion_weight_of; the run's weight gives a trained class's rows exactly)."""
    x = torch.from_numpy(np.ascontiguousarray(frames))
    row, tower = text_row(model, info, words or name, defects=defects, clip_weights=clip_weights, reference=reference,
                          verified_tower=verified_tower)
    text = torch.from_numpy(row)
    feat16 = model.encoder(x[:1])[2]  # the prompt image: the first one
    prompt = model.reconstructor.encode_prompt(feat16)[0]
    emb = model.embed_patches(views(x, augment))
    bank = _bank(model, emb)
    held = None if held_out is None else torch.from_numpy(np.ascontiguousarray(held_out))
    check, banks, method = _calibration_set(model, x, held, emb, bank, name)
    run_weight = float(model.segmentor.fusion_weight)
    trained_gains = model.position_gain.clone()  # before _use_rows replaces the run's rows
    profiled = not is_identity(trained_gains)
    weight = fusion_weight_of(run_weight, method, fusion_weight, profiled=profiled)
    check_maps = _distance_maps(model, check, banks)
    plain = normal_stats(check_maps)
    stats = weighted_stats(plain, run_weight, weight)
    gain = (_class_gain(model, method, check_maps, plain, emb, banks, trained_gains) if profiled
            else identity_gain(model.cfg.image_size))
    _use_rows(model, text, feat16, banks, stats, gain)
    scores = _scores(model, check, len(banks))
    return ClassRows(text=text.numpy().astype(np.float32), prompt=prompt.numpy().astype(np.float32),
                     bank=bank.numpy().astype(np.float32), stats=stats.numpy().astype(np.float32),
                     gain=gain.numpy().astype(np.float32),
                     threshold=threshold_of(scores), calibration=method, scores=tuple(float(s) for s in scores),
                     fusion_weight=weight, text_tower_sha256=tower)
