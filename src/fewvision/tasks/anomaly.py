"""Model-level anomaly detection: fit from good images with a calibrated threshold, score files, evaluate.

>>> from fewvision.tasks.anomaly import fit_anomaly, score_files
>>> model = fit_anomaly(["good/"], method="patchcore", backbone="texture", target_false_reject=0.05)
>>> result = score_files(model, ["incoming/"])
>>> result.rows[0]["score"], result.rows[0]["verdict"]

``fit_anomaly`` fits the head on the good images and sets the threshold from good images alone with the conformal
rule (:mod:`fewvision.decide.threshold`): for heads that can score their own training images by a model that did not
see them (PatchCore: K-fold cross-conformal with its default coreset, leave-one-out with every patch kept; PaDiM:
exact leave-one-out) from those scores of every good image, else from a held-out share. ``decision['guarantee']``
says what the threshold promises for new good images exchangeable with the given ones (:func:`guarantee`). Every score - calibration, prediction,
evaluation, a saved and re-loaded model - goes through :func:`_score_chunks`, which calls
:func:`fewvision.anomaly.postprocess.finish`, the only post-processing path.

Patch features are read and written through the feature cache (``encode_files(kind="patch")``, stored as float16)
one chunk of images at a time, so neither fitting nor scoring holds every image's features at once.
"""

from __future__ import annotations

import inspect
import os
import re
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..anomaly import create_anomaly_head
from ..anomaly.base import AnomalyHead
from ..anomaly.postprocess import DEFAULT_SIGMA, finish
from ..backbones import create_backbone
from ..backbones.base import Backbone
from ..decide.threshold import ThresholdError, conformal_threshold, supported_target
from ..defaults import DEFAULT_ANOMALY_BACKBONE
from ..defaults import DEFAULT_ANOMALY_METHOD as DEFAULT_METHOD
from ..features.cache import open_cache
from ..features.encode import encode_files, encode_pixels, patch_kind
from ..io.images import hash_files
from ..io.datasets import GOOD, Dataset, DatasetError, is_mvtec
from ..io.images import iter_image_files
from ..io.tiles import DEFAULT_OVERLAP, StitchedView, TileCutter, Tiling, TilingError, geometry_of
from ..modelfile import FewVisionModel
from ..progress import expect, progress_bar
from ..runtime.preprocess import PreprocessError, steps_of
from .evaluation import AnomalyEvaluation, evaluate_maps, good_label_of, test_items  # noqa: F401
from .rows import AnomalyPredictions, Recorder, anomaly_rows, region_rule, pixel_chunks
from .tiled import TILES_PER_RUN, cut, score_tiled, tiled_predictions

DEFAULT_HOLDOUT_FRACTION = 0.2
DEFAULT_CHUNK_IMAGES = 32
PATCH_CACHE_DTYPE = np.float16
BASELINE_SIZE = (64, 64)  # the median good map kept for heat-map display


def _as_backbone(backbone: str | Backbone, cache_dir: str | None, weights: str | None) -> Backbone:
    return backbone if isinstance(backbone, Backbone) else create_backbone(backbone, cache_dir=cache_dir, weights=weights)


# --- inputs for the heads ----------------------------------------------------------------------------------------
def _patch_chunks(backbone: Backbone, paths: Sequence[str], cache, chunk_images: int, batch_size: int,
                  rec: Recorder, progress: bool, kind: str) -> Iterator[tuple[list[str], torch.Tensor]]:
    for start in range(0, len(paths), chunk_images):
        # progress is counted per chunk by the caller, once the chunk is fitted or scored
        feats = encode_files(backbone, paths[start : start + chunk_images], cache, kind=kind, batch_size=batch_size,
                             workers=0, progress=False, dtype=PATCH_CACHE_DTYPE)
        rec.skipped += feats.skipped
        if feats.paths:
            rec.used += feats.paths
            yield feats.paths, torch.from_numpy(feats.features)


def _head_patch_kind(head: AnomalyHead, backbone: Backbone) -> str:
    # The stages a fitted head was fitted on, else those it asks this backbone for.
    layers = head.feature_layers_ if hasattr(head, "feature_layers_") else (
        head.feature_layers(backbone) if hasattr(head, "feature_layers") else None)
    return patch_kind(layers)


