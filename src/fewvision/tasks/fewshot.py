"""Few-shot models end to end: fit a head on a few labelled images, calibrate it, save it, predict, evaluate.

>>> model = fit("textile", "prototype", backbone="texture", shots=8, calibrate_fraction=0.2, alpha=0.1)
>>> save_model("textile.fvm", model)
>>> predict(load("textile.fvm"), ["new_photos/"], abstain=True).labels
"""

from __future__ import annotations

import inspect
import os
from typing import Any, Sequence

import numpy as np
import torch

from ..backbones.base import Backbone, BackboneError
from ..decide.calibration import METHOD as CALIBRATION_METHOD
from ..decide.calibration import choose_temperature, mean_nll
from ..decide.conformal import calibrate_conformal
from ..features.encode import GLOBAL, Features, encode_pixels
from ..io.images import hash_files
from ..heads import ClassifierHead, create_head
from ..heads.base import _to_json
from ..heads.support import Support
from ..io.datasets import Dataset, Item, load_dataset, sample_shots, stratified_split
from ..io.images import BadImage, Skipped, iter_image_files, load_image
from ..modelfile import FewVisionModel, load, save_model
from ..progress import expect, progress_bar
from .evaluation import evaluate_classes
from .rows import Scored, predictions  # noqa: F401 - predictions: its home before tasks.rows
from .common import as_backbone, encode, predictions_from
from .rows import Evaluation, Predictions, evaluate_predictions

IMAGES = "images"  # the feature kind of heads that predict from PIL images (``predict_proba_images``)
IMAGE_CHUNK = 64  # images decoded at a time for such heads, to bound memory


def feature_kind(head: ClassifierHead) -> str:
    """What a head predicts from: a cached feature kind ('global' unless the head says otherwise, e.g. pre-projection
    features) or 'images' (heads that adapt the towers and take PIL images through ``predict_proba_images``)."""
    return getattr(head, "feature_kind", GLOBAL)


def head_scores(head: ClassifierHead, features: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities as ``head.predict_proba`` gives them, float64 log-softmax of the same logits)."""
    head._check_fitted()
    feats = torch.as_tensor(np.asarray(features), dtype=torch.float32)
    with torch.inference_mode():
        logits = head.logits(feats).double()
        return torch.softmax(logits, dim=-1).float().numpy(), torch.log_softmax(logits, dim=-1).numpy()


def images_proba(head: ClassifierHead, backbone: Backbone, paths: Sequence[str], progress: bool = False) -> Scored:
    """Probabilities from a head that takes PIL images, decoding ``IMAGE_CHUNK`` files at a time."""
    shas, bad = hash_files(paths)
    skipped = [Skipped(paths[i], why) for i, why in bad.items()]
    ok, chunks, pending = [], [], []

    with progress_bar(len(paths), "scoring", enabled=progress) as advance:
        def flush():
            if pending:
                chunks.append(head.predict_proba_images(backbone, [im for _, im in pending]))
                ok.extend(i for i, _ in pending)
                advance(len(pending))
                pending.clear()

        for i, path in enumerate(paths):
            if i in bad:
                advance(1)
                continue
            try:
                pending.append((i, load_image(path)))
            except BadImage as err:
                skipped.append(Skipped(path, err.reason))
                advance(1)
            if len(pending) >= IMAGE_CHUNK:
                flush()
        flush()
    proba = np.concatenate(chunks) if chunks else np.zeros((0, len(head.class_names_)), dtype=np.float32)
    return Scored([paths[i] for i in ok], [shas[i] for i in ok], proba, skipped, len(ok))


def score_files(head: ClassifierHead, backbone: Backbone, paths: Sequence[str], *, cache_dir: str | None = None,
                use_cache: bool = True, progress: bool = False, description: str = "encoding") -> Scored:
    """A head's raw probabilities for image files: from cached features of its kind, or from the images."""
    kind = feature_kind(head)
    if kind == IMAGES:
        return images_proba(head, backbone, list(paths), progress)
    feats = encode(backbone, list(paths), kind, cache_dir=cache_dir, use_cache=use_cache, progress=progress,
                   description=description)
    if not feats.paths:
        return Scored([], [], np.zeros((0, len(head.class_names_)), np.float32), feats.skipped, feats.encoded)
    proba, log_proba = head_scores(head, feats.tensor)
    return Scored(feats.paths, feats.shas, proba, feats.skipped, feats.encoded, log_proba)


