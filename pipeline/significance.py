"""Paired significance tests between experiment cells over test users (issue 11, item 6).

A claim "A beats B" compares two models on the SAME test users. Per user u, the metric
(NDCG@10 by default) of each cell is averaged over the seeds both cells ran (seeds pooled),
``a_u`` and ``b_u``; the test is on the paired differences ``d_u = a_u - b_u`` (U users):

* **paired permutation test** (sign flips: under H0 "A and B are exchangeable for each
  user", each ``d_u`` is as likely to be ``-d_u``), statistic ``mean(d)``, two-sided;
  exact over all 2^U flips when ``n_resamples >= 2^U``, else Monte Carlo
  (``scipy.stats.permutation_test`` with ``permutation_type="samples"``);
* **95% paired bootstrap interval** of ``mean(d)`` (users resampled with replacement,
  percentile method; ``scipy.stats.bootstrap``).

The verdict follows both: ``"A > B"`` when p < alpha and the interval lies above 0,
``"A < B"`` when p < alpha and it lies below 0, else ``"no significant difference"``.
Per-user figures come from each run's ``per_user-<exclude>-<repeat>.csv``
(:func:`pipeline.train_runs.write_per_user`: the target's 1-based rank per user, largest
Matryoshka size), so NDCG@K_u = 1[r <= K] / log2(r + 1) (Järvelin & Kekäläinen 2002), as
``pipeline.metrics``. Randomness: the tests are seeded (``seed``), so the same inputs give
the same p and interval.

Errors: :class:`mmcache.errors.ConfigError` for unusable inputs (named file, cells, users).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import ConfigError

ALPHA = 0.05


@dataclass(frozen=True)
class PairedTest:
    """The outcome of one paired comparison of cell ``a`` against cell ``b``.

    Attributes:
        a, b: cell ids; n_users: paired users U; seeds: the seeds pooled (both cells ran).
        mean_a, mean_b: the mean per-user metric of each (seeds averaged first).
        diff: mean(a_u - b_u) (= mean_a - mean_b); ci_low, ci_high: its 95% paired
            bootstrap interval; p: two-sided paired permutation p-value.
        verdict: ``"A > B"``, ``"A < B"`` or ``"no significant difference"`` (alpha 0.05,
            both the p-value and the interval must agree).
    """

    a: str
    b: str
    metric: str
    n_users: int
    seeds: tuple[int, ...]
    mean_a: float
    mean_b: float
    diff: float
    ci_low: float
    ci_high: float
    p: float
    verdict: str

    def row(self) -> dict:
        """A flat dict for CSV (seeds as ``1 2 3``)."""
        d = asdict(self)
        d["seeds"] = " ".join(str(s) for s in self.seeds)
        return d


def paired_test(a: np.ndarray, b: np.ndarray, *, n_resamples: int = 10_000, seed: int = 0,
                alpha: float = ALPHA, names: tuple[str, str] = ("A", "B"),
                metric: str = "NDCG@10", seeds: Sequence[int] = ()) -> PairedTest:
    """Paired permutation test and bootstrap interval of mean(a - b) (module docstring).

    Args:
        a, b: (U,) per-user metric of the two cells, aligned by user (U >= 2).
        n_resamples: permutations and bootstrap resamples (exact permutation test when
            >= 2^U).
        seed: seeds both resamplings.
    Raises:
        ConfigError: shapes differ, fewer than 2 users, or non-finite values.
    """
    from scipy import stats
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ConfigError(f"paired test {names[0]} vs {names[1]}: per-user arrays must be "
                          f"(U,) and aligned, got {a.shape} and {b.shape}")
    if a.size < 2 or not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ConfigError(f"paired test {names[0]} vs {names[1]}: needs >= 2 users with "
                          f"finite values (got {a.size})")
    d = a - b
    diff = float(d.mean())
    if not d.any():  # identical per-user figures: nothing to test
        p, lo, hi = 1.0, 0.0, 0.0
    else:
        perm = stats.permutation_test(
            (a, b), lambda x, y, axis: np.mean(x - y, axis=axis), permutation_type="samples",
            vectorized=True, n_resamples=n_resamples, alternative="two-sided",
            rng=np.random.default_rng(seed))
        p = float(perm.pvalue)
        boot = stats.bootstrap((d,), np.mean, n_resamples=n_resamples, confidence_level=0.95,
                               method="percentile", vectorized=True,
                               rng=np.random.default_rng(seed + 1))
        lo, hi = float(boot.confidence_interval.low), float(boot.confidence_interval.high)
    if p < alpha and lo > 0:
        verdict = f"{names[0]} > {names[1]}"
    elif p < alpha and hi < 0:
        verdict = f"{names[0]} < {names[1]}"
    else:
        verdict = "no significant difference"
    return PairedTest(a=names[0], b=names[1], metric=metric, n_users=int(a.size),
                      seeds=tuple(seeds), mean_a=float(a.mean()), mean_b=float(b.mean()),
                      diff=diff, ci_low=lo, ci_high=hi, p=p, verdict=verdict)


def per_user_metric(path: Path, split: str = "test", metric: str = "NDCG@10") -> dict[str, float]:
    """user_key -> the metric of that user's target, from a ``per_user-*.csv`` file.

    ``metric``: ``NDCG@K``, ``HR@K`` or ``MRR`` (from the 1-based ``rank`` column).

    Raises:
        ConfigError: the file is missing or a row is malformed (names the file and row);
            an unknown metric.
    """
    name, _, k = metric.partition("@")
    if name not in ("NDCG", "HR", "MRR") or (name != "MRR" and not k.isdigit()):
        raise ConfigError(f"unknown per-user metric {metric!r} (NDCG@K, HR@K or MRR)")
    kk = int(k) if k else 0
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"per-user results {path} not found (evaluate the run first)")
    out: dict[str, float] = {}
    with open(path, newline="") as f:
        for i, row in enumerate(csv.DictReader(f), start=2):
            if row.get("split") != split:
                continue
            try:
                r = int(row["rank"])
                user = row["user_key"]
            except (KeyError, TypeError, ValueError):
                raise ConfigError(f"{path}, row {i}: needs user_key and an integer rank, got "
                                  f"{row}") from None
            if r < 1:
                raise ConfigError(f"{path}, row {i}: rank {r} < 1")
            out[user] = (1.0 / r if name == "MRR" else
                         float(r <= kk) / (math.log2(r + 1) if name == "NDCG" else 1.0))
    return out


def pooled(paths_by_seed: dict[int, Path], split: str = "test",
           metric: str = "NDCG@10") -> dict[int, dict[str, float]]:
    """seed -> (user_key -> metric) for one cell's runs."""
    return {s: per_user_metric(p, split, metric) for s, p in paths_by_seed.items()}


