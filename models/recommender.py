"""Item tables and the next-item recommender (item table + SASRec) with full-softmax CE.

Papers: SASRec (Kang & McAuley, ICDM 2018) scoring ``y_ui = <h_u, e_i>`` against the item
embedding table; IISAN (Fu et al., SIGIR 2024; seed ``003_*``) with the item table produced
by the IISAN item encoder over cached hidden states. Loss: full-softmax cross-entropy over
all N items at every non-padding position (RecBole "CE", fMRLRec); IISAN's in-batch
debiased CE (eq. 6-7) lives with the other losses, not here.

Conventions: item ids are 1..N; id 0 is padding. Tables are (N + 1, D) with row 0 the
padding item (zero). Sequences are LEFT-padded: (B, L) long, 0 = padding, last column =
most recent item.

Departures from SASRec / RecBole: item embeddings are not multiplied by sqrt(D) (SASRec
does for ID tables); the sequence encoder normalises ``x + P`` with a LayerNorm, as the
MoRec / IISAN user encoder does, which makes such a scale moot. Embedding dropout is the
encoder's. The padding item is never a softmax candidate (RecBole's CE keeps it).
Errors: :class:`pipeline.errors.ConfigError`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from pipeline.errors import ConfigError

from .san import IISANItemEncoder
from .sasrec import SASRec


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


class ContentItemTable(nn.Module):
    """Item table computed by an IISAN encoder from cached hidden states.

    The hidden states are non-persistent buffers (data, not weights: they follow ``.to()``
    but are not saved in ``state_dict``) and keep their dtype (e.g. float16); the encoder
    casts each chunk on entry.

    Args:
        encoder: the :class:`IISANItemEncoder` to train.
        text_h: (N, Lt, Dt) cached text hidden states of items 1..N (row i-1 = item i), or None.
        image_h: (N, Li, Di) cached image hidden states, or None.
        chunk_size: if set, encode items in chunks of this many; with gradients enabled each
            chunk is activation-checkpointed (recomputed in backward), so peak activation
            memory is one chunk's. None = all items at once.
    Raises: ConfigError if the item counts differ, no modality is given, or chunk_size < 1.
    """

    def __init__(self, encoder: IISANItemEncoder, text_h: Tensor | None, image_h: Tensor | None,
                 chunk_size: int | None = None) -> None:
        super().__init__()
        given = [h for h in (text_h, image_h) if h is not None]
        if not given:
            raise ConfigError("ContentItemTable needs text_h or image_h")
        if len({h.shape[0] for h in given}) != 1:
            raise ConfigError(f"text_h and image_h disagree on the number of items: "
                              f"{[h.shape[0] for h in given]}")
        if chunk_size is not None and chunk_size < 1:
            raise ConfigError(f"chunk_size must be >= 1 or None, got {chunk_size!r}")
        self.encoder, self.chunk_size = encoder, chunk_size
        self.num_items, self.dim = given[0].shape[0], encoder.cfg.out_dim
        self.register_buffer("text_h", text_h, persistent=False)
        self.register_buffer("image_h", image_h, persistent=False)

    def forward(self) -> Tensor:
        """Returns the table (N + 1, out_dim); row 0 = zeros (padding)."""
        n, step = self.num_items, self.chunk_size or self.num_items
        out = []
        for i in range(0, n, step):
            t = self.text_h[i:i + step] if self.text_h is not None else None
            v = self.image_h[i:i + step] if self.image_h is not None else None
            if self.chunk_size is not None and torch.is_grad_enabled():
                out.append(checkpoint(self.encoder, t, v, use_reentrant=False))
            else:
                out.append(self.encoder(t, v))  # (chunk, D)
        emb = torch.cat(out)  # (N, D)
        return torch.cat([emb.new_zeros(1, emb.shape[1]), emb])  # (N + 1, D)


class SequentialRecommender(nn.Module):
    """Next-item recommender: item table -> SASRec -> dot-product scores over all items.

    Args:
        item_table: module whose ``forward()`` returns the (N + 1, D) table with row 0 the
            padding item; exposes ``num_items`` and ``dim`` (as the tables above do).
        seq_model: :class:`SASRec` with ``cfg.hidden == item_table.dim``.
    Raises: ConfigError if the widths differ.
    """

    def __init__(self, item_table: nn.Module, seq_model: SASRec) -> None:
        super().__init__()
        if getattr(item_table, "dim", seq_model.cfg.hidden) != seq_model.cfg.hidden:
            raise ConfigError(f"item table width {item_table.dim} != SASRec hidden "
                              f"{seq_model.cfg.hidden}")
        self.item_table, self.seq_model = item_table, seq_model

    def _encode(self, seqs: Tensor, table: Tensor) -> Tensor:
        if seqs.dim() != 2:
            raise ConfigError(f"seqs must be (B, L) item ids, got shape {tuple(seqs.shape)}")
        return self.seq_model(table[seqs], seqs == 0)  # (B, L, D)

    def forward(self, seqs: Tensor) -> Tensor:
        """seqs: (B, L) long, left-padded with 0 -> hidden states (B, L, D)."""
        return self._encode(seqs, self.item_table())

    def loss(self, seqs: Tensor, targets: Tensor) -> Tensor:
        """Mean full-softmax cross-entropy over the N real items.

        Args:
            seqs: (B, L) long input ids; targets: (B, L) long next-item ids, 0 = ignore.
        Returns:
            scalar: mean over positions with ``targets != 0`` of
            ``-log softmax_j(<h_t, e_j>)[target]`` with j over items 1..N. The item table is
            computed once per call.
        Raises: ConfigError for mismatched shapes or no non-padding target.
        """
        if seqs.shape != targets.shape:
            raise ConfigError(f"seqs {tuple(seqs.shape)} and targets {tuple(targets.shape)} "
                              f"differ in shape")
        valid = targets != 0  # (B, L)
        if not bool(valid.any()):
            raise ConfigError("loss needs at least one non-padding target (all targets are 0)")
        table = self.item_table()  # (N + 1, D)
        h = self._encode(seqs, table)[valid]  # (M, D) at the M valid positions
        logits = h @ table[1:].T  # (M, N)
        return F.cross_entropy(logits.float(), targets[valid] - 1)

    def score_last(self, seqs: Tensor) -> Tensor:
        """Scores for the item following the last position.

        Args: seqs: (B, L) long, left-padded; the last column must be a real item.
        Returns: (B, N + 1) logits ``<h_{L-1}, e_j>``; column 0 (padding) is -inf.
        Raises: ConfigError if some row's last position is padding (right-padded input).
        """
        if seqs.dim() == 2 and bool((seqs[:, -1] == 0).any()):
            raise ConfigError("score_last needs left-padded sequences: some row's last "
                              "position is padding")
        table = self.item_table()  # (N + 1, D)
        scores = self._encode(seqs, table)[:, -1] @ table.T  # (B, N + 1)
        scores[:, 0] = float("-inf")
        return scores