def score_pixels(head: ClassifierHead, backbone: Backbone, paths: Sequence[str], pixels: torch.Tensor) -> Scored:
    """A head's raw probabilities for images already decoded and preprocessed (``pixels`` [N, C, H, W] from
    ``backbone.preprocess``, in the order of ``paths``): :func:`score_files` without the files, for callers that
    decode elsewhere (``fewvision batch`` on Ray). Heads that take PIL images (kind 'images') are scored from their
    files with :func:`score_files`."""
    kind = feature_kind(head)
    if kind == IMAGES:
        raise ValueError(f"method '{head.method}' predicts from PIL images, not preprocessed ones: use score_files")
    if not len(paths):
        return Scored([], [], np.zeros((0, len(head.class_names_)), np.float32))
    feats = torch.from_numpy(np.ascontiguousarray(encode_pixels(backbone, pixels, kind), dtype=np.float32))
    proba, log_proba = head_scores(head, feats)
    return Scored(list(paths), [None] * len(paths), proba, [], len(paths), log_proba)


def make_head(method: str, seed: int = 0, **params) -> ClassifierHead:
    """A registered head; ``seed`` is passed to heads that take one (zero-shot has nothing random)."""
    from ..heads import head_classes

    cls = head_classes().get(method)
    if cls is not None and "seed" in inspect.signature(cls.__init__).parameters:
        params["seed"] = seed
    return create_head(method, **params)


# Text heads that take an image given as several vectors (BLIP-2's query embeddings): each class scored by its
# best-matching vector (zeroshot), or the LMM's answer mapped onto the classes (slac, tlac).
MULTI_VECTOR_TEXT_HEADS = ("zeroshot", "slac", "tlac", "tip", "tip-f", "clip-adapter")


def check_text(head: ClassifierHead, backbone: Backbone) -> None:
    if head.needs_text and not backbone.has_text:
        raise BackboneError(f"method '{head.method}' needs a text tower, which backbone '{backbone.spec}' lacks; "
                            "use a CLIP backbone or an image-only method (prototype, linear)")
    if head.needs_text and getattr(backbone, "image_vectors", 1) > 1 and head.method not in MULTI_VECTOR_TEXT_HEADS:
        raise BackboneError(f"method '{head.method}' combines one image vector with the text's, and backbone "
                            f"'{backbone.spec}' gives {backbone.image_vectors} per image (BLIP-2's queries); use "
                            f"{', '.join(MULTI_VECTOR_TEXT_HEADS)} or an image-only method (prototype, linear)")


def as_dataset(data: Dataset | str | os.PathLike | Sequence[str | os.PathLike],
               labels: Sequence[str] | None = None) -> Dataset:
    """A Dataset from a Dataset, a dataset source ('textile', CSV, folder) or image paths with their labels."""
    if isinstance(data, Dataset):
        return data
    if isinstance(data, (str, os.PathLike)):
        if labels is not None:
            raise ValueError("labels are only taken with a list of image paths, not with a dataset source")
        return load_dataset(data)
    paths = [str(p) for p in data]
    if labels is None or len(labels) != len(paths):
        raise ValueError(f"{len(paths)} image paths need as many labels, got {0 if labels is None else len(labels)}")
    classes = sorted({str(lab) for lab in labels})
    if len(classes) < 2:
        raise ValueError(f"at least two classes are needed, got {classes}")
    return Dataset("images", [Item(p, str(lab)) for p, lab in zip(paths, labels)], classes, "list")