def compare_cells(a: str, b: str, runs_a: dict[int, dict[str, float]],
                  runs_b: dict[int, dict[str, float]], **kw) -> PairedTest:
    """Seeds pooled: per user, the mean over the seeds both cells ran, then :func:`paired_test`.

    Raises:
        ConfigError: no seed in common, or the seeds' user sets differ (names the cells).
    """
    seeds = sorted(set(runs_a) & set(runs_b))
    if not seeds:
        raise ConfigError(f"cells {a} and {b} share no seed ({sorted(runs_a)} vs "
                          f"{sorted(runs_b)})")
    users = sorted(runs_a[seeds[0]])
    for s in seeds:
        for cell, runs in ((a, runs_a), (b, runs_b)):
            if sorted(runs[s]) != users:
                raise ConfigError(f"cell {cell}, seed {s}: its test users differ from cell "
                                  f"{a}, seed {seeds[0]} (not the same split?)")
    va = np.array([np.mean([runs_a[s][u] for s in seeds]) for u in users])  # (U,)
    vb = np.array([np.mean([runs_b[s][u] for s in seeds]) for u in users])  # (U,)
    return paired_test(va, vb, names=(a, b), seeds=seeds, **kw)


COMPARISONS: tuple[tuple[str, str, str], ...] = (
    # (A, B, the question): the claims the README's Experiments section states
    ("iisan", "sasrec-id", "IISAN (text + image) vs an ID-only SASRec"),
    ("iisan", "iisan-text", "adding the image tower to text-only IISAN"),
    ("iisan", "iisan-image", "adding the text tower to image-only IISAN"),
    ("iisan", "concat", "IISAN's SANs vs the frozen backbone (concat-and-project)"),
    ("iisan", "iisan-no-layerdrop", "LayerDrop vs every hidden state"),
    ("iisan", "iisan-no-gates", "modality gates"),
    ("iisan", "iisan-no-intra", "intra-modal SANs"),
    ("iisan", "iisan-no-inter", "inter-modal SAN"),
    *((f"{c}-dce", c, "IISAN's in-batch debiased CE vs full CE")
      for c in ("iisan", "iisan-no-layerdrop", "iisan-no-gates", "iisan-no-intra",
                "iisan-no-inter")),
    ("qformer", "concat", "Fusion-Q-Former vs concat-and-project"),
    ("qformer-id", "qformer", "adding item IDs to the Fusion-Q-Former"),
    ("qformer-id-cic", "qformer-id", "EM3's Content-ID-Contrastive loss (Q-Former)"),
    ("qformer-tokens", "qformer", "Fusion-Q-Former: token states vs pooled rows"),
    ("qformer-tokens-mean", "qformer-tokens",
     "Fusion-Q-Former on token states: queries + mean token vs EM3's queries"),
    ("qformer-tokens-mean", "concat",
     "Fusion-Q-Former (token states, queries + mean token) vs concat-and-project"),
    ("qformer-tokens-mean-text", "concat-text",
     "text only: Fusion-Q-Former (token states, queries + mean token) vs concat-and-project"),
    ("qformer-mean", "qformer",
     "pooled rows: Fusion-Q-Former queries + mean token vs EM3's queries"),
    ("qformer-mean", "concat",
     "Fusion-Q-Former (pooled rows, queries + mean token) vs concat-and-project"),
    ("qformer-tokens-mean", "qformer-mean",
     "queries + mean token: Fusion-Q-Former on token states vs pooled rows"),
    ("qformer-mean-text", "qformer-text",
     "text only, pooled rows: Fusion-Q-Former queries + mean token vs EM3's queries"),
    ("qformer-tokens-mean-text", "qformer-mean-text",
     "text only, queries + mean token: Fusion-Q-Former on token states vs pooled rows"),
    ("concat-id-cic", "concat-id", "Content-ID-Contrastive loss (concat)"),
    ("lru-id", "sasrec-id", "LRURec vs SASRec (item IDs)"),
    ("gru4rec-id", "sasrec-id", "GRU4Rec vs SASRec (item IDs)"),
    ("lru-id", "gru4rec-id", "LRURec vs GRU4Rec (item IDs)"),
    ("lru-id-short", "lru-id", "LRURec: windows of 10 vs 50"),
    ("lru-id-lora", "lru-id-short", "LoRA on full windows vs the short-window base"),
    ("vbpr", "sasrec-id", "VBPR (BPR, not sequential) vs SASRec"),
    # the modality study's one-tower rows and the fusion rows without the image tower
    ("iisan-text", "sasrec-id", "text-only IISAN vs an ID-only SASRec"),
    ("iisan-image", "sasrec-id", "image-only IISAN vs an ID-only SASRec"),
    ("iisan-text", "iisan-image", "IISAN on one tower: text vs image"),
    ("concat", "concat-text", "adding the image tower to concat-and-project"),
    ("qformer-text", "concat-text", "text only: Fusion-Q-Former vs concat-and-project"),
    ("concat-id", "concat", "adding item IDs to concat-and-project"),
    ("concat-id", "sasrec-id", "concat + item ID vs an ID-only SASRec"),
)
"""Pairs compared whenever both cells ran (A first)."""


