"""PatchCore (Roth et al., "Towards Total Recall in Industrial Anomaly Detection", CVPR 2022).

* Locally aware patch features (Eq. 1-2, p = 3): the backbone's mid-level feature maps (``patch_features``; for a
  timm CNN the stages in ``layers``, default 2 and 3 as in the paper). Each layer's map is averaged over every position's
  ``p x p`` neighbourhood on its own grid, then up-sampled bilinearly to the first layer's grid and concatenated,
  as the reference implementation and anomalib do (the backbone's layer layout is recorded at fit time).
* Memory bank: greedy k-center coreset (Alg. 1; Sener & Savarese 2018) of all training patches, distances taken on
  a seeded Johnson-Lindenstrauss random projection to 128 dimensions; ``coreset_ratio`` of the patches are kept.
* Anomaly map: distance of each test patch to its nearest memory item (exact search, :func:`nearest_rows`).
* Image score (Eq. 6-7): ``s = (1 - exp||m_test* - m*|| / sum_{m in N_b(m*)} exp||m_test* - m||) * s*`` with
  ``s*`` the largest patch distance, ``m_test*`` that patch, ``m*`` its nearest memory item and ``N_b(m*)`` the
  ``num_neighbors`` nearest memory items of ``m*`` (``m*`` itself included, as anomalib does). This is the paper's
  equation; the reference code (amazon-science/patchcore-inspection) scores an image by the plain maximum ``s*``
  instead (``num_neighbors=1`` here).

Threshold calibration from the training images themselves (``score_left_out``, used by
:func:`fewvision.tasks.anomaly.fit_anomaly`):

* ``coreset_ratio < 1`` (the default 0.1): K-fold cross-conformal (``calibration_folds``, default 5). Every training
  image is put in one of K folds (consecutive blocks of K images in fit order each get a seeded random permutation
  of the folds, so fold sizes differ by at most one and the assignment never looks at the images). K more coresets
  are drawn, the k-th from the patches of the images outside fold k only, and each training image is scored by the
  coreset of its own fold - one whose candidate pool never held a patch of that image. Removing an image's items from
  the full bank (what an earlier version did) is not that: the other items of the bank were chosen by a greedy
  k-center that saw the image's patches.
* ``coreset_ratio == 1``: every patch is in the bank, so the bank without the image's own patches *is* the bank of a
  refit without it (exact leave-one-out, no extra coreset).

Streaming fit with bounded memory: up to ``exact_max_images`` images the patches are kept and one greedy k-center
runs over all of them (the paper's algorithm, exactly). Beyond that, the training patches of each chunk of
``chunk_images`` images are reduced as they arrive to ``min(1, stream_oversample * coreset_ratio)`` of themselves by
the same greedy k-center on the same projection - separately for the images of each calibration fold, so that what
is kept of a fold depends on that fold's images alone - and only the kept patches are carried forward; a final greedy
k-center over the union selects ``ceil(coreset_ratio * all patches)`` memory items. Peak memory is therefore at most
``(exact_max_images + chunk_images) * h * w * C`` floats of raw patches plus
``stream_oversample * coreset_ratio * N * h * w * C`` floats of kept ones - never every patch of every image.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F

from ..backbones.base import unpack_layers
from . import register
from .base import AnomalyHead, iter_chunks, selected_layers

PAPER_LAYERS = (2, 3)  # the paper's layer2 + layer3 of a ResNet
_FOLD_SEED = 104_729  # offsets the seed of the fold assignment and of the fold coresets from the fit's own draws


def fold_assignment(n: int, folds: int, seed: int) -> torch.Tensor:
    """Calibration fold of each of ``n`` images in fit order: every block of ``folds`` consecutive images gets a
    seeded random permutation of ``0 .. folds - 1``. Balanced (fold sizes differ by at most one), known for an image
    as soon as it arrives, and independent of the images' content."""
    generator = torch.Generator().manual_seed(int(seed) + _FOLD_SEED)
    blocks = [torch.randperm(folds, generator=generator) for _ in range(-(-n // folds))]
    return torch.cat(blocks)[:n] if blocks else torch.zeros(0, dtype=torch.long)


def cross_conformal_bound(alpha: float, n: int, folds: int) -> float:
    """Worst-case false-reject rate of the K-fold cross-conformal (CV+) rule at target ``alpha`` with ``n``
    calibration images (Barber, Candes, Ramdas, Tibshirani 2021, Theorem 4):
    ``2 alpha + min(2 (1 - 1/K) / (n/K + 1), (1 - K/n) / (K + 1))``, at most 1."""
    k = max(1, int(folds))
    slack = min(2.0 * (1.0 - 1.0 / k) / (n / k + 1.0), (1.0 - k / n) / (k + 1.0))
    return min(1.0, 2.0 * float(alpha) + max(0.0, slack))


def aggregate_neighbourhood(maps: torch.Tensor, pool_size: int) -> torch.Tensor:
    """Eq. 2: average of every position's ``p x p`` neighbourhood (zero-padded at the border, stride 1)."""
    if pool_size <= 1:
        return maps
    return F.avg_pool2d(maps, kernel_size=pool_size, stride=1, padding=pool_size // 2)


def flatten_patches(maps: torch.Tensor) -> torch.Tensor:
    """``[N, C, h, w]`` -> ``[N * h * w, C]`` (image-major, then row-major positions)."""
    return maps.permute(0, 2, 3, 1).reshape(-1, maps.shape[1])


def greedy_coreset(z: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """Greedy k-center selection (PatchCore Alg. 1) on rows of ``z``: indices of ``k`` rows, starting at a random one.

    Each step adds the row farthest (Euclidean) from everything selected so far. The loop runs on one thread: each
    step is a memory-bound matrix-vector product over ``z`` for which thread hand-off costs more than it saves
    (measured: 2.5 ms per step on 1 thread vs 14 ms on 2 for 31k x 128 on a shared 2-core machine).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _greedy_coreset(z, k, generator)
    finally:
        torch.set_num_threads(threads)


def _greedy_coreset(z: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    n = len(z)
    if k >= n:
        return torch.arange(n)
    if k <= 0:
        return torch.zeros(0, dtype=torch.long)
    z = z.float()
    sq = (z * z).sum(1)
    # A column-major copy: the matrix-vector product streams its columns, 30 % faster than over rows (AMD EPYC, MKL)
    columns = z.T.contiguous().T
    selected = []
    i = int(torch.randint(n, (1,), generator=generator))
    min_d = torch.full((n,), float("inf"))
    d = torch.empty(n)
    for _ in range(k):
        selected.append(i)
        torch.addmv(sq, columns, z[i], alpha=-2.0, out=d)
        d += sq[i]
        torch.minimum(min_d, d, out=min_d)
        min_d[i] = -1.0  # never picked again, even with rounding
        i = int(min_d.argmax())
    return torch.tensor(selected, dtype=torch.long)


# Query rows per chunk of the exact search: chunk x bank distances stay near 16 MB of float32, small enough to be
# ranked while still in cache (30 % faster than 64 MB chunks on a 2-core machine).
_SEARCH_ELEMENTS = 1 << 22
# In a bank of more than 2 x _TILE_ITEMS items the single nearest item is searched in tiles of queries x items
# with a running minimum: a 1024 x 2048 product (8 MB) runs at 175-180 GFLOP/s on 2 cores, where a 16 MB chunk of
# 107 queries x 39,200 items ran at 110 (784 queries, 384 channels: 305 -> 176 ms for 39,200 items, 84 -> 69 ms for
# 16,384; for 3,920 items one chunk of 1,069 queries was faster, 16.6 against 19.4 ms).
_TILE_QUERIES, _TILE_ITEMS = 1024, 2048


def row_argmin(x: torch.Tensor, block: int = 64) -> torch.Tensor:
    """``x.argmin(1)`` of a 2-D tensor (the first smallest of each row), 3-6x faster on long rows: torch's CPU
    argmin is not vectorised, ``amin`` is; so the smallest of each block of ``block`` columns first, then the
    argmin over the block minima, then over the chosen block's columns (measured on 1 thread: 6.0 -> 2.0 ms for
    1070 x 3920, 5.4 -> 0.9 ms for 128 x 32768)."""
    n_rows, n = x.shape
    whole = n - n % block
    if whole < 4 * block:
        return x.argmin(1)
    blocks = x[:, :whole].unflatten(1, (whole // block, block))
    best = blocks.amin(2).argmin(1)  # the first block holding the row's minimum
    rows = torch.arange(n_rows)
    i = best * block + blocks[rows, best].argmin(1)
    if whole < n:  # the last columns, fewer than a block: taken only where strictly smaller (they come last)
        tail_min, tail_arg = x[:, whole:].min(1)
        i = torch.where(tail_min < x[rows, i], whole + tail_arg, i)
    return i


def nearest_rows(queries: torch.Tensor, bank: torch.Tensor, k: int,
                 exclude: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact ``k`` nearest rows of ``bank`` for each row of ``queries``: (Euclidean distances ascending [n, k],
    indices [n, k]). ``exclude`` (bool [len(bank)]) removes rows from the search.

    Neighbours ranked by ``-2 q.m + |m|^2`` from matrix products over chunks of queries (for the nearest one in a
    large bank, tiles of queries x items) - what faiss's ``IndexFlatL2`` computes for batches of queries - with
    torch's BLAS, which was about 3x faster than faiss-cpu's on the CPUs we measured
    (benchmarks/nearest_neighbour.py); the distances of the neighbours found are then computed from the differences
    ``q - m``, which keeps them accurate where the expanded form cancels.
    """
    bank = bank.float().contiguous()
    queries = queries.float()
    k = min(int(k), len(bank) - (int(exclude.sum()) if exclude is not None else 0))
    bank_sq = (bank * bank).sum(1)
    if exclude is not None:
        bank_sq = bank_sq.masked_fill(exclude, float("inf"))  # never the nearest
    exporting = torch.compiler.is_exporting()
    tiled = k == 1 and not exporting and len(bank) > 2 * _TILE_ITEMS
    rows = _TILE_QUERIES if tiled else max(1, _SEARCH_ELEMENTS // max(1, len(bank), k * bank.shape[1]))
    # One buffer for every chunk's distances: allocating and freeing 16 MB blocks between small tensors fragments
    # glibc's heap (4.7 GB resident after 300 images against a 39,200-item bank). Not while exporting: the graph
    # is functional there.
    scratch = None if exporting or not len(queries) else \
        torch.empty(min(rows, len(queries)) * (min(_TILE_ITEMS, len(bank)) if tiled else len(bank)))
    dists, idxs = [], []
    for start in range(0, len(queries), rows):
        q = queries[start : start + rows]
        if tiled:
            i = _nearest_item(q, bank, bank_sq, scratch)[:, None]
        else:
            out = None if scratch is None else scratch[: len(q) * len(bank)].view(len(q), len(bank))
            partial = torch.addmm(bank_sq, q, bank.T, alpha=-2.0, out=out)  # |q|^2 would not change the ranking
            if k > 1:
                i = torch.topk(partial, k, dim=1, largest=False).indices
            elif exporting:  # one ArgMin node (blocked in the graph, onnxruntime ran no faster)
                i = partial.min(1, keepdim=True).indices
            else:
                i = row_argmin(partial)[:, None]
        # The distances themselves from the differences: |q|^2 - 2 q.m + |m|^2 cancels badly for near neighbours
        # (1e-3 off for distances near 0.05 in float32), and two runtimes' matrix products would disagree there.
        d = torch.linalg.vector_norm(q.unsqueeze(1) - bank[i], dim=-1)
        if k > 1:
            d, order = d.sort(1)
            i = i.gather(1, order)
        dists.append(d)
        idxs.append(i)
    if not dists:
        return torch.zeros(0, k), torch.zeros(0, k, dtype=torch.long)
    return torch.cat(dists), torch.cat(idxs)


def _nearest_item(q: torch.Tensor, bank: torch.Tensor, bank_sq: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """Index of each query's nearest bank row, ranked by ``-2 q.m + |m|^2`` over tiles of ``_TILE_ITEMS`` items with a
    running minimum; a later tile wins only when strictly nearer, so ties go to the first item, as argmin's."""
    best = nearest = None
    for first in range(0, len(bank), _TILE_ITEMS):
        items = slice(first, first + _TILE_ITEMS)
        width = len(bank_sq[items])
        partial = torch.addmm(bank_sq[items], q, bank[items].T, alpha=-2.0,
                              out=scratch[: len(q) * width].view(len(q), width))
        i = row_argmin(partial)
        value = partial.gather(1, i[:, None])[:, 0]
        if best is None:
            best, nearest = value, i + first
        else:
            nearer = value < best
            best, nearest = torch.where(nearer, value, best), torch.where(nearer, i + first, nearest)
    return nearest


@register
class PatchCore(AnomalyHead):
    STATE_SHAPES = {"memory_bank_": ("M", "F")}
    method = "patchcore"
    inputs = "patches"
    image_score = "head"
    leave_one_out = True
    # With --tile every tile is a training image: ~100 times the patches of the same images whole. The paper's
    # PatchCore-1% variant (Roth et al. 2022, Table 1: about the image AUROC of PatchCore-10% on MVTec AD) keeps the
    # bank near the size 10 % gives untiled; fit and search take a fraction of the time (docs/anomaly.md).
    tiled_defaults = {"coreset_ratio": 0.01}

    def __init__(
        self,
        coreset_ratio: float = 0.1,
        projection_dim: int = 128,
        num_neighbors: int = 9,
        pool_size: int = 3,
        stream_oversample: float = 2.0,
        chunk_images: int = 32,
        exact_max_images: int = 96,
        layers: Sequence[int] | None = None,
        calibration_folds: int = 5,
        seed: int = 0,
    ):
        self.coreset_ratio = coreset_ratio
        self.projection_dim = projection_dim
        self.num_neighbors = num_neighbors
        self.pool_size = pool_size
        self.stream_oversample = stream_oversample
        self.chunk_images = chunk_images
        self.exact_max_images = exact_max_images
        self.layers = layers
        self.calibration_folds = calibration_folds
        self.seed = seed

    def feature_layers(self, backbone) -> list[int] | None:
        """The CNN stages whose maps are combined: ``layers``, else the paper's 2 and 3 on a backbone with
        selectable stages (timm CNNs), else the backbone's own patch features (None)."""
        return selected_layers(self.layers, backbone, PAPER_LAYERS)

    # --- fit ----------------------------------------------------------------------------------------------------
    def _check_params(self) -> None:
        if not 0 < self.coreset_ratio <= 1:
            raise ValueError(f"coreset_ratio must be in (0, 1], got {self.coreset_ratio}")
        if self.projection_dim < 1 or self.num_neighbors < 1 or self.chunk_images < 1:
            raise ValueError("projection_dim, num_neighbors and chunk_images must be >= 1")
        if self.exact_max_images < 0:
            raise ValueError(f"exact_max_images must be >= 0, got {self.exact_max_images}")
        if self.stream_oversample < 1:
            raise ValueError(f"stream_oversample must be >= 1, got {self.stream_oversample}")
        if self.pool_size < 1 or self.pool_size % 2 == 0:
            raise ValueError(f"pool_size must be an odd number >= 1, got {self.pool_size}")
        if int(self.calibration_folds) < 2:
            raise ValueError(f"calibration_folds must be >= 2, got {self.calibration_folds}")

    def cross_fitted(self) -> bool:
        """Whether the training images' calibration scores come from K fold coresets (``coreset_ratio < 1``) rather
        than from the full bank without each image's own patches (exact only when every patch is kept)."""
        return self.coreset_ratio < 1

    def left_out_calibration(self) -> str:
        """How :meth:`score_left_out` scores the training images, as fit_anomaly records it."""
        return "cross-conformal" if self.cross_fitted() else "leave-one-out conformal"

    def _projection(self, channels: int, generator: torch.Generator) -> torch.Tensor | None:
        if channels <= self.projection_dim:
            return None  # already low-dimensional: distances on the features themselves
        return torch.randn(channels, self.projection_dim, generator=generator) / math.sqrt(self.projection_dim)

    def fit(self, inputs: torch.Tensor | Iterable[torch.Tensor], backbone=None) -> "PatchCore":
        self._check_params()
        self.feature_layers_ = self.feature_layers(backbone)
        generator = torch.Generator().manual_seed(int(self.seed))
        projection = None
        channels = grid = None
        kept: list[torch.Tensor] = []  # reduced chunks
        raw: list[torch.Tensor] = []  # chunks not reduced yet (all of them while n_images <= exact_max_images)
        n_patches = n_images = 0
        keep_ratio = min(1.0, self.stream_oversample * self.coreset_ratio)
        cross = self.cross_fitted()
        image_fold = torch.zeros(0, dtype=torch.long)

        def reduce(part: tuple[torch.Tensor, torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
            emb, source = part
            fold = image_fold[source.long()] if cross else torch.zeros(len(source), dtype=torch.long)
            out = []
            for f in torch.unique(fold).tolist():  # each fold's patches on their own: kept ones depend on it alone
                rows = torch.nonzero(fold == f)[:, 0]
                k = math.ceil(keep_ratio * len(rows))
                z = emb[rows] if projection is None else emb[rows] @ projection
                keep = rows[greedy_coreset(z, k, generator)]
                out.append((emb[keep], source[keep]))
            return out

        for chunk in iter_chunks(inputs, self.chunk_images):
            if chunk.ndim != 4:
                raise ValueError(f"patchcore expects patch maps [N, C, h, w], got shape {tuple(chunk.shape)}")
            if channels is None:
                channels, grid = chunk.shape[1], tuple(chunk.shape[-2:])
                layout = backbone.patch_layout(self.feature_layers_) if backbone is not None else None
                self.layers_ = [list(map(int, layer)) for layer in (layout or [(channels, *grid)])]
                unpack_layers(chunk[:1], self.layers_)  # checks the layout fits these maps
                projection = self._projection(channels, generator)
            elif chunk.shape[1] != channels or tuple(chunk.shape[-2:]) != grid:
                raise ValueError(f"patch maps changed shape during fit: {tuple(chunk.shape[1:])} after "
                                 f"{(channels, *grid)}")
            emb = flatten_patches(self._embed(chunk))
            source = torch.arange(n_images, n_images + len(chunk), dtype=torch.int32).repeat_interleave(
                chunk.shape[-2] * chunk.shape[-1])  # which training image each patch comes from
            raw.append((emb, source))
            n_patches += len(emb)
            n_images += len(chunk)
            if cross and len(image_fold) < n_images:
                image_fold = fold_assignment(n_images + 64 * int(self.calibration_folds), int(self.calibration_folds),
                                             int(self.seed))
            if n_images > self.exact_max_images:  # streaming from now on: reduce every chunk as it comes
                kept += [p for r in raw for p in reduce(r)]
                raw = []
        if n_images == 0:
            raise ValueError("patchcore needs at least one good image to fit")
        union = torch.cat([e for e, _ in kept + raw])
        sources = torch.cat([s for _, s in kept + raw])
        del kept, raw
        k = max(1, math.ceil(self.coreset_ratio * n_patches))
        z = union if projection is None else union @ projection
        chosen = greedy_coreset(z, k, generator)
        self.memory_bank_ = union[chosen].contiguous()
        self._bank_image = sources[chosen]  # for leave-one-out scores; not saved with the model
        # What the calibration scores need and the model file does not: the candidate pool (every patch up to
        # exact_max_images images, else the per-fold reduced ones), the image of each candidate, each image's fold.
        self._pool = (union, sources, image_fold[:n_images].clone(), projection) if cross else None
        self._fold_banks: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.grid_ = list(grid)
        self.n_train_images_ = int(n_images)
        self.n_train_patches_ = int(n_patches)
        return self

    def partial_fit(self, inputs: torch.Tensor, backbone=None) -> "PatchCore":
        """Add good images to the memory bank without refitting: a greedy k-center coreset of each image's own
        locally aware patches (``coreset_ratio`` of them) is appended. The threshold is not recalibrated."""
        self._check_fitted()
        x = self._check_input(inputs)
        generator = torch.Generator().manual_seed(int(self.seed) + int(self.n_train_images_))
        added = []
        for maps in x.split(1):
            emb = flatten_patches(self._embed(maps))
            added.append(emb[greedy_coreset(emb, max(1, math.ceil(self.coreset_ratio * len(emb))), generator)])
        self.memory_bank_ = torch.cat([self.memory_bank_, *added]).contiguous()
        self.n_train_images_ = int(self.n_train_images_) + len(x)
        self.n_train_patches_ = int(self.n_train_patches_) + len(x) * x.shape[-2] * x.shape[-1]
        return self

    def _embed(self, maps: torch.Tensor) -> torch.Tensor:
        """Locally aware patch features of packed maps ``[N, C, h, w]`` -> ``[N, C, h, w]``."""
        layout = getattr(self, "layers_", None)
        if not layout or len(layout) == 1:
            return aggregate_neighbourhood(maps, self.pool_size)
        size = maps.shape[-2:]
        pooled = [aggregate_neighbourhood(m, self.pool_size) for m in unpack_layers(maps, layout)]
        return torch.cat([m if m.shape[-2:] == size else F.interpolate(m, size=size, mode="bilinear")
                          for m in pooled], 1)

    # --- score --------------------------------------------------------------------------------------------------
    def nearest(self, queries: torch.Tensor, k: int, exclude: torch.Tensor | None = None,
                bank: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(Euclidean distances [n, k], indices [n, k]) of the ``k`` nearest memory items of each query row (in
        ``bank`` when given: a calibration fold's coreset)."""
        return nearest_rows(queries, self.memory_bank_ if bank is None else bank, k, exclude)

    def _check_input(self, inputs: torch.Tensor) -> torch.Tensor:
        self._check_fitted()
        x = torch.as_tensor(inputs).float()
        if x.ndim != 4 or x.shape[1] != self.memory_bank_.shape[1]:
            raise ValueError(f"patchcore was fitted on {self.memory_bank_.shape[1]}-channel patch maps, got shape "
                             f"{tuple(x.shape)}")
        return x

    def score(self, inputs: torch.Tensor, backbone=None) -> tuple[torch.Tensor, torch.Tensor]:
        x = self._check_input(inputs)
        n, _, h, w = x.shape
        if n == 0:
            return torch.zeros(0, h, w), torch.zeros(0)
        return self._score(flatten_patches(self._embed(x)).view(n, h * w, -1), (h, w))

    def _score(self, emb: torch.Tensor, grid: tuple[int, int], exclude: torch.Tensor | None = None,
               bank: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(emb)
        dist, nn_idx = self.nearest(emb.reshape(-1, emb.shape[-1]), 1, exclude, bank)
        patch_scores = dist[:, 0].view(n, -1)
        return patch_scores.view(n, *grid), self._reweight(patch_scores, nn_idx[:, 0].view(n, -1), emb, exclude,
                                                           bank)

    # --- scores of the training images by models that did not see them (their threshold calibration) ---------
    def score_left_out(self, inputs: torch.Tensor, first_index: int, backbone=None):
        """Scores of training images ``first_index``, ``first_index + 1``, ... (in fit order), each by a model
        fitted without it: the coreset of its calibration fold (drawn from the other folds' patches only) when
        ``coreset_ratio < 1``, else the bank without its own patches (then exactly the bank of a refit)."""
        if getattr(self, "_bank_image", None) is None:
            raise RuntimeError("leave-one-out scores are only available right after fit")
        x = self._check_input(inputs)
        n, _, h, w = x.shape
        if first_index < 0 or first_index + n > int(self.n_train_images_):
            raise ValueError(f"training images {first_index}..{first_index + n - 1} asked for, the model was fitted "
                             f"on {self.n_train_images_}")
        if not self.cross_fitted():
            return self._score_without_own_items(x, first_index)
        emb = flatten_patches(self._embed(x)).view(n, h * w, -1)
        folds = self._pool[2][first_index : first_index + n]
        maps, scores = torch.zeros(n, h, w), torch.zeros(n)
        for f in torch.unique(folds).tolist():
            rows = torch.nonzero(folds == f)[:, 0]
            maps[rows], scores[rows] = self._score(emb[rows], (h, w), bank=self.fold_coreset(f)[0])
        return maps, scores

    def calibration_fold(self, index: int) -> int:
        """The calibration fold of training image ``index`` (fit order), right after a fit with ``coreset_ratio < 1``."""
        if getattr(self, "_pool", None) is None:
            raise RuntimeError("calibration folds exist only right after a fit with coreset_ratio < 1")
        return int(self._pool[2][index])

    def fold_coreset(self, fold: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(memory items, training image of each) of the coreset that scores fold ``fold``'s images: a greedy k-center
        of ``ceil(coreset_ratio * their patches)`` items drawn from the patches of the *other* folds' images only,
        with the fit's projection and a start point drawn from ``seed`` and ``fold``. Built once, on first use."""
        if getattr(self, "_pool", None) is None:
            raise RuntimeError("fold coresets exist only right after a fit with coreset_ratio < 1")
        fold = int(fold)
        if fold not in self._fold_banks:
            union, sources, image_fold, projection = self._pool
            if not bool((image_fold == fold).any()):
                raise ValueError(f"no training image is in calibration fold {fold}")
            others = image_fold != fold
            rows = torch.nonzero(others[sources.long()])[:, 0]
            if len(rows) == 0:
                raise ValueError("cross-conformal calibration needs training images in at least two folds")
            pool = union[rows]
            k = max(1, math.ceil(self.coreset_ratio * int(others.sum()) * int(self.grid_[0]) * int(self.grid_[1])))
            z = pool if projection is None else pool @ projection
            chosen = greedy_coreset(z, k, torch.Generator().manual_seed(int(self.seed) + _FOLD_SEED + 1 + fold))
            self._fold_banks[fold] = (pool[chosen].contiguous(), sources[rows][chosen])
        return self._fold_banks[fold]

    def _score_without_own_items(self, x: torch.Tensor, first_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Each image against the full bank without the items taken from its own patches: a refit without it when
        every patch is kept (``coreset_ratio == 1``); with a coreset, not (the other items were chosen with it)."""
        n, _, h, w = x.shape
        emb = flatten_patches(self._embed(x)).view(n, h * w, -1)
        maps, scores = [], []
        for j in range(n):
            m, s = self._score(emb[j : j + 1], (h, w), exclude=self._bank_image == first_index + j)
            maps.append(m)
            scores.append(s)
        return torch.cat(maps), torch.cat(scores)

    def release_fit_data(self) -> None:
        self._bank_image = None
        self._pool = None
        self._fold_banks = {}

    def _reweight(self, patch_scores: torch.Tensor, nn_idx: torch.Tensor, emb: torch.Tensor,
                  exclude: torch.Tensor | None = None, bank: torch.Tensor | None = None) -> torch.Tensor:
        """Eq. 7 for every image (rows of ``patch_scores``), against ``bank`` (default: the memory bank)."""
        best = patch_scores.argmax(dim=1, keepdim=True)  # [n, 1]
        s_star = patch_scores.gather(1, best)[:, 0]
        if self.num_neighbors <= 1:
            return s_star
        m_test = emb.gather(1, best.unsqueeze(-1).expand(-1, 1, emb.shape[-1]))[:, 0]  # [n, C]
        m_star_idx = nn_idx.gather(1, best)[:, 0]  # [n]
        bank = (self.memory_bank_ if bank is None else bank).float()
        _, support = self.nearest(bank[m_star_idx], self.num_neighbors, exclude, bank)
        # m* first, then its other nearest memory items in order (m* may not come first when the bank holds
        # duplicates, or be among them at all). Ranked without data-dependent shapes, so the graph exports: the
        # entries that are not m* keep their positions as keys, m* goes last, and the first b - 1 keys are taken.
        b = support.shape[1]
        position = torch.arange(b, device=support.device).expand_as(support)
        key = position + (support == m_star_idx.unsqueeze(1)).long() * b
        take = torch.topk(key, b - 1, dim=1, largest=False).indices if b > 1 else support[:, :0]
        neighbourhood = torch.cat([m_star_idx.unsqueeze(1), support.gather(1, take)], 1)
        distances = torch.linalg.norm(m_test.unsqueeze(1) - bank[neighbourhood], dim=-1)  # [n, b]
        weights = 1.0 - torch.softmax(distances.double(), dim=1)[:, 0].float()
        return weights * s_star
