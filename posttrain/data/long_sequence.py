"""The "long sequence" continual-learning benchmark (Razdaibiedina et al. 2023; the 15 text-classification tasks of
O-LoRA, Wang et al. 2023) in the layout the continual recipes read: `<dst>/<task>/{train,test}.jsonl, labels.json`,
rows `{"sentence": ..., "label": ...}`.

Its data ships in O-LoRA's repository (https://github.com/cmnfriend/O-LoRA, folder `CL_Benchmark/`: JSON lists
`[{"label", "sentence"}]` in `<category>/<task>/{train,dev,test}.json` with a `labels.json`). Convert it once:

    git clone --depth 1 https://github.com/cmnfriend/O-LoRA
    python -m posttrain.data.long_sequence O-LoRA/CL_Benchmark data/continual --train-rows 1000 --test-rows 500

Rows are sampled with a fixed seed (all of them when a split is smaller); the test split is `test.json`, else
`dev.json`; labels come from `labels.json`, else from the training rows (in order of first appearance).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

__all__ = ["LONG_SEQUENCE_FOLDERS", "convert_long_sequence"]

# our task name -> its folder under CL_Benchmark/
LONG_SEQUENCE_FOLDERS: dict[str, str] = {
    "mnli": "NLI/MNLI", "cb": "NLI/CB", "rte": "NLI/RTE", "qqp": "QQP/QQP", "sst2": "SC/SST-2",
    "amazon": "SC/amazon", "yelp": "SC/yelp", "imdb": "SC/IMDB", "agnews": "TC/agnews", "dbpedia": "TC/dbpedia",
    "yahoo": "TC/yahoo", "boolq": "BoolQA/BoolQA", "copa": "COPA/COPA", "wic": "WiC/WiC", "multirc": "MultiRC/MultiRC",
}


def _read(path: Path) -> list[dict[str, str]]:
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: invalid JSON ({err.msg})") from None
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected a JSON list of {{label, sentence}} rows")
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not isinstance(row.get("sentence"), str) or "label" not in row:
            raise ValueError(f"{path}: row {i + 1} is not a {{label, sentence}} object")
    return rows


def convert_long_sequence(src: str | Path, dst: str | Path, tasks: list[str] | None = None, train_rows: int = 1000,
                          test_rows: int = 500, seed: int = 0) -> list[str]:
    """Write every task of `tasks` (default: all fifteen found under `src`) to `dst`; returns the tasks written."""
    src, dst = Path(src), Path(dst)
    written = []
    for task in tasks or list(LONG_SEQUENCE_FOLDERS):
        if task not in LONG_SEQUENCE_FOLDERS:
            raise KeyError(f"unknown long-sequence task {task!r}; known: {', '.join(LONG_SEQUENCE_FOLDERS)}")
        folder = src / LONG_SEQUENCE_FOLDERS[task]
        if not (folder / "train.json").is_file():
            if tasks is not None:
                raise FileNotFoundError(f"no {folder / 'train.json'} for task {task!r}")
            continue
        test_file = folder / "test.json" if (folder / "test.json").is_file() else folder / "dev.json"
        if not test_file.is_file():
            raise FileNotFoundError(f"no test.json or dev.json in {folder} for task {task!r}")
        train, test = _read(folder / "train.json"), _read(test_file)
        labels_file = folder / "labels.json"
        labels = json.loads(labels_file.read_text()) if labels_file.is_file() else list(
            dict.fromkeys(str(r["label"]) for r in train))
        rng = random.Random(seed)
        out = dst / task
        out.mkdir(parents=True, exist_ok=True)
        for name, rows, n in (("train", train, train_rows), ("test", test, test_rows)):
            picked = rng.sample(rows, n) if len(rows) > n else list(rows)
            with open(out / f"{name}.jsonl", "w", encoding="utf-8") as f:
                for row in picked:
                    f.write(json.dumps({"sentence": row["sentence"], "label": str(row["label"])}, ensure_ascii=False)
                            + "\n")
        (out / "labels.json").write_text(json.dumps(labels, ensure_ascii=False))
        written.append(task)
    if not written:
        raise FileNotFoundError(f"no long-sequence task under {src} (expected folders like {src}/NLI/CB/train.json)")
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="O-LoRA's CL_Benchmark folder")
    parser.add_argument("dst", help="where the task folders go (the recipes' data.path)")
    parser.add_argument("--tasks", nargs="+", help="a subset (default: every task found)")
    parser.add_argument("--train-rows", type=int, default=1000)
    parser.add_argument("--test-rows", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    done = convert_long_sequence(args.src, args.dst, args.tasks, args.train_rows, args.test_rows, args.seed)
    print(f"wrote {len(done)} tasks to {args.dst}: {', '.join(done)}")


if __name__ == "__main__":
    main()
