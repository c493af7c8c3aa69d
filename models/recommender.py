"""Item tables and the next-item recommender (item table + sequence model) with its losses.

Papers: SASRec (Kang & McAuley, ICDM 2018) scoring ``y_ui = <h_u, e_i>`` against the item
embedding table; IISAN (Fu et al., SIGIR 2024; seed ``003_*``) with the item table produced
by the IISAN item encoder over cached hidden states. Default loss: full-softmax
cross-entropy over all N items at every non-padding position (RecBole "CE", fMRLRec); with a
Matryoshka sequence model it is averaged over the sizes (fMRLRec eq. 14). IISAN's in-batch
debiased CE (eq. 6-7) and BPR are selectable (:mod:`models.losses`). The sequence model is
any of :class:`models.sasrec.SASRec`, :class:`models.sasrec.MatryoshkaSASRec`,
:class:`models.lru.LRURec`, :class:`models.gru4rec.GRU4Rec` (``forward(x, pad_mask) -> (B, L, D)``, ``hidden``, ``sizes``).

Conventions: item ids are 1..N; id 0 is padding. Tables are (N + 1, D) with row 0 the
padding item (zero). Sequences are LEFT-padded: (B, L) long, 0 = padding, last column =
most recent item.

Departures from SASRec / RecBole: item embeddings are not multiplied by sqrt(D) (SASRec
does for ID tables); the sequence encoder normalises ``x + P`` with a LayerNorm, as the
MoRec / IISAN user encoder does, which makes such a scale moot. Embedding dropout is the
encoder's. The padding item is never a softmax candidate (RecBole's CE keeps it).
Errors: :class:`mmcache.errors.ConfigError`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from mmcache.errors import ConfigError

from .common import lookup
from .losses import bpr_loss, debiased_in_batch_ce, matryoshka_ce, sample_negatives
from .matryoshka import nested_scores, size_index
from .san import IISANItemEncoder


class IDItemTable(nn.Module):
    """Learned ID embeddings: ``nn.Embedding(N + 1, D, padding_idx=0)``, init N(0, 0.02^2).

    Args: num_items: N (ids 1..N). dim: D.
    Raises: ConfigError for num_items < 1 or dim < 1.
    """

    def __init__(self, num_items: int, dim: int) -> None:
        super().__init__()
        if num_items < 1 or dim < 1:
            raise ConfigError(f"IDItemTable needs num_items >= 1 and dim >= 1, "
                              f"got {num_items}, {dim}")
        self.num_items, self.dim = num_items, dim
        self.emb = nn.Embedding(num_items + 1, dim, padding_idx=0)
        nn.init.normal_(self.emb.weight, 0.0, 0.02)
        with torch.no_grad():
            self.emb.weight[0].zero_()

    def forward(self) -> Tensor:
        """Returns the table (N + 1, D); row 0 = padding (zero, receives no gradient)."""
        return self.emb.weight


TABLE_NORMS = ("none", "center", "standardize")


class ContentItemTable(nn.Module):
    """Item table computed by a content encoder from cached hidden states.

    The encoder is any module ``encoder(text_h, image_h) -> (n, cfg.out_dim)``: IISAN
    (:mod:`models.san`), the Fusion-Q-Former (:mod:`models.qformer`) or the concat-and-project
    / frozen-feature linear encoder (:mod:`models.item_encoders`).

    The hidden states are non-persistent buffers (data, not weights: they follow ``.to()``
    but are not saved in ``state_dict``) and keep their dtype (e.g. float16); the encoder
    casts each chunk on entry.

    Args:
        encoder: the item encoder to train (e.g. :class:`IISANItemEncoder`).
        text_h: (N, Lt, Dt) cached text hidden states of items 1..N (row i-1 = item i), or None.
        image_h: (N, Li, Di) cached image hidden states, or None.
        chunk_size: if set, encode items in chunks of this many; with gradients enabled each
            chunk is activation-checkpointed (recomputed in backward), so peak activation
            memory is one chunk's. None = all items at once.
        text_mask, image_mask: (N, T) bool attention masks of token-level states
            (``pooling="tokens"``), passed to the encoder as ``text_mask`` / ``image_mask``
            (the Fusion-Q-Former); None = not given.
        table_norm: ``"none"`` (default), ``"center"`` (subtract the mean over the N items,
            per dim: e_i - mean_j e_j) or ``"standardize"`` (centre, divide by the std over
            the items per dim, times a learned per-dim gain, init D^-1/2 so rows start
            with norm ~1 (unit-std dims gave initial losses of 25): batch normalisation
            whose batch is the whole catalogue, so train and eval see the same statistics
            and no running averages exist). For encoders whose table collapses onto one
            item-independent vector (the Fusion-Q-Former, README "Experiments"): the
            sequence model's input LayerNorm then sees almost the same vector for every
            item. Not in IISAN / EM3.
    Raises: ConfigError if the item counts differ, no modality is given, chunk_size < 1 or
        table_norm is unknown.
    """

    def __init__(self, encoder: IISANItemEncoder, text_h: Tensor | None, image_h: Tensor | None,
                 chunk_size: int | None = None, text_mask: Tensor | None = None,
                 image_mask: Tensor | None = None, table_norm: str = "none") -> None:
        super().__init__()
        if table_norm not in TABLE_NORMS:
            raise ConfigError(f"table_norm must be one of {TABLE_NORMS}, got {table_norm!r}")
        self.table_norm = table_norm
        d = encoder.cfg.out_dim
        self.gain = (nn.Parameter(torch.full((d,), d ** -0.5))  # rows of norm ~1 at init
                     if table_norm == "standardize" else None)
        given = [h for h in (text_h, image_h) if h is not None]
        if not given:
            raise ConfigError("ContentItemTable needs text_h or image_h")
        if len({h.shape[0] for h in given}) != 1:
            raise ConfigError(f"text_h and image_h disagree on the number of items: "
                              f"{[h.shape[0] for h in given]}")
        for name, m in (("text_mask", text_mask), ("image_mask", image_mask)):
            if m is not None and (m.dim() != 2 or m.shape[0] != given[0].shape[0]):
                raise ConfigError(f"{name} must be (N, T) with N = {given[0].shape[0]} items, "
                                  f"got {tuple(m.shape)}")
        if chunk_size is not None and chunk_size < 1:
            raise ConfigError(f"chunk_size must be >= 1 or None, got {chunk_size!r}")
        self.encoder, self.chunk_size = encoder, chunk_size
        self.num_items, self.dim = given[0].shape[0], encoder.cfg.out_dim
        self.register_buffer("text_h", text_h, persistent=False)
        self.register_buffer("image_h", image_h, persistent=False)
        self.register_buffer("text_mask", text_mask, persistent=False)
        self.register_buffer("image_mask", image_mask, persistent=False)

    def forward(self) -> Tensor:
        """Returns the table (N + 1, out_dim); row 0 = zeros (padding)."""
        return self._table(None)

    def rows(self, ids: Tensor) -> Tensor:
        """The table of only these items: (U + 1, out_dim), row 0 = zeros, row k = item ids[k-1].

        Equal to ``forward()[torch.cat([0, ids])]`` (the encoder maps each item on its own),
        at the cost of U items instead of N: what an in-batch loss needs (IISAN's debiased
        CE scores only the batch's items).

        Args: ids: (U,) long item ids in 1..N.
        Raises: ConfigError for an id outside 1..N.
        """
        if ids.numel() and (int(ids.min()) < 1 or int(ids.max()) > self.num_items):
            raise ConfigError(f"item ids must be in 1..{self.num_items}, got "
                              f"{int(ids.min())}..{int(ids.max())}")
        if self.table_norm != "none":  # the statistics are the whole catalogue's
            return self._table(None)[torch.cat([ids.new_zeros(1), ids])]
        return self._table(ids - 1)

    def _table(self, index: Tensor | None) -> Tensor:
        n = self.num_items if index is None else int(index.numel())
        step = self.chunk_size or max(n, 1)

        def take(h: Tensor | None, i: int) -> Tensor | None:
            if h is None:
                return None
            return h[i:i + step] if index is None else h[index[i:i + step]]

        out = []
        for i in range(0, n, step):
            t, v = take(self.text_h, i), take(self.image_h, i)
            kw = {k: take(m, i) for k, m in (("text_mask", self.text_mask),
                                              ("image_mask", self.image_mask))
                  if m is not None}
            if self.chunk_size is not None and torch.is_grad_enabled():
                out.append(checkpoint(self.encoder, t, v, use_reentrant=False, **kw))
            else:
                out.append(self.encoder(t, v, **kw))  # (chunk, D)
        emb = torch.cat(out)  # (N, D)
        if self.table_norm != "none" and index is None:
            emb = emb - emb.mean(0, keepdim=True)  # (N, D), mean over the catalogue
            if self.gain is not None:
                emb = emb / (emb.std(0, keepdim=True) + 1e-5) * self.gain  # (N, D)
        return torch.cat([emb.new_zeros(1, emb.shape[1]), emb])  # (N + 1, D)


class SequentialRecommender(nn.Module):
    """Next-item recommender: item table -> sequence model -> dot-product scores over all items.

    Args:
        item_table: module whose ``forward()`` returns the (N + 1, D) table with row 0 the
            padding item; exposes ``num_items`` and ``dim`` (as the tables above do).
        seq_model: a sequence model with ``hidden == item_table.dim`` (SASRec, Matryoshka
            SASRec, LRURec, GRU4Rec). Its ``sizes`` (default ``(hidden,)``) are the widths
            that are models of their own: the size-s score is ``<h[:s], e[:s]>``.
    Raises: ConfigError if the widths differ.
    """

    def __init__(self, item_table: nn.Module, seq_model: nn.Module) -> None:
        super().__init__()
        hidden = getattr(seq_model, "hidden", None) or seq_model.cfg.hidden
        if getattr(item_table, "dim", hidden) != hidden:
            raise ConfigError(f"item table width {item_table.dim} != sequence model hidden "
                              f"{hidden}")
        self.item_table, self.seq_model = item_table, seq_model
        self.hidden = hidden
        self.sizes: tuple[int, ...] = tuple(getattr(seq_model, "sizes", (hidden,)))

    def _encode(self, seqs: Tensor, table: Tensor) -> Tensor:
        if seqs.dim() != 2:
            raise ConfigError(f"seqs must be (B, L) item ids, got shape {tuple(seqs.shape)}")
        return self.seq_model(lookup(table, seqs), seqs == 0)  # (B, L, D)

    def forward(self, seqs: Tensor) -> Tensor:
        """seqs: (B, L) long, left-padded with 0 -> hidden states (B, L, D)."""
        return self._encode(seqs, self.item_table())

    def loss(self, seqs: Tensor, targets: Tensor, kind: str = "ce", *,
             table: Tensor | None = None, log_pop: Tensor | None = None,
             num_negatives: int = 1, generator: torch.Generator | None = None) -> Tensor:
        """Training loss at every position with a target, averaged over the sizes.

        Args:
            seqs: (B, L) long input ids; targets: (B, L) long next-item ids, 0 = ignore.
            kind: "ce" (full softmax over the N items; fMRLRec eq. 14 over the sizes),
                "debiased_ce" (IISAN eq. 6-7; needs ``log_pop``; candidates are the items of
                the batch windows ``[seqs, targets[:, -1:]]``) or "bpr" (``num_negatives``
                uniform negatives per target).
            table: the (N + 1, D) item table if the caller has computed it (else computed
                here, once per call; for "debiased_ce" with a content table only the batch's
                items are encoded, :meth:`ContentItemTable.rows`).
        Returns:
            scalar; for "ce" with one size: mean over positions with ``targets != 0`` of
            ``-log softmax_j(<h_t, e_j>)[target]``, j over items 1..N.
        Raises: ConfigError for mismatched shapes, no non-padding target, unknown kind or a
            missing ``log_pop``.
        """
        if seqs.shape != targets.shape:
            raise ConfigError(f"seqs {tuple(seqs.shape)} and targets {tuple(targets.shape)} "
                              f"differ in shape")
        valid = targets != 0  # (B, L)
        if not bool(valid.any()):
            raise ConfigError("loss needs at least one non-padding target (all targets are 0)")
        if kind not in ("ce", "debiased_ce", "bpr"):
            raise ConfigError(f"unknown loss kind {kind!r}; expected ce, debiased_ce or bpr")
        if table is None and kind == "debiased_ce" and hasattr(self.item_table, "rows"):
            # in-batch loss: encode only the U items of the batch windows (IISAN's training
            # step), then the same loss on batch-local ids (equal values and gradients)
            if log_pop is None:
                raise ConfigError("loss kind 'debiased_ce' needs log_pop (log item popularity)")
            window = torch.cat([seqs, targets[:, -1:]], dim=1)  # (B, L + 1)
            uniq = torch.unique(window)  # (U') sorted
            uniq = uniq[uniq != 0]  # (U,)
            local = lambda x: torch.where(x == 0, 0, torch.searchsorted(uniq, x) + 1)  # noqa: E731
            sub = self.item_table.rows(uniq)  # (U + 1, D)
            lp = torch.cat([log_pop[:1], log_pop[uniq]])  # (U + 1,)
            h_all = self._encode(local(seqs), sub)  # (B, L, D)
            return debiased_in_batch_ce(h_all, local(targets), local(window), sub, lp, self.sizes)
        if table is None:
            table = self.item_table()  # (N + 1, D)
        h_all = self._encode(seqs, table)  # (B, L, D)
        if kind == "ce":
            return matryoshka_ce(h_all[valid], table, targets[valid], self.sizes)
        if kind == "debiased_ce":
            if log_pop is None:
                raise ConfigError("loss kind 'debiased_ce' needs log_pop (log item popularity)")
            window = torch.cat([seqs, targets[:, -1:]], dim=1)  # (B, L + 1)
            return debiased_in_batch_ce(h_all, targets, window, table, log_pop, self.sizes)
        h, pos = h_all[valid], targets[valid]  # (M, D), (M,)
        neg = sample_negatives(pos, table.shape[0] - 1, num_negatives, generator)  # (M, J)
        cand = torch.cat([pos[:, None], neg], dim=1)  # (M, 1 + J)
        e = lookup(table, cand)  # (M, 1 + J, D)
        terms = []
        for s in self.sizes:  # M x (1 + J) scores per size: the products are cheap
            y = torch.einsum("md,mjd->mj", h[:, :s], e[..., :s])  # (M, 1 + J)
            terms.append(bpr_loss(y[:, 0], y[:, 1:]))
        return torch.stack(terms).mean()

    def score_last_sizes(self, seqs: Tensor) -> list[Tensor]:
        """Scores for the next item at every size (one sequence-model pass).

        Args: seqs: (B, L) long, left-padded; the last column must be a real item.
        Returns: one (B, N + 1) tensor per size in ``self.sizes``; column 0 is -inf.
        Raises: ConfigError if some row's last position is padding.
        """
        if seqs.dim() == 2 and bool((seqs[:, -1] == 0).any()):
            raise ConfigError("score_last needs left-padded sequences: some row's last "
                              "position is padding")
        table = self.item_table()  # (N + 1, D)
        h = self._encode(seqs, table)[:, -1]  # (B, D)
        out = (nested_scores(h, table, self.sizes) if len(self.sizes) > 1
               else [h @ table.T])  # (B, N + 1) each, one product at the largest size
        for scores in out:
            scores[:, 0] = float("-inf")
        return out

    def score_last(self, seqs: Tensor, size: int | None = None) -> Tensor:
        """Scores for the item following the last position.

        Args: seqs: (B, L) long, left-padded; the last column must be a real item.
            size: Matryoshka size to score with (default: the full width).
        Returns: (B, N + 1) logits ``<h_{L-1}[:s], e_j[:s]>``; column 0 (padding) is -inf.
        Raises: ConfigError if some row's last position is padding (right-padded input) or
            ``size`` is not one of ``sizes``.
        """
        k = size_index(self.sizes, size) if size is not None else len(self.sizes) - 1
        return self.score_last_sizes(seqs)[k]

    def extract(self, size: int) -> "SequentialRecommender":
        """A standalone recommender of width ``size`` (fMRLRec: train once, deploy any size).

        The item table is computed once and sliced to its first ``size`` features
        (:class:`models.item_encoders.FixedItemTable`); the sequence model is extracted with
        its own ``extract``.
        Raises: ConfigError if ``size`` is not one of ``sizes`` or the model cannot extract.
        """
        from .item_encoders import FixedItemTable
        k = size_index(self.sizes, size)
        if not hasattr(self.seq_model, "extract"):
            raise ConfigError(f"{type(self.seq_model).__name__} has no Matryoshka extraction")
        with torch.no_grad():
            table = self.item_table()[:, :size]  # (N + 1, size)
        return SequentialRecommender(FixedItemTable(table), self.seq_model.extract(k))
