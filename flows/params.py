"""Validated parameters of the flows, shared by deployments and the command line.

Each flow's parameters are a pydantic model here (:class:`CacheParams`,
:class:`TrainParams`, :class:`EvaluateParams`, :class:`PipelineParams`). The flow functions
declare the same parameters with the same annotated types, so:

* a deployment's parameter schema (what ``prefect deploy`` sends to the server, and what
  the server checks every ``prefect deployment run -p key=value`` against, since
  ``enforce_parameter_schema`` is on) carries the bounds and choices below;
* the flow body builds the model (``CacheParams(**params)``) and so validates the values
  once more, cross-field rules included, also when a flow is called from Python;
* ``python flows/<name>.py --help`` is generated from the same fields
  (:func:`add_model_arguments`), with the descriptions below as help text.

``tests/test_deploy.py`` checks that the flows' signatures and these models agree.
"""

from __future__ import annotations

import argparse
import json
import types
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipeline.encoders import PRESETS

# --------------------------------------------------------------------------- field types
EncoderName = Literal[tuple(sorted(PRESETS))]  # type: ignore[valid-type]
"""A preset name of ``pipeline.encoders.PRESETS``."""

Device = Annotated[str, Field(pattern=r"^(auto|cpu|mps|cuda(:[0-9]+)?)$",
                              description="torch device; 'auto' = cuda if available, else cpu")]
ShardSize = Annotated[int, Field(ge=1, le=1_000_000,
                                 description="items per shard (unit of writing, resume, retry)")]
BatchSize = Annotated[int, Field(ge=1, le=65_536, description="items per forward pass")]
Seconds = Annotated[float, Field(gt=0, le=7 * 24 * 3600, description="a duration in seconds")]
Retries = Annotated[int, Field(ge=0, le=20, description="retries of a failed shard task")]
Epochs = Annotated[int, Field(ge=1, le=10_000)]
Exclude = Literal["none", "window", "all"]
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
    batch_size: BatchSize | None = Field(None, description="items per forward pass "
                                                           "(default: the preset's)")
    encoder_spec: dict[str, Any] | None = Field(
        None, description="full pipeline.encoders.EncoderSpec as JSON; overrides --encoder")
    device: Device = "auto"
    mode: CacheMode = Field("append", description="append: encode only items the newest store "
                                                  "lacks; rebuild: write a new store version")
    runner: dict[str, Any] | None = Field(
        None, description="pipeline.runners.RunnerConfig as JSON (default: MMCACHE_DASK_* "
                          "environment, else threads)")
    shard_timeout_s: Seconds = Field(6 * 3600.0, description="timeout of one shard-group task")
    shard_retries: Retries = 3

    @model_validator(mode="after")
    def _check(self) -> "CacheParams":
        if self.encoder_spec is not None:
            from pipeline.encoders import EncoderSpec
            EncoderSpec(**self.encoder_spec)  # raises naming the bad field
        if self.runner:
            from pipeline.runners import RunnerConfig
            RunnerConfig(**self.runner)
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
    text_encoder: EncoderName | None = Field("minilm", description="text store to pick up")
    image_encoder: EncoderName | None = Field("efficientnet-lite0",
                                              description="image store to pick up")
    text_store: str | None = Field(None, description="explicit text store path")
    image_store: str | None = Field(None, description="explicit image store path")
    max_epochs: Epochs = 100
    patience: Epochs = 10
    exclude: Exclude = "all"
    seed: int = 42
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
    device: Device = "auto"


class PipelineParams(_Params):
    """Parameters of the ``mm-pipeline`` flow (the whole job, as ``make demo``)."""

    source_dir: str = Field("data/movielens-5core", min_length=1,
                            description="MovieLens folder (ml-latest-small/ + posters/)")
    out_dir: str = Field("outputs/demo", min_length=1, description="output folder")
    text_encoder: EncoderName = "minilm"
    image_encoder: EncoderName = "efficientnet-lite0"
    k_core: Annotated[int, Field(ge=1, le=1000)] = 5
    max_epochs: Epochs = 100
    patience: Epochs = 10
    exclude: Exclude = "all"
    seed: int = 42
    items_per_shard: ShardSize = 256
    runner: dict[str, Any] | None = Field(None, description="RunnerConfig JSON for stage 1")


# --------------------------------------------------------------------------- devices
def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when torch sees a GPU, else ``cpu``; other values unchanged."""
    if device != "auto":
        return device
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


# --------------------------------------------------------------------------- command line
def _unwrap(annotation: Any) -> tuple[Any, bool]:
    """(inner type, optional?) of ``X | None`` / ``Optional[X]`` / ``Annotated[X, ...]``."""
    optional = False
    while True:
        origin = get_origin(annotation)
        if origin is Annotated:
            annotation = get_args(annotation)[0]
        elif origin in (Union, types.UnionType):
            args = [a for a in get_args(annotation) if a is not type(None)]
            optional = optional or len(args) < len(get_args(annotation))
            annotation = args[0] if len(args) == 1 else str
        else:
            return annotation, optional


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return value


def add_model_arguments(parser: argparse.ArgumentParser, model: type[BaseModel],
                        aliases: dict[str, list[str]] | None = None) -> None:
    """Add one ``--field-name`` option per field of ``model`` (plus ``aliases``).

    Options default to None so that only the values given on the command line override
    the model's defaults (see :func:`model_from_args`). Literal fields get ``choices``,
    dict fields take JSON, bools get ``--x/--no-x``.
    """
    aliases = aliases or {}
    for name, info in model.model_fields.items():
        kind, _ = _unwrap(info.annotation)
        flags = [f"--{name.replace('_', '-')}", *aliases.get(name, [])]
        default = info.get_default(call_default_factory=True)
        help_ = (info.description or "") + (f" (default: {default})" if default is not None
                                            else "")
        kw: dict[str, Any] = {"dest": name, "default": None, "help": help_}
        if get_origin(kind) is Literal:
            kw["choices"] = list(get_args(kind))
        elif kind is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif kind in (int, float, str):
            kw["type"] = kind
        elif get_origin(kind) is dict or kind is dict:
            kw["type"], kw["metavar"] = _json_object, "JSON"
        else:
            kw["type"] = str
        parser.add_argument(*flags, **kw)


def model_from_args(model: type[BaseModel], args: argparse.Namespace) -> BaseModel:
    """Build ``model`` from the options given on the command line (others keep defaults).

    Raises:
        pydantic.ValidationError: a value is out of range (names the field).
    """
    given = {k: v for k, v in vars(args).items() if k in model.model_fields and v is not None}
    return model(**given)


def flow_parameter_names(fn: Any) -> list[str]:
    """Parameter names of a flow function (``Flow.fn``) in order; used by the tests."""
    import inspect
    return list(inspect.signature(fn).parameters)


__all__ = ["CacheParams", "TrainParams", "EvaluateParams", "PipelineParams", "EncoderName",
           "Device", "ShardSize", "BatchSize", "Seconds", "Retries", "Epochs", "Exclude",
           "CacheMode", "resolve_device", "add_model_arguments", "model_from_args",
           "flow_parameter_names"]
