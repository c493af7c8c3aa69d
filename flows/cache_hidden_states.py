"""Stage 1 flow: cache layer-wise hidden states of one frozen encoder for one modality.

Run by hand::

    python flows/cache_hidden_states.py --tables outputs/demo/tables \
        --stores outputs/demo/stores --encoder minilm

The flow plans first (no model is loaded): a complete store for the same request means no
work. Otherwise the pending shards are encoded by one task that loads the model once.
Tasks exchange paths, shard ids, counts and seconds only; tensors go straight to the store.
"""

from __future__ import annotations

import os
import sys

# Run as a script (`python flows/x.py`), Python puts flows/ first on sys.path, where
# flows/pipeline.py would shadow the `pipeline` package: drop that entry.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import argparse
import json
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task

from pipeline.cache import CacheConfig, encode_shards, plan_cache
from pipeline.encoders import PRESETS, EncoderSpec, preset


@task(task_run_name="plan-{cfg.encoder.modality}-{cfg.encoder.name}")
def plan_task(cfg: CacheConfig) -> dict[str, Any]:
    """Find or create the store and list pending shards (see ``pipeline.cache.plan_cache``)."""
    return plan_cache(cfg)


@task(task_run_name="encode-{cfg.encoder.modality}-{cfg.encoder.name}",
      retries=1, retry_delay_seconds=5)
def encode_task(cfg: CacheConfig, shards: list[int]) -> dict[str, Any]:
    """Encode ``shards`` (idempotent: done shards are skipped, so a retry resumes)."""
    return encode_shards(cfg, shards)


def run_cache(cfg: CacheConfig) -> dict[str, Any]:
    """Plan, then encode the pending shards. Call inside a flow. Returns small figures only."""
    logger = get_run_logger()
    plan = plan_task(cfg)
    if plan["complete"]:
        logger.info("store %s is complete (%d shards): skipping stage 1 for %s",
                    plan["store"], plan["num_shards"], cfg.encoder.name)
        return {**plan, "skipped": True, "items": 0, "seconds": 0.0, "items_per_s": 0.0}
    if cfg.encoder.random_init:
        logger.warning("%s uses RANDOM weights (architecture only, no pretrained checkpoint)",
                       cfg.encoder.name)
    if plan["rewritten_corrupt"]:
        logger.warning("corrupt shards %s will be rewritten", plan["rewritten_corrupt"])
    logger.info("encoding %d of %d shards into %s", len(plan["pending"]), plan["num_shards"],
                plan["store"])
    return {**plan, **encode_task(cfg, plan["pending"]), "skipped": False}


@flow(name="cache-hidden-states", log_prints=True)
def cache_hidden_states(tables_dir: str, store_dir: str, encoder: str = "minilm",
                        items_per_shard: int = 256, batch_size: int | None = None,
                        encoder_spec: dict | None = None) -> dict[str, Any]:
    """Cache hidden states of ``encoder`` (a preset name, or a full ``encoder_spec``)."""
    spec = EncoderSpec(**encoder_spec) if encoder_spec else preset(encoder)
    if batch_size:
        spec = spec.model_copy(update={"batch_size": batch_size})
    cfg = CacheConfig(tables_dir=Path(tables_dir), store_dir=Path(store_dir), encoder=spec,
                      items_per_shard=items_per_shard)
    return run_cache(cfg)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tables", required=True, help="folder with items.parquet")
    p.add_argument("--stores", required=True, help="folder for the zarr stores")
    p.add_argument("--encoder", default="minilm", choices=sorted(PRESETS))
    p.add_argument("--encoder-spec", type=json.loads, default=None,
                   help="JSON EncoderSpec overriding --encoder (hub id / local path, policy, ...)")
    p.add_argument("--items-per-shard", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=None)
    a = p.parse_args(argv)
    print(json.dumps(cache_hidden_states(a.tables, a.stores, a.encoder, a.items_per_shard,
                                         a.batch_size, a.encoder_spec), indent=2))


if __name__ == "__main__":
    main()
