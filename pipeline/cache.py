"""Stage 1: fill a hidden-state store for one modality and one frozen encoder.

``plan_cache`` decides, without loading the model, which store answers the request and
which of its shards are still pending (a complete store means no work); ``encode_shards``
loads the encoder once and writes the given shards, each as one unit (see
``stores.hidden_states``). Both take and return small values (paths, shard ids, counts,
seconds) so that Prefect / Dask tasks can call them and tensors never pass through them.

Several writers may fill one store at once (threads, processes, Dask workers on one
shared file system): ``encode_shards`` joins the store as a cooperating writer (shared
writer lock, ``run_id``) and claims each shard (``HiddenStateStore.claim``) before
computing it, so a shard is computed and written by exactly one writer; shards done or
claimed by another writer are skipped. ``plan_cache`` (verify, invalidate) takes the store
exclusively and is refused while writers run.

Resume: shards already marked done are verified against their digests; a corrupt one is
marked pending again and rewritten alone. Batches are formed inside a shard only (length
bucketing sorts the shard's items by token count, ties in row order), so a shard's bytes
depend on its items alone and a resumed run produces the same bytes as an uninterrupted
one, whichever writer computes which shard.

Overlap: the next shard's inputs are read (images decoded and resized, texts tokenized)
in a background thread while the current shard is computed, and a finished shard is
written by another background thread (at most one write in flight) while the next one
is computed.

Per-shard records: ``<store>.stage1/shard-<s>.json`` (items, batches, truncated texts,
token counts, skipped items with reasons, seconds, device, host) is written before the
shard's data, so a shard marked done always has its record; ``<store>.stage1/encoder.json``
records the resolved encoder (architecture, effective max length, which hidden state the
last row holds) and ``<store>.stage1/cache_config.json`` the run's configuration. The
records live in a sidecar folder next to the store (``stores.sidecars``), not in the Zarr
group, which holds Zarr nodes only.

Inputs are checked where they are used: an image's bytes must hash to the items table's
``image_sha256`` (the fingerprint the store's identity covers) before the image is
encoded, else :class:`~mmcache.errors.CorruptImageError` names the item and the file.

Identity: besides the model and its inputs, every encoding setting that changes stored
values (``batch_size``, ``token_budget``, ``padding_side``, ``compute_dtype``; see
``StoreSpec.encode_settings``) is recorded, and a resume with another value is refused
naming the setting.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import socket
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from pipeline.encoders import (EncoderSpec, architecture, check_text, effective_max_length,
                               hidden_state_convention, library_versions, load_encoder,
                               load_image, quantization_tag, store_modality, validate_spec,
                               weights_fingerprint)
from pipeline.errors import (ConfigError, CorruptImageError, InputDataError, StoreLockedError,
                             StoreMismatchError, StoreNotFoundError)
from stores.hidden_states import HiddenStateStore, StoreSpec, dump_json
from stores.sidecars import records_dir
from stores.tables import ITEMS_FILE, items_fingerprint, read_items

log = logging.getLogger(__name__)

STATS_DIR = "stage1"
"""Kept for compatibility: the records are in :func:`stats_dir` (``<store>.stage1``)."""


def stats_dir(store: str | os.PathLike) -> Path:
    """``<store>.stage1``: the folder with ``encoder.json``, ``cache_config.json`` and one
    ``shard-<s>.json`` per written shard (``stores.sidecars.records_dir``)."""
    return records_dir(store)


class CacheConfig(BaseModel):
    """One stage-1 run: which items, which encoder, where the store goes.

    Fields:
        tables_dir: folder with ``items.parquet`` (see ``stores.tables``).
        store_dir: folder that holds the stores; the store's name derives from the request.
        encoder: the frozen encoder request.
        items_per_shard: rows per shard (the unit of writing, resume and fan-out).
        items_per_chunk: rows per inner zarr chunk.
        on_bad_input: ``error`` (default): a missing / undecodable image or an empty text
            stops the run with an error naming the file and item; ``skip``: the item's row
            is left at zero and recorded (id and reason) in the shard's record.
        prefetch: read the next shard's inputs in a background thread.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    tables_dir: Path
    store_dir: Path
    encoder: EncoderSpec
    items_per_shard: int = Field(default=256, ge=1)
    items_per_chunk: int = Field(default=64, ge=1)
    on_bad_input: Literal["error", "skip"] = "error"
    prefetch: bool = True


