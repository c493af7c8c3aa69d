"""IISAN item encoder: intra- and inter-modal side-adapted networks over cached hidden states.

Papers: Fu et al., "IISAN: Efficiently Adapting Multimodal Representation for Sequential
Recommendation with Decoupled PEFT" (SIGIR 2024) and the journal extension IISAN-Versa
(seed ``003_*``), section III.

Equations implemented (``h_k`` = k-th kept hidden state row, row 0 = embedding output):
    SANB(x)  = x + W_up ReLU(W_down x + b_down) + b_up,  W ~ N(0, 0.01^2), b = 0
    gates    g_k = sigmoid(a_k / 0.1), a_k = 0 at init (g = 0.5); constant 0.5 if disabled
    Intra-SAN (eq. 2):  s_0 = h_0;  s_k = SANB_k(g_k h_k + (1 - g_k) s_{k-1}),  k = 1..n-1
    Inter-SAN (eq. 3-4): X = DTL(h) for the wider modality (IISAN-VA), else h;
        s_0 = b_0 X^img_0 + (1 - b_0) X^txt_0;
        s_k = SANB_k(s_{k-1} + b_k X^img_k + (1 - b_k) X^txt_k),  k = 1..n-1
    item embedding (eq. 1): e = FL([e_img ; e_inter ; e_txt]), FL a Linear to ``out_dim``.

Where this departs from the paper / public code:
    * Eq. (2) prints the gate on the previous SANB state (mu s_{k-1} + (1 - mu) h_k); we put
      it on the hidden state, g_k h_k + (1 - g_k) s_{k-1}, as the project reference does. The
      two are the same family (g = 1 - mu) and coincide at init (0.5).
    * Row 0 (embedding output) is fed as the initial state s_0 with no SANB, as the public
      code does ("the first SANB will only take the text embeddings"), so n rows give n - 1
      SANBs per intra tower.
    * When the two towers keep different numbers of rows, Inter-SAN reads the TOP
      min(n_txt, n_img) rows of each (section VI-E: "we adopt the top hidden states to align
      with the vision tower for Inter-SAN"); the intra towers use all their rows.
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

import torch
from torch import Tensor, nn

from mmcache.errors import ConfigError

from .dtl import RowDTL, check_widths, mixed

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
        self.drop = nn.Dropout(dropout)
        for lin in (self.down, self.up):
            nn.init.normal_(lin.weight, 0.0, 0.01)
            nn.init.zeros_(lin.bias)

    def forward(self, x: Tensor) -> Tensor:
        """x: (..., D) -> (..., D)."""
        return x + self.drop(self.up(torch.relu(self.down(x))))


class Gate(nn.Module):
    """Scalar fusion gate ``g = sigmoid(a / 0.1)``, ``a = 0`` at init (g = 0.5).

    Args: learnable: if False, ``g`` is the constant 0.5 and the gate has no parameter
    (the "w/o Modality Gate" ablation, IISAN-Versa table VI).
    """

    def __init__(self, learnable: bool = True) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.zeros(())) if learnable else None

    def forward(self) -> Tensor | float:
        """Returns the gate value: a 0-d tensor in (0, 1), or the float 0.5."""
        return 0.5 if self.a is None else torch.sigmoid(self.a / GATE_TEMPERATURE)


class IntraSAN(nn.Module):
    """Intra-modal SAN (eq. 2) over the n kept hidden states of one modality.

    Args:
        d: hidden width D of the modality. r: SANB bottleneck.
        n_rows: kept hidden-state rows n (>= 2); row 0 is the embedding output and is fed as
            the initial state s_0, so there are n - 1 SANBs and n - 1 gates.
        use_gate: learnable gates (else constant 0.5). dropout: SANB branch dropout.
    Raises: ConfigError for n_rows < 2 or bad widths.
    """

    def __init__(self, d: int, r: int, n_rows: int, use_gate: bool = True,
                 dropout: float = 0.0) -> None:
        super().__init__()
        _pos_int("IntraSAN n_rows", n_rows, 2)
        self.n_rows = n_rows
        self.blocks = nn.ModuleList(SANB(d, r, dropout) for _ in range(n_rows - 1))
        self.gates = nn.ModuleList(Gate(use_gate) for _ in range(n_rows - 1))

    def forward(self, h: Tensor) -> Tensor:
        """h: (B, n, D) kept hidden states, row 0 = embedding output -> s_{n-1}: (B, D)."""
        rows = h.unbind(1)  # n x (B, D); backward stacks once (h[:, k] would fill n zero copies)
        s = rows[0]  # (B, D)
        for k, (block, gate) in enumerate(zip(self.blocks, self.gates), start=1):
            g = gate()
            s = block(g * rows[k] + (1 - g) * s)  # (B, D)
        return s


class InterSAN(nn.Module):
    """Inter-modal SAN (eq. 3-4) fusing aligned text and image rows.

    Args:
        d_text, d_image: widths Dt, Di. If they differ, the wider modality passes a DTL
            ``Linear(d_big -> d_small)`` per row first (IISAN-VA); output width is
            ``d_small = min(Dt, Di)``.
        r: SANB bottleneck. n_rows: aligned rows n (>= 1); n gates b_0..b_{n-1} and n - 1
            SANBs. use_gate: learnable gates (else 0.5). dropout: SANB branch dropout.
    Raises: ConfigError for bad widths / row counts.
    """

    def __init__(self, d_text: int, d_image: int, r: int, n_rows: int, use_gate: bool = True,
                 dropout: float = 0.0) -> None:
        super().__init__()
        _pos_int("InterSAN d_text", d_text)
        _pos_int("InterSAN d_image", d_image)
        _pos_int("InterSAN n_rows", n_rows)
        self.n_rows, self.d_small = n_rows, min(d_text, d_image)

        def dtl(d_in: int) -> nn.ModuleList | None:
            if d_in == self.d_small:
                return None
            return nn.ModuleList(nn.Linear(d_in, self.d_small) for _ in range(n_rows))

        self.dtl_text, self.dtl_image = dtl(d_text), dtl(d_image)
        self.blocks = nn.ModuleList(SANB(self.d_small, r, dropout) for _ in range(n_rows - 1))
        self.gates = nn.ModuleList(Gate(use_gate) for _ in range(n_rows))

    @staticmethod
    def _align(h: Tensor, dtl: nn.ModuleList | None) -> tuple[Tensor, ...]:
        rows = h.unbind(1)  # n x (B, D)
        if dtl is None:
            return rows
        return tuple(lin(r) for r, lin in zip(rows, dtl))  # n x (B, d_small)

    def forward(self, text_h: Tensor, image_h: Tensor) -> Tensor:
        """text_h: (B, n, Dt), image_h: (B, n, Di) -> s_{n-1}: (B, d_small)."""
        xt, xi = self._align(text_h, self.dtl_text), self._align(image_h, self.dtl_image)
        b = self.gates[0]()
        s = b * xi[0] + (1 - b) * xt[0]  # (B, d_small)
        for k, block in enumerate(self.blocks, start=1):
            b = self.gates[k]()
            s = block(s + b * xi[k] + (1 - b) * xt[k])  # (B, d_small)
        return s


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
        adapter_dim: SANB bottleneck r (default 64, see module docstring).
        out_dim: item embedding width (64 = the SASRec width used by IISAN).
        use_intra, use_inter, use_gates: ablation switches (IISAN-Versa table VI). Inter is
            used only when both modalities are present.
        dropout: SANB adapter-branch dropout in [0, 1).
    Raises: ConfigError on invalid values (in ``__post_init__``).
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
        for m in ("text", "image"):
            dim, rows = getattr(self, f"{m}_dim"), getattr(self, f"{m}_rows")
            if (dim > 0) != (rows > 0):
                raise ConfigError(f"{m} modality half configured: {m}_dim={dim}, "
                                  f"{m}_rows={rows} (both 0 = absent, both > 0 = present)")
            if dim and self.use_intra and rows < 2:
                raise ConfigError(f"Intra-SAN needs >= 2 {m} rows (embedding + one block), "
                                  f"got {m}_rows={rows}")
        if not (self.has_text or self.has_image):
            raise ConfigError("IISANConfig needs at least one modality (text_dim/image_dim > 0)")

    @property
    def has_text(self) -> bool:
        return self.text_dim > 0

    @property
    def has_image(self) -> bool:
        return self.image_dim > 0

    @property
    def inter_active(self) -> bool:
        return self.use_inter and self.has_text and self.has_image

    @property
    def inter_rows(self) -> int:
        """Rows fed to Inter-SAN: the top min(Lt, Li)."""
        return min(self.text_rows, self.image_rows)


class IISANItemEncoder(nn.Module):
    """IISAN item encoder (eq. 1): ``Linear([e_img ; e_inter ; e_txt]) -> (N, out_dim)``.

    ``e_txt`` / ``e_img``: Intra-SAN outputs (or, with ``use_intra=False``, the last cached
    row, i.e. the frozen backbone's top hidden state); ``e_inter``: Inter-SAN over the top
    min(Lt, Li) rows (dropped with ``use_inter=False`` or a single modality). Absent
    modalities contribute nothing to the concatenation.
    """

    def __init__(self, cfg: IISANConfig) -> None:
        super().__init__()
        self.cfg = c = cfg
        intra = lambda d, n: IntraSAN(d, c.adapter_dim, n, c.use_gates, c.dropout)  # noqa: E731
        self.intra_text = intra(c.text_dim, c.text_rows) if c.has_text and c.use_intra else None
        self.intra_image = (intra(c.image_dim, c.image_rows)
                            if c.has_image and c.use_intra else None)
        # row-wise DTL of a mixed-width tower onto its widest width (None when uniform)
        self.dtl_text = RowDTL(c.text_widths, c.text_dim) if mixed(c.text_widths) else None
        self.dtl_image = RowDTL(c.image_widths, c.image_dim) if mixed(c.image_widths) else None
        self.inter = (InterSAN(c.text_dim, c.image_dim, c.adapter_dim, c.inter_rows,
                               c.use_gates, c.dropout) if c.inter_active else None)
        width = c.text_dim + c.image_dim + (self.inter.d_small if self.inter is not None else 0)
        self.fusion = nn.Linear(width, c.out_dim)

    def _check(self, name: str, h: Tensor | None, dim: int, rows: int) -> None:
        if (h is not None) != (dim > 0):
            raise ConfigError(f"{name} hidden states {'given' if h is not None else 'missing'} "
                              f"but the config has {name}_dim={dim}")
        if h is not None and (h.dim() != 3 or tuple(h.shape[1:]) != (rows, dim)):
            raise ConfigError(f"{name} hidden states must be (N, {rows}, {dim}), "
                              f"got {tuple(h.shape)}")

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
        if ih is not None:
            parts.append(self.intra_image(ih) if self.intra_image is not None else ih[:, -1])
        if self.inter is not None:
            n = c.inter_rows
            parts.append(self.inter(th[:, -n:], ih[:, -n:]))  # (N, d_small)
        if th is not None:
            parts.append(self.intra_text(th) if self.intra_text is not None else th[:, -1])
        return self.fusion(torch.cat(parts, dim=-1))  # (N, out_dim)
