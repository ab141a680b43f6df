"""``fedsilo personalize``: a site's personal model, the global model fine-tuned on the
site's own data (local fine-tuning, as in FedAvg+FT: Wang et al. 2019, "Federated
Evaluation of On-device Personalization"; Yu et al. 2020, "Salvaging Federated Learning by
Local Adaptation").

Run by one site alone, after the federation: it reads the run's released ``config.yaml``
and ``model.pt`` (with its card) and **only this site's shard** (its train split to
fine-tune, its val split to compare), never another site's file nor ``test.h5``.  It
reports the global and the personal model's accuracy and AUC on the site's own validation
split, and writes the personal model with its card, mode 0600, never over an existing
file.

Nothing here crosses to anyone: under DP the personal model is trained on the site's data
without noise, which spends no budget *because it is never released*; it is the site's
private model (docs/baseline.md).
"""

from __future__ import annotations

import io
import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from fedsilo import __version__
from fedsilo.config import load_config
from fedsilo.errors import ConfigError, ModelError
from fedsilo.modelfile import CARD_FORMAT, card_path
from fedsilo.rundir import RunDir, atomic_file
from fedsilo.shards import SplitReader, check_listed_shard, load_manifest, sha256_file

log = logging.getLogger("fedsilo")

#: what ``--layers`` fine-tunes: the classifier alone, or every layer
LAYERS = ("head", "all")


def personalize(run_dir: str, *, site: int, out: str, layers: str = "head",
                epochs: int = 1, lr: float | None = None, data_dir: str | None = None
                ) -> dict[str, Any]:
    """Fine-tune run ``run_dir``'s global model on site ``site``'s own train split and
    write it to ``out``; returns the validation metrics of both models on the site's val
    split (``{"global": {...}, "personal": {...}}``) and what was written."""
    run = RunDir(run_dir)
    if not run.root.is_dir():
        raise ConfigError(f"{run.root}: no such run directory")
    if not run.config.is_file():
        raise ConfigError(f"{run.root} holds no config.yaml: not a fedsilo run directory")
    if not run.model.is_file():
        raise ConfigError(f"{run.root} holds no model.pt: the run has not finished (the "
                          f"global model is written at its end)")
    target = Path(out)
    if target.suffix != ".pt":
        raise ConfigError(f"--out {target}: give a .pt file (its card goes beside it as "
                          f"{target.with_suffix('.json').name})")
    if target.resolve().is_relative_to(run.root.resolve()):
        # a run directory is shared and released (fedsilo release): the personal model is not
        raise ConfigError(f"--out {target} lies inside the run directory {run.root}, whose "
                          f"files are shared; keep the personal model outside it")
    for path in (target, card_path(target)):
        if path.exists():
            raise ConfigError(f"--out {target}: {path} exists; personalize never overwrites "
                              f"a file, choose another --out")
    if layers not in LAYERS:
        raise ConfigError(f"--layers {layers!r}: choose one of {', '.join(LAYERS)}")
    if epochs < 1:
        raise ConfigError(f"--epochs {epochs}: give at least 1")
    if lr is not None and not (np.isfinite(lr) and lr > 0):
        raise ConfigError(f"--lr {lr}: give a positive learning rate")
    config = load_config(run.config)
    directory = Path(data_dir if data_dir is not None else config.data.dir).expanduser()
    manifest = load_manifest(directory)
    if not 0 <= site < manifest.num_sites:
        raise ConfigError(f"--site {site}: unknown site; the shard set {directory} has sites "
                          f"0..{manifest.num_sites - 1}")
    entry = manifest.sites[site]
    # this site's shard only, checked against the manifest (torch-free, before the model)
    check_listed_shard(manifest, directory, entry, kind="site",
                       verify_hash=config.data.verify_hashes)
    return _fine_tune(run, config, manifest.path_of(entry, directory), site=site,
                      target=target, layers=layers, epochs=epochs, lr=lr)


