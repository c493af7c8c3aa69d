"""Validated parameters of the flows, shared by deployments and the command line.

Each flow's parameters are a pydantic model here (:class:`CacheParams`,
:class:`TrainParams`, :class:`EvaluateParams`, :class:`PipelineParams`). The flow functions
declare the same parameters with the same annotated types, so:

* a deployment's parameter schema (what ``prefect deploy`` sends to the server, and what
  the server checks every ``prefect deployment run -p key=value`` against, since
  ``enforce_parameter_schema`` is on) carries the bounds and choices below;
* the flow body builds the model (``CacheParams(**params)``) and so validates the values
  once more, cross-field rules included, also when a flow is called from Python;
* ``python flows/<name>.py --help`` is generated from the same fields by pydantic-settings'
  ``CliApp`` (:mod:`flows.cli`), with the descriptions below as help text; a bad value is one
  ``error:`` line naming the flag, exit status 2.

``tests/test_deploy.py`` checks that the flows' signatures and these models agree.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipeline.encoders import PRESETS, presets_of

# --------------------------------------------------------------------------- field types
EncoderName = Literal[tuple(sorted(PRESETS))]  # type: ignore[valid-type]
"""A preset name of ``pipeline.encoders.PRESETS``."""
TextEncoderName = Literal[presets_of("text")]  # type: ignore[valid-type]
"""A text preset name (``pipeline.encoders.PRESET_MODALITIES``)."""
ImageEncoderName = Literal[presets_of("image")]  # type: ignore[valid-type]
"""An image preset name (``pipeline.encoders.PRESET_MODALITIES``)."""
GridName = Literal["all", "fusion", "iisan", "modality", "mrl", "seq", "smoke"]
"""A grid of ``pipeline.experiments.GRIDS`` (``tests/test_cli.py`` checks they agree)."""

Device = Annotated[str, Field(pattern=r"^(auto|cpu|mps|cuda(:[0-9]+)?)$",
                              description="torch device; 'auto' = cuda if available, else cpu")]
ShardSize = Annotated[int, Field(ge=1, le=1_000_000,
                                 description="items per shard (unit of writing, resume, retry)")]
BatchSize = Annotated[int, Field(ge=1, le=65_536, description="items per forward pass")]
Seconds = Annotated[float, Field(gt=0, le=7 * 24 * 3600, description="a duration in seconds")]
Retries = Annotated[int, Field(ge=0, le=20, description="retries of a failed shard task")]
Epochs = Annotated[int, Field(ge=1, le=10_000, description="an epoch count")]
Exclude = Annotated[Literal["none", "window", "all"], Field(
    description="history exclusion when ranking: all = the user's earlier items, window = the "
                "model's input window, none")]
Seed = Annotated[int, Field(ge=0, le=2**32 - 1, description="random seed")]
RepeatTarget = Annotated[Literal["rankable", "masked"], Field(
    description="a target also in the excluded history: rankable, or masked as IISAN's code "
                "does (a miss)")]
CacheMode = Literal["append", "rebuild"]


class _Params(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class CacheParams(_Params):
    """Parameters of the ``cache-hidden-states`` flow (stage 1)."""

    tables_dir: str = Field("outputs/demo/tables", min_length=1,
                            description="folder with items.parquet (relative to the worker's "
                                        "working directory or absolute)")
    store_dir: str = Field("outputs/demo/stores", min_length=1,
                           description="folder holding the hidden-state stores")
    encoder: EncoderName = Field("minilm", description="encoder preset")
    items_per_shard: ShardSize = 256
    batch_size: BatchSize | None = Field(None, description="items per forward pass; unset: "
                                                           "the preset's")
    encoder_spec: dict[str, Any] | None = Field(
        None, description="full pipeline.encoders.EncoderSpec as JSON; overrides --encoder")
    device: Device = "auto"
    mode: CacheMode = Field("append", description="append: encode only items the newest store "
                                                  "lacks; rebuild: write a new store version")
    runner: dict[str, Any] | None = Field(
        None, description="pipeline.runners.RunnerConfig as JSON; unset: the MMCACHE_DASK_* "
                          "environment, else threads")
    shard_timeout_s: Seconds = Field(6 * 3600.0, description="timeout of one shard-group task")
    shard_retries: Retries = 3

    @model_validator(mode="after")
    def _check(self) -> "CacheParams":
        from pydantic import ValidationError
        checks = []
        if self.encoder_spec is not None:
            from pipeline.encoders import EncoderSpec
            checks.append(("encoder_spec", EncoderSpec, self.encoder_spec))
        if self.runner:
            from pipeline.runners import RunnerConfig
            checks.append(("runner", RunnerConfig, self.runner))
        for field, model, value in checks:
            try:
                model(**value)
            except ValidationError as exc:  # name this field, then the inner one
                err = exc.errors()[0]
                inner = ".".join(str(x) for x in err.get("loc", ()))
                raise ValueError(f"{field}{'.' + inner if inner else ''}: "
                                 f"{str(err['msg']).removeprefix('Value error, ')}") from None
        return self


class TrainParams(_Params):
    """Parameters of the ``train`` flow (stage 2): one model, then its evaluation."""

    tables_dir: str = Field("outputs/demo/tables", min_length=1,
                            description="folder with interactions.parquet / items.parquet")
    out_dir: str = Field("outputs/demo/checkpoints", min_length=1,
                         description="checkpoints go to <out_dir>/<name>")
    name: str = Field("iisan-text-image", pattern=r"^[A-Za-z0-9._-]+$", description="run name")
    item_encoder: Literal["id", "iisan"] = Field("iisan", description="id embeddings or IISAN "
                                                                      "over cached states")
    store_dir: str | None = Field("outputs/demo/stores",
                                  description="where to find the newest complete stores when "
                                              "text_store / image_store are not given")
    text_encoder: TextEncoderName | None = Field(
        "minilm", description="text encoder preset whose newest store under store_dir is used")
    image_encoder: ImageEncoderName | None = Field(
        "efficientnet-lite0",
        description="image encoder preset whose newest store under store_dir is used")
    text_store: str | None = Field(None, description="explicit text store path (must hold "
                                                     "text hidden states)")
    image_store: str | None = Field(None, description="explicit image store path (must hold "
                                                      "image hidden states)")
    max_epochs: Epochs = Field(100, description="most training epochs")
    patience: Epochs = Field(10, description="early stopping: epochs without a better valid "
                                             "NDCG@10")
    exclude: Exclude = "all"
    repeat_target: RepeatTarget = "rankable"
    seed: Seed = 42
    device: Device = "auto"
    config: dict[str, Any] | None = Field(
        None, description="further pipeline.train.TrainConfig fields (JSON); a complete "
                          "TrainConfig here is used as given")

    @model_validator(mode="after")
    def _check(self) -> "TrainParams":
        if self.item_encoder == "iisan" and not (self.text_store or self.image_store
                                                 or self.store_dir):
            raise ValueError("item_encoder='iisan' needs text_store/image_store or store_dir")
        return self


class EvaluateParams(_Params):
    """Parameters of the ``evaluate`` flow: full-ranking metrics of a saved checkpoint."""

    checkpoint_dir: str = Field("outputs/demo/checkpoints/iisan-text-image", min_length=1,
                                description="folder with config.json and model.safetensors")
    exclude: Exclude = "all"
    repeat_target: RepeatTarget = "rankable"
    device: Device = "auto"


class PipelineParams(_Params):
    """Parameters of the ``mm-pipeline`` flow (the whole job, as ``make demo``)."""

    source_dir: str = Field("data/movielens-5core", min_length=1,
                            description="MovieLens folder (ml-latest-small/ + posters/)")
    out_dir: str = Field("outputs/demo", min_length=1, description="output folder")
    text_encoder: TextEncoderName = Field("minilm", description="text encoder preset")
    image_encoder: ImageEncoderName = Field("efficientnet-lite0",
                                            description="image encoder preset")
    k_core: Annotated[int, Field(ge=1, le=1000)] = Field(
        5, description="iterative k-core: users and items with fewer interactions are dropped")
    max_epochs: Epochs = Field(100, description="most training epochs per model")
    patience: Epochs = Field(10, description="early stopping patience (epochs)")
    exclude: Exclude = "all"
    seed: Seed = 42
    items_per_shard: ShardSize = 256
    runner: dict[str, Any] | None = Field(None, description="RunnerConfig JSON for stage 1")


class ExperimentsParams(_Params):
    """Parameters of the ``experiments`` flow: a named grid of training runs on one cache."""

    grid: GridName = Field("all", description="grid of pipeline.experiments.GRIDS")
    tables_dir: str = Field("outputs/demo/tables", min_length=1,
                            description="folder with interactions.parquet / items.parquet")
    out_dir: str = Field("outputs/experiments", min_length=1,
                         description="runs/, plots/ and the result tables go here")
    store_dir: str | None = Field("outputs/demo/stores",
                                  description="where the encoder presets' stores are found")
    text_encoder: TextEncoderName | None = Field(
        "minilm", description="text preset whose store under store_dir is used")
    image_encoder: ImageEncoderName | None = Field(
        "efficientnet-lite0", description="image preset whose store under store_dir is used")
    text_store: str | None = Field(None, description="explicit text store (LayerDrop layers)")
    image_store: str | None = Field(None, description="explicit image store (LayerDrop layers)")
    text_store_all: str | None = Field(None, description="text store with every hidden state "
                                                         "(default: cached into out_dir/stores)")
    image_store_all: str | None = Field(None, description="image store with every hidden "
                                                          "state (default: cached)")
    text_store_tokens: str | None = Field(None, description="text store of token states "
                                          "(pooling 'tokens') for the Fusion-Q-Former's token "
                                          "cells (default: cached into out_dir/stores)")
    image_store_tokens: str | None = Field(None, description="image store of token states "
                                           "(default: cached)")
    seeds: list[Seed] | None = Field(None, description="one run per seed and cell "
                                                       "(default [1, 2, 3])")
    max_epochs: Epochs = Field(200, description="most training epochs of every run (high "
                                                "enough that early stopping decides; a run "
                                                "that stops at it is flagged)")
    patience: Epochs = Field(10, description="early stopping patience of every run")
    min_epochs: Epochs = Field(30, description="early stopping never stops a run before this "
                                               "epoch")
    batch_size: BatchSize = Field(128, description="training batch size (users)")
    lr: float = Field(3e-3, gt=0, le=1, description="learning rate")
    mrl_sizes: list[Annotated[int, Field(ge=1)]] | None = Field(
        None, description="Matryoshka sizes of the mrl grid (default [16, 32, 64, 128])")
    short_len: Annotated[int, Field(ge=1)] = Field(10, description="window of the LoRA base "
                                                                   "run")
    exclude: Exclude = "all"
    train: dict[str, Any] | None = Field(None, description="further TrainConfig fields for "
                                                           "every cell (JSON)")
    workers: Annotated[int, Field(ge=1, le=256)] = Field(
        1, description="runs in parallel, each a task run in its own worker process "
                       "(Prefect's ProcessPoolTaskRunner); 1 = in the flow's process")
    threads: Annotated[int, Field(ge=1, le=256)] | None = Field(
        1, description="torch threads per run (None: torch's default)")


# --------------------------------------------------------------------------- devices
def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when torch sees a GPU, else ``cpu``; other values unchanged."""
    if device != "auto":
        return device
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def flow_parameter_names(fn: Any) -> list[str]:
    """Parameter names of a flow function (``Flow.fn``) in order; used by the tests."""
    import inspect
    return list(inspect.signature(fn).parameters)


__all__ = ["CacheParams", "TrainParams", "EvaluateParams", "PipelineParams",
           "ExperimentsParams", "EncoderName", "TextEncoderName", "ImageEncoderName", "GridName",
           "Device", "ShardSize", "BatchSize", "Seconds", "Retries", "Epochs", "Exclude", "RepeatTarget", "Seed",
           "CacheMode", "resolve_device", "flow_parameter_names"]