def fit(
    data: Dataset | str | os.PathLike | Sequence[str | os.PathLike],
    method: str,
    backbone: str | Backbone,
    shots: int | None = None,
    seed: int = 0,
    *,
    labels: Sequence[str] | None = None,
    weights: str | None = None,
    calibrate_fraction: float = 0.0,
    alpha: float | None = None,
    conformal: str = "lac",
    mondrian: bool = False,
    good: Sequence[str | os.PathLike] | None = None,
    good_method: str = "padim",
    meta: FewVisionModel | str | os.PathLike | None = None,
    synthetic: FewVisionModel | str | os.PathLike | None = None,
    synthetic_per_class: int = 8,
    cache_dir: str | None = None,
    use_cache: bool = True,
    progress: bool = False,
    **params: Any,
) -> FewVisionModel:
    """Fit ``method`` on ``shots`` images per class (all when None) of the train split (or the whole dataset).

    With ``meta`` (a model from :func:`fewvision.tasks.meta.meta_train_model`) the head keeps that model's
    meta-trained embedding and learns only the new classes' prototypes, on the meta model's backbone.

    With ``good`` (folders and/or files of good images) an anomaly model (``good_method``) is fitted on them with
    the same backbone, and the head learns from its map statistics and map-weighted patch features as well as the
    image features (:class:`fewvision.heads.with_good.WithGoodImages`).

    With ``synthetic`` (a fitted gcpl or comple model), ``synthetic_per_class`` images per class generated from its
    learned class tokens join the support set (:func:`fewvision.diffusion.generate.synthesize`).

    With ``calibrate_fraction`` > 0 a seeded, stratified share of those images is held out (never used for fitting)
    to fit the temperature and, with ``alpha``, split-conformal thresholds (``conformal`` 'lac' or 'aps',
    ``mondrian`` for per-class thresholds); see :func:`calibrate`.
    """
    dataset = as_dataset(data, labels)
    if not 0.0 <= calibrate_fraction < 1.0:
        raise ValueError(f"calibrate fraction must be in [0, 1), got {calibrate_fraction}")
    if alpha is not None and calibrate_fraction <= 0:
        raise ValueError("conformal prediction sets (--alpha) need held-out calibration images: "
                         "give --calibrate-fraction (e.g. 0.3)")
    if shots is not None and shots < 1:
        raise ValueError(f"shots must be >= 1, got {shots}")
    head = make_head(method, seed, **params)
    if meta is not None:
        meta = meta if isinstance(meta, FewVisionModel) else load(meta, cache_dir)
        if meta.head.method != method or not hasattr(meta.head, "adopt"):
            raise ValueError(f"the meta-trained model is a {meta.head.method} model: fit it with --method "
                             f"{meta.head.method}")
        spec = backbone.spec if isinstance(backbone, Backbone) else backbone
        if spec is not None and spec != meta.backbone_spec:
            raise ValueError(f"the meta-trained model was trained on backbone '{meta.backbone_spec}', not '{spec}': "
                             "its embedding only fits those features")
        bb = meta.backbone(cache_dir, weights) if not isinstance(backbone, Backbone) else meta.bind(backbone)._backbone
        head.adopt(meta.head, {"from": "meta-trained", "base_classes": list(meta.head.class_names_)})
    else:
        bb = as_backbone(backbone, cache_dir, weights)
    check_text(head, bb)
    anomaly_info = None
    if good:
        from ..heads.with_good import WithGoodImages, check_inner
        from .anomaly import fit_anomaly

        check_inner(head)  # before any fitting
        good_model = fit_anomaly(list(good), good_method, bb, seed=seed, cache_dir=cache_dir, use_cache=use_cache,
                                 progress=progress)
        head = WithGoodImages(head, good_model.head, good_model.decision)
        anomaly_info = {"method": good_method, "n_good_images": good_model.info.get("n_fit_images"),
                        "threshold": good_model.decision["threshold"]}

    y = dataset.labels
    pool = np.arange(len(dataset))
    if dataset.has_splits:
        pool = np.array([i for i, it in enumerate(dataset.items) if it.split == "train"], dtype=np.int64)
        if len(pool) == 0:
            raise ValueError(f"{dataset.name}: the dataset has splits but no 'train' split to fit on")
    calib = np.zeros(0, dtype=np.int64)
    if calibrate_fraction > 0:
        keep, held = stratified_split(y[pool], calibrate_fraction, seed)
        pool, calib = pool[keep], pool[held]
    chosen = sample_shots(y, shots, seed, pool) if shots else pool
    paths, labels = [dataset.paths[i] for i in chosen], list(y[chosen])
    synthetic_info = None
    if synthetic is not None:
        from ..diffusion.generate import synthesize

        source = synthetic if isinstance(synthetic, FewVisionModel) else load(synthetic, cache_dir)
        unknown = sorted(set(source.head.class_names_) - set(dataset.class_names))
        if unknown:
            raise ValueError(f"the synthetic-image model knows class(es) {', '.join(unknown)} that {dataset.name} "
                             "does not have")
        drawn = synthesize(source, synthetic_per_class, seed=seed, cache_dir=cache_dir)
        paths += [p for p, _ in drawn]
        labels += [dataset.class_names.index(c) for _, c in drawn]
        synthetic_info = {"method": source.head.method, "per_class": int(synthetic_per_class),
                          "n_images": len(drawn), "classes": list(source.head.class_names_)}
    expect(len(paths) + len(calib))
    support = Support.from_files(bb, paths, labels, dataset.class_names, cache_dir=cache_dir, use_cache=use_cache,
                                 progress=progress,
                                 captions={it.path: it.caption for it in dataset.items if it.caption})
    head.fit(support)

    shas, _ = hash_files(support.paths)
    info = {"method": method, "params": _to_json(head.get_params()), "shots": shots, "seed": seed,
            "dataset": dataset.name, "class_names": list(dataset.class_names), "n_support": len(support.paths),
            "support_counts": np.bincount(support.labels.numpy(), minlength=support.n_classes).tolist(),
            "fitted_on_sha256": [s for s in shas if s], "n_trainable_parameters": head.n_trainable_parameters(),
            "skipped": [f"{s.path}: {s.reason}" for s in support.skipped][:20], "n_skipped": len(support.skipped)}
    if anomaly_info:
        info["good_images"] = anomaly_info
    if synthetic_info:
        info["synthetic"] = synthetic_info
    model = FewVisionModel(head, bb.spec, bb.id, info=info, _backbone=bb)
    if len(calib):
        calibrate(model, [dataset.paths[i] for i in calib], y[calib], alpha=alpha, score=conformal,
                  mondrian=mondrian, cache_dir=cache_dir, use_cache=use_cache, progress=progress)
    return model


