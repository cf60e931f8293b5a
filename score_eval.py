"""Whether the point scores mean something: on labelled faces, a patch (noise, a piece of the crop's own corner, or one flat grey) covers part of each crop, and the scores of covered points are compared with those of visible ones (AUROC), and with each point's error."""
import random

import numpy as np
import torch

from dataset import FaceLandmarksDataset
from errors import UsageError
from landmarks import Face, Markup
from runtime import Network, points_and_scores
from transforms import Transforms, occlude, pixel_rect, visible

BATCH = 32
# What covers the patch: the uniform noise --occlusion trains on; a piece of the crop's own top-left
# corner (background, hair, a shoulder: something real); or one flat grey, the crop's mean (a blurred or
# shadowed hand), which no training fill draws.
OCCLUDERS = ("noise", "corner", "flat")


def auroc(positive: np.ndarray, negative: np.ndarray) -> float:
    """The chance that a positive's score beats a negative's (ties count half): Mann-Whitney's U, from ranks."""
    scores = np.concatenate([positive, negative])
    order = scores.argsort(kind="mergesort")
    ranks = np.empty(len(scores))
    ranks[order] = np.arange(1, len(scores) + 1)
    for value in np.unique(scores):  # ties share their mean rank
        tied = scores == value
        ranks[tied] = ranks[tied].mean()
    u = ranks[:len(positive)].sum() - len(positive) * (len(positive) + 1) / 2
    return float(u / (len(positive) * len(negative)))


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    rank = lambda x: np.argsort(np.argsort(x)).astype(float)  # noqa: E731
    return float(np.corrcoef(rank(a), rank(b))[0, 1])


def score_test(network: Network, faces: list[Face], img_size: int, markup: Markup, seed: int = 0,
               occluder: str = "noise") -> dict:
    """Each face cropped as for prediction, once as it is and once with a patch (OCCLUDERS) over a random
    part (the sides of --occlusion's: 10-50% of the crop). Returns the AUROC of visible against covered
    points' scores, and the rank correlation of the score with the point's error on the uncovered crops."""
    draw = Transforms(img_size, train=True, rotation=0, jitter=0, occlusion=1.0)
    transform = Transforms(img_size, train=False)
    rng_state = random.getstate()
    random.seed(seed)
    seen, covered, clean_scores, clean_errors = [], [], [], []
    data = FaceLandmarksDataset(faces, transform)
    with torch.random.fork_rng():
        torch.manual_seed(seed)  # the patches' noise
        for start in range(0, len(data), BATCH):
            scored = score_batch(network, data, start, draw, occluder)
            seen += scored[0]
            covered += scored[1]
            clean_scores.append(scored[2])
            clean_errors.append(scored[3])
    random.setstate(rng_state)
    clean_scores, clean_errors = np.concatenate(clean_scores), np.concatenate(clean_errors)
    return {"faces": len(faces), "occluder": occluder, "covered_points": len(covered), "visible_points": len(seen),
            "auroc_visible_vs_covered": auroc(np.array(seen), np.array(covered)),
            "mean_score_visible": float(np.mean(seen)), "mean_score_covered": float(np.mean(covered)),
            "spearman_score_vs_error": spearman(clean_scores, clean_errors),
            "pearson_score_vs_error": float(np.corrcoef(clean_scores, clean_errors)[0, 1])}


def cover(pixels: torch.Tensor, rect: tuple[float, float, float, float], occluder: str) -> torch.Tensor:
    """Grey levels (H, W) with `rect` (fractions of the side) covered as OCCLUDERS says."""
    if occluder == "noise":
        return occlude(pixels, rect)
    left, top, width, height = pixel_rect(rect, pixels.shape[-1])
    covered = pixels.clone()
    covered[top:top + height, left:left + width] = pixels[:height, :width] if occluder == "corner" else pixels.mean()
    return covered


def score_batch(network: Network, data: FaceLandmarksDataset, start: int, draw: Transforms,
                occluder: str = "noise") -> tuple[list, list, np.ndarray, np.ndarray]:
    """One batch: visible and covered points' scores on the patched crops; scores and errors on the clean ones."""
    seen_scores, covered_scores = [], []
    images, targets = map(torch.stack, zip(*(data[i] for i in range(start, min(start + BATCH, len(data))))))
    rects = [draw.draw_occlusion() for _ in range(len(images))]
    patched = torch.stack([cover((img[0] + 1) * 127.5, r, occluder)[None] / 127.5 - 1 for img, r in zip(images, rects)])
    with torch.inference_mode():
        coords, scores = points_and_scores(network, images)
        _, patched_scores = points_and_scores(network, patched)
    if scores is None:
        raise UsageError("--score-test: these weights have the regression head, which gives no point scores")
    targets = targets.view(len(images), -1, 2).numpy()
    for t, s, r in zip(targets, patched_scores.numpy(), rects):
        seen = visible(t, r).astype(bool)
        covered_scores += list(s[~seen])
        seen_scores += list(s[seen])
    error = np.linalg.norm(coords.reshape(len(images), -1, 2).numpy() - targets, axis=-1)
    return seen_scores, covered_scores, scores.numpy().ravel(), error.ravel()
