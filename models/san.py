"""IISAN item encoder: intra- and inter-modal side-adapted networks over cached hidden states.

Papers: Fu et al., "IISAN: Efficiently Adapting Multimodal Representation for Sequential
Recommendation with Decoupled PEFT" (SIGIR 2024) and the journal extension IISAN-Versa
(seed ``003_*``), section III.

Equations implemented (``h_k`` = k-th kept hidden state row, row 0 = embedding output):
    SANB(x)  = x + W_up ReLU(W_down x + b_down) + b_up,  W ~ N(0, 0.01^2), b = 0
    gates    g_k = sigmoid(a_k / 0.1), a_k = 0 at init (g = 0.5)
    Intra-SAN (eq. 2):  s_0 = h_0;  s_k = SANB_k(g_k h_k + (1 - g_k) s_{k-1}),  k = 1..n-1
    Inter-SAN (eq. 3-4) over P paired rows (X^txt_k, X^img_k), k = 1..P; X = DTL(h) for the
        wider modality (IISAN-VA), else h:
        s_0 = 0;  s_k = SANB_k(s_{k-1} + b_k X^img_k + (1 - b_k) X^txt_k)
    item embedding (eq. 1): e = FL([e_img ; e_inter ; e_txt]), FL a Linear to ``out_dim``.

Defaults follow the public IISAN code (GAIR-Lab/IISAN ``Code_Cached/model``), each
departure kept as a named option of :class:`IISANConfig`:
    * ``inter_start="zeros"``: the Inter-SAN starts from zeros and fuses the paired block rows
      only (``remove_first``); ``"gate"`` = the earlier variant, ``s_0 = b_0 X^img_0 +
      (1 - b_0) X^txt_0`` with no SANB (so P pairs give P - 1 SANBs).
    * ``use_gates=False`` ("w/o Modality Gate") with ``ungated="sum"``: the two inputs are
      summed, ``SANB(h_k + s_{k-1})`` and ``SANB(s_{k-1} + X^img_k + X^txt_k)``; ``"half"``
      = a constant gate 0.5 (the earlier variant).
    * ``use_intra=False`` ("w/o Intra-modal SAN", the public ``modality == "inter"``) with
      ``without_intra="inter_only"``: ``e = FL(e_inter)`` alone; ``"frozen_rows"`` = the
      earlier variant, the frozen top rows of both towers next to ``e_inter``. With no
      Inter-SAN either (or one modality), the frozen top rows are used (frozen backbone).
    * ``use_inter=False`` ("w/o Inter-modal SAN"): ``e = FL([e_img ; e_txt])``, the two intra
      outputs alone.
    * ``pairing="versa"``: the Inter-SAN pairs the towers' rows by IISAN-Versa group
      LayerDrop for the towers' depths (:func:`models.layerdrop.versa_pairing`; e.g. MiniLM
      6 blocks + EfficientNet-Lite0 8 -> text hidden states 3, 4, 5, 6 with image 2, 4, 6, 8);
      the given rows must contain them (``*_layer_ids`` name the hidden-state index of each
      given row). ``"top"`` = the earlier variant, the top min(n_txt, n_img) given rows of
      each tower (section VI-E's "24+12" experiments), without the embedding rows when
      ``inter_start="zeros"``. :attr:`IISANConfig.inter_pairs` is the resolved pairing.

Where this departs from the paper / public code:
    * Eq. (2) prints the gate on the previous SANB state (mu s_{k-1} + (1 - mu) h_k); we put
      it on the hidden state, g_k h_k + (1 - g_k) s_{k-1}, as the project reference does. The
      two are the same family (g = 1 - mu) and coincide at init (0.5).
    * Row 0 (embedding output) is fed as the initial state s_0 of each intra tower with no
      SANB, as the public code does, so n rows give n - 1 SANBs per intra tower; the intra
      towers use every given row (the store's LayerDrop), the pairing only picks the
      Inter-SAN's rows.
    * DTL is one ``Linear(d_big -> d_small)`` per inter row (IISAN-Versa, fig. 2).
    * Towers whose kept rows differ in width (a CNN's stage outputs, ``text_widths`` /
      ``image_widths``) first map every row to the tower's widest width with a row-wise
      DTL (``models.dtl.RowDTL``, one ``Linear(d_k -> D)`` per narrower row, reading the
      row's first ``d_k`` dims of the zero-padded cache) before the intra-modal SAN; the
      Inter-SAN DTL then applies as above. Uniform towers get no row-wise DTL.
    * Optional dropout on each SANB's adapter branch (0 reproduces the equations exactly).
    * Bottleneck ``adapter_dim`` r defaults to 64 (Houlsby-adapter scale; 12x reduction for
      d = 768); the papers do not fix it in the text.

Shapes: N items, n rows (kept hidden states), D / Dt / Di hidden widths.
Errors: :class:`mmcache.errors.ConfigError`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from mmcache.errors import ConfigError

from .dtl import RowDTL, check_widths, mixed
from .layerdrop import versa_pairing
from .rng import Dropout

GATE_TEMPERATURE = 0.1


def _pos_int(name: str, v: object, minimum: int = 1) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ConfigError(f"{name} must be an int >= {minimum}, got {v!r}")


class SANB(nn.Module):
    """Side-adapted network block: ``x + W_up ReLU(W_down x + b_down) + b_up``.

    Args:
        d: input / output width D. r: bottleneck width. dropout: on the adapter branch.
    Init: weights N(0, 0.01^2), biases 0 (so SANB is close to identity at init).
    Raises: ConfigError for d < 1, r < 1 or dropout outside [0, 1).
    """

    def __init__(self, d: int, r: int, dropout: float = 0.0) -> None:
        super().__init__()
        _pos_int("SANB width d", d)
        _pos_int("SANB bottleneck r", r)
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {dropout!r}")
        self.down, self.up = nn.Linear(d, r), nn.Linear(r, d)
        self.drop = Dropout(dropout)
        for lin in (self.down, self.up):
            nn.init.normal_(lin.weight, 0.0, 0.01)
            nn.init.zeros_(lin.bias)

    def forward(self, x: Tensor) -> Tensor:
        """x: (..., D) -> (..., D)."""
        return x + self.drop(self.up(torch.relu(self.down(x))))


class Gate(nn.Module):
    """Scalar fusion gate ``g = sigmoid(a / 0.1)``, ``a = 0`` at init (g = 0.5).

    Args: learnable: if False the gate has no parameter and :meth:`forward` returns None
    (the "w/o Modality Gate" ablation, IISAN-Versa table VI; the caller then sums or
    averages the two inputs, see :func:`fuse`).
    """

    def __init__(self, learnable: bool = True) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.zeros(())) if learnable else None

    def forward(self) -> Tensor | None:
        """Returns the gate value: a 0-d tensor in (0, 1), or None without a gate."""
        return None if self.a is None else torch.sigmoid(self.a / GATE_TEMPERATURE)


UNGATED = ("sum", "half")


def fuse(g: Tensor | None, x: Tensor, y: Tensor, ungated: str = "sum") -> Tensor:
    """Gated mix ``g x + (1 - g) y``; without a gate (g None) ``x + y`` (``"sum"``, the public
    IISAN code) or ``0.5 x + 0.5 y`` (``"half"``). x, y: (B, D) -> (B, D)."""
    if g is None:
        return x + y if ungated == "sum" else 0.5 * x + 0.5 * y
    return g * x + (1 - g) * y


def _check_ungated(ungated: str) -> None:
    if ungated not in UNGATED:
        raise ConfigError(f"ungated must be one of {UNGATED}, got {ungated!r}")


class IntraSAN(nn.Module):
    """Intra-modal SAN (eq. 2) over the n kept hidden states of one modality.

    Args:
        d: hidden width D of the modality. r: SANB bottleneck.
        n_rows: kept hidden-state rows n (>= 2); row 0 is the embedding output and is fed as
            the initial state s_0, so there are n - 1 SANBs and n - 1 gates.
        use_gate: learnable gates; without them the inputs are fused as ``ungated`` says
            (``"sum"``: ``SANB(h_k + s_{k-1})``, public code; ``"half"``: gate 0.5).
        dropout: SANB branch dropout.
    Raises: ConfigError for n_rows < 2, bad widths or an unknown ``ungated``.
    """

    def __init__(self, d: int, r: int, n_rows: int, use_gate: bool = True,
                 dropout: float = 0.0, ungated: str = "sum") -> None:
        super().__init__()
        _pos_int("IntraSAN n_rows", n_rows, 2)
        _check_ungated(ungated)
        self.n_rows, self.ungated = n_rows, ungated
        self.blocks = nn.ModuleList(SANB(d, r, dropout) for _ in range(n_rows - 1))
        self.gates = nn.ModuleList(Gate(use_gate) for _ in range(n_rows - 1))

    def forward(self, h: Tensor) -> Tensor:
        """h: (B, n, D) kept hidden states, row 0 = embedding output -> s_{n-1}: (B, D)."""
        rows = h.unbind(1)  # n x (B, D); backward stacks once (h[:, k] would fill n zero copies)
        s = rows[0]  # (B, D)
        for k, (block, gate) in enumerate(zip(self.blocks, self.gates), start=1):
            s = block(fuse(gate(), rows[k], s, self.ungated))  # (B, D)
        return s


class InterSAN(nn.Module):
    """Inter-modal SAN (eq. 3-4) fusing P paired text and image rows.

    Args:
        d_text, d_image: widths Dt, Di. If they differ, the wider modality passes a DTL
            ``Linear(d_big -> d_small)`` per row first (IISAN-VA); output width is
            ``d_small = min(Dt, Di)``.
        r: SANB bottleneck. n_rows: paired rows P (>= 1). use_gate: learnable gates b_k
            (else the inputs are fused as ``ungated`` says). dropout: SANB branch dropout.
        start: ``"zeros"`` (public code): ``s_0 = 0`` and every pair goes through a SANB (P
            SANBs, P gates); ``"gate"``: the first pair is mixed by a gate as ``s_0`` with no
            SANB (P - 1 SANBs, P gates).
    Raises: ConfigError for bad widths / row counts / options.
    """

    def __init__(self, d_text: int, d_image: int, r: int, n_rows: int, use_gate: bool = True,
                 dropout: float = 0.0, start: str = "zeros", ungated: str = "sum") -> None:
        super().__init__()
        _pos_int("InterSAN d_text", d_text)
        _pos_int("InterSAN d_image", d_image)
        _pos_int("InterSAN n_rows", n_rows)
        _check_ungated(ungated)
        if start not in INTER_STARTS:
            raise ConfigError(f"InterSAN start must be one of {INTER_STARTS}, got {start!r}")
        self.n_rows, self.d_small = n_rows, min(d_text, d_image)
        self.start, self.ungated = start, ungated

        def dtl(d_in: int) -> nn.ModuleList | None:
            if d_in == self.d_small:
                return None
            return nn.ModuleList(nn.Linear(d_in, self.d_small) for _ in range(n_rows))

        self.dtl_text, self.dtl_image = dtl(d_text), dtl(d_image)
        n_blocks = n_rows if start == "zeros" else n_rows - 1
        self.blocks = nn.ModuleList(SANB(self.d_small, r, dropout) for _ in range(n_blocks))
        self.gates = nn.ModuleList(Gate(use_gate) for _ in range(n_rows))

    @staticmethod
    def _align(h: Tensor, dtl: nn.ModuleList | None) -> tuple[Tensor, ...]:
        rows = h.unbind(1)  # P x (B, D)
        if dtl is None:
            return rows
        return tuple(lin(r) for r, lin in zip(rows, dtl))  # P x (B, d_small)

    def forward(self, text_h: Tensor, image_h: Tensor) -> Tensor:
        """text_h: (B, P, Dt), image_h: (B, P, Di), row k of each paired -> (B, d_small)."""
        xt, xi = self._align(text_h, self.dtl_text), self._align(image_h, self.dtl_image)
        if self.start == "zeros":
            s = xt[0].new_zeros(xt[0].shape)  # (B, d_small)
            first = 0
        else:
            s = fuse(self.gates[0](), xi[0], xt[0], self.ungated)  # (B, d_small)
            first = 1
        for block, k in zip(self.blocks, range(first, self.n_rows)):
            s = block(s + fuse(self.gates[k](), xi[k], xt[k], self.ungated))  # (B, d_small)
        return s


INTER_STARTS = ("zeros", "gate")
PAIRINGS = ("versa", "top")
WITHOUT_INTRA = ("inter_only", "frozen_rows")


@dataclass(frozen=True)
class IISANConfig:
    """Settings of :class:`IISANItemEncoder`.

    Attributes:
        text_dim, image_dim: hidden widths Dt, Di of the cached states (0 = modality absent).
        text_rows, image_rows: cached hidden-state rows per item, Lt, Li (0 = absent; a
            modality is present iff its dim and rows are both > 0). Row 0 is the embedding
            output. With ``use_intra`` a present modality needs >= 2 rows.
        text_widths, image_widths: real width of each row when they differ (a CNN's stages,
            zero-padded to ``*_dim`` = the widest); None = every row ``*_dim`` wide.
        text_layer_ids, image_layer_ids: hidden-state index of each given row (the store's
            ``layer_indices``, ascending); None = 0, 1, ..., rows - 1.
        text_depth, image_depth: blocks of each tower (the store's ``num_model_layers``);
            None = the largest layer id (the rows reach the tower's top).
        adapter_dim: SANB bottleneck r (default 64, see module docstring).
        out_dim: item embedding width (64 = the SASRec width used by IISAN).
        use_intra, use_inter, use_gates: ablation switches (IISAN-Versa table VI). Inter is
            used only when both modalities are present.
        pairing: ``"versa"`` (default) or ``"top"``: which rows the Inter-SAN pairs.
        inter_start: ``"zeros"`` (default, public code) or ``"gate"``.
        ungated: fusion without gates, ``"sum"`` (default, public code) or ``"half"``.
        without_intra: what ``use_intra=False`` feeds the fusion layer, ``"inter_only"``
            (default, public ``modality == "inter"``) or ``"frozen_rows"``.
        dropout: SANB adapter-branch dropout in [0, 1).
    Raises: ConfigError on invalid values (in ``__post_init__``), also when ``pairing="versa"``
        needs hidden states the given rows do not hold (the message names them).
    """

    text_dim: int = 0
    image_dim: int = 0
    text_rows: int = 0
    image_rows: int = 0
    adapter_dim: int = 64
    out_dim: int = 64
    use_intra: bool = True
    use_inter: bool = True
    use_gates: bool = True
    dropout: float = 0.0
    text_widths: tuple[int, ...] | None = None
    image_widths: tuple[int, ...] | None = None
    text_layer_ids: tuple[int, ...] | None = None
    image_layer_ids: tuple[int, ...] | None = None
    text_depth: int | None = None
    image_depth: int | None = None
    pairing: Literal["versa", "top"] = "versa"
    inter_start: Literal["zeros", "gate"] = "zeros"
    ungated: Literal["sum", "half"] = "sum"
    without_intra: Literal["inter_only", "frozen_rows"] = "inter_only"

    def __post_init__(self) -> None:
        for m in ("text", "image"):
            check_widths(m, getattr(self, f"{m}_widths"), getattr(self, f"{m}_rows"),
                         getattr(self, f"{m}_dim"))
        for name in ("text_dim", "image_dim", "text_rows", "image_rows"):
            _pos_int(name, getattr(self, name), 0)
        _pos_int("adapter_dim", self.adapter_dim)
        _pos_int("out_dim", self.out_dim)
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout!r}")
        for name, allowed in (("pairing", PAIRINGS), ("inter_start", INTER_STARTS),
                              ("ungated", UNGATED), ("without_intra", WITHOUT_INTRA)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be one of {allowed}, got "
                                  f"{getattr(self, name)!r}")
        for m in ("text", "image"):
            dim, rows = getattr(self, f"{m}_dim"), getattr(self, f"{m}_rows")
            if (dim > 0) != (rows > 0):
                raise ConfigError(f"{m} modality half configured: {m}_dim={dim}, "
                                  f"{m}_rows={rows} (both 0 = absent, both > 0 = present)")
            if dim and self.use_intra and rows < 2:
                raise ConfigError(f"Intra-SAN needs >= 2 {m} rows (embedding + one block), "
                                  f"got {m}_rows={rows}")
            ids, depth = getattr(self, f"{m}_layer_ids"), getattr(self, f"{m}_depth")
            if ids is not None:
                ids = tuple(ids)
                if (len(ids) != rows or any(isinstance(i, bool) or not isinstance(i, int)
                                            or i < 0 for i in ids)
                        or any(b <= a for a, b in zip(ids, ids[1:]))):
                    raise ConfigError(f"{m}_layer_ids must be {rows} ascending hidden-state "
                                      f"indices (one per row), got {ids}")
                object.__setattr__(self, f"{m}_layer_ids", ids)
            if depth is not None:
                _pos_int(f"{m}_depth", depth)
                if rows and depth < self.layer_ids(m)[-1]:
                    raise ConfigError(f"{m}_depth={depth} blocks is below the largest given "
                                      f"hidden-state index {self.layer_ids(m)[-1]}")
        if not (self.has_text or self.has_image):
            raise ConfigError("IISANConfig needs at least one modality (text_dim/image_dim > 0)")
        if self.inter_active:
            self.inter_pairs  # resolve now: missing rows raise here, when the config is built

    @property
    def has_text(self) -> bool:
        return self.text_dim > 0

    @property
    def has_image(self) -> bool:
        return self.image_dim > 0

    @property
    def inter_active(self) -> bool:
        return self.use_inter and self.has_text and self.has_image

    def layer_ids(self, m: str) -> tuple[int, ...]:
        """Hidden-state index of each given row of modality ``m`` ("text" / "image")."""
        ids = getattr(self, f"{m}_layer_ids")
        return ids if ids is not None else tuple(range(getattr(self, f"{m}_rows")))

    def depth(self, m: str) -> int:
        """Blocks of tower ``m``: ``*_depth`` or, if None, its largest given layer id."""
        d = getattr(self, f"{m}_depth")
        return d if d is not None else max(self.layer_ids(m)[-1], 1)

    @property
    def inter_pairs(self) -> tuple[tuple[int, int], ...]:
        """Resolved Inter-SAN pairing: ``(text hidden state, image hidden state)`` per step.

        ``"versa"``: :func:`models.layerdrop.versa_pairing` of the two depths (plus the
        embedding pair ``(0, 0)`` first when ``inter_start="gate"`` and both are given);
        ``"top"``: the top min(Lt, Li) given rows (without hidden state 0 when
        ``inter_start="zeros"``). Empty when the Inter-SAN is not active.
        Raises: ConfigError if a paired hidden state is not among the given rows.
        """
        if not self.inter_active:
            return ()
        tid, iid = self.layer_ids("text"), self.layer_ids("image")
        if self.pairing == "top":
            n = min(len(tid), len(iid))
            pairs = tuple(zip(tid[-n:], iid[-n:]))
            if self.inter_start == "zeros":
                pairs = tuple((t, i) for t, i in pairs if t != 0 and i != 0)
            if not pairs:
                raise ConfigError(f"pairing='top' leaves no Inter-SAN row without the "
                                  f"embedding outputs (text rows {tid}, image rows {iid})")
            return pairs
        pairs = versa_pairing(self.depth("text"), self.depth("image"))
        if self.inter_start == "gate" and 0 in tid and 0 in iid:
            pairs = ((0, 0),) + pairs
        for m, ids, need in (("text", tid, [t for t, _ in pairs]),
                             ("image", iid, [i for _, i in pairs])):
            missing = [l for l in need if l not in ids]
            if missing:
                raise ConfigError(
                    f"pairing='versa' aligns the {self.depth('text')}-block text tower with the "
                    f"{self.depth('image')}-block image tower on hidden states {pairs} (text, "
                    f"image); the {m} rows given hold hidden states {ids}, not {missing}: "
                    f"cache the {m} tower with those layers (e.g. layer_policy 'asymmetric' "
                    f"or 'all') or use pairing='top'")
        return pairs

    def inter_positions(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Row positions (into the given rows) of the paired text and image hidden states."""
        tid, iid = self.layer_ids("text"), self.layer_ids("image")
        pairs = self.inter_pairs
        return tuple(tid.index(t) for t, _ in pairs), tuple(iid.index(i) for _, i in pairs)

    def frozen_rows(self) -> bool:
        """True when a modality without Intra-SAN feeds its frozen top row to the fusion."""
        return not self.use_intra and (self.without_intra == "frozen_rows"
                                       or not self.inter_active)

    def resolved(self) -> dict[str, object]:
        """What the encoder computes, for a run's config: pairing, options and fused parts."""
        parts = [p for p, on in (("e_img", self.has_image and (self.use_intra or self.frozen_rows())),
                                 ("e_inter", self.inter_active),
                                 ("e_txt", self.has_text and (self.use_intra or self.frozen_rows())))
                 if on]
        return {"pairing": self.pairing, "inter_pairs": [list(p) for p in self.inter_pairs],
                "text_layer_ids": list(self.layer_ids("text")),
                "image_layer_ids": list(self.layer_ids("image")),
                "text_depth": self.depth("text") if self.has_text else None,
                "image_depth": self.depth("image") if self.has_image else None,
                "inter_start": self.inter_start, "ungated": self.ungated,
                "without_intra": self.without_intra, "use_intra": self.use_intra,
                "use_inter": self.use_inter, "use_gates": self.use_gates,
                "fused": parts if self.use_intra else
                [p if p == "e_inter" else f"{p} (frozen top row)" for p in parts]}


class IISANItemEncoder(nn.Module):
    """IISAN item encoder (eq. 1): ``Linear([e_img ; e_inter ; e_txt]) -> (N, out_dim)``.

    ``e_txt`` / ``e_img``: Intra-SAN outputs; with ``use_intra=False`` they are left out
    (``without_intra="inter_only"``, the public code's "inter" modality) or replaced by the
    last cached row, the frozen backbone's top hidden state (``"frozen_rows"``, and always
    when there is no Inter-SAN). ``e_inter``: Inter-SAN over the rows of
    :attr:`IISANConfig.inter_pairs` (dropped with ``use_inter=False`` or a single
    modality). Absent parts contribute nothing to the concatenation.
    """

    def __init__(self, cfg: IISANConfig) -> None:
        super().__init__()
        self.cfg = c = cfg
        intra = lambda d, n: IntraSAN(d, c.adapter_dim, n, c.use_gates, c.dropout,  # noqa: E731
                                      c.ungated)
        self.intra_text = intra(c.text_dim, c.text_rows) if c.has_text and c.use_intra else None
        self.intra_image = (intra(c.image_dim, c.image_rows)
                            if c.has_image and c.use_intra else None)
        # row-wise DTL of a mixed-width tower onto its widest width (None when uniform)
        self.dtl_text = RowDTL(c.text_widths, c.text_dim) if mixed(c.text_widths) else None
        self.dtl_image = RowDTL(c.image_widths, c.image_dim) if mixed(c.image_widths) else None
        self.inter = (InterSAN(c.text_dim, c.image_dim, c.adapter_dim, len(c.inter_pairs),
                               c.use_gates, c.dropout, c.inter_start, c.ungated)
                      if c.inter_active else None)
        self._tpos, self._ipos = c.inter_positions() if c.inter_active else ((), ())
        frozen = c.frozen_rows()
        self._frozen_text = c.has_text and frozen
        self._frozen_image = c.has_image and frozen
        width = ((c.text_dim if self.intra_text is not None or self._frozen_text else 0)
                 + (c.image_dim if self.intra_image is not None or self._frozen_image else 0)
                 + (self.inter.d_small if self.inter is not None else 0))
        self.fusion = nn.Linear(width, c.out_dim)

    def _check(self, name: str, h: Tensor | None, dim: int, rows: int) -> None:
        if (h is not None) != (dim > 0):
            raise ConfigError(f"{name} hidden states {'given' if h is not None else 'missing'} "
                              f"but the config has {name}_dim={dim}")
        if h is not None and (h.dim() != 3 or tuple(h.shape[1:]) != (rows, dim)):
            raise ConfigError(f"{name} hidden states must be (N, {rows}, {dim}), "
                              f"got {tuple(h.shape)}")

    @staticmethod
    def _rows(h: Tensor, pos: tuple[int, ...]) -> Tensor:
        """h[:, pos] as a slice when the positions are contiguous (no gather in backward)."""
        if list(pos) == list(range(pos[0], pos[0] + len(pos))):
            return h[:, pos[0]:pos[0] + len(pos)]
        return h[:, list(pos)]  # (N, P, D)

    def forward(self, text_h: Tensor | None, image_h: Tensor | None) -> Tensor:
        """Encode N items from their cached hidden states.

        Args:
            text_h: (N, Lt, Dt) kept text hidden states (row 0 = embeddings), or None.
            image_h: (N, Li, Di) kept image hidden states, or None. Any float dtype
                (e.g. float16 from the cache); cast to the parameter dtype on entry.
                Rows narrower than D (``*_widths``) are zero-padded to D.
        Returns: (N, out_dim) item embeddings.
        Raises: ConfigError if presence or shapes disagree with the config.
        """
        c = self.cfg
        self._check("text", text_h, c.text_dim, c.text_rows)
        self._check("image", image_h, c.image_dim, c.image_rows)
        dtype = self.fusion.weight.dtype
        th = text_h.to(dtype) if text_h is not None else None
        ih = image_h.to(dtype) if image_h is not None else None
        if self.dtl_text is not None:
            th = self.dtl_text(th)  # (N, Lt, Dt)
        if self.dtl_image is not None:
            ih = self.dtl_image(ih)  # (N, Li, Di)
        parts: list[Tensor] = []
        if self.intra_image is not None:
            parts.append(self.intra_image(ih))
        elif self._frozen_image:
            parts.append(ih[:, -1])
        if self.inter is not None:
            parts.append(self.inter(self._rows(th, self._tpos),
                                    self._rows(ih, self._ipos)))  # (N, d_small)
        if self.intra_text is not None:
            parts.append(self.intra_text(th))
        elif self._frozen_text:
            parts.append(th[:, -1])
        return self.fusion(torch.cat(parts, dim=-1))  # (N, out_dim)