def calibrate(model: FewVisionModel, paths: Sequence[str], labels: Sequence[int], *, alpha: float | None = None,
              score: str = "lac", mondrian: bool = False, cache_dir: str | None = None, use_cache: bool = True,
              progress: bool = False) -> FewVisionModel:
    """Calibrate ``model`` on held-out labelled images (``paths``, ``labels``; never used for fitting).

    The temperature is chosen by :func:`fewvision.decide.calibration.choose_temperature` on the head's
    log-probabilities (the MAP fit, or T = 1 with the reason when the fit does not hold up). With ``alpha`` the
    split-conformal thresholds are set from the same images' *raw* head probabilities: the score function is then
    fixed before any calibration image is seen, so the coverage guarantee is exact whatever T they give. The NLL and
    expected calibration error of the held-out images before and after scaling are stored.
    """
    from ..metrics.classification import expected_calibration_error

    scored = score_files(model.head, model.backbone(cache_dir), list(paths), cache_dir=cache_dir,
                         use_cache=use_cache, progress=progress, description="calibration")
    label_of = dict(zip(paths, labels))
    y = np.array([int(label_of[p]) for p in scored.paths], dtype=np.int64)
    log_proba = scored.log_probabilities()
    choice = choose_temperature(log_proba, y)
    model.decision["temperature"] = choice.temperature
    calibrated = scored.calibrated(choice.temperature)
    model.decision["calibration"] = {
        "method": CALIBRATION_METHOD, "n": int(len(y)), **choice.as_dict(),
        "nll_before": mean_nll(log_proba, y), "nll_after": mean_nll(log_proba, y, choice.temperature),
        "ece_before": expected_calibration_error(scored.proba, y),
        "ece_after": expected_calibration_error(calibrated, y)}
    # the drift monitor's reference (docs/monitor.md): how unsure the model is of each held-out image, label-free,
    # as 'predict' will report it (calibrated probabilities)
    model.decision["nonconformity_scores"] = sorted(float(v) for v in 1.0 - calibrated.max(axis=1))
    model.info["fitted_on_sha256"] = model.info.get("fitted_on_sha256", []) + list(scored.shas)
    if scored.skipped:
        model.info["skipped"] = (model.info.get("skipped", []) + [f"{s.path}: {s.reason}" for s in scored.skipped])[:20]
        model.info["n_skipped"] = model.info.get("n_skipped", 0) + len(scored.skipped)
    if alpha is not None:
        model.decision["conformal"] = {**calibrate_conformal(scored.proba, y, alpha, score, mondrian),
                                       "probabilities": "raw"}
    return model


def can_update(model: FewVisionModel) -> bool:
    """Whether a model's head takes new labelled images without a refit (prototype, Tip-Adapter)."""
    return callable(getattr(model.head, "partial_fit", None)) and all(
        hasattr(model.head, a) for a in getattr(model.head, "STATE_SHAPES", {}) if a != "text_weights_")


