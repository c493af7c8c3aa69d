"""Train one RecBole 1.2.1 sequential model on pre-split atomic files and dump its best
checkpoint's full score matrices (issue 11, item 5). Runs with ``.peer-venv/bin/python``
(RecBole's own venv: Python 3.11, torch 2.13 CPU, numpy 1.26, pandas 2.2); it imports
nothing from this project.

    .peer-venv/bin/python benchmarks/peer/recbole_runner.py --data-dir D --dataset mmcache \
        --model SASRec --budget-s 900 --out OUT

Reads ``D/<dataset>/<dataset>.{train,valid,test}.inter`` and ``<dataset>.item``
(``benchmarks/peer/atomic.py``). RecBole's default hyper-parameters of the model
(``recbole/properties/model/<Model>.yaml``) and of training (Adam, lr 1e-3, batch 2048,
up to 300 epochs) are kept; set here: CE loss with no negative sampling, full ranking,
valid metric NDCG@10, ``stopping_step`` 10, CPU, ``--threads`` torch threads, seed.

Wall-time budget: RecBole's ``Trainer.fit`` has none, so its ``callback_fn`` (called after
each validation, after the best checkpoint is saved) raises when the next epoch would end
past ``--budget-s`` seconds since ``fit`` started (this project's rule,
``TrainConfig.time_budget_s``); the best checkpoint on disk is then used as if training
had ended.

Writes to ``OUT``: ``epochs.json`` (per validated epoch: 0-based epoch, seconds since fit
started, RecBole's valid NDCG@10), ``scores_valid.npz`` / ``scores_test.npz`` (``scores``
(B, M) float32 from ``full_sort_predict`` of the best checkpoint, ``users`` (B,) user
tokens, ``items`` (M,) item tokens of RecBole's internal ids, ``[PAD]`` at 0) and
``summary.json`` (best valid NDCG@10 and its time, RecBole's own valid / test results of
the best checkpoint, versions). RecBole's log goes to ``OUT/log/`` (its cwd is OUT).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # RecBole's torch.load, torch >= 2.6


class BudgetStop(Exception):
    """Raised from RecBole's fit callback when the wall-time budget is spent."""


