"""Stage 2 flow: train a sequential recommender on cached hidden states, then evaluate it.

Run by hand::

    python flows/train.py --tables outputs/demo/tables --out outputs/demo/checkpoints \
        --name iisan --item-encoder iisan \
        --text-store outputs/demo/stores/text__minilm__mean.zarr \
        --image-store outputs/demo/stores/image__vit-b-32-random__cls.zarr

No encoder is loaded: the item encoder reads the stores only.
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

from prefect import flow, task

from pipeline.evaluate import EvalConfig
from pipeline.train import TrainConfig, evaluate_checkpoint, popularity, train


@task(task_run_name="train-{cfg.name}")
def train_task(cfg: TrainConfig) -> dict[str, Any]:
    """Train with early stopping; returns the checkpoint folder and small figures."""
    return train(cfg)


@task(task_run_name="evaluate-{name}")
def evaluate_task(name: str, checkpoint_dir: str, eval_cfg: EvalConfig) -> dict[str, Any]:
    """Full-ranking leave-one-out metrics of a saved checkpoint on valid and test."""
    return evaluate_checkpoint(Path(checkpoint_dir), eval_cfg)


@task(task_run_name="popularity")
def popularity_task(tables_dir: str, eval_cfg: EvalConfig) -> dict[str, Any]:
    """The popularity baseline on the same split."""
    return popularity(Path(tables_dir), eval_cfg)


@flow(name="train", log_prints=True)
def train_flow(config: dict) -> dict[str, Any]:
    """Train and evaluate one model described by a :class:`TrainConfig` dict."""
    cfg = TrainConfig(**config)
    run = train_task(cfg)
    return {**run, **evaluate_task(cfg.name, run["checkpoint_dir"], cfg.eval)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tables", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--item-encoder", choices=["id", "iisan"], default="id")
    p.add_argument("--text-store")
    p.add_argument("--image-store")
    p.add_argument("--max-epochs", type=int, default=100)
    p.add_argument("--patience", type=int, default=10)
    p.add_argument("--exclude", choices=["none", "window", "all"], default="all")
    p.add_argument("--seed", type=int, default=42)
    a = p.parse_args(argv)
    cfg = {"name": a.name, "tables_dir": a.tables, "out_dir": a.out,
           "item_encoder": a.item_encoder, "text_store": a.text_store,
           "image_store": a.image_store, "max_epochs": a.max_epochs, "patience": a.patience,
           "seed": a.seed, "eval": {"exclude": a.exclude}}
    res = train_flow(cfg)
    print(json.dumps({k: res[k] for k in ("name", "best_epoch", "valid", "test")}, indent=2))


if __name__ == "__main__":
    main()
