"""Classification metrics (numpy and scipy only: no torch), for training and ``evaluate``."""

from __future__ import annotations

import numpy as np

__all__ = ["roc_auc"]


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

    score, positive = np.asarray(score, float), np.asarray(positive, bool)
    n1, n0 = int(positive.sum()), int((~positive).sum())
    if n1 == 0 or n0 == 0:
        return float("nan")
    r = rankdata(score)
    return float((r[positive].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))