def store_path(cfg: CacheConfig) -> Path:
    """``<store_dir>/<modality>__<encoder name>__<pooling>.zarr``.

    The modality is ``text``, ``image`` or ``text-<column>`` for another text column.
    """
    e = cfg.encoder
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", e.name)
    modality = re.sub(r"[^A-Za-z0-9._-]+", "-", store_modality(e))
    return cfg.store_dir / f"{modality}__{name}__{e.pooling}.zarr"


def describe_architecture(spec: EncoderSpec) -> dict[str, Any]:
    """Depth, width and input size read from the model's config, without loading weights.

    Returns:
        {"num_layers": L, "hidden_dim": D, "image_size": pixels or None, ...} (the keys of
        :func:`pipeline.encoders.architecture`).
    Raises:
        ConfigError: unknown architecture, or a modality the model does not have.
    """
    return architecture(spec)


def items_fingerprint_for(cfg: CacheConfig, items: Any) -> str:
    """Fingerprint of what a store of ``cfg`` encodes from ``items`` (sorted by item_id).

    The table's fingerprint (``item_id, text, image_sha256``) for the ``text`` column and
    for images; for another text column the fingerprint also covers that column's values,
    so a changed caption invalidates its store.
    """
    fp = items_fingerprint(items)  # schema columns only: extra columns are ignored there
    col = cfg.encoder.text_column
    if cfg.encoder.modality != "text" or col == "text":
        return fp
    h = hashlib.sha256(f"{fp}|column={col}\n".encode())
    for item_id, v in zip(items["item_id"], items[col]):
        h.update(json.dumps([int(item_id), None if v is None else str(v)],
                            ensure_ascii=False).encode() + b"\n")
    return h.hexdigest()


def request_spec(cfg: CacheConfig, items_fingerprint: str) -> StoreSpec:
    """The :class:`StoreSpec` a run of ``cfg`` must produce (validates the spec vs the model).

    Raises:
        ConfigError: LayerDrop beyond the depth, pooling / modality / quantization mismatch.
    """
    e = cfg.encoder
    arch = describe_architecture(e)
    layers = validate_spec(e, arch)
    root = Path(e.model_id[len("local-dir:"):] if e.model_id.startswith("local-dir:")
                else e.model_id)
    model_id = "/".join(root.resolve().parts[-2:]) if root.is_dir() else e.model_id
    if e.library in ("open_clip", "timm") and e.pretrained and not e.random_init and \
            not e.model_id.startswith(("local-dir:", "hf-hub:")):
        model_id = f"{model_id}/{Path(e.pretrained).name}"
    # CNN stage outputs differ in width: recorded per kept layer (rows zero-padded to D)
    widths = (tuple(int(arch["layer_widths"][i]) for i in layers)
              if arch.get("layer_widths") else None)
    return StoreSpec(
        items_fingerprint=items_fingerprint, modality=store_modality(e), library=e.library,
        model_id=model_id, weights_fingerprint=weights_fingerprint(e),
        pretrained=not e.random_init, num_model_layers=arch["num_layers"],
        layer_indices=tuple(layers), layer_policy=e.layer_policy, pooling=e.pooling,
        max_length=effective_max_length(e, arch), image_size=arch["image_size"],
        hidden_dim=arch["hidden_dim"], layer_widths=widths, dtype=e.store_dtype,
        quantization=quantization_tag(e, arch), encode_settings=encode_settings(e))


