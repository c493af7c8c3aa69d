"""IISAN LayerDrop: which cached hidden states feed the side-adapted networks.

Paper: Fu et al., "IISAN: Efficiently Adapting Multimodal Representation for
Sequential Recommendation with Decoupled PEFT" (SIGIR 2024) and its journal
extension IISAN-Versa (seed ``003_*``), section III-E, eq. (5).

Conventions (used by every caller of this module):
    A backbone with ``L`` transformer blocks has ``L + 1`` hidden states.
    Hidden-state index 0 is the embedding output; index ``l`` (1..L) is the output of
    block ``l - 1`` (blocks are 0-based). "Blocks" below are 0-based block ids;
    "hidden-state indices" are rows of the stage-1 cache.

Policies:
    * symmetric (IISAN-VS): keep every second block, 0-based 1, 3, 5, ... (12 -> 1,3,...,11,
      i.e. hidden states 2, 4, ..., 12). The public code also feeds the embedding output
      (index 0) to the first SAN block, hence ``include_embeddings=True`` by default.
    * asymmetric (IISAN-VA group LayerDrop): keep ``N = L_image // 2`` text blocks spaced by
      a stride ``k``. Departure from the paper: eq. (5) prints
      ``max k : L_text - k * L_image / 2 >= 1``, which does not reproduce the public code's
      layer lists; we implement the rule that does,
      ``k* = max{k : L_text - k (N - 1) >= 1} = (L_text - 1) // (N - 1)`` and blocks
      ``{L_text - 1 - j k* : j = 0..N-1}`` (so the last block is always kept).
      Checks against a 12-layer image tower: 80 -> 4,19,34,49,64,79; 32 -> 1,7,...,31;
      28 -> 2,7,...,27; 48 -> 2,11,20,29,38,47; 6 -> 0..5.
    * all / explicit: every block, or a user-given list of 0-based blocks.

Pure Python; raises :class:`mmcache.errors.ConfigError` for every invalid setting.
"""

from __future__ import annotations

from typing import Iterable, Literal

from mmcache.errors import ConfigError

Policy = Literal["all", "symmetric", "asymmetric", "explicit"]
POLICIES: tuple[str, ...] = ("all", "symmetric", "asymmetric", "explicit")


def _check_depth(num_layers: object, what: str = "num_layers") -> int:
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise ConfigError(f"{what} must be a positive int (number of transformer blocks), "
                          f"got {num_layers!r}")
    return num_layers


def symmetric_blocks(num_layers: int) -> tuple[int, ...]:
    """0-based blocks kept by symmetric LayerDrop: every second block, 1, 3, 5, ...

    Args:
        num_layers: number of transformer blocks L of the backbone (>= 2).
    Returns:
        ascending block ids, e.g. 12 -> (1, 3, 5, 7, 9, 11), 6 -> (1, 3, 5); for odd L the
        last block is not kept (7 -> (1, 3, 5)), as grouping blocks in pairs implies.
    Raises:
        ConfigError: ``num_layers`` is not an int >= 2 (a 1-block model has no pair).
    Source: IISAN section III-E ("group two transformer blocks together and drop the first").
    """
    _check_depth(num_layers)
    if num_layers < 2:
        raise ConfigError(f"symmetric LayerDrop needs a model depth of at least 2 blocks, "
                          f"got num_layers={num_layers}")
    return tuple(range(1, num_layers, 2))


def asymmetric_blocks(num_text_layers: int, num_image_layers: int) -> tuple[int, ...]:
    """0-based text blocks kept by IISAN-Versa group LayerDrop (public-code rule).

    ``N = num_image_layers // 2`` blocks are kept (the image tower keeps N by symmetric
    LayerDrop), spaced by ``k* = (L_text - 1) // (N - 1)`` and ending at the last block.

    Args:
        num_text_layers: blocks of the (larger) text encoder, L_text.
        num_image_layers: blocks of the image encoder, L_image (>= 2).
    Returns:
        N ascending block ids, e.g. (80, 12) -> (4, 19, 34, 49, 64, 79), (6, 12) -> (0, ..., 5).
    Raises:
        ConfigError: a depth is not a positive int, L_image < 2, or the text encoder has
            fewer than N blocks (no stride k >= 1 fits).
    """
    lt = _check_depth(num_text_layers, "num_text_layers")
    li = _check_depth(num_image_layers, "num_image_layers")
    n = li // 2
    if n < 1:
        raise ConfigError(f"asymmetric LayerDrop needs an image model depth of at least 2 "
                          f"blocks, got num_image_layers={li}")
    if n == 1:  # stride undefined; keep the top block only
        return (lt - 1,)
    k = (lt - 1) // (n - 1)
    if k < 1:
        raise ConfigError(f"asymmetric LayerDrop keeps {n} blocks (image depth {li} // 2) but "
                          f"the text model depth is only {lt} blocks")
    return tuple(sorted(lt - 1 - j * k for j in range(n)))


