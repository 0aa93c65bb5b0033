"""Segmentation scores: instance AP over IoU thresholds, semantic IoU per class, accuracy.

Instance "AP" at an IoU threshold ``tau`` is the score of the 2018 Data Science Bowl and
of the StarDist and Cellpose papers: ``TP / (TP + FP + FN)`` after one-to-one matching of
predicted and true objects with ``IoU >= tau`` (for ``tau >= 0.5`` such a match is unique;
below, the matching maximises the summed IoU with the Hungarian algorithm). It applies to
label images of any dimension (2D or 3D) and needs no scores. ``mAP`` is its mean over
``tau = 0.5, 0.55, ..., 0.95`` (the COCO thresholds).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

IOU_THRESHOLDS = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))


def iou_matrix(true: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """IoU of every true object with every predicted object.

    Parameters
    ----------
    true, pred : integer label images of the same shape (0 = background).

    Returns
    -------
    iou : ``(n_true, n_pred)`` float64.
    true_ids, pred_ids : the ids of the rows and columns.
    """
    if true.shape != pred.shape:
        raise ValueError(f"shapes differ: {true.shape} vs {pred.shape}")
    t = np.asarray(true).ravel()
    p = np.asarray(pred).ravel()
    true_ids, t_inv = np.unique(t, return_inverse=True)
    pred_ids, p_inv = np.unique(p, return_inverse=True)
    t_has_bg = true_ids.size > 0 and true_ids[0] == 0
    p_has_bg = pred_ids.size > 0 and pred_ids[0] == 0
    nt, np_ = len(true_ids), len(pred_ids)
    fg = (t != 0) | (p != 0)
    pairs = t_inv[fg].astype(np.int64) * np_ + p_inv[fg]
    counts = np.bincount(pairs, minlength=nt * np_).reshape(nt, np_)
    t_sizes = np.bincount(t_inv, minlength=nt)
    p_sizes = np.bincount(p_inv, minlength=np_)
    r0 = 1 if t_has_bg else 0
    c0 = 1 if p_has_bg else 0
    inter = counts[r0:, c0:].astype(np.float64)
    union = t_sizes[r0:, None] + p_sizes[None, c0:] - inter
    iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    return iou, true_ids[r0:], pred_ids[c0:]


def _n_matches(iou: np.ndarray, threshold: float) -> int:
    from scipy.optimize import linear_sum_assignment

    if iou.size == 0:
        return 0
    if threshold > 0.5:  # IoU > 0.5 allows at most one partner on each side
        return int((iou >= threshold).sum())

    cost = -np.where(iou >= threshold, iou, 0.0)
    rows, cols = linear_sum_assignment(cost)
    return int((iou[rows, cols] >= threshold).sum())


@dataclass(frozen=True)
class InstanceScores:
    """Instance scores of one prediction (or summed over several).

    Attributes
    ----------
    ap : ``{threshold: TP / (TP + FP + FN)}`` for each IoU threshold.
    tp, fp, fn : counts per threshold.
    n_true, n_pred : object counts.
    """

    ap: dict[float, float]
    tp: dict[float, int]
    fp: dict[float, int]
    fn: dict[float, int]
    n_true: int
    n_pred: int

    @property
    def ap50(self) -> float:
        return self.ap[0.5]

    @property
    def map(self) -> float:
        """Mean AP over IoU 0.5:0.95."""
        return float(np.mean([self.ap[t] for t in IOU_THRESHOLDS]))

    def precision(self, threshold: float = 0.5) -> float:
        return self.tp[threshold] / max(1, self.n_pred)

    def recall(self, threshold: float = 0.5) -> float:
        return self.tp[threshold] / max(1, self.n_true)


def instance_scores(
    true: np.ndarray | list[np.ndarray],
    pred: np.ndarray | list[np.ndarray],
    *,
    thresholds: tuple[float, ...] = IOU_THRESHOLDS,
) -> InstanceScores:
    """Match predicted to true objects and score them (pooled over a list of images).

    Parameters
    ----------
    true, pred : label images (2D or 3D, same shapes pairwise), or lists of them; the
        counts are pooled over the list before taking ratios.
    thresholds : IoU thresholds.
    """
    trues = true if isinstance(true, list) else [true]
    preds = pred if isinstance(pred, list) else [pred]
    tp = dict.fromkeys(thresholds, 0)
    n_true = n_pred = 0
    for t, p in zip(trues, preds, strict=True):
        iou, tid, pid = iou_matrix(t, p)
        n_true += len(tid)
        n_pred += len(pid)
        for th in thresholds:
            tp[th] += _n_matches(iou, th)
    fp = {th: n_pred - tp[th] for th in thresholds}
    fn = {th: n_true - tp[th] for th in thresholds}
    ap = {th: tp[th] / max(1, tp[th] + fp[th] + fn[th]) for th in thresholds}
    if n_true == 0 and n_pred == 0:
        ap = dict.fromkeys(thresholds, 1.0)
    return InstanceScores(ap=ap, tp=tp, fp=fp, fn=fn, n_true=n_true, n_pred=n_pred)


def semantic_scores(
    true: np.ndarray | list[np.ndarray],
    pred: np.ndarray | list[np.ndarray],
    *,
    n_classes: int = 3,
) -> dict[str, float]:
    """Per-class IoU and global (pixel) accuracy of semantic maps.

    Parameters
    ----------
    true, pred : integer class maps (0..n_classes-1) of equal shapes, or lists of them
        (pooled).

    Returns
    -------
    ``{"iou_<k>": ..., "accuracy": ...}``; a class absent from both gets IoU ``nan``.
    """
    trues = true if isinstance(true, list) else [true]
    preds = pred if isinstance(pred, list) else [pred]
    conf = np.zeros((n_classes, n_classes), dtype=np.int64)
    for t, p in zip(trues, preds, strict=True):
        if t.shape != p.shape:
            raise ValueError(f"shapes differ: {t.shape} vs {p.shape}")
        idx = t.astype(np.int64).ravel() * n_classes + p.astype(np.int64).ravel()
        conf += np.bincount(idx, minlength=n_classes * n_classes).reshape(n_classes, n_classes)
    out: dict[str, float] = {}
    for k in range(n_classes):
        union = conf[k, :].sum() + conf[:, k].sum() - conf[k, k]
        out[f"iou_{k}"] = float(conf[k, k] / union) if union else float("nan")
    out["accuracy"] = float(np.trace(conf) / max(1, conf.sum()))
    return out
