"""Flower's side of ``flower_side_by_side.py``: the same task in Flower's simulation runtime.

    PYTHON_WITH_FLWR benchmarks/flower_task.py --shards shards/pneu --rounds 10 --out t.json

Written the way Flower's own ``quickstart-pytorch`` app is (Message API of Flower ≥ 1.21:
``ClientApp`` with ``@app.train()``/``@app.evaluate()``, ``ServerApp`` running
``FedAvg.start``), on fedsilo's shards so that both frameworks see the same partition:

- each of the 3 virtual SuperNodes reads ``site_{partition-id}.h5`` (train and val splits),
  trains 1 local epoch (batch 64, SGD lr 0.05 momentum 0.9, shuffled) and evaluates on val;
- the ServerApp evaluates the global model on ``test.h5`` after every round
  (``evaluate_fn``), as fedsilo's coordinator does;
- the model is fedsilo's ``small_cnn`` (420,610 parameters for 1×28×28, 2 classes), built
  by the same code;
- images are normalised with the shard set's global mean and std (fedsilo's default).

It writes per-round timings to ``--out``: the round (configure_train to the end of the
central evaluation), the slowest client's training, the slowest client's validation and the
central evaluation, so that the driver can compute the same "overhead per round" for both
frameworks: round minus the work done in it.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import h5py
import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.simulation import run_simulation
from torch import nn

from fedsilo.models.registry import build_model

SHARDS = Path(os.environ.get("FLOWER_TASK_SHARDS", "shards/pneu"))
ROUNDS = int(os.environ.get("FLOWER_TASK_ROUNDS", "10"))
TIMES: dict[str, list[float]] = {"round_start": [], "round_end": [], "train_max": [],
                                 "val_max": [], "central_eval": []}


def _normalization() -> tuple[np.ndarray, np.ndarray]:
    manifest = json.loads((SHARDS / "manifest.json").read_text())
    stats = manifest.get("normalization") or {}
    mean = np.asarray(stats.get("mean", [0.0]), dtype=np.float32)
    std = np.maximum(np.asarray(stats.get("std", [1.0]), dtype=np.float32), 1e-6)
    return mean, std


def _load(path: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    mean, std = _normalization()
    with h5py.File(path, "r") as f:
        images = f[split]["images"][()].astype(np.float32) / 255.0
        labels = f[split]["labels"][()].astype(np.int64)
    images = (images - mean.reshape(1, -1, 1, 1)) / std.reshape(1, -1, 1, 1)
    return torch.from_numpy(images), torch.from_numpy(labels)


def _site_file(site: int) -> Path:
    manifest = json.loads((SHARDS / "manifest.json").read_text())
    return SHARDS / manifest["sites"][site]["file"]


def _model() -> nn.Module:
    return build_model("small_cnn", in_channels=1, num_classes=2, image_size=(28, 28))


def _evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    model.eval()
    loss, correct = 0.0, 0
    with torch.no_grad():
        for begin in range(0, len(y), 256):
            logits = model(x[begin: begin + 256])
            loss += float(nn.functional.cross_entropy(logits, y[begin: begin + 256],
                                                      reduction="sum"))
            correct += int((logits.argmax(1) == y[begin: begin + 256]).sum())
    return loss / len(y), correct / len(y)


client = ClientApp()


def _site_and_model(msg: Message, context: Context, split: str):
    """This SuperNode's split and the global model the message carries (what both client
    functions start with, as in Flower's quickstart)."""
    torch.set_num_threads(1)
    x, y = _load(_site_file(int(context.node_config["partition-id"])), split)
    model = _model()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    return x, y, model


@client.train()
def train(msg: Message, context: Context) -> Message:
    start = time.perf_counter()
    x, y, model = _site_and_model(msg, context, "train")
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    order = torch.randperm(len(y))
    for begin in range(0, len(y), 64):
        index = order[begin: begin + 64]
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x[index]), y[index]).backward()
        optimizer.step()
    seconds = time.perf_counter() - start
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()),
                          "metrics": MetricRecord({"num-examples": len(y), "train_s": seconds})})
    return Message(content=content, reply_to=msg)


@client.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    start = time.perf_counter()
    x, y, model = _site_and_model(msg, context, "val")
    loss, acc = _evaluate(model, x, y)
    metrics = {"num-examples": len(y), "val_loss": loss, "val_acc": acc,
               "val_s": time.perf_counter() - start}
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)


def _max_of(key: str, store: str):
    def aggregate(records: list[RecordDict], weighting: str) -> MetricRecord:
        value = max(float(r["metrics"][key]) for r in records)
        TIMES[store].append(value)
        return MetricRecord({key: value})
    return aggregate


class TimedFedAvg(FedAvg):
    def configure_train(self, server_round, arrays, config, grid):  # type: ignore[override]
        TIMES["round_start"].append(time.perf_counter())
        return super().configure_train(server_round, arrays, config, grid)


server = ServerApp()


@server.main()
def main(grid: Grid, context: Context) -> None:
    torch.set_num_threads(1)
    test_x, test_y = _load(SHARDS / "test.h5", "test")
    model = _model()

    def central(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        start = time.perf_counter()
        model.load_state_dict(arrays.to_torch_state_dict())
        loss, acc = _evaluate(model, test_x, test_y)
        end = time.perf_counter()
        if server_round > 0:
            TIMES["central_eval"].append(end - start)
            TIMES["round_end"].append(end)
        return MetricRecord({"test_loss": loss, "test_acc": acc})

    strategy = TimedFedAvg(fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=3,
                           min_evaluate_nodes=3, min_available_nodes=3,
                           train_metrics_aggr_fn=_max_of("train_s", "train_max"),
                           evaluate_metrics_aggr_fn=_max_of("val_s", "val_max"))
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(model.state_dict()),
                            num_rounds=ROUNDS, evaluate_fn=central)
    TIMES["final_test_acc"] = [float(result.evaluate_metrics_serverapp[ROUNDS]["test_acc"])]


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--cpus", type=float, default=float(os.cpu_count() or 1))
    args = parser.parse_args()
    # The server and client apps read these (Ray workers inherit the environment).
    os.environ["FLOWER_TASK_SHARDS"] = str(args.shards.resolve())
    os.environ["FLOWER_TASK_ROUNDS"] = str(args.rounds)
    global SHARDS, ROUNDS
    SHARDS, ROUNDS = args.shards.resolve(), args.rounds
    # All three clients run at once on the machine's cores, one thread each, as fedsilo's
    # three participant ranks do.
    backend = {"client_resources": {"num_cpus": args.cpus / 3, "num_gpus": 0.0}}
    run_simulation(server_app=server, client_app=client, num_supernodes=3,
                   backend_config=backend)
    if len(TIMES["train_max"]) != ROUNDS or len(TIMES["val_max"]) != ROUNDS:
        raise SystemExit("flower_task.py: some rounds got no client replies (see the log)")
    rounds = [end - start for start, end in zip(TIMES["round_start"], TIMES["round_end"])]
    work = [t + v + c for t, v, c in zip(TIMES["train_max"], TIMES["val_max"],
                                         TIMES["central_eval"])]
    args.out.write_text(json.dumps({"round_s": rounds, "work_s": work,
                                    "final_test_acc": TIMES.get("final_test_acc", [None])[0]}))


if __name__ == "__main__":
    cli()
