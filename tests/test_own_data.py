"""README "Your own data": its commands, run as written (ingest a generic CSV pair with
string ids, cache MiniLM text states, train ID SASRec and IISAN text-only, evaluate under
IISAN's rule), on a small CSV pair written here; no Python of the user's."""

from __future__ import annotations

import csv
import json
import os
import random
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    """The bash block after the ``own-data:commands`` marker of README.md."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"<!-- own-data:commands.*?-->\s*```bash\n(.*?)```", text, re.S)
    assert block, "README.md lost its 'Your own data' commands"
    return [line for line in block.group(1).splitlines() if line.strip()]


def write_pair(root: Path, n_items: int = 80, n_users: int = 40, seed: int = 0) -> None:
    rng = random.Random(seed)
    words = "red blue steel glass paper pen ink lamp cable drill tape glue valve pump".split()
    (root / "my-data").mkdir(parents=True)
    items = [(f"SKU-{i:04d}", " ".join(rng.sample(words, 3)), rng.choice(["Acme", "Bolt", ""]))
             for i in range(n_items)]
    with open(root / "my-data" / "items.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["item", "title", "brand"])
        w.writerows(items)
    with open(root / "my-data" / "interactions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["user", "item", "ts"])
        for u in range(n_users):
            t, pos = 1_700_000_000 + u, rng.randrange(n_items)
            for _ in range(rng.randint(5, 9)):
                pos = (pos + rng.choice([1, 2, 3])) % n_items
                t += rng.randint(60, 86400)
                w.writerow([f"cust-{u:03d}", items[pos][0], t])


def test_readme_commands_parse():
    cmds = readme_commands()
    assert [c.split()[1] for c in cmds] == ["-m", "flows/cache_hidden_states.py",
                                             "flows/train.py", "flows/train.py", "flows/train.py"]


@pytest.mark.slow
def test_readme_own_data_commands_run_end_to_end(tmp_path):
    write_pair(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MMCACHE_PROGRESS": "0"}
    for line in readme_commands():
        argv = shlex.split(line)
        argv[0] = sys.executable
        argv = [str(ROOT / a) if a.startswith("flows/") else a for a in argv]
        r = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=1200)
        assert r.returncode == 0, f"{line}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    out = tmp_path / "outputs" / "my-data"
    items = pd.read_parquet(out / "tables" / "items.parquet")
    assert items["item_key"].str.startswith("SKU-").all()
    for name in ("sasrec-id", "iisan-text"):
        ck = out / "checkpoints" / name
        summary = json.loads((ck / "train_summary.json").read_text())
        assert len(pd.read_csv(ck / "history.csv")) == summary["epochs_run"]
        assert json.loads((ck / "metrics.json").read_text())["repeat_target"] == "rankable"
        ids = pd.read_csv(ck / "id_map.csv")
        assert set(ids[ids["kind"] == "item"]["key"]) == set(items["item_key"])
    ck = out / "checkpoints" / "iisan-text"
    masked = json.loads((ck / "metrics-all-masked.json").read_text())
    assert masked["exclude"] == "all" and masked["repeat_target"] == "masked"
    per_user = pd.read_csv(ck / "per_user-all-masked.csv")
    assert per_user["user_key"].str.startswith("cust-").all()
    assert per_user["target_key"].str.startswith("SKU-").all()