def encode_settings(e: EncoderSpec) -> dict[str, Any]:
    """The encoding settings that change stored values, as recorded in the store's identity.

    ``batch_size`` (batched attention and kernels differ with the batch's padding and
    size) and ``compute_dtype`` for every encoder; for text also ``token_budget`` (0 = no
    budget: it splits batches) and ``padding_side`` (``"tokenizer"`` = the tokenizer's
    own). Images have no padding and no token budget.
    """
    out: dict[str, Any] = {"batch_size": int(e.batch_size), "compute_dtype": e.compute_dtype}
    if e.modality == "text":
        out["token_budget"] = int(e.token_budget or 0)
        out["padding_side"] = e.padding_side or "tokenizer"
    return out


def _num_tokens(cfg: CacheConfig, arch: dict[str, Any]) -> int | None:
    e = cfg.encoder
    if e.pooling != "tokens":
        return None
    return effective_max_length(e, arch) if e.modality == "text" else arch["num_tokens"]


def items_for(cfg: CacheConfig):
    """(items sorted by item_id with the encoded column, fingerprint for ``cfg``).

    Use this (not ``stores.tables.items_fingerprint``) to compare a catalogue with a store
    of ``cfg``: for a text column other than ``text`` the fingerprint covers that column.
    """
    return _items(cfg)


def _items(cfg: CacheConfig):
    """(items sorted by item_id with the encoded column, fingerprint for ``cfg``).

    A text column outside the standard items schema is read from ``items.parquet`` too.
    Raises:
        ConfigError: the text column does not exist (names the file and column).
    """
    items = read_items(cfg.tables_dir).sort_values("item_id").reset_index(drop=True)
    col = cfg.encoder.text_column
    if cfg.encoder.modality == "text" and col not in items.columns:
        import pyarrow.parquet as pq
        path = cfg.tables_dir / ITEMS_FILE
        if col not in pq.read_schema(path).names:
            raise ConfigError(f"items table {path} has no column {col!r}")
        extra = pq.read_table(path, columns=["item_id", col]).to_pandas()
        items = items.merge(extra, on="item_id", how="left", validate="one_to_one")
    return items, items_fingerprint_for(cfg, items)


