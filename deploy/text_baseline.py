#!/usr/bin/env python3
"""The frozen-embedding baseline of the text experiment: all-MiniLM-L6-v2 sentence embeddings
(transformers, mean pooling over real tokens, L2-normalised: what sentence-transformers
computes) and an L2-regularised logistic regression fitted to convergence (Newton's method),
evaluated on the test file. Python with torch + transformers (the libtorch venv has both):

    ~/.cache/fedtune/libtorch-venv/bin/python deploy/text_baseline.py MINILM_DIR TRAIN_CSV TEST_CSV \
        [--train-examples N] [--test-examples N] [--c 1.0]

TRAIN_CSV / TEST_CSV: `text,label` files as deploy/fetch-text-data.sh writes them (the first N
rows are used: the text experiment's 4 clients x 300 sentences are the first 1,200 rows of
rt/train.csv and its 500 test sentences the first 500 of rt/test.csv).
"""

import argparse
import csv
import time

import numpy as np
import torch
from transformers import AutoModel, AutoTokenizer


def read(path, limit):
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if limit:
        rows = rows[:limit]
    return [r["text"] for r in rows], [r["label"] for r in rows]


def embed(model, tokenizer, texts, batch=64, max_len=128):
    out = []
    with torch.inference_mode():
        for i in range(0, len(texts), batch):
            enc = tokenizer(texts[i : i + batch], padding=True, truncation=True,
                            max_length=max_len, return_tensors="pt")
            states = model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).float()
            pooled = (states * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out.append(torch.nn.functional.normalize(pooled, dim=1).numpy())
    return np.concatenate(out).astype(np.float64)


def fit_logistic(x, y, c):
    """Minimises sum of log-losses + ||w||^2 / (2c) (bias unpenalised), as scikit-learn's
    LogisticRegression(C=c) does, by Newton's method."""
    xb = np.hstack([x, np.ones((len(x), 1))])
    w = np.zeros(xb.shape[1])
    reg = np.full(xb.shape[1], 1.0 / c)
    reg[-1] = 0.0
    for _ in range(50):
        p = 1.0 / (1.0 + np.exp(-xb @ w))
        grad = xb.T @ (p - y) + reg * w
        hess = (xb * (p * (1 - p))[:, None]).T @ xb + np.diag(reg)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    return w


def macro_f1(y, pred):
    f1s = []
    for k in (0, 1):
        tp = np.sum((pred == k) & (y == k))
        fp = np.sum((pred == k) & (y != k))
        fn = np.sum((pred != k) & (y == k))
        f1s.append(2 * tp / max(2 * tp + fp + fn, 1))
    return float(np.mean(f1s))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir")
    ap.add_argument("train_csv")
    ap.add_argument("test_csv")
    ap.add_argument("--train-examples", type=int, default=0)
    ap.add_argument("--test-examples", type=int, default=0)
    ap.add_argument("--c", type=float, default=1.0)
    args = ap.parse_args()
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    model = AutoModel.from_pretrained(args.model_dir).eval()
    train_x, train_y = read(args.train_csv, args.train_examples)
    test_x, test_y = read(args.test_csv, args.test_examples)
    labels = sorted(set(train_y))
    if len(labels) != 2:
        raise SystemExit(f"{args.train_csv}: expected 2 labels, found {labels}")
    started = time.time()
    xtr, xte = embed(model, tokenizer, train_x), embed(model, tokenizer, test_x)
    ytr = np.array([labels.index(v) for v in train_y], dtype=np.float64)
    yte = np.array([labels.index(v) for v in test_y])
    w = fit_logistic(xtr, ytr, args.c)
    pred = ((np.hstack([xte, np.ones((len(xte), 1))]) @ w) > 0).astype(int)
    print(
        f"frozen MiniLM + logistic regression (C={args.c}): {len(train_x)} training, "
        f"{len(test_x)} test sentences: accuracy {np.mean(pred == yte) * 100:.2f}% "
        f"macro-F1 {macro_f1(yte, pred):.4f} ({time.time() - started:.0f} s)"
    )


if __name__ == "__main__":
    main()
