"""Command line for hidden-state stores (no model is ever loaded here).

    python -m stores describe PATH [--verify] [--json]
        provenance, shape, completion, bytes per layer / item / on disk of a store
        (a path or an fsspec URL). Every call checks each done shard's file for presence
        and size (no data read) and the metadata; ``--verify`` also re-reads every shard.
        Exit status 0 complete, 3 half written, 4 damaged or corrupt (a missing / wrong-size
        shard file, damaged metadata or item ids, or a digest mismatch with --verify),
        2 not a store.

    python -m stores estimate --items N (--layers K --dim D | --widths W1,W2,...)
                              [--dtype float16] [--tokens T] [--items-per-shard S]
                              [--items-per-chunk C] [--all-layers L] [--json]
        bytes of a planned store, with the arithmetic ``HiddenStateStore.create`` follows
        (e.g. Llama-3-70B, 6 kept layers of 8192 dims over 20,314 items:
        ``--items 20314 --layers 6 --dim 8192``); ``--all-layers 81`` adds what keeping every
        hidden state would cost. ``--widths 32,24,80,192,1280`` gives each kept layer's width
        (a CNN's stages): K and D (the widest) follow from it, and the output says how many
        bytes are zero padding.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Sequence

from mmcache.errors import ConfigError, StoreCorruptError, StoreError
from stores.hidden_states import HiddenStateStore, estimate_bytes


def _b(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n:,} B ({n / 2**20:,.2f} MiB, {n / 1e9:,.3f} GB)"


def _widths_lines(d: dict[str, Any], label: str) -> list[str]:
    """``[label + "32, 24, 1280 (padded to 1280; 74.9% of hidden_states bytes are padding)"]``
    for a describe / estimate dict ``d`` with mixed ``layer_widths``; [] for uniform widths."""
    widths = d["layer_widths"]
    if len(set(widths)) < 2:
        return []
    return [f"{label}{', '.join(map(str, widths))} (padded to {max(widths)}; "
            f"{100 * d['padding_fraction']:.1f}% of hidden_states bytes are padding)"]


def describe_text(d: dict[str, Any], corrupt: list[int] | None = None) -> str:
    """Human-readable form of :meth:`HiddenStateStore.describe`."""
    s, lay = d["spec"], d["layout"]
    shape = "  ".join(f"{k}={v}" for k, v in d["shape"].items())
    status = (f"complete ({d['shards_done']}/{d['shards_total']} shards)" if d["complete"] else
              f"HALF WRITTEN: {d['shards_done']}/{d['shards_total']} shards done, pending "
              f"{d['pending_shards'][:10]}{' ...' if len(d['pending_shards']) > 10 else ''}")
    if corrupt:
        status += f"; CORRUPT shards {corrupt} (a resumed cache run rewrites them)"
    elif corrupt is not None:
        status += "; every done shard matches its digest"
    ids = d["item_id_range"]
    widths = _widths_lines(d, "widths      ")
    real = (f"  as stored (padded); real widths: "
            f"{' / '.join(f'{b:,}' for b in d['bytes_per_layer_real'])} B" if widths else "")
    lines = [
        f"store       {d['path']}",
        f"status      {status}",
        f"shape       {shape}   dtype {s['dtype']} (stored as {lay['physical_dtype']})",
        f"layers      {', '.join(map(str, s['layer_indices']))}  (hidden-state indices, 0 = "
        f"embedding output; policy {s['layer_policy']}; model has {s['num_model_layers']} blocks)",
        *widths,
        f"model       {s['library']} {s['model_id']}  pretrained={s['pretrained']}  "
        f"quantization={s['quantization']}",
        f"weights     sha256 {s['weights_fingerprint']}",
        f"input       modality {s['modality']}  pooling {s['pooling']}  max_length "
        f"{s['max_length']}  image_size {s['image_size']}",
        f"items       {d['shape'].get('item')} (ids {ids[0] if ids else '-'}..{ids[1] if ids else '-'}"
        f", {'ascending' if d['item_ids_ascending'] else 'in order of addition'})  "
        f"items sha256 {s['items_fingerprint']}",
        f"layout      {lay['items_per_shard']} items/shard, {lay['items_per_chunk']} items/chunk, "
        f"{lay['num_shards']} shards" + (f", {lay['num_tokens']} tokens" if lay.get("num_tokens") else ""),
        f"bytes/layer {_b(d['bytes_per_layer'])}{real}",
        f"bytes/item  {d['bytes_per_item']:,} B",
        f"data        {_b(d['data_bytes'])}"
        + (f", of which zero padding {_b(d['padding_bytes'])}" if widths else ""),
        f"on disk     {_b(d['bytes_on_disk'])}",
        f"code        {s['code_version']}   "
        + ", ".join(f"{k} {v}" for k, v in sorted(d["versions"].items())),
    ]
    for h in d.get("history", []):
        lines.append(f"history     {h.get('at')} {h.get('op')} -> {h.get('num_items')} items")
    for w in d["warnings"]:
        lines.append(f"WARNING     {w}")
    return "\n".join(lines)


def estimate_text(e: dict[str, Any], args: argparse.Namespace) -> str:
    """Human-readable form of :func:`estimate_bytes` (``args``: the parsed ``estimate`` options,
    ``layers`` and ``dim`` resolved)."""
    lay = e["layout"]
    kind = f"token states, {args.tokens} tokens" if args.tokens else "pooled vectors"
    widths = _widths_lines(e, "widths         ")
    lines = [
        f"planned store  {args.items:,} items x {args.layers} layers x {args.dim} dim "
        f"{args.dtype} ({kind})",
        *widths,
        f"layout         {lay['items_per_shard']} items/shard, {lay['items_per_chunk']} "
        f"items/chunk, {lay['num_shards']} shards, {e['files']:,} files",
        f"hidden_states  {_b(e['hidden_states_bytes'])}",
        *([f"padding        {_b(e['padding_bytes'])}  (within hidden_states: narrow layers "
           f"zero-padded to {args.dim})"] if widths else []),
        f"shard indexes  {_b(e['index_bytes'])}",
    ]
    if args.tokens:
        lines.append(f"attention_mask {_b(e['attention_mask_bytes'])}")
    lines += [
        f"small arrays   {_b(e['small_arrays_bytes'])}  metadata {e['metadata_bytes']:,} B",
        f"TOTAL          {_b(e['bytes'])}",
        f"per item       {e['bytes_per_item']:,} B   per layer {_b(e['bytes_per_layer'])}",
    ]
    if e.get("all_layers"):
        a = e["all_layers"]
        lines.append(f"all {args.all_layers} hidden states would take {_b(a['bytes'])} "
                     f"({a['bytes'] / e['bytes']:.1f}x)")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m stores", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("describe", help="provenance, shape, completion and bytes of a store")
    d.add_argument("path")
    d.add_argument("--verify", action="store_true", help="re-read every done shard and check "
                   "its digest (reads the whole store)")
    d.add_argument("--json", action="store_true", help="print the describe() dict as JSON")
    e = sub.add_parser("estimate", help="bytes of a planned store, before any model is loaded")
    e.add_argument("--items", type=int, required=True, help="N items")
    e.add_argument("--layers", type=int, default=None,
                   help="K kept hidden states (default with --widths: their count)")
    e.add_argument("--dim", type=int, default=None,
                   help="D hidden width (default with --widths: the widest)")
    e.add_argument("--widths", type=_int_list, default=None,
                   help="comma-separated width of each kept layer, e.g. 32,24,80,192,1280 "
                        "(narrow layers are zero-padded to the widest)")
    e.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    e.add_argument("--tokens", type=int, default=None, help="T when token states are kept")
    e.add_argument("--items-per-shard", type=int, default=256)
    e.add_argument("--items-per-chunk", type=int, default=None)
    e.add_argument("--all-layers", type=int, default=None,
                   help="also estimate keeping this many hidden states (e.g. 81 for an "
                        "80-block model)")
    e.add_argument("--json", action="store_true")
    args = p.parse_args(argv)

    if args.cmd == "describe":
        try:
            st = HiddenStateStore.open(args.path, require_complete=False)
            desc = st.describe()
        except StoreCorruptError as exc:  # damaged metadata or item ids: named, exit 4
            print(f"error: {exc}", file=sys.stderr)
            return 4
        except StoreError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        corrupt = st.verify() if args.verify else None
        if desc["damaged_shards"]:
            corrupt = sorted(set(corrupt or []) | set(desc["damaged_shards"]))
        if args.json:
            print(json.dumps({**desc, **({"corrupt_shards": corrupt} if corrupt is not None
                                         else {})}, indent=2, default=str))
        else:
            print(describe_text(desc, corrupt))
        if corrupt:
            return 4
        return 0 if desc["complete"] else 3

    kw = dict(dtype=args.dtype, num_tokens=args.tokens, items_per_shard=args.items_per_shard,
              items_per_chunk=args.items_per_chunk)
    try:
        _resolve_shape(args)
        est = estimate_bytes(args.items, args.layers, args.dim, layer_widths=args.widths, **kw)
        if args.all_layers:
            est["all_layers"] = estimate_bytes(args.items, args.all_layers, args.dim, **kw)
    except Exception as exc:  # ConfigError: a bad size
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(est, indent=2) if args.json else estimate_text(est, args))
    return 0


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}") from None


def _resolve_shape(args: argparse.Namespace) -> None:
    """Fill ``args.layers`` / ``args.dim`` from ``args.widths`` (count, max) when not given.

    Raises:
        ConfigError: neither given, or given and inconsistent with ``--widths``.
    """
    w = args.widths
    if not w:
        if args.layers is None or args.dim is None:
            raise ConfigError("give --layers and --dim, or --widths")
        return
    if args.layers is None:
        args.layers = len(w)
    if args.dim is None:
        args.dim = max(w)
    if args.layers != len(w) or args.dim != max(w):
        raise ConfigError(f"--widths {','.join(map(str, w))} means {len(w)} layers of at most "
                          f"{max(w)} dims, but --layers {args.layers} --dim {args.dim} was given")


if __name__ == "__main__":
    raise SystemExit(main())
