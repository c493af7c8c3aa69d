"""This project's leave-one-out split as RecBole atomic files, and RecBole's score matrices
scored with this project's metric code (issue 11, item 5: the peer side by side).

Runs in the project venv and never imports RecBole (``benchmarks/peer/recbole_runner.py``
runs RecBole in its own venv, ``.peer-venv/``).

Atomic files (RecBole 1.2.1 benchmark-file mode, ``benchmark_filename: [train, valid,
test]`` with ``alias_of_item_id: [item_id_list]`` so that the history and target columns
share one item vocabulary, as RecBole's ``run_example/session_based_rec_example.py``):
``<dataset>.<part>.inter`` with the header ``user_id:token item_id_list:token_seq
item_id:token``, tab-separated, history items separated by one space, plus
``<dataset>.item`` (``item_id:token``, every catalogue item, so RecBole's vocabulary covers
the whole catalogue even where an item has no interaction). Tokens are this project's
model item indices ``1..N`` (``pipeline.split``) and ``SequenceSplit.user_ids`` as text, so
mapping RecBole's ``field2id_token`` back is a parse, not a lookup table.

* train: for every training sequence ``s`` (``split.train_sequences()``) and every
  ``t`` in ``1..len(s)-1``: history ``s[:t]`` (its last ``max_len`` items) -> ``s[t]``.
  This is the all-prefix augmentation RecBole applies to a non-pre-split sequential
  dataset; it covers exactly the targets of ``pipeline.train.training_windows``.
* valid: ``split.examples("valid")``: history ``seq[:-2]`` -> ``seq[-2]``.
* test: ``split.examples("test")``: history ``seq[:-1]`` -> ``seq[-1]``.

Histories are cut to their last ``max_len`` items in the files (RecBole's position table
has ``MAX_ITEM_LIST_LENGTH`` rows; this project's ``pad_left`` cuts the same way). Users
with fewer than 3 interactions have no valid / test row (as in ``SequenceSplit.examples``).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from pipeline.errors import ConfigError, InputDataError
from pipeline.metrics import exclusion_mask, metrics_from_ranks, ranks_from_scores
from pipeline.split import SequenceSplit

__all__ = ["PARTS", "HEADER", "write_atomic_files", "read_atomic_file", "scores_in_our_order",
           "metrics_from_score_matrix"]

PARTS = ("train", "valid", "test")
HEADER = ("user_id:token", "item_id_list:token_seq", "item_id:token")


def _rows(split: SequenceSplit, part: str, max_len: int) -> list[tuple[str, np.ndarray, int]]:
    if part == "train":
        out = []
        for user, s in zip(split.user_ids, split.train_sequences()):
            for t in range(1, len(s)):
                out.append((str(user), s[max(0, t - max_len):t], int(s[t])))
        return out
    kept = [u for u, s in zip(split.user_ids, split.sequences) if len(s) >= 3]
    hist, targets = split.examples(part)  # type: ignore[arg-type]
    return [(str(u), h[-max_len:], int(t)) for u, h, t in zip(kept, hist, targets)]


def write_atomic_files(split: SequenceSplit, out_dir: str | Path, dataset: str = "mmcache",
                       max_len: int = 50) -> dict[str, int]:
    """Write the split as RecBole atomic files ``out_dir/<dataset>.{train,valid,test}.inter``
    and ``out_dir/<dataset>.item`` (see the module doc for the rows).

    Args:
        split: the leave-one-out split (``pipeline.split.build_split``).
        out_dir: folder to write (created; existing files of these names are replaced).
        dataset: RecBole's ``dataset`` name (file prefix).
        max_len: L, histories keep their last L items (RecBole's ``MAX_ITEM_LIST_LENGTH``).

    Returns:
        ``{"train": rows, "valid": rows, "test": rows, "items": N}``.

    Raises:
        ConfigError: ``max_len`` < 1.
        InputDataError: the split gives no row for a part (no user with >= 2 training items,
            or none with >= 3 interactions), or a user id contains a tab or newline.
    """
    if max_len < 1:
        raise ConfigError(f"max_len must be >= 1, got {max_len}")
    bad = [u for u in split.user_ids if any(c in str(u) for c in "\t\n\r ")]
    if bad:
        raise InputDataError(f"user id {bad[0]!r} contains whitespace: it cannot be a RecBole "
                             "token")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {}
    for part in PARTS:
        rows = _rows(split, part, max_len)
        if not rows:
            raise InputDataError(f"the split gives no {part} row for RecBole")
        path = out_dir / f"{dataset}.{part}.inter"
        with open(path, "w", encoding="utf-8", newline="") as f:
            f.write("\t".join(HEADER) + "\n")
            for user, hist, target in rows:
                f.write(f"{user}\t{' '.join(map(str, hist.tolist()))}\t{target}\n")
        counts[part] = len(rows)
    with open(out_dir / f"{dataset}.item", "w", encoding="utf-8", newline="") as f:
        f.write("item_id:token\n")
        f.write("".join(f"{i}\n" for i in range(1, split.num_items + 1)))
    counts["items"] = split.num_items
    return counts


def read_atomic_file(path: str | Path) -> list[tuple[str, np.ndarray, int]]:
    """Read one ``.inter`` file written by :func:`write_atomic_files`.

    Returns:
        rows ``(user token, (h,) int64 history of model item indices, target index)``, in
        file order.

    Raises:
        InputDataError: the header differs from :data:`HEADER`, or a row (named by its
            0-based data row) does not have three fields of integer tokens.
    """
    path = Path(path)
    out = []
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader, None)
        if tuple(header or ()) != HEADER:
            raise InputDataError(f"header {header} is not {list(HEADER)}", path=path)
        for line, row in enumerate(reader, start=2):
            try:
                user, hist, target = row
                items = np.array([int(t) for t in hist.split(" ") if t], dtype=np.int64)
                out.append((user, items, int(target)))
            except ValueError as exc:
                raise InputDataError(f"not 'user<TAB>items<TAB>item': {row!r}", path=path,
                                     row=line - 2) from exc
    return out


def scores_in_our_order(scores: np.ndarray, item_tokens: list[str], row_users: list[str],
                        split: SequenceSplit) -> torch.Tensor:
    """Reorder a RecBole score matrix into this project's (examples, N+1) layout.

    Args:
        scores: (B, M) float scores from RecBole's ``full_sort_predict``; column j is
            RecBole's internal item id j (``field2id_token["item_id"][j]``; 0 = ``[PAD]``).
        item_tokens: (M,) RecBole's ``field2id_token["item_id"]``: the model item index
            1..N of each column as text, ``"[PAD]"`` at 0.
        row_users: (B,) the user token of each row (RecBole's ``field2id_token["user_id"]``
            of the row's user); each user of ``split`` with >= 3 interactions exactly once.
        split: the split the files were written from.

    Returns:
        (B, N+1) float32 tensor, rows in ``split.examples`` order (users ascending), column
        i = model item index i; column 0 (padding) is -inf.

    Raises:
        InputDataError: a catalogue item has no column, a token is not an item index 1..N,
            or the rows do not cover the split's evaluation users exactly once.
    """
    scores = np.asarray(scores, dtype=np.float32)
    n = split.num_items
    if scores.ndim != 2 or scores.shape[1] != len(item_tokens) or scores.shape[0] != len(row_users):
        raise InputDataError(f"scores {scores.shape} do not match {len(row_users)} users x "
                             f"{len(item_tokens)} item tokens")
    cols = np.full(n + 1, -1, dtype=np.int64)
    for j, tok in enumerate(item_tokens):
        if tok == "[PAD]":
            continue
        try:
            i = int(tok)
        except ValueError as exc:
            raise InputDataError(f"RecBole item token {tok!r} is not a model item index") from exc
        if not 1 <= i <= n:
            raise InputDataError(f"RecBole item token {tok!r} is outside 1..{n}")
        cols[i] = j
    missing = np.flatnonzero(cols[1:] < 0) + 1
    if len(missing):
        raise InputDataError(f"{len(missing)} catalogue item(s) have no RecBole column, e.g. "
                             f"model index {int(missing[0])}")
    want = [str(u) for u, s in zip(split.user_ids, split.sequences) if len(s) >= 3]
    pos = {u: r for r, u in enumerate(row_users)}
    if len(pos) != len(row_users) or set(pos) != set(want):
        extra = sorted(set(pos) ^ set(want))[:3]
        raise InputDataError(f"score rows cover users {len(pos)} (distinct) of {len(row_users)}"
                             f", the split has {len(want)} evaluation users; differing: {extra}")
    out = np.full((len(want), n + 1), -np.inf, dtype=np.float32)
    out[:, 1:] = scores[np.array([pos[u] for u in want])][:, cols[1:]]
    return torch.from_numpy(out)


def metrics_from_score_matrix(scores: torch.Tensor, split: SequenceSplit,
                              stage: Literal["valid", "test"],
                              rule: Literal["none", "window", "all"], max_len: int = 50,
                              ks: tuple[int, ...] = (5, 10, 20)) -> dict[str, float]:
    """This project's full-ranking metrics of a score matrix in our layout.

    Same histories, exclusion rule (``pipeline.metrics.exclusion_mask``; ``window`` = the
    last ``max_len`` history items), pessimistic ties and repeat-target rule ``rankable`` as
    ``pipeline.evaluate.evaluate``.

    Args:
        scores: (B, N+1) scores, rows in ``split.examples(stage)`` order
            (:func:`scores_in_our_order`).
        split, stage, rule, max_len, ks: as ``pipeline.evaluate.evaluate`` / ``EvalConfig``.

    Returns:
        ``{"HR@K", "NDCG@K", "MRR", "n_users"}``.

    Raises:
        InputDataError: the row count differs from the stage's examples.
        ConfigError / UnknownItemError / ValueError: from ``pipeline.metrics``.
    """
    hist, targets = split.examples(stage)
    if scores.shape[0] != len(targets):
        raise InputDataError(f"{scores.shape[0]} score rows for {len(targets)} {stage} examples")
    mask = exclusion_mask(hist, targets, split.num_items, rule, max_len)
    ranks = ranks_from_scores(scores.float(), torch.from_numpy(targets), mask)
    return {**metrics_from_ranks(ranks, ks), "n_users": len(targets)}