def main(argv: list[str] | None = None) -> dict:
    """Train, dump scores, write the summary; returns the summary dict.

    Raises: FileNotFoundError if an atomic file is missing (RecBole raises ValueError).
    """
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", required=True, type=Path, help="folder holding <dataset>/")
    p.add_argument("--dataset", default="mmcache")
    p.add_argument("--model", required=True, choices=["SASRec", "GRU4Rec"])
    p.add_argument("--budget-s", type=float, default=900.0)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=2020)
    p.add_argument("--max-len", type=int, default=50)
    p.add_argument("--epochs", type=int, default=300)
    args = p.parse_args(argv)
    data_dir, out = args.data_dir.resolve(), args.out.resolve()
    for part in ("train.inter", "valid.inter", "test.inter", "item"):
        f = data_dir / args.dataset / f"{args.dataset}.{part}"
        if not f.is_file():
            raise FileNotFoundError(f"atomic file {f} is missing (benchmarks/peer/atomic.py)")
    out.mkdir(parents=True, exist_ok=True)
    os.chdir(out)  # RecBole writes ./log/ and ./log_tensorboard/ under its cwd

    import numpy as np
    import pandas as pd
    import torch

    torch.set_num_threads(args.threads)
    import recbole
    from recbole.config import Config
    from recbole.data import create_dataset, data_preparation
    from recbole.utils import get_model, get_trainer, init_logger, init_seed

    config_dict = {
        "data_path": str(data_dir), "benchmark_filename": ["train", "valid", "test"],
        "alias_of_item_id": ["item_id_list"],
        "load_col": {"inter": ["user_id", "item_id_list", "item_id"], "item": ["item_id"]},
        "USER_ID_FIELD": "user_id", "ITEM_ID_FIELD": "item_id",
        "ITEM_LIST_LENGTH_FIELD": "item_length", "LIST_SUFFIX": "_list",
        "MAX_ITEM_LIST_LENGTH": args.max_len,
        "loss_type": "CE", "train_neg_sample_args": None,
        "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "group_by": "user",
                      "mode": "full"},
        "metrics": ["Hit", "NDCG", "MRR"], "topk": [10], "valid_metric": "NDCG@10",
        "stopping_step": 10, "epochs": args.epochs, "eval_step": 1,
        "use_gpu": False, "device": "cpu", "seed": args.seed, "reproducibility": True,
        "checkpoint_dir": str(out / "saved"), "show_progress": False, "worker": 0,
        "save_dataset": False, "save_dataloaders": False, "log_wandb": False,
    }
    config = Config(model=args.model, dataset=args.dataset, config_dict=config_dict)
    init_seed(config["seed"], config["reproducibility"])
    init_logger(config)
    torch.set_num_threads(args.threads)
    t_data = time.perf_counter()
    dataset = create_dataset(config)
    train_data, valid_data, test_data = data_preparation(config, dataset)
    data_s = time.perf_counter() - t_data
    init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
    model = get_model(config["model"])(config, train_data._dataset).to(config["device"])
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)

    epochs: list[dict] = []
    t0 = time.perf_counter()

    def callback(epoch_idx: int, valid_score: float) -> None:
        elapsed = time.perf_counter() - t0
        epochs.append({"epoch": epoch_idx, "elapsed_s": round(elapsed, 3),
                       "valid_ndcg10": float(valid_score)})
        (out / "epochs.json").write_text(json.dumps(epochs, indent=1))
        done = epoch_idx + 1
        if elapsed + elapsed / done > args.budget_s:
            raise BudgetStop(f"budget {args.budget_s:.0f} s: stopping after epoch {epoch_idx}")

    stopped = None
    try:
        trainer.fit(train_data, valid_data, saved=True, show_progress=False,
                    callback_fn=callback)
    except BudgetStop as exc:
        stopped = str(exc)
    fit_s = time.perf_counter() - t0

    ckpt = torch.load(trainer.saved_model_file, map_location="cpu", weights_only=False)
    model.load_state_dict(ckpt["state_dict"])
    model.load_other_parameter(ckpt.get("other_parameter"))
    model.eval()
    best = max(epochs, key=lambda e: e["valid_ndcg10"])  # first epoch reaching the max
    own_valid = trainer.evaluate(valid_data, load_best_model=False, show_progress=False)
    own_test = trainer.evaluate(test_data, load_best_model=False, show_progress=False)

    item_tokens = np.array(dataset.field2id_token["item_id"]).astype(str)
    user_tokens = np.array(dataset.field2id_token["user_id"]).astype(str)
    for stage, loader in (("valid", valid_data), ("test", test_data)):
        rows, users = [], []
        with torch.no_grad():
            for interaction, _, _, _ in loader:
                rows.append(model.full_sort_predict(interaction.to("cpu")).float().numpy())
                users.append(user_tokens[interaction["user_id"].numpy()])
        np.savez(out / f"scores_{stage}.npz", scores=np.concatenate(rows),
                 users=np.concatenate(users), items=item_tokens)
    summary = {
        "model": args.model, "budget_s": args.budget_s, "stopped": stopped,
        "epochs_run": len(epochs), "fit_s": round(fit_s, 2), "data_prep_s": round(data_s, 2),
        "best_epoch": best["epoch"], "best_valid_ndcg10_recbole": best["valid_ndcg10"],
        "best_reached_s": best["elapsed_s"], "checkpoint": trainer.saved_model_file,
        "checkpoint_epoch": int(ckpt.get("epoch", -1)),
        # RecBole saves on ties too (early_stopping: value >= best), so the checkpoint is the
        # LAST epoch with the best value; best_reached_s above is the FIRST
        "checkpoint_reached_s": next((e["elapsed_s"] for e in epochs
                                      if e["epoch"] == int(ckpt.get("epoch", -1))), None),
        "recbole_valid": {k: float(v) for k, v in own_valid.items()},
        "recbole_test": {k: float(v) for k, v in own_test.items()},
        "rows": {"train": len(train_data._dataset), "valid": len(valid_data._dataset),
                 "test": len(test_data._dataset)}, "n_items_recbole": int(dataset.item_num),
        "config": {k: config[k] for k in ("train_batch_size", "learning_rate", "epochs",
                                          "stopping_step", "MAX_ITEM_LIST_LENGTH", "loss_type",
                                          "seed")},
        "model_params": {k: config[k] for k in ("hidden_size", "n_layers", "n_heads",
                                                "inner_size", "hidden_dropout_prob",
                                                "attn_dropout_prob", "embedding_size",
                                                "num_layers", "dropout_prob")
                         if k in config.final_config_dict},
        "threads": torch.get_num_threads(),
        "versions": {"python": platform.python_version(), "recbole": recbole.__version__,
                     "torch": torch.__version__, "numpy": np.__version__,
                     "pandas": pd.__version__},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: summary[k] for k in ("model", "epochs_run", "best_epoch",
                                              "best_valid_ndcg10_recbole", "best_reached_s",
                                              "stopped")}))
    return summary


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