def _fine_tune(run: RunDir, config: Any, shard: Path, *, site: int, target: Path,
               layers: str, epochs: int, lr: float | None) -> dict[str, Any]:
    import torch

    from fedsilo.loading import load_splits
    from fedsilo.modelfile import load_model
    from fedsilo.models import adapt
    from fedsilo.runtime import configure_threads, defer_dynamo_import, select_device
    from fedsilo.training import evaluate, make_optimizer, round_lr, round_seed, train_local

    configure_threads(config.runtime.threads, local_size=1)
    defer_dynamo_import()
    model, card, weights = load_model(run.model)
    device = select_device(config.runtime.device, local_rank=0, is_coordinator=False)
    model = model.to(device)
    readers = [SplitReader(shard, split, cache_bytes=0) for split in ("train", "val")]
    if config.data.normalize == "site":  # as the site trained in the federation
        mean, std = readers[0].mean.tolist(), np.maximum(readers[0].std, 1e-6).tolist()
    else:
        mean, std = list(card.mean), list(card.std)
    train_data, val_data = load_splits([(r, mean, std) for r in readers], data=config.data,
                                       device=device, who=f"site {site}")
    batch = config.eval.batch_size
    before = evaluate(model, val_data, batch_size=batch)
    if layers == "all":  # also what the federation kept frozen (model.train_layers)
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        try:
            adapt.freeze(model, "head", head=adapt.head_name(model))
        except ModelError as exc:
            raise ConfigError(f"--layers head: {exc}; use --layers all") from None
    # the last round's learning rate: the personal model starts where the federation ended
    rate = lr if lr is not None else round_lr(config.train, config.rounds)
    train = replace(config.train, epochs=epochs, max_steps=None, lr=rate, lr_decay=1.0,
                    channels_last=False)
    seed = round_seed(config.seed, config.rounds + 1, site)
    torch.manual_seed(seed)
    stats = train_local(model, train_data, config=train,
                        optimizer=make_optimizer(model, train),
                        generator=torch.Generator().manual_seed(seed))
    after = evaluate(model, val_data, batch_size=batch)
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    result = {"site": site, "num_train": len(train_data), "num_val": len(val_data),
              "global": before, "personal": after}
    raw = {k: v for k, v in card.raw.items()
           if k not in ("fedsilo_model_card", "weights", "weights_sha256")}
    personal_card = {
        **raw,
        "fedsilo_version": __version__,
        "normalization": {**raw.get("normalization", {}), "mean": [float(v) for v in mean],
                          "std": [float(v) for v in std]},
        "selected_by": None,
        "threshold": None,  # the global model's threshold was chosen for other weights
        "personalized": {
            "site": site, "from": str(weights), "from_sha256": sha256_file(weights),
            "layers": layers, "epochs": epochs, "lr": rate, "steps": stats.steps,
            "validation": {"global": before, "personal": after},
            "release": "private to the site: trained on its data without DP noise",
        },
    }
    _write_private_model(target, state, personal_card)
    result["out"] = str(target)
    return result


def _write_private_model(path: Path, state: dict[str, Any], card: dict[str, Any]) -> None:
    """The weights and their card, each mode 0600 and linked into place only where no file
    is (a file that appeared meanwhile is kept: ConfigError)."""
    import torch

    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    try:
        with atomic_file(path, private=True, exclusive=True,
                         retry="run fedsilo personalize again") as handle:
            handle.write(data)
        full = {"fedsilo_model_card": CARD_FORMAT, "weights": path.name,
                "weights_sha256": sha256_file(path), **card}
        with atomic_file(card_path(path), private=True, exclusive=True,
                         retry="run fedsilo personalize again") as handle:
            handle.write((json.dumps(full, indent=2) + "\n").encode())
    except FileExistsError:
        raise ConfigError(f"--out {path}: the file or its card appeared while training; "
                          f"nothing was overwritten, choose another --out") from None


def format_result(result: dict[str, Any]) -> str:
    """The comparison ``fedsilo personalize`` prints."""
    lines = [f"site {result['site']}: {result['num_train']} training, {result['num_val']} "
             f"validation images (its own split)",
             f"{'model':<10} {'val acc':>8} {'val AUC':>8} {'val loss':>9}"]
    for name in ("global", "personal"):
        m = result[name]
        lines.append(f"{name:<10} {_f(m.get('acc')):>8} {_f(m.get('auc')):>8} "
                     f"{_f(m.get('loss')):>9}")
    lines.append(f"wrote {result['out']} and its card (mode 0600: the personal model stays "
                 f"with the site)")
    return "\n".join(lines)


def _f(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) and np.isfinite(value) else "-"