def update(model: FewVisionModel, paths: Sequence[str], labels: Sequence[str], *, cache_dir: str | None = None,
           use_cache: bool = True) -> FewVisionModel:
    """A new model: ``model`` with labelled images added without a refit (:func:`can_update` heads). The
    calibration is kept as it is; the images join the model's fitted-on list."""
    if not can_update(model):
        raise ValueError(f"method '{model.head.method}' cannot take new images without a refit")
    index = {n: i for i, n in enumerate(model.class_names)}
    unknown = sorted(set(labels) - set(index))
    if unknown:
        raise ValueError(f"unknown class(es) {', '.join(unknown)}; the model's classes are "
                         f"{', '.join(model.class_names)}")
    import copy

    bb = model.backbone(cache_dir)
    added = Support.from_files(bb, list(paths), [index[label] for label in labels], model.class_names,
                               cache_dir=cache_dir, use_cache=use_cache, additions=True)
    if not added.paths:
        raise ValueError(f"no readable image to add: {'; '.join(f'{s.path}: {s.reason}' for s in added.skipped)}")
    head = copy.deepcopy(model.head).partial_fit(added)
    shas, _ = hash_files(added.paths)
    info = {**model.info, "fitted_on_sha256": model.info.get("fitted_on_sha256", []) + [s for s in shas if s],
            "n_added": model.info.get("n_added", 0) + len(added.paths)}
    return FewVisionModel(head, model.backbone_spec, model.backbone_id, model.task, dict(model.decision), info,
                          _backbone=bb)


def predict(model: FewVisionModel | str | os.PathLike, inputs: Sequence[str | os.PathLike], *, abstain: bool = False,
            unknown_threshold: float | None = None, weights: str | None = None, cache_dir: str | None = None,
            use_cache: bool = True, progress: bool = False) -> Predictions:
    """Classify image files and folders with a fitted model (calibrated probabilities; ``review`` when abstaining)."""
    model = model if isinstance(model, FewVisionModel) else load(model)
    paths = [str(p) for p in iter_image_files(inputs)]
    expect(len(paths))
    scored = score_files(model.head, model.backbone(cache_dir, weights), paths, cache_dir=cache_dir,
                         use_cache=use_cache, progress=progress)
    return predictions(model, scored, abstain=abstain, unknown_threshold=unknown_threshold)


def evaluate_model(model: FewVisionModel | str | os.PathLike, dataset: Dataset | str | os.PathLike, *,
                   abstain: bool = False, weights: str | None = None, cache_dir: str | None = None,
                   use_cache: bool = True, progress: bool = False, n_bootstrap: int = 1000) -> Evaluation:
    """:func:`fewvision.tasks.evaluation.evaluate_classes` with this model's torch scoring."""
    model = model if isinstance(model, FewVisionModel) else load(model)

    def score(paths):
        return score_files(model.head, model.backbone(cache_dir, weights), paths, cache_dir=cache_dir,
                           use_cache=use_cache, progress=progress)

    return evaluate_classes(model, as_dataset(dataset), score, abstain=abstain, n_bootstrap=n_bootstrap)


def evaluate_prototype(
    dataset: Dataset,
    *,
    backbone: str | Backbone,
    shots: int = 10,
    seed: int = 0,
    cache_dir: str | None = None,
    use_cache: bool = True,
    progress: bool = False,
) -> Evaluation:
    """Class means of ``shots`` random images per class; evaluated on every other image of the dataset."""
    expect(len(dataset))
    bb = as_backbone(backbone, cache_dir)
    feats = encode(bb, dataset.paths, cache_dir=cache_dir, use_cache=use_cache, progress=progress)
    label_of = {it.path: it.label for it in dataset.items}
    index = {c: i for i, c in enumerate(dataset.class_names)}
    labels = np.array([index[label_of[p]] for p in feats.paths], dtype=np.int64)
    pool = np.arange(len(labels))
    if dataset.has_splits:
        split_of = {it.path: it.split for it in dataset.items}
        pool = np.array([i for i, p in enumerate(feats.paths) if split_of[p] == "train"], dtype=np.int64)
    support = sample_shots(labels, shots, seed, pool)
    head = create_head("prototype").fit(Support(feats.tensor[support], labels[support], dataset.class_names, bb))
    rest = np.setdiff1d(np.arange(len(labels)) if not dataset.has_splits else np.array(
        [i for i, p in enumerate(feats.paths) if split_of[p] != "train"], dtype=np.int64), support)
    test = Features([feats.paths[i] for i in rest], [feats.shas[i] for i in rest], feats.features[rest],
                    feats.skipped, feats.encoded)
    ev = evaluate_predictions(predictions_from(head, test), dataset)
    ev.support_paths = [feats.paths[i] for i in support]
    ev.metrics["shots"] = shots
    ev.metrics["seed"] = seed
    return ev


__all__ = ["evaluate_prototype", "fit", "predict", "evaluate_model", "calibrate", "load", "save_model", "as_dataset", "make_head"]
