"""Stage 2 flows: train a sequential recommender on cached hidden states; evaluate a checkpoint.

Run by hand (``--help`` lists every parameter)::

    python flows/train.py --tables outputs/demo/tables --out outputs/demo/checkpoints \
        --name iisan --item-encoder iisan \
        --text-store outputs/demo/stores/text__minilm__mean.zarr \
        --image-store outputs/demo/stores/image__efficientnet-lite0__mean.zarr

Without ``--text-store`` / ``--image-store`` the newest complete stores of
``--text-encoder`` / ``--image-encoder`` under ``--store-dir`` that cover the catalogue are
used (``pipeline.incremental.newest_complete_store``), which is what the nightly ``train``
deployment relies on after the nightly cache runs. ``python flows/train.py evaluate
--checkpoint-dir DIR`` scores a saved checkpoint (the ``evaluate`` flow).

No encoder is loaded: the item encoder reads the stores only. Each run publishes a
markdown artifact with its test metrics.
"""

from __future__ import annotations

import os
import sys

# Run as a script (`python flows/x.py`), Python puts flows/ first on sys.path, where
# flows/pipeline.py would shadow the `pipeline` package: drop that entry.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

# before prefect: a longer start-up timeout for the temporary local API (its first start
# creates the database) and the pipeline package's log lines in the flow's output
import flows._prefect_start  # noqa: E402,F401

import argparse
import json
from pathlib import Path
from typing import Any, Literal

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.artifacts import create_markdown_artifact

from flows.cache_hidden_states import GPU_TAG, artifact_key, is_transient
from flows.params import (Device, EncoderName, Epochs, EvaluateParams, Exclude, TrainParams,
                          add_model_arguments, model_from_args, resolve_device)
from pipeline.evaluate import EvalConfig
from pipeline.reuse import evaluate_or_reuse, train_or_reuse
from pipeline.train import TrainConfig, popularity


@task(task_run_name="train-{cfg.name}", cache_policy=NO_CACHE, tags=[GPU_TAG], retries=1,
      retry_delay_seconds=30, retry_condition_fn=is_transient, timeout_seconds=24 * 3600)
def train_task(cfg: TrainConfig, reuse: bool = False) -> dict[str, Any]:
    """Train with early stopping; returns the checkpoint folder and small figures.

    With ``reuse``, a finished checkpoint of the same resolved config and unchanged inputs
    (tables, stores) is reused instead (:func:`pipeline.reuse.train_or_reuse`; the result
    says ``"reused"``). A fresh training records its inputs next to the checkpoint.
    """
    return train_or_reuse(cfg, reuse=reuse)


@task(cache_policy=NO_CACHE, task_run_name="evaluate-{name}")
def evaluate_task(name: str, checkpoint_dir: str, eval_cfg: EvalConfig,
                  device: str = "cpu", reuse: bool = False) -> dict[str, Any]:
    """Full-ranking leave-one-out metrics of a saved checkpoint on valid and test.

    With ``reuse``, the checkpoint's ``metrics.json`` is returned when it scores the current
    weights with the same evaluation settings (:func:`pipeline.reuse.evaluate_or_reuse`).
    """
    return evaluate_or_reuse(Path(checkpoint_dir), eval_cfg, device=device, reuse=reuse)


@task(cache_policy=NO_CACHE, task_run_name="popularity")
def popularity_task(tables_dir: str, eval_cfg: EvalConfig) -> dict[str, Any]:
    """The popularity baseline on the same split."""
    return popularity(Path(tables_dir), eval_cfg)


@task(cache_policy=NO_CACHE, task_run_name="find-stores")
def find_stores_task(tables_dir: str, store_dir: str, text_encoder: str | None,
                     image_encoder: str | None) -> dict[str, str | None]:
    """Paths of the newest complete text / image stores covering the catalogue.

    Raises:
        StoreNotFoundError: an encoder has no complete store covering every item.
    """
    from pipeline.encoders import preset
    from pipeline.incremental import newest_complete_store
    from stores.tables import read_items
    ids = read_items(tables_dir)["item_id"].to_numpy()
    out: dict[str, str | None] = {"text_store": None, "image_store": None}
    for key, enc in (("text_store", text_encoder), ("image_store", image_encoder)):
        if enc:
            out[key] = str(newest_complete_store(store_dir, preset(enc), ids))
    return out


def metrics_markdown(title: str, res: dict[str, Any]) -> str:
    """A markdown table of a run's valid/test metrics (plus its figures, when present)."""
    names = list(res["test"])
    lines = [f"# {title}", "", "| split | " + " | ".join(names) + " |",
             "|---|" + "---|" * len(names)]
    for split in ("valid", "test"):
        lines.append(f"| {split} | " + " | ".join(
            f"{v:.4f}" if isinstance(v := res[split].get(n), float) else str(v)
            for n in names) + " |")
    extra = {k: res[k] for k in ("best_epoch", "epochs_run", "seconds", "seconds_per_epoch",
                                 "exclude", "checkpoint_dir") if k in res}
    if extra:
        lines += ["", *[f"- {k}: {v}" for k, v in extra.items()]]
    return "\n".join(lines)


