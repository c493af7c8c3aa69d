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

No encoder is loaded: the item encoder reads the stores only. Each run publishes a table
artifact of its valid / test metrics; evaluation on CUDA is tagged ``gpu``. A store given for
the wrong modality (an image store as ``--text-store``) is refused, naming the store and the
modality it holds.
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

from pathlib import Path
from typing import Any, Literal

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.artifacts import create_table_artifact

from flows.cache_hidden_states import GPU_TAG, artifact_key, is_transient, store_asset
from flows.params import (Device, Epochs, EvaluateParams, Exclude, ImageEncoderName,
                          RepeatTarget, Seed, TextEncoderName, TrainParams, resolve_device)
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


def train_on(cfg: TrainConfig) -> Any:
    """``train_task`` with the stores it reads as its ``asset_deps`` (the UI's asset graph
    then shows which store a model was trained from)."""
    deps = [store_asset(s) for s in (cfg.text_store, cfg.image_store) if s is not None]
    return train_task.with_options(asset_deps=deps) if deps else train_task


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


def metrics_table(res: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows of a run's table artifact: one per split (valid, test), one column per metric
    (HR@K, NDCG@K, MRR, ...), values rounded to 4 decimals."""
    names = list(res["test"])
    return [{"split": split, **{n: round(v, 4) if isinstance(v := res[split].get(n), float)
                                else v for n in names}} for split in ("valid", "test")]


def figures_line(res: dict[str, Any]) -> str:
    """The run's figures (best epoch, epochs, seconds, exclusion rule, checkpoint), one line."""
    return ", ".join(f"{k} {res[k]}" for k in ("best_epoch", "epochs_run", "seconds",
                                                 "seconds_per_epoch", "exclude",
                                                 "repeat_target", "checkpoint_dir") if k in res)


def evaluate_on(device: str) -> Any:
    """``evaluate_task`` for ``device``: tagged ``gpu`` (and so held to the ``gpu`` tag's
    concurrency limit) when it runs on CUDA."""
    return evaluate_task.with_options(tags=[GPU_TAG]) if str(device).startswith("cuda") \
        else evaluate_task


@flow(name="train", log_prints=True)
def train_flow(tables_dir: str = "outputs/demo/tables",
               out_dir: str = "outputs/demo/checkpoints",
               name: str = "iisan-text-image",
               item_encoder: Literal["id", "iisan"] = "iisan",
               store_dir: str | None = "outputs/demo/stores",
               text_encoder: TextEncoderName | None = "minilm",
               image_encoder: ImageEncoderName | None = "efficientnet-lite0",
               text_store: str | None = None,
               image_store: str | None = None,
               max_epochs: Epochs = 100,
               patience: Epochs = 10,
               exclude: Exclude = "all",
               repeat_target: RepeatTarget = "rankable",
               seed: Seed = 42,
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
                        patience=patience, exclude=exclude, repeat_target=repeat_target,
                        seed=seed, device=device,
                        config=config)
        stores = {"text_store": p.text_store, "image_store": p.image_store}
        if p.item_encoder == "iisan" and not (p.text_store or p.image_store):
            stores = find_stores_task(p.tables_dir, p.store_dir, p.text_encoder, p.image_encoder)
            logger.info("using the newest complete stores: %s", stores)
        cfg = TrainConfig(**{
            "name": p.name, "tables_dir": p.tables_dir, "out_dir": p.out_dir,
            "item_encoder": p.item_encoder, "max_epochs": p.max_epochs,
            "patience": p.patience, "seed": p.seed, "device": resolve_device(p.device),
            "eval": {"exclude": p.exclude, "repeat_target": p.repeat_target},
            **(stores if p.item_encoder == "iisan" else {}), **(p.config or {})})
    run = train_on(cfg)(cfg)
    res = {**run, **evaluate_on(cfg.device)(cfg.name, run["checkpoint_dir"], cfg.eval,
                                            cfg.device)}
    create_table_artifact(key=artifact_key("train-report", cfg.name), table=metrics_table(res),
                          description=f"metrics of {cfg.name}: {figures_line(res)}")
    return res


@flow(name="evaluate", log_prints=True)
def evaluate_flow(checkpoint_dir: str = "outputs/demo/checkpoints/iisan-text-image",
                  exclude: Exclude = "all", repeat_target: RepeatTarget = "rankable",
                  device: Device = "auto") -> dict[str, Any]:
    """Score a saved checkpoint (parameters: :class:`flows.params.EvaluateParams`).

    Returns ``{"name", "valid", "test", "exclude", "repeat_target"}`` and writes
    ``metrics-<exclude>-<repeat_target>.json`` (``metrics.json`` only under the run's own
    rules) next to the checkpoint. Raises StoreMismatchError when a store it was trained on
    has changed.
    """
    p = EvaluateParams(checkpoint_dir=checkpoint_dir, exclude=exclude,
                       repeat_target=repeat_target, device=device)
    name = Path(p.checkpoint_dir).name
    device = resolve_device(p.device)
    res = evaluate_on(device)(name, p.checkpoint_dir,
                              EvalConfig(exclude=p.exclude, repeat_target=p.repeat_target), device)
    create_table_artifact(key=artifact_key("evaluate-report", name), table=metrics_table(res),
                          description=f"metrics of {name}: {figures_line(res)}")
    return res


STORE_SLOTS = {"text_store": "text", "image_store": "image"}
"""Store fields of :class:`TrainParams` and the modality each must hold."""


def train_cli() -> "Any":
    """The train flow's command line, generated from :class:`flows.params.TrainParams`."""
    from flows.cli import ModelCli
    return ModelCli(TrainParams, "flows/train.py", description=__doc__.split("\n\n")[0],
                    shortcuts={"tables_dir": "tables", "out_dir": "out"},
                    epilog="'python flows/train.py evaluate --help': the evaluate flow")


def evaluate_cli() -> "Any":
    """The evaluate flow's command line (:class:`flows.params.EvaluateParams`)."""
    from flows.cli import ModelCli
    return ModelCli(EvaluateParams, "flows/train.py evaluate",
                    description="Score a saved checkpoint (evaluate flow).")


def summary(res: dict[str, Any]) -> str:
    """One line: the run's name, best epoch, test NDCG@10 / HR@10 and its checkpoint."""
    test = res.get("test", {})

    def metric(name: str) -> str:
        v = test.get(name)
        return f"{v:.4f}" if isinstance(v, float) else "-"
    best = f"best epoch {res['best_epoch']}, " if res.get("best_epoch") is not None else ""
    where = f", {res['checkpoint_dir']}" if res.get("checkpoint_dir") else ""
    return (f"{res.get('name', '?')}: {best}test NDCG@10 {metric('NDCG@10')} HR@10 "
            f"{metric('HR@10')} (exclude {res.get('exclude', '?')}){where}")


def main(argv: list[str] | None = None) -> None:
    """Command line: ``python flows/train.py --help``, ``python flows/train.py evaluate --help``.

    Bad values and a store of the wrong modality (an image store as ``--text-store``) end
    with one ``error:`` line naming the flag (exit 2), before any flow starts.
    """
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["evaluate"]:
        params = evaluate_cli().parse(argv[1:])
        print(summary(evaluate_flow(**params.model_dump())))
        return
    from flows.cli import check_stores
    cli = train_cli()
    params = cli.parse(argv)
    check_stores(cli, params, STORE_SLOTS)
    print(summary(train_flow(**params.model_dump())))


if __name__ == "__main__":
    main()
