"""Reference re-implementation of the MIND competition scorer (github.com/msnews/MIND, evaluate.py).

Kept line for line in its logic, NumPy calls and order of operations (including the unstable
``np.argsort(y_score)[::-1]``), so that tests compare the project's metrics with what the
competition computes. Only the file handling is simplified: ``scoring`` takes two iterables of
lines, as the original's file objects are.
"""

import json

import numpy as np
from sklearn.metrics import roc_auc_score


def dcg_score(y_true, y_score, k=10):
    order = np.argsort(y_score)[::-1]
    y_true = np.take(y_true, order[:k])
    gains = 2**y_true - 1
    discounts = np.log2(np.arange(len(y_true)) + 2)
    return np.sum(gains / discounts)


def ndcg_score(y_true, y_score, k=10):
    best = dcg_score(y_true, y_true, k)
    actual = dcg_score(y_true, y_score, k)
    return actual / best


def mrr_score(y_true, y_score):
    order = np.argsort(y_score)[::-1]
    y_true = np.take(y_true, order)
    rr_score = y_true / (np.arange(len(y_true)) + 1)
    return np.sum(rr_score) / np.sum(y_true)


def parse_line(line):
    impid, ranks = line.strip("\n").split()
    ranks = json.loads(ranks)
    return impid, ranks


def scoring(truth_lines, submission_lines):
    """Mean AUC, MRR, nDCG@5, nDCG@10 of a submission against a truth file (lines of each)."""
    aucs, mrrs, ndcg5s, ndcg10s = [], [], [], []
    submission = iter(submission_lines)
    for truth in truth_lines:
        line = next(submission)  # read before the mask check, as the original does
        impid, labels = parse_line(truth)
        if labels == []:  # masked impressions
            continue
        sub_impid, sub_ranks = parse_line(line)
        if sub_impid != impid:
            raise ValueError(f"Inconsistent Impression Id {sub_impid} and {impid}")
        y_true = np.array(labels, dtype="float32")
        y_score = [1.0 / rank for rank in sub_ranks]
        aucs.append(roc_auc_score(y_true, y_score))
        mrrs.append(mrr_score(y_true, y_score))
        ndcg5s.append(ndcg_score(y_true, y_score, 5))
        ndcg10s.append(ndcg_score(y_true, y_score, 10))
    return np.mean(aucs), np.mean(mrrs), np.mean(ndcg5s), np.mean(ndcg10s)