@flow(name="train", log_prints=True)
def train_flow(tables_dir: str = "outputs/demo/tables",
               out_dir: str = "outputs/demo/checkpoints",
               name: str = "iisan-text-image",
               item_encoder: Literal["id", "iisan"] = "iisan",
               store_dir: str | None = "outputs/demo/stores",
               text_encoder: EncoderName | None = "minilm",
               image_encoder: EncoderName | None = "efficientnet-lite0",
               text_store: str | None = None,
               image_store: str | None = None,
               max_epochs: Epochs = 100,
               patience: Epochs = 10,
               exclude: Exclude = "all",
               seed: int = 42,
               device: Device = "auto",
               config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train and evaluate one model (parameters: :class:`flows.params.TrainParams`).

    A ``config`` holding a complete :class:`TrainConfig` (``name``, ``tables_dir``,
    ``out_dir``, ...) is used as given; otherwise its keys add to the parameters.
    Returns the training figures and the valid/test metrics.
    """
    logger = get_run_logger()
    if config and {"name", "tables_dir", "out_dir"} <= set(config):
        cfg = TrainConfig(**config)
    else:
        p = TrainParams(tables_dir=tables_dir, out_dir=out_dir, name=name,
                        item_encoder=item_encoder, store_dir=store_dir,
                        text_encoder=text_encoder, image_encoder=image_encoder,
                        text_store=text_store, image_store=image_store, max_epochs=max_epochs,
                        patience=patience, exclude=exclude, seed=seed, device=device,
                        config=config)
        stores = {"text_store": p.text_store, "image_store": p.image_store}
        if p.item_encoder == "iisan" and not (p.text_store or p.image_store):
            stores = find_stores_task(p.tables_dir, p.store_dir, p.text_encoder, p.image_encoder)
            logger.info("using the newest complete stores: %s", stores)
        cfg = TrainConfig(**{
            "name": p.name, "tables_dir": p.tables_dir, "out_dir": p.out_dir,
            "item_encoder": p.item_encoder, "max_epochs": p.max_epochs,
            "patience": p.patience, "seed": p.seed, "device": resolve_device(p.device),
            "eval": {"exclude": p.exclude},
            **(stores if p.item_encoder == "iisan" else {}), **(p.config or {})})
    run = train_task(cfg)
    res = {**run, **evaluate_task(cfg.name, run["checkpoint_dir"], cfg.eval, cfg.device)}
    create_markdown_artifact(key=artifact_key("train-report", cfg.name),
                             markdown=metrics_markdown(f"Training `{cfg.name}`", res),
                             description=f"metrics of {cfg.name}")
    return res


@flow(name="evaluate", log_prints=True)
def evaluate_flow(checkpoint_dir: str = "outputs/demo/checkpoints/iisan-text-image",
                  exclude: Exclude = "all", device: Device = "auto") -> dict[str, Any]:
    """Score a saved checkpoint (parameters: :class:`flows.params.EvaluateParams`).

    Returns ``{"name", "valid", "test", "exclude"}`` and writes ``metrics.json`` next to the
    checkpoint. Raises StoreMismatchError when a store it was trained on has changed.
    """
    p = EvaluateParams(checkpoint_dir=checkpoint_dir, exclude=exclude, device=device)
    name = Path(p.checkpoint_dir).name
    res = evaluate_task(name, p.checkpoint_dir, EvalConfig(exclude=p.exclude),
                        resolve_device(p.device))
    create_markdown_artifact(key=artifact_key("evaluate-report", name),
                             markdown=metrics_markdown(f"Evaluation of `{name}`", res),
                             description=f"metrics of {name}")
    return res


def main(argv: list[str] | None = None) -> None:
    """Command line: ``python flows/train.py --help``, ``python flows/train.py evaluate --help``."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["evaluate"]:
        p = argparse.ArgumentParser(prog="flows/train.py evaluate",
                                    description="Score a saved checkpoint (evaluate flow).")
        add_model_arguments(p, EvaluateParams)
        params = model_from_args(EvaluateParams, p.parse_args(argv[1:]))
        res = evaluate_flow(**params.model_dump())
        print(json.dumps({k: res[k] for k in ("name", "valid", "test")}, indent=2))
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="'python flows/train.py evaluate --help': the "
                                       "evaluate flow")
    add_model_arguments(p, TrainParams, aliases={"tables_dir": ["--tables"],
                                                 "out_dir": ["--out"]})
    params = model_from_args(TrainParams, p.parse_args(argv))
    res = train_flow(**params.model_dump())
    print(json.dumps({k: res[k] for k in ("name", "best_epoch", "valid", "test")}, indent=2))


if __name__ == "__main__":
    main()