def run_comparisons(per_user_files: dict[str, dict[int, Path]],
                    pairs: Iterable[tuple[str, str, str]] = COMPARISONS,
                    metric: str = "NDCG@10", **kw) -> list[PairedTest]:
    """Every pair of ``pairs`` whose cells both have per-user files.

    Args:
        per_user_files: cell id -> seed -> ``per_user-*.csv`` of that run.
    """
    cache: dict[str, dict[int, dict[str, float]]] = {}
    out = []
    for a, b, _ in pairs:
        if a not in per_user_files or b not in per_user_files:
            continue
        for c in (a, b):
            if c not in cache:
                cache[c] = pooled(per_user_files[c], metric=metric)
        out.append(compare_cells(a, b, cache[a], cache[b], metric=metric, **kw))
    return out


def markdown(tests: Sequence[PairedTest], questions: dict[tuple[str, str], str] | None = None
             ) -> str:
    """A markdown table of the comparisons (one row each)."""
    questions = questions if questions is not None else {(a, b): q for a, b, q in COMPARISONS}
    lines = ["| A vs B | question | A | B | A - B [95% CI] | p | verdict |",
             "|---|---|---|---|---|---|---|"]
    for t in tests:
        lines.append(f"| {t.a} vs {t.b} | {questions.get((t.a, t.b), '')} | {t.mean_a:.4f} | "
                     f"{t.mean_b:.4f} | {t.diff:+.4f} [{t.ci_low:+.4f}, {t.ci_high:+.4f}] | "
                     f"{t.p:.4f} | {t.verdict} |")
    if tests:
        t = tests[0]
        lines += ["", f"Paired over {t.n_users} test users ({t.metric} per user, the mean over "
                  f"seeds {', '.join(map(str, t.seeds))} first): two-sided sign-flip "
                  f"permutation test of the mean difference and its 95% paired bootstrap "
                  f"interval (percentile); a verdict needs p < {ALPHA} and an interval that "
                  f"excludes 0 (`pipeline/significance.py`)."]
    return "\n".join(lines)