def select_hidden_states(policy: Policy, num_layers: int, *, image_layers: int | None = None,
                         blocks: Iterable[int] | None = None,
                         include_embeddings: bool = True) -> tuple[int, ...]:
    """Hidden-state indices (rows of the stage-1 cache) kept under a LayerDrop policy.

    Args:
        policy: "all" (every block), "symmetric", "asymmetric" (this model is the text
            tower, ``image_layers`` is the image tower's depth) or "explicit" (``blocks``).
        num_layers: number of transformer blocks L of this model (hidden states 0..L).
        image_layers: image-tower depth; required for, and only allowed with, "asymmetric".
        blocks: 0-based block ids; required for, and only allowed with, "explicit".
            Order is free; duplicates are an error.
        include_embeddings: prepend hidden state 0 (the embedding output), as the public
            IISAN code feeds it to the first SAN block.
    Returns:
        ascending hidden-state indices in [0, L]: block b maps to index b + 1, and 0 comes
        first when ``include_embeddings``. E.g. ("symmetric", 12) -> (0, 2, 4, ..., 12).
    Raises:
        ConfigError: unknown policy, missing/extra argument, or a block id outside
            [0, L - 1] (the message names the model depth).
    """
    depth = _check_depth(num_layers)
    if policy not in POLICIES:
        raise ConfigError(f"unknown LayerDrop policy {policy!r}; expected one of {POLICIES}")
    if (image_layers is not None) != (policy == "asymmetric"):
        raise ConfigError("image_layers is required for, and only allowed with, policy "
                          f"'asymmetric' (policy={policy!r}, image_layers={image_layers!r})")
    if (blocks is not None) != (policy == "explicit"):
        raise ConfigError("blocks is required for, and only allowed with, policy 'explicit' "
                          f"(policy={policy!r})")
    if policy == "all":
        kept = tuple(range(depth))
    elif policy == "symmetric":
        kept = symmetric_blocks(depth)
    elif policy == "asymmetric":
        kept = asymmetric_blocks(depth, image_layers)  # type: ignore[arg-type]
    else:
        ids = list(blocks)  # type: ignore[arg-type]
        if not ids:
            raise ConfigError("explicit LayerDrop needs at least one block id")
        for b in ids:
            if isinstance(b, bool) or not isinstance(b, int) or not 0 <= b < depth:
                raise ConfigError(f"block id {b!r} is out of range for a model depth of {depth} "
                                  f"blocks (valid 0-based ids: 0..{depth - 1})")
        if len(set(ids)) != len(ids):
            raise ConfigError(f"explicit LayerDrop block ids contain duplicates: {ids}")
        kept = tuple(sorted(ids))
    return ((0,) if include_embeddings else ()) + tuple(b + 1 for b in kept)


def versa_blocks(num_text_layers: int, num_image_layers: int
                 ) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """0-based blocks of both towers aligned one to one by IISAN-Versa group LayerDrop.

    The image tower keeps ``N = L_image // 2`` blocks by symmetric LayerDrop and the text
    tower ``N`` blocks by group LayerDrop (:func:`asymmetric_blocks`: largest stride, last
    block kept), so the k-th kept text block pairs with the k-th kept image block in the
    Inter-SAN (IISAN-Versa sec. III-E, VI-E). This is the paper's rule whenever the text
    tower has at least N blocks, also when it is the shallower one (6 + 12 -> text 0..5 with
    image 1, 3, ..., 11). When it has fewer (e.g. 12 text + 32 image blocks) the roles are
    exchanged: the text tower keeps ``L_text // 2`` blocks by symmetric LayerDrop and the
    image tower is group-dropped onto them. Equal depths give symmetric LayerDrop on both
    (IISAN-VS).

    Args:
        num_text_layers, num_image_layers: blocks L_text, L_image of the two towers.
    Returns:
        (text blocks, image blocks), ascending, equally long; e.g. (6, 8) -> ((2, 3, 4, 5),
        (1, 3, 5, 7)); (32, 12) -> ((1, 7, 13, 19, 25, 31), (1, 3, 5, 7, 9, 11));
        (12, 32) -> ((1, 3, 5, 7, 9, 11), (1, 7, 13, 19, 25, 31)).
    Raises:
        ConfigError: a depth is not a positive int, or both towers have a single block.
    Source: IISAN-Versa (seed ``003_*``) eq. (5) with the public code's stride rule.
    """
    lt = _check_depth(num_text_layers, "num_text_layers")
    li = _check_depth(num_image_layers, "num_image_layers")
    if li >= 2 and lt >= li // 2:
        return asymmetric_blocks(lt, li), symmetric_blocks(li)
    if lt >= 2 and li >= lt // 2:
        return symmetric_blocks(lt), asymmetric_blocks(li, lt)
    raise ConfigError(f"IISAN-Versa alignment needs a tower of at least 2 blocks, got "
                      f"text {lt} and image {li} blocks")


def versa_pairing(num_text_layers: int, num_image_layers: int) -> tuple[tuple[int, int], ...]:
    """Hidden-state index pairs ``(text row, image row)`` fed to the Inter-SAN, in order.

    Block b is hidden state b + 1 (see the module conventions); the embedding outputs
    (hidden state 0) are not paired (the public IISAN code's Inter-SAN starts from zeros).
    E.g. (6, 8) -> ((3, 2), (4, 4), (5, 6), (6, 8)). Raises as :func:`versa_blocks`.
    """
    tb, ib = versa_blocks(num_text_layers, num_image_layers)
    return tuple((t + 1, i + 1) for t, i in zip(tb, ib))
