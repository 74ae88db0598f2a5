"""The paper's representation analyses (§2, Tables 1, 8, 10; Figures 2, 4, 5) on feature arrays.

Functions of plain arrays, so each is checked on embeddings of known structure. Distances are
cosine distances between L2-normalised vectors.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def probe_accuracy(
    train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, seed: int = 0
) -> float:
    """Linear probing (Table 1): logistic regression on standardised features, test accuracy."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=seed))
    probe.fit(train_x, train_y)
    return float(probe.score(test_x, test_y))


def alignment_quality(objects: np.ndarray, labels: np.ndarray, categories: np.ndarray) -> float:
    """Table 8: mean over classes of the mean cosine similarity between each object and its
    category name's embedding (`categories[label]`)."""
    sims = np.sum(_unit(objects) * _unit(categories)[labels], axis=1)
    return float(np.mean([sims[labels == c].mean() for c in np.unique(labels)]))


def centroids(x: np.ndarray, labels: np.ndarray) -> np.ndarray:
    return np.stack([_unit(x)[labels == c].mean(0) for c in np.unique(labels)])


def inter_class_distance(x: np.ndarray, labels: np.ndarray) -> float:
    """Table 10: mean cosine distance between the class centroids of the (normalised) vectors."""
    c = _unit(centroids(x, labels))
    d = 1 - c @ c.T
    return float(d[~np.eye(len(c), dtype=bool)].mean())


def intra_class_variance(x: np.ndarray, labels: np.ndarray) -> float:
    """Table 10: mean squared distance of the normalised vectors to their class centroid."""
    u = _unit(x)
    return float(
        np.mean([np.sum((u[labels == c] - u[labels == c].mean(0)) ** 2, axis=1).mean() for c in np.unique(labels)])
    )


def modality_gap(objects: np.ndarray, categories: np.ndarray) -> float:
    """Distance between the means of the normalised object and category embeddings (Liang et al.)."""
    return float(np.linalg.norm(_unit(objects).mean(0) - _unit(categories).mean(0)))


def confusion(truth: list[str], predicted: list[str], classes: list[str]) -> np.ndarray:
    """Rows: true class; columns: predicted class, the last column for generation failures (any
    prediction that is not a class name, e.g. FOCI's "NA ### <raw output>")."""
    index = {c: i for i, c in enumerate(classes)}
    m = np.zeros((len(classes), len(classes) + 1), dtype=int)
    for t, p in zip(truth, predicted):
        m[index[t], index.get(p, len(classes))] += 1
    return m


def plot_tsne(groups: dict[str, tuple[np.ndarray, np.ndarray]], title: str, out: Path, seed: int = 0) -> None:
    """t-SNE of one or more groups of vectors (name -> (vectors, labels)) in one plane: colour is
    the class, marker the group (objects o, categories *)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.manifold import TSNE

    xs = np.concatenate([_unit(v) for v, _ in groups.values()])
    perplexity = float(min(30, max(2, (len(xs) - 1) // 3)))
    # 500 iterations (sklearn's default: 1000): the layout of a few hundred points has settled by then
    xy = TSNE(n_components=2, perplexity=perplexity, init="pca", max_iter=500, random_state=seed).fit_transform(xs)
    fig, ax = plt.subplots(figsize=(5, 5))
    start = 0
    for (name, (v, labels)), marker in zip(groups.items(), "o*^s"):
        part = xy[start : start + len(v)]
        ax.scatter(
            part[:, 0],
            part[:, 1],
            c=labels,
            cmap="tab20",
            marker=marker,
            s=60 if marker == "*" else 12,
            label=name,
            edgecolors="none",
        )
        start += len(v)
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)


def plot_confusion(m: np.ndarray, classes: list[str], title: str, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 5))
    ax.imshow(m, cmap="Blues")
    ax.set_yticks(range(len(classes)), classes, fontsize=6)
    ax.set_xticks(range(len(classes) + 1), [*classes, "(failure)"], fontsize=6, rotation=90)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