def _check_inputs(head: AnomalyHead) -> None:
    if head.inputs not in ("patches", "pixels", "backbone"):
        raise ValueError(f"{type(head).__name__}.inputs must be 'patches', 'pixels' or 'backbone', "
                         f"got {head.inputs!r}")


def _chunks(head: AnomalyHead, backbone: Backbone, paths: Sequence[str], cache, chunk_images: int, batch_size: int,
            rec: Recorder, progress: bool):
    _check_inputs(head)
    if head.inputs == "patches":
        return _patch_chunks(backbone, paths, cache, chunk_images, batch_size, rec, progress,
                             _head_patch_kind(head, backbone))
    return pixel_chunks(backbone.preprocess, paths, chunk_images, rec, torch.stack)


def _pixel_inputs(head: AnomalyHead, backbone: Backbone, pixels: torch.Tensor) -> torch.Tensor:
    """What :func:`_chunks` gives the head, from images already preprocessed (``pixels`` [N, C, H, W]): patch
    features through the cache's dtype (so the scores are those of a cached run), or the pixels themselves."""
    _check_inputs(head)
    if head.inputs == "patches":
        kind = _head_patch_kind(head, backbone)
        return torch.from_numpy(encode_pixels(backbone, pixels, kind, PATCH_CACHE_DTYPE)).float()
    return pixels