def _write_json_atomic(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(dump_json(obj))
    os.replace(tmp, path)


def plan_cache(cfg: CacheConfig) -> dict[str, Any]:
    """Find or create the store for ``cfg`` and list its pending shards.

    A new store is created atomically (``HiddenStateStore.create``: complete or absent after
    any kill), its records first in ``<store>.stage1/``. An existing one is opened
    exclusively, which repairs damaged array metadata and lost completion data
    (``stores/README.md``, Guarantees); damaged item ids are rewritten from the catalogue
    when it holds the same ids; every done shard is verified and a damaged one marked
    pending, to be rewritten alone. A request for a subset of a complete store's layers is
    answered by it (nothing pending).

    Returns:
        {"store": path, "pending": [shard ids], "num_shards": S, "complete": bool,
         "rewritten_corrupt": [shard ids found corrupt and marked pending]}
    Raises:
        ConfigError: the spec does not fit the model (before any item or weight is read).
        StoreMismatchError: a store exists at the path for another request, or was written
            with another encoding setting (names the field, e.g. ``batch_size``).
        StoreLockedError: another process is writing it (or creating it).
        StoreCorruptError: the group metadata or the item ids are damaged beyond repair.
    """
    items, fp = _items(cfg)
    spec = request_spec(cfg, fp)
    path = store_path(cfg)
    cfg.store_dir.mkdir(parents=True, exist_ok=True)
    ids = items["item_id"].to_numpy()
    try:
        store = HiddenStateStore.open(path, mode="w", expected=spec)  # exclusive: repairs
    except StoreNotFoundError:
        arch = describe_architecture(cfg.encoder)
        # the records first (a sidecar folder, harmless without a store), then the store,
        # created atomically under the writer lock: complete or absent after any kill
        _write_json_atomic(stats_dir(path) / "cache_config.json", cfg.model_dump(mode="json"))
        _write_json_atomic(stats_dir(path) / "encoder.json", {
            "encoder": cfg.encoder.model_dump(mode="json"), "architecture": arch,
            "effective_max_length": effective_max_length(cfg.encoder, arch),
            "hidden_states": hidden_state_convention(cfg.encoder, arch),
            "layer_indices": list(spec.layer_indices)})
        store = HiddenStateStore.create(
            path, spec, ids, items_per_shard=cfg.items_per_shard,
            items_per_chunk=min(cfg.items_per_chunk, cfg.items_per_shard),
            num_tokens=_num_tokens(cfg, arch), versions=library_versions())
    with store:
        store.repair_item_ids(np.sort(ids))
        corrupt = store.verify()
        if corrupt:
            log.warning("store %s: shards %s do not match their digest; rewriting them", path, corrupt)
            store.invalidate(corrupt)
        pending = store.pending_shards()
        if store.spec.layer_indices != spec.layer_indices and pending:
            # a subset of the stored layers is served from a complete store; a store that
            # still needs encoding is encoded with its own layers only
            raise StoreMismatchError("layer_indices", spec.layer_indices,
                                     store.spec.layer_indices, store=str(path))
        return {"store": str(path), "pending": pending, "num_shards": store.num_shards,
                "complete": not pending, "rewritten_corrupt": corrupt}


def store_status(store: str | os.PathLike) -> dict[str, Any]:
    """``{"complete", "pending", "num_shards"}`` of a store as it is now (read from disk).

    Stage 1's final result takes ``complete`` from here after encoding, not from the plan
    made before it (which said ``False`` for every store it then completed).
    """
    st = HiddenStateStore.open(store, mode="r", require_complete=False)
    pending = st.pending_shards()
    return {"complete": not pending, "pending": pending, "num_shards": st.num_shards}


def default_run_id(cfg: CacheConfig, spec: StoreSpec) -> str:
    """Run id under which writers of the same request cooperate on one store."""
    h = hashlib.sha256(spec.model_dump_json().encode()).hexdigest()[:16]
    return f"encode-{cfg.encoder.name}-{h}"


def check_image_bytes(image_path: str, image_sha256: str | None, item_id: int,
                      tables_path: Path | None = None) -> None:
    """Refuse an image whose bytes are not those the items table recorded.

    The store's identity covers the items table's ``image_sha256`` (the items
    fingerprint), so an image replaced after ingest must not be encoded under it.
    Reads the file once (a missing or unreadable file is left to ``load_image``, which
    names it).

    Raises:
        CorruptImageError: sha256 of the file's bytes != ``image_sha256`` (names the item,
            the file and both hashes).
    """
    if not image_sha256:
        return
    try:
        with open(image_path, "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
    except OSError:
        return
    if digest != str(image_sha256):
        raise CorruptImageError(
            f"the image changed after ingest: the sha256 of its bytes is {digest[:16]}..., "
            f"the items table {tables_path} records {str(image_sha256)[:16]}...; re-run "
            f"ingest to fingerprint the new image",
            path=image_path, item_id=item_id)


def _load_inputs(cfg: CacheConfig, by_id: Any, ids: np.ndarray, tables_path: Path
                 ) -> tuple[list[Any], list[dict[str, Any]]]:
    """Inputs of the items ``ids`` (None where skipped) and the skip records.

    Raises (``on_bad_input="error"``): MissingImageError / CorruptImageError /
    EmptyTextError naming the file and item.
    """
    e = cfg.encoder
    out: list[Any] = []
    skipped: list[dict[str, Any]] = []
    for item_id in ids:
        row = by_id.loc[int(item_id)]
        try:
            if e.modality == "text":
                out.append(check_text(row[e.text_column], int(item_id), tables_path))
            else:
                check_image_bytes(row["image_path"], row.get("image_sha256"), int(item_id),
                                  tables_path)
                out.append(load_image(row["image_path"], int(item_id)))
        except InputDataError as exc:
            if cfg.on_bad_input == "error":
                raise
            out.append(None)
            skipped.append({"item_id": int(item_id), "reason": type(exc).__name__,
                            "message": str(exc)})
            log.warning("skipping item %s: %s", item_id, exc)
    return out, skipped


def encode_shards(cfg: CacheConfig, shards: Sequence[int] | None = None,
                  stop_after: int | None = None, *, run_id: str | None = None
                  ) -> dict[str, Any]:
    """Load the encoder once and write ``shards`` (default: every pending shard).

    Joins the store as a cooperating writer (``run_id``, default one per request): other
    processes may write other shards of the same store at the same time; a shard done or
    being written by another writer is skipped.

    Args:
        shards: shard ids this writer should write; already-done ones are skipped.
        stop_after: testing aid; stop after this many shards (simulates a partial run).
        run_id: cooperating-writer id (writers with the same id share the store).
    Returns:
        {"store", "shards_written", "items", "seconds", "items_per_s", "skipped_items",
         "truncated_items", "shards_skipped_busy"}
    Raises:
        MissingImageError / CorruptImageError / EmptyTextError naming the file and item.
        ConfigError: the spec does not fit the model. StoreLockedError: the store is held
        exclusively (e.g. by ``plan_cache``) or by a writer of another run.
    """
    items, fp = _items(cfg)
    path = store_path(cfg)
    spec = request_spec(cfg, fp)
    t0 = time.perf_counter()
    n_items = written = n_skipped = n_trunc = busy = 0
    tables_path = cfg.tables_dir / ITEMS_FILE
    by_id = items.set_index("item_id", drop=False)
    with HiddenStateStore.open(path, mode="w", expected=spec,
                               run_id=run_id or default_run_id(cfg, spec)) as store:
        done = store.done_mask()
        todo = [int(s) for s in (shards if shards is not None else store.pending_shards())
                if not done[int(s)]]
        if not todo:
            return {"store": str(path), "shards_written": 0, "items": 0, "seconds": 0.0,
                    "items_per_s": 0.0, "skipped_items": 0, "truncated_items": 0,
                    "shards_skipped_busy": 0}
        store_ids = store.item_ids
        # rows each shard needs (all of them, except a grown store's kept rows); fixed
        # during the run (growing needs the store exclusively), read once here
        rows = {s: store.rows_to_encode(s) for s in todo}
        enc = None
        if any(b > a for a, b in rows.values()):
            enc = load_encoder(cfg.encoder)  # once; not at all when nothing is to compute
            if tuple(enc.layer_indices) != spec.layer_indices:
                raise ConfigError(f"{cfg.encoder.model_id}: the loaded model keeps layers "
                                  f"{enc.layer_indices}, the store {spec.layer_indices}")
        reader = ThreadPoolExecutor(1, thread_name_prefix="stage1-read") if cfg.prefetch else None
        writer = ThreadPoolExecutor(1, thread_name_prefix="stage1-write")
        in_flight: Future | None = None
        prefetched: dict[int, Future] = {}

        def load(s: int) -> tuple[np.ndarray, list[int], list[dict[str, Any]], Any]:
            """Read, decode and preprocess the inputs of shard ``s`` (CPU only)."""
            a, b = rows[s]
            ids = store_ids[a:b]
            inputs, skipped = _load_inputs(cfg, by_id, ids, tables_path)
            ok = [j for j, x in enumerate(inputs) if x is not None]
            prep = enc.prepare_items([inputs[j] for j in ok]) if ok else None
            return ids, ok, skipped, prep

        def fetch(s: int) -> tuple[np.ndarray, list[int], list[dict[str, Any]], Any]:
            f = prefetched.pop(s, None)
            return f.result() if f is not None else load(s)

        def write(s: int, block: np.ndarray, mask: np.ndarray | None, record: dict,
                  claim: Any) -> None:
            try:
                _write_json_atomic(stats_dir(path) / f"shard-{s:05d}.json", record)
                store.write_shard(s, block, mask)
            finally:
                claim.__exit__(None, None, None)

        try:
            for i, s in enumerate(todo):
                claim = store.claim(s)
                try:
                    claim.__enter__()
                except StoreLockedError:
                    busy += 1
                    prefetched.pop(s, None)
                    continue
                if store.done_mask()[s]:  # written by another writer meanwhile
                    claim.__exit__(None, None, None)
                    prefetched.pop(s, None)
                    continue
                try:
                    ts = time.perf_counter()
                    ids, ok, skipped, prep = fetch(s)
                    if reader is not None and i + 1 < len(todo) and todo[i + 1] not in prefetched:
                        prefetched[todo[i + 1]] = reader.submit(load, todo[i + 1])
                    shape = tuple(store.shape[1:])
                    block = np.zeros((len(ids), *shape), dtype=np.float32)
                    mask = np.zeros((len(ids), shape[1]), dtype=bool) \
                        if spec.pooling == "tokens" else None
                    record: dict[str, Any] = {"shard": s, "rows": list(rows[s]),
                                              "items": len(ids), "skipped": skipped}
                    if ok:
                        res = enc.encode_items(prep)
                        block[ok] = res.states
                        if mask is not None:
                            mask[ok] = res.mask
                        trunc_ids = [int(ids[ok[j]]) for j in np.flatnonzero(res.truncated)]
                        record.update(batches=res.batches, truncated_items=len(trunc_ids),
                                      truncated_item_ids=trunc_ids[:100],
                                      max_tokens=int(res.lengths.max()),
                                      mean_tokens=round(float(res.lengths.mean()), 2))
                        n_trunc += len(trunc_ids)
                    record.update(seconds=round(time.perf_counter() - ts, 3),
                                  device=str(enc.input_device) if enc else None,
                                  host=socket.gethostname(), pid=os.getpid())
                except BaseException:
                    claim.__exit__(None, None, None)
                    raise
                if in_flight is not None:
                    in_flight.result()  # at most one write in flight; re-raises its error
                in_flight = writer.submit(write, s, block, mask, record, claim)
                n_items += len(ids)
                n_skipped += len(skipped)
                written += 1
                log.info("store %s: shard %d/%d encoded (%d items%s)", path.name, s + 1,
                         store.num_shards, len(ids),
                         f", {len(skipped)} skipped" if skipped else "")
                if stop_after is not None and written >= stop_after:
                    break
            if in_flight is not None:
                in_flight.result()
                in_flight = None
        finally:
            if in_flight is not None:  # an error above: let the pending write finish first
                try:
                    in_flight.result()
                except Exception:  # noqa: BLE001 - the first error is the one raised
                    log.exception("store %s: background write failed", path)
            writer.shutdown(wait=True)
            if reader is not None:
                for f in prefetched.values():
                    f.cancel()
                reader.shutdown(wait=True)
    secs = time.perf_counter() - t0
    return {"store": str(path), "shards_written": written, "items": n_items,
            "seconds": round(secs, 3), "items_per_s": round(n_items / secs, 2) if secs else 0.0,
            "skipped_items": n_skipped, "truncated_items": n_trunc, "shards_skipped_busy": busy}


def shard_records(store: str | os.PathLike) -> list[dict[str, Any]]:
    """The per-shard records (``<store>.stage1/shard-*.json``) of a store, by shard id."""
    d = stats_dir(store)
    return [json.loads(p.read_text()) for p in sorted(d.glob("shard-*.json"))]


def cache_all(cfg: CacheConfig) -> dict[str, Any]:
    """Plan then encode every pending shard; returns the plan merged with the encode figures,
    ``complete`` being the store's completion after encoding."""
    plan = plan_cache(cfg)
    if plan["complete"]:
        log.info("store %s is complete: nothing to encode", plan["store"])
        return {**plan, "skipped": True, "items": 0, "seconds": 0.0}
    res = {**plan, **encode_shards(cfg, plan["pending"]), "skipped": False}
    # completion as the store is after encoding, not the plan's (made before it);
    # ``pending`` stays what this run had to encode
    return {**res, "complete": store_status(plan["store"])["complete"]}
