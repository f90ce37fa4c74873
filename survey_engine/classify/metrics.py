"""Classification metrics (numpy and scipy only: no torch), for training and ``evaluate``."""

from __future__ import annotations

import numpy as np

__all__ = ["roc_auc", "roc_auc_error"]


def roc_auc(score: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve of ``score`` for the ``positive`` class (ties count half).

    Parameters
    ----------
    score : numpy.ndarray
        Per object: larger means more likely positive.
    positive : numpy.ndarray of bool
        The true class.

    Returns
    -------
    float
        NaN unless both classes are present.
    """
    from scipy.stats import rankdata

    score, positive, n1, n0 = _classes(score, positive)
    if n1 == 0 or n0 == 0:
        return float("nan")
    r = rankdata(score)
    return float((r[positive].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def roc_auc_error(score: np.ndarray, positive: np.ndarray) -> float:
    """Standard error of :func:`roc_auc` (DeLong et al. 1988: the variance of the placements).

    Parameters
    ----------
    score, positive : numpy.ndarray
        As for :func:`roc_auc`.

    Returns
    -------
    float
        NaN unless each class has at least two objects.
    """
    from scipy.stats import rankdata

    score, positive, n1, n0 = _classes(score, positive)
    if n1 < 2 or n0 < 2:
        return float("nan")
    r = rankdata(score)
    v10 = (r[positive] - rankdata(score[positive])) / n0  # each positive: fraction of negatives below
    v01 = 1.0 - (r[~positive] - rankdata(score[~positive])) / n1  # each negative: positives above
    return float(np.sqrt(np.var(v10, ddof=1) / n1 + np.var(v01, ddof=1) / n0))


def _classes(score, positive) -> tuple[np.ndarray, np.ndarray, int, int]:
    """``score`` as floats, ``positive`` as bools, and the number of positives and negatives."""
    score, positive = np.asarray(score, float), np.asarray(positive, bool)
    return score, positive, int(positive.sum()), int((~positive).sum())