def _score_inputs(head: AnomalyHead, backbone: Backbone, inputs: torch.Tensor, *, size: tuple[int, int],
                  sigma: float, left_out: bool = False, first: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(finished maps [n, H, W], image scores [n]) of one chunk of head inputs: the head, then
    :func:`fewvision.anomaly.postprocess.finish`. ``left_out``: the chunk's images are the head's training images
    from index ``first`` on, each scored as if the head had been fitted without it."""
    with torch.inference_mode():
        raw, scores = (head.score_left_out(inputs, first, backbone) if left_out else head.score(inputs, backbone))
        return finish(head, raw, scores, size, sigma)


def _score_chunks(head: AnomalyHead, backbone: Backbone, paths: Sequence[str], cache, *, size: tuple[int, int],
                  sigma: float, chunk_images: int, batch_size: int, rec: Recorder, progress: bool,
                  left_out: bool = False) -> Iterator[tuple[list[str], torch.Tensor, torch.Tensor]]:
    """(paths, finished maps [n, H, W], image scores [n]) per chunk: the one scoring path. ``left_out``: ``paths``
    are the head's training images in fit order, each scored as if the head had been fitted without it."""
    done = 0
    with progress_bar(len(paths), "scoring", enabled=progress) as advance:
        before = 0
        for ok, inputs in _chunks(head, backbone, paths, cache, chunk_images, batch_size, rec, progress):
            maps, scores = _score_inputs(head, backbone, inputs, size=size, sigma=sigma, left_out=left_out,
                                         first=done)
            done += len(ok)
            yield ok, maps, scores
            advance(done + len(rec.skipped) - before)  # skipped files count as done too
            before = done + len(rec.skipped)
        advance(len(paths) - before)


# --- tiles (--tile; the rules in fewvision.io.tiles) ---------------------------------------------------------------
def _cutter(tiling: Tiling, backbone: Backbone) -> TileCutter:
    try:
        return TileCutter(tiling, steps_of(backbone.preprocess))
    except PreprocessError as err:
        raise TilingError(f"--tile: the preprocessing of {backbone.id} cannot be applied to tiles ({err})") from None


def _tile_runner(head: AnomalyHead, backbone: Backbone, size: tuple[int, int], sigma: float):
    """The torch path's scoring of preprocessed tiles, as :func:`fewvision.tasks.tiled.score_tiled` calls it."""
    def run(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        maps, scores = _score_inputs(head, backbone, _pixel_inputs(head, backbone, torch.from_numpy(pixels)),
                                     size=size, sigma=sigma)
        return maps.numpy(), scores.numpy()

    return run


def _tile_chunks(head: AnomalyHead, backbone: Backbone, cutter: TileCutter, paths: Sequence[str], rec: Recorder
                 ) -> Iterator[tuple[list[str], torch.Tensor]]:
    """:func:`_chunks` for a tiled fit: the head's inputs of every tile of every image, a few tiles at a time (to
    the head each tile is a training image); the image's path comes with its last tiles."""
    for path, _, pixels, _ in cut(cutter, paths, rec):
        for start in range(0, len(pixels), TILES_PER_RUN):
            last = start + TILES_PER_RUN >= len(pixels)
            if last:
                rec.used.append(path)
            tiles = torch.from_numpy(pixels[start : start + TILES_PER_RUN])
            yield ([path] if last else []), _pixel_inputs(head, backbone, tiles)


# --- fit ------------------------------------------------------------------------------------------------------
def _head(method: str, seed: int, params: dict) -> AnomalyHead:
    from ..anomaly import anomaly_head_classes

    classes = anomaly_head_classes()
    if method not in classes:
        return create_anomaly_head(method, **params)  # raises the "unknown method" error
    accepted = inspect.signature(classes[method].__init__).parameters
    if "seed" in accepted and "seed" not in params:
        params = {**params, "seed": seed}
    unknown = sorted(set(params) - set(accepted) - {"self"})
    if unknown:
        raise ValueError(f"method '{method}' has no parameter(s) {', '.join(unknown)}; it accepts "
                         f"{', '.join(p for p in accepted if p != 'self')}")
    return create_anomaly_head(method, **params)


def _split(n: int, holdout_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    n_hold = min(n - 1, max(1, int(round(n * holdout_fraction))))
    return np.sort(order[n_hold:]), np.sort(order[:n_hold])


MIN_LEAVE_ONE_OUT_IMAGES = 3  # PaDiM's leave-one-out covariance needs n - 2 >= 1
GOOD_FOLDER_NAMES = ("good", "ok", "nominal", "normal")
_DEFECT_WORDS = re.compile(r"defect|anomal|\bng\b|bad|fail|reject|scratch|crack|dent|stain|hole|broken|contamin|spot|"
                           r"damage|flaw|missing|bent|\bcut\b|burr|chip|fault|local|global|faulty|tear|crease", re.I)


class LayoutError(DatasetError):
    """A folder given as good images whose layout says it is not only good images."""


def good_images(inputs: Sequence[str | os.PathLike], all_subfolders: bool = False) -> tuple[list[str], list[str]]:
    """(image paths, one line per input saying what was used) for the good images of ``anomaly fit``.

    A file is used as it is. A folder: an MVTec AD category gives its ``train/good``; a folder with one sub-folder
    named good / ok / nominal / normal gives that one; a folder whose sub-folders look like defect classes is
    refused (``all_subfolders`` takes every image anyway); any other folder gives every image below it.
    """
    paths: list[str] = []
    used: list[str] = []
    for item in inputs:
        folder = Path(item)
        chosen, why = folder, "every image below it"
        if folder.is_dir() and not all_subfolders:
            subs = sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
            good_subs = [d for d in subs if d.name.lower() in GOOD_FOLDER_NAMES]
            if is_mvtec(folder):
                chosen, why = folder / "train" / GOOD, "MVTec AD layout: its train/good"
            elif len(good_subs) == 1:
                others = [d.name + "/" for d in subs if d != good_subs[0]]
                chosen = good_subs[0]
                why = f"its {chosen.name}/ folder" + (f" (not {', '.join(others)})" if others else "")
            else:
                defect_like = [d.name + "/" for d in subs if _DEFECT_WORDS.search(d.name)]
                if defect_like:
                    raise LayoutError(
                        f"{folder}: its sub-folders {', '.join(defect_like)} look like defect classes, not good "
                        "images; give the folder of good images, or --all-subfolders to fit on every image")
        found = [str(p) for p in iter_image_files([chosen])]
        paths += found
        used.append(f"{chosen}: {len(found)} image(s), {why}" if folder.is_dir() else f"{chosen}")
    return paths, used


def guarantee(decision: dict) -> str:
    """One sentence on what a model's threshold promises for new good parts (exchangeable with the good images).

    Split conformal and exact leave-one-out: at most the target. K-fold cross-conformal (PatchCore with a coreset):
    the threshold is the conformal quantile of scores each computed by a coreset fitted without the image's fold;
    what is proven (Barber et al. 2021, Theorem 4) is ``2 * target + min(2(1 - 1/K)/(n/K + 1), (1 - K/n)/(K + 1))``
    for a part rejected only when *every* fold coreset scores it above the threshold - not for the shipped coreset
    of all ``n`` images, whose realised rate is measured (docs/benchmarks.md) and typically about the target.
    """
    n, target = decision["n_calibration"], decision["target_false_reject"]
    if decision.get("calibration") == "cross-conformal":
        from ..anomaly.patchcore import cross_conformal_bound

        k = int(decision["calibration_folds"])
        worst = cross_conformal_bound(target, n, k)
        return (f"set on {n} good images ({k}-fold cross-conformal: each scored by a coreset fitted without its fold) "
                f"for a target of {target:.3g} of good parts rejected: about {target:.3g} in practice (measured on "
                f"benchmark images, not proven, for this model fitted on all {n}); proven at most {worst:.3g} only for a part rejected when "
                f"all {k} fold coresets score it above the threshold (Barber et al. 2021)")
    how = ("each scored by the model fitted without it" if decision.get("calibration") == "leave-one-out conformal"
           else "held out from fitting")
    return f"set on {n} good images ({how}) so that at most {target:.3g} of good parts are rejected"


def fit_anomaly(
    good: Sequence[str | os.PathLike] | str | os.PathLike,
    method: str = DEFAULT_METHOD,
    backbone: str | Backbone = DEFAULT_ANOMALY_BACKBONE,
    *,
    target_false_reject: float = 0.01,
    holdout_fraction: float = DEFAULT_HOLDOUT_FRACTION,
    seed: int = 0,
    sigma: float = DEFAULT_SIGMA,
    weights: str | None = None,
    cache_dir: str | None = None,
    use_cache: bool = True,
    progress: bool = False,
    batch_size: int = 16,
    chunk_images: int = DEFAULT_CHUNK_IMAGES,
    all_subfolders: bool = False,
    shots: int | None = None,
    min_region_area: float = 0.0,
    tile: int | None = None,
    tile_overlap: float = DEFAULT_OVERLAP,
    **params: Any,
) -> FewVisionModel:
    """Fit ``method`` on good images (files and/or folders, see :func:`good_images` for layouts) and set its
    threshold from good images alone.

    Heads that can score their own training images by a model fitted without them (PatchCore with a coreset: the
    coreset of the image's cross-validation fold, drawn from the other folds' patches; PatchCore with every patch
    kept: the bank without the image's own patches; PaDiM: exactly, from the Gaussians without the image) fit on
    *every* good image, and those scores set the conformal threshold, so every image both fits and calibrates. Other heads
    hold out ``holdout_fraction`` of the images (seeded) for split-conformal calibration. The threshold is the
    ``ceil((n + 1)(1 - target))``-th smallest calibration score; when ``n`` scores cannot support the target, the
    tightest target they support (1 / (n + 1)) is used and ``decision['target_note']`` says so.

    ``shots``: the few-shot setting (AnomalyDINO's k good images): the head is fitted on ``shots`` good images
    (a seeded draw) and every other good image calibrates the threshold (split conformal); with no other image the
    ``shots`` images calibrate it leave-one-out, where the head can.

    ``min_region_area``: defect regions (the map's connected parts above the threshold, reported with every row)
    smaller than this many image pixels are left out of the rows; the verdict does not depend on it.

    ``tile``: score high-resolution images tile by tile at their native resolution (``tile`` pixels a side,
    neighbours overlapping by ``tile_overlap`` of a tile; :mod:`fewvision.io.tiles`): the head is fitted on every
    tile of the fitting images, and the threshold is set on whole held-out images (split conformal on their image
    scores), since a tile's overlapping neighbours would stay in the fit if it alone were left out.
    """
    if isinstance(good, (str, os.PathLike)):
        good = [good]
    paths, sources = good_images(good, all_subfolders)
    if not paths:
        raise ValueError(f"no good images found in {', '.join(map(str, good)) or '(nothing given)'}")
    if not 0 < holdout_fraction < 1:
        raise ValueError(f"holdout_fraction must be in (0, 1), got {holdout_fraction}")
    if not 0 < target_false_reject < 1:
        raise ThresholdError(f"the target false-reject rate must be in (0, 1), got {target_false_reject}")
    if not min_region_area >= 0:
        raise ValueError(f"min_region_area must be >= 0 image pixels, got {min_region_area}")
    if tile:  # a method's defaults for tiled fits (PatchCore: its paper's 1 % coreset), under the user's own params
        from ..anomaly import anomaly_head_classes

        params = {**getattr(anomaly_head_classes().get(method), "tiled_defaults", {}), **params}
    head = _head(method, seed, dict(params))
    tiling = Tiling(int(tile), float(tile_overlap), "map_max" if getattr(head, "image_score", "head") == "map_max"
                    else "tile_max") if tile else None
    left_out = bool(getattr(head, "leave_one_out", False)) and tiling is None
    if shots is not None:
        if not 1 <= int(shots) <= len(paths):
            raise ValueError(f"shots must be in 1..{len(paths)} (the good images found), got {shots}")
        order = np.random.default_rng(seed).permutation(len(paths))
        fit_paths = [paths[i] for i in sorted(order[: int(shots)])]
        hold_paths = [paths[i] for i in sorted(order[int(shots):])]
        left_out = left_out and not hold_paths
        if not hold_paths and not left_out:
            raise ValueError(f"{method} with shots={shots} needs more good images than shots: the others set the "
                             "threshold")
        if left_out and len(fit_paths) < MIN_LEAVE_ONE_OUT_IMAGES:
            raise ValueError(f"shots={shots} of {len(paths)} good images leave none to set the threshold; give at "
                             f"least {MIN_LEAVE_ONE_OUT_IMAGES} good images")
    elif left_out:
        if len(paths) < MIN_LEAVE_ONE_OUT_IMAGES:
            raise ValueError(f"{method} needs at least {MIN_LEAVE_ONE_OUT_IMAGES} good images, got {len(paths)}")
        fit_paths, hold_paths = paths, []
    else:
        if len(paths) < 2:
            raise ValueError(f"{method} needs at least 2 good images (one to fit, one to set the threshold)")
        fit_idx, hold_idx = _split(len(paths), holdout_fraction, seed)
        fit_paths, hold_paths = [paths[i] for i in fit_idx], [paths[i] for i in hold_idx]
    bb = _as_backbone(backbone, cache_dir, weights)
    cache = open_cache(bb.id, cache_dir, enabled=use_cache)
    size = tuple(int(v) for v in bb.input_size)

    cutter = _cutter(tiling, bb) if tiling else None
    cal_count = len(fit_paths) if left_out else len(hold_paths)
    expect(len(fit_paths) + cal_count)
    fit_rec = Recorder()
    with progress_bar(len(fit_paths), "fitting", enabled=progress) as advance:
        def counted():
            chunks = _tile_chunks(head, bb, cutter, fit_paths, fit_rec) if cutter else \
                _chunks(head, bb, fit_paths, cache, chunk_images, batch_size, fit_rec, progress)
            for ok, x in chunks:
                yield x
                advance(len(ok))
            advance(len(fit_rec.skipped))

        if head.inputs == "patches":
            def stream():
                yield from counted()
                if not fit_rec.used:
                    raise ValueError(_none_readable(fit_paths, fit_rec))

            head.fit(stream(), bb)
        else:
            parts = list(counted())
            if not parts:
                raise ValueError(_none_readable(fit_paths, fit_rec))
            head.fit(torch.cat(parts), bb)
    if not fit_rec.used:
        raise ValueError(_none_readable(fit_paths, fit_rec))

    cal_rec = Recorder()
    cal_scores, cal_peaks, small_maps = [], [], []
    cal_paths = list(fit_rec.used) if left_out else hold_paths  # fit order, as score_left_out expects
    if cutter:
        with progress_bar(len(cal_paths), "scoring", enabled=progress) as advance:
            for _, stitched, score in score_tiled(cutter, _tile_runner(head, bb, size, sigma), cal_paths, cal_rec):
                cal_scores.append(np.array([score]))
                cal_peaks.append(np.array([float(stitched.max())]))
                small_maps.append(F.adaptive_avg_pool2d(torch.from_numpy(stitched)[None, None], BASELINE_SIZE)[:, 0])
                advance(1)
    else:
        for _, maps, scores in _score_chunks(head, bb, cal_paths, cache, size=size, sigma=sigma,
                                             chunk_images=chunk_images, batch_size=batch_size, rec=cal_rec,
                                             progress=progress, left_out=left_out):
            cal_scores.append(scores.double().numpy())
            cal_peaks.append(maps.amax(dim=(1, 2)).double().numpy())
            small_maps.append(F.adaptive_avg_pool2d(maps[:, None], BASELINE_SIZE)[:, 0])
    calibration = "split conformal"
    if left_out:
        calibration = head.left_out_calibration() if hasattr(head, "left_out_calibration") else \
            "leave-one-out conformal"
    folds = (len({head.calibration_fold(i) for i in range(len(fit_rec.used))})
             if calibration == "cross-conformal" else None)
    head.release_fit_data()  # what only the calibration scores needed (also when --shots left other images for them)
    cal = np.concatenate(cal_scores) if cal_scores else np.zeros(0)
    if len(cal) == 0:
        raise ValueError(f"none of the {len(cal_paths)} held-out good image(s) could be read to set the threshold")
    target, note = supported_target(target_false_reject, len(cal))
    threshold = conformal_threshold(cal, target)
    # Defect regions are the map's parts above a map threshold set by the same rule on the same good images' map
    # maxima: the image score need not be the map's maximum, nor on its scale (GANomaly scores its latent code,
    # PatchCore its largest patch distance before the map is smoothed), and a good image then shows a region with
    # the target's probability.
    region_threshold = conformal_threshold(np.concatenate(cal_peaks), target)
    # Heat maps show each pixel's excess over the median map of the good images, so what every good image has
    # (a brighter frame where the features see the image border, a lighting gradient) does not light up; the
    # colour range runs from no excess to twice the largest excess of a good image.
    small = torch.cat(small_maps)
    baseline = small.median(dim=0).values
    hottest = float((small - baseline).amax())
    decision = {
        "threshold": threshold,
        "rule": "score > threshold",
        "calibration": calibration,
        "target_false_reject": float(target),
        "requested_false_reject": float(target_false_reject),
        "n_calibration": int(len(cal)),
        "calibration_scores": sorted(float(v) for v in cal),
        "sigma": float(sigma),
        "map_size": list(size),
        "heatmap_baseline": [[round(float(v), 6) for v in row] for row in baseline.tolist()],
        "heatmap_range": [0.0, 2.0 * max(hottest, 1e-12)],
        "region_threshold": region_threshold,
        "min_region_area": float(min_region_area),
    }
    if tiling:
        decision["tiling"] = tiling.as_dict()
    if folds is not None:
        decision["calibration_folds"] = folds
    if shots is not None:
        decision["shots"] = int(shots)
    elif not left_out:
        decision["holdout_fraction"] = float(holdout_fraction)
    if note:
        decision["target_note"] = note
    decision["guarantee"] = guarantee(decision)
    fit_shas, _ = hash_files(fit_rec.used)
    info = {
        "method": method,
        "seed": int(seed),
        "good_sources": sources,
        "fitted_on_sha256": [s for s in fit_shas if s],
        "n_fit_images": len(fit_rec.used),
        "n_calibration_images": int(len(cal)),
        "skipped": [f"{s.path}: {s.reason}" for s in (fit_rec.skipped + cal_rec.skipped)[:20]],
        "n_skipped": len(fit_rec.skipped) + len(cal_rec.skipped),
    }
    model = FewVisionModel(head, bb.spec, bb.id, task="anomaly", decision=decision, info=info)
    return model.bind(bb)


def _none_readable(paths: Sequence[str], rec: Recorder) -> str:
    first = f" (first: {rec.skipped[0].path}: {rec.skipped[0].reason})" if rec.skipped else ""
    return f"none of the {len(paths)} good image(s) to fit on could be read{first}"


def rethreshold(model: FewVisionModel, target_false_reject: float) -> FewVisionModel:
    """A new conformal threshold from the stored calibration scores of good images (no refit)."""
    cal = model.decision.get("calibration_scores")
    if not cal:
        raise ThresholdError("this model stores no calibration scores of good images to set a threshold from")
    target, note = supported_target(target_false_reject, len(cal))
    decision = {k: v for k, v in model.decision.items() if k != "target_note"}
    decision.update({"threshold": conformal_threshold(cal, target), "target_false_reject": float(target),
                     "requested_false_reject": float(target_false_reject)})
    if note:
        decision["target_note"] = note
    decision["guarantee"] = guarantee(decision)
    model.decision = decision
    return model


def can_update(model: FewVisionModel) -> bool:
    """Whether a model's head takes new good images without a refit (PatchCore and AnomalyDINO: their memory
    banks; PaDiM: its Gaussians)."""
    return callable(getattr(model.head, "partial_fit", None))


def update(model: FewVisionModel, paths: Sequence[str], *, cache_dir: str | None = None,
           use_cache: bool = True) -> FewVisionModel:
    """A new model: ``model`` with good images added to its memory without a refit; the threshold is kept (it was
    calibrated without them, so it stays on the safe side for images like the old ones)."""
    if not can_update(model):
        raise ValueError(f"method '{model.head.method}' cannot take new good images without a refit")
    import copy

    bb = model.backbone(cache_dir=cache_dir)
    head = copy.deepcopy(model.head)
    rec = Recorder()
    tiling = Tiling.of(model.decision)
    chunks = _tile_chunks(head, bb, _cutter(tiling, bb), list(paths), rec) if tiling else \
        _chunks(head, bb, list(paths), open_cache(bb.id, cache_dir, enabled=use_cache), DEFAULT_CHUNK_IMAGES, 16, rec,
                False)
    for _, x in chunks:
        head.partial_fit(x, bb)
    shas, _ = hash_files(rec.used)
    info = {**model.info, "fitted_on_sha256": model.info.get("fitted_on_sha256", []) + [s for s in shas if s],
            "n_added": model.info.get("n_added", 0) + len(rec.used)}
    return FewVisionModel(head, model.backbone_spec, model.backbone_id, "anomaly", dict(model.decision), info,
                          _backbone=bb)


# --- scoring --------------------------------------------------------------------------------------------------
def _settings(model: FewVisionModel, backbone: Backbone) -> tuple[tuple[int, int], float]:
    size = model.decision.get("map_size") or list(backbone.input_size)
    return (int(size[0]), int(size[1])), float(model.decision.get("sigma", DEFAULT_SIGMA))


def map_geometry(model: FewVisionModel, *, cache_dir: str | None = None, weights: str | None = None):
    """What places the model's maps on its images (:func:`fewvision.io.tiles.geometry_of`): the backbone's
    preprocessing, or a tiled model's stitched geometry."""
    bb = model.backbone(cache_dir=cache_dir, weights=weights)
    return geometry_of(model.decision, bb.preprocess, _settings(model, bb)[0])


def score_files(
    model: FewVisionModel,
    inputs: Sequence[str | os.PathLike],
    *,
    keep_maps: bool = True,
    review_band: float = 0.0,
    weights: str | None = None,
    cache_dir: str | None = None,
    use_cache: bool = True,
    progress: bool = False,
    batch_size: int = 16,
    chunk_images: int = DEFAULT_CHUNK_IMAGES,
) -> AnomalyPredictions:
    """Score image files and/or folders; unreadable files are skipped with their reason.

    Each row: path, score, threshold, ``normalized_score`` (score / threshold, method-independent: above 1 is over
    the threshold), ``verdict`` (ok / ng, or review within ``review_band`` of the threshold), ``x`` / ``y`` (where
    the map peaks, in the image's own pixels) and ``time`` (UTC)."""
    if model.task != "anomaly":
        raise ValueError(f"this is a {model.task} model, not an anomaly model")
    if review_band < 0:
        raise ValueError(f"the review band must be >= 0, got {review_band}")
    paths = [str(p) for p in iter_image_files(inputs)]
    expect(len(paths))
    return _score_paths(model, paths, keep_maps=keep_maps, weights=weights, cache_dir=cache_dir, use_cache=use_cache,
                        progress=progress, batch_size=batch_size, chunk_images=chunk_images, review_band=review_band)


def _score_paths(model: FewVisionModel, paths: Sequence[str], *, keep_maps: bool, weights: str | None,
                 cache_dir: str | None, use_cache: bool, progress: bool, batch_size: int,
                 chunk_images: int, review_band: float = 0.0) -> AnomalyPredictions:
    bb = model.backbone(cache_dir=cache_dir, weights=weights)
    size, sigma = _settings(model, bb)
    threshold = model.decision.get("threshold")
    rec = Recorder()
    tiling = Tiling.of(model.decision)
    if tiling:
        with progress_bar(len(paths), "scoring", enabled=progress) as advance:
            rows, maps = tiled_predictions(_cutter(tiling, bb), _tile_runner(model.head, bb, size, sigma), paths,
                                           rec, view=StitchedView(tiling, size), threshold=threshold,
                                           review_band=review_band, regions=region_rule(model.decision),
                                           keep_maps=keep_maps, advance=advance)
        return AnomalyPredictions(rows, maps if keep_maps else None, threshold, rec.skipped)
    cache = open_cache(bb.id, cache_dir, enabled=use_cache)
    rows, maps = [], []
    for ok, m, s in _score_chunks(model.head, bb, paths, cache, size=size, sigma=sigma, chunk_images=chunk_images,
                                  batch_size=batch_size, rec=rec, progress=progress):
        rows += anomaly_rows(ok, m.numpy(), s.numpy(), bb.preprocess, size, threshold, review_band,
                             region_rule(model.decision))
        if keep_maps:
            maps.append(m.numpy().astype(np.float32, copy=False))
    stacked = (np.concatenate(maps) if maps else np.zeros((0, *size), np.float32)) if keep_maps else None
    return AnomalyPredictions(rows, stacked, threshold, rec.skipped)


def score_pixels(model: FewVisionModel, paths: Sequence[str], pixels: torch.Tensor, *, review_band: float = 0.0,
                 weights: str | None = None, cache_dir: str | None = None) -> AnomalyPredictions:
    """The rows of :func:`score_files` for images already decoded and preprocessed (``pixels`` [N, C, H, W] from
    the backbone's ``preprocess``, in the order of ``paths``; no maps kept, no cache): the same head and
    post-processing, for callers that decode elsewhere (``fewvision batch`` on Ray)."""
    if model.task != "anomaly":
        raise ValueError(f"this is a {model.task} model, not an anomaly model")
    if Tiling.of(model.decision):
        raise TilingError("a model fitted with --tile scores image files (its tiles are cut from the full image), "
                          "not preprocessed whole images")
    bb = model.backbone(cache_dir=cache_dir, weights=weights)
    size, sigma = _settings(model, bb)
    threshold = model.decision.get("threshold")
    if not len(paths):
        return AnomalyPredictions([], None, threshold)
    maps, scores = _score_inputs(model.head, bb, _pixel_inputs(model.head, bb, pixels), size=size, sigma=sigma)
    return AnomalyPredictions(anomaly_rows(paths, maps.numpy(), scores.numpy(), bb.preprocess, size, threshold,
                                            review_band, region_rule(model.decision)), None, threshold)


# --- evaluation -----------------------------------------------------------------------------------------------
def evaluate_anomaly(
    model: FewVisionModel,
    dataset: Dataset | str | os.PathLike,
    *,
    good_label: str | None = None,
    recall: float = 0.95,
    n_bootstrap: int = 1000,
    seed: int = 0,
    weights: str | None = None,
    cache_dir: str | None = None,
    use_cache: bool = True,
    progress: bool = False,
    batch_size: int = 16,
    chunk_images: int = DEFAULT_CHUNK_IMAGES,
) -> AnomalyEvaluation:
    """:func:`fewvision.tasks.evaluation.evaluate_maps` with this model's torch scoring."""
    bb = model.backbone(cache_dir=cache_dir, weights=weights)
    size, _ = _settings(model, bb)

    def score(paths):
        return _score_paths(model, paths, keep_maps=True, weights=weights, cache_dir=cache_dir, use_cache=use_cache,
                            progress=progress, batch_size=batch_size, chunk_images=chunk_images)

    return evaluate_maps(model, dataset, score, geometry_of(model.decision, bb.preprocess, size),
                         good_label=good_label, recall=recall, n_bootstrap=n_bootstrap, seed=seed)


__all__ = ["fit_anomaly", "score_files", "evaluate_anomaly", "rethreshold", "AnomalyPredictions",
           "AnomalyEvaluation", "DEFAULT_ANOMALY_BACKBONE", "good_label_of", "test_items"]
