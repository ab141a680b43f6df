"""``fedsilo baseline``: the centralized reference run, what pooling the data would give.

The same model, recipe and evaluation as ``fedsilo train``, trained in one process (no MPI)
on the **union of the sites' training splits** as if one site held every image: the
*pooled site*.  A "round" is one pass of the recipe over the pooled set (``train.epochs``
epochs with a fresh optimizer at ``train.lr · lr_decay^(r−1)``, batches of
``train.batch_size``, the same augmentation), so a baseline of ``rounds = R`` is exactly a
one-site FedAvg run of R rounds on the pooled data.  Under DP (``dp.enabled``) the pooled
site trains with DP-SGD under the job-wide (ε, δ) as one site (its larger N means a smaller
sampling rate, so less noise for the same ε); ``dp.user`` protects one site's whole
contribution, which a single pooled site cannot have, and is left out with a warning.
What a federation adds on top (strategy, secure aggregation, sampling of sites) has no
pooled counterpart and is ignored.

The run directory holds what ``fedsilo report`` reads of a federated run
(``config.yaml``, ``metrics.jsonl`` with ``round`` = epoch pass and test
``acc``/``auc``/``loss``, ``model.pt`` with its card, ``summary.json``); every row and the
summary carry ``"centralized": true`` so that the report can put the baseline beside a
federated run (docs/baseline.md).  It is a **simulation** for whoever may pool the data:
it reads every site's shard.  It writes no checkpoint and does not resume: rerun it.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence, cast

import numpy as np

from fedsilo import __version__
from fedsilo.config import Config, dump_config, load_config
from fedsilo.errors import ConfigError, PrivacyBudgetError, ShardError
from fedsilo.rundir import RunDir, atomic_write_text, dump_json
from fedsilo.shards import Manifest, SplitReader, check_listed_shard, load_manifest

log = logging.getLogger("fedsilo")

#: the pooled site's index in the seeds of its batch order and augmentation (a one-site
#: federation's site 0 draws the same)
POOLED_SITE = 0
#: images hashed at a time for the pooled training set's digest
_DIGEST_BLOCK = 4096


class PooledReader:
    """One split of several shards, end to end (site 0's rows first), read as one
    :class:`~fedsilo.shards.SplitReader` (what :func:`fedsilo.loading.load_splits` takes):
    held in memory or streamed like any split, never copied into a new file."""

    def __init__(self, readers: Sequence[SplitReader], *, split: str) -> None:
        if not readers:
            raise ShardError("a pooled split needs at least one shard")
        first = readers[0]
        for reader in readers[1:]:
            if (reader.image_shape, reader.dtype) != (first.image_shape, first.dtype):
                raise ShardError(f"{reader.where} holds {reader.dtype} images of shape "
                                 f"{reader.image_shape}, {first.where} {first.dtype} of "
                                 f"{first.image_shape}: the shards cannot be pooled")
        self.readers = list(readers)
        self.split = split
        sizes = [r.num_samples for r in self.readers]
        #: the first pooled row of each shard, and the total
        self.starts = np.cumsum([0, *sizes])
        self.num_samples = int(self.starts[-1])
        self.image_shape, self.dtype = first.image_shape, first.dtype
        self.row_bytes = first.row_bytes
        names = "+".join(r.path.name for r in self.readers)
        self.path = first.path.parent / f"{names} [{split}]"
        self.where = f"the pooled {split} split of {names}"

    @property
    def cache_bytes(self) -> int:
        return sum(r.cache_bytes for r in self.readers)

    @cache_bytes.setter
    def cache_bytes(self, value: int) -> None:
        for reader in self.readers:  # shared by size, as one reader's would be
            reader.cache_bytes = int(value) * reader.num_samples // max(self.num_samples, 1)

    def labels(self) -> np.ndarray:
        return np.concatenate([r.labels() for r in self.readers]
                              or [np.zeros(0, dtype=np.int64)])

    def read(self, rows: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """The images of ``rows`` (ascending, no repeats) of the pooled split, in order."""
        rows = np.asarray(rows, dtype=np.int64)
        if out is None:
            out = np.empty((rows.size, *self.image_shape), dtype=self.dtype)
        if rows.size and (rows[0] < 0 or rows[-1] >= self.num_samples):
            raise IndexError(f"{self.where}: rows outside [0, {self.num_samples})")
        cuts = np.searchsorted(rows, self.starts)
        for index, reader in enumerate(self.readers):
            begin, end = int(cuts[index]), int(cuts[index + 1])
            if end > begin:
                reader.read(rows[begin:end] - self.starts[index], out=out[begin:end])
        return out

    def close(self) -> None:
        for reader in self.readers:
            reader.close()


def pooled_digest(reader: PooledReader | SplitReader) -> str:
    """sha256 of a split's raw images (in row order, as stored) followed by its labels
    (int64, little-endian): what a baseline trained on, in bounded memory."""
    digest = hashlib.sha256()
    for begin in range(0, reader.num_samples, _DIGEST_BLOCK):
        rows = np.arange(begin, min(begin + _DIGEST_BLOCK, reader.num_samples))
        digest.update(np.ascontiguousarray(reader.read(rows)).tobytes())
    digest.update(reader.labels().astype("<i8").tobytes())
    return digest.hexdigest()


def run_baseline(*, config_path: str | None, overrides: Sequence[str], out_dir: str) -> Path:
    """Train the centralized baseline of a configuration into ``out_dir``; returns it."""
    config = load_config(config_path, overrides=overrides)
    data_dir = Path(config.data.dir).expanduser().resolve()
    config = replace(config, data=replace(config.data, dir=str(data_dir)))
    run = RunDir(out_dir)
    if run.root.exists() and not run.root.is_dir():
        raise ConfigError(f"--out {run.root} is an existing file, not a directory")
    if run.holds_run() or run.summary.exists():
        raise ConfigError(f"{run.root} already holds a run (metrics, model or summary); "
                          f"choose another --out (nothing there is overwritten)")
    manifest = load_manifest(data_dir)
    for entry in manifest.sites:  # torch-free: bad data is reported before torch loads
        check_listed_shard(manifest, data_dir, entry, kind="site",
                           verify_hash=config.data.verify_hashes)
    check_listed_shard(manifest, data_dir, manifest.test, kind="test",
                       verify_hash=config.data.verify_hashes)
    if config.dp.user.enabled:
        log.warning("dp.user (user-level DP-FedAvg) protects one site's whole contribution; "
                    "the pooled site holds every site's data, so the baseline leaves it out")
    lock = run.lock()  # fedsilo report shows the baseline as running while it trains
    try:
        return _train(config, manifest, run)
    finally:
        lock.close()


def _train(config: Config, manifest: Manifest, run: RunDir) -> Path:
    import torch

    from fedsilo.loading import load_splits
    from fedsilo.models import build_for
    from fedsilo.roles import private
    from fedsilo.runtime import configure_threads, defer_dynamo_import, select_device

    started = time.perf_counter()
    threads = configure_threads(config.runtime.threads, local_size=1)
    defer_dynamo_import()
    device = select_device(config.runtime.device, local_rank=0, is_coordinator=False)
    torch.manual_seed(config.seed)  # the initial weights every rank of a federation has
    channels, height, width = manifest.image_shape
    model = build_for(config, in_channels=channels, num_classes=manifest.num_classes,
                      image_size=(height, width)).to(device)
    mean, std = _normalization(config, manifest)
    data_dir = Path(config.data.dir)
    site_paths = [manifest.path_of(entry, data_dir) for entry in manifest.sites]
    pools = [PooledReader([SplitReader(p, split, cache_bytes=0) for p in site_paths],
                          split=split) for split in ("train", "val")]
    train_digest = pooled_digest(pools[0])
    # a PooledReader is read exactly as a SplitReader is (duck-typed)
    train_data, val_data = load_splits([(cast(SplitReader, pool), mean, std) for pool in pools],
                                       data=config.data, device=device, who="the pooled site")
    test_reader = SplitReader(manifest.path_of(manifest.test, data_dir), "test", cache_bytes=0)
    test_data = load_splits([(test_reader, mean, std)], data=config.data, device=device,
                            who="the baseline's test")[0]
    train_counts = np.bincount(train_data.labels.cpu().numpy(),
                               minlength=manifest.num_classes).tolist()
    data_record = {
        "train": {"num_samples": len(train_data), "class_counts": train_counts,
                  "sha256": train_digest},
        "val": {"num_samples": len(val_data)},
        "sites": [{"file": entry.file, "sha256": entry.sha256,
                   "num_samples": int(entry.num_samples.get("train", 0))}
                  for entry in manifest.sites],
        "test": {"file": manifest.test.file, "sha256": manifest.test.sha256,
                 "num_samples": len(test_data)},
    }
    log.info("centralized baseline: %d training images pooled from %d sites (%s), model %s "
             "with %d parameters, %d threads, device %s", len(train_data), manifest.num_sites,
             ", ".join(e.file for e in manifest.sites), config.model.name,
             sum(p.numel() for p in model.parameters()), threads, device)
    atomic_write_text(run.config, dump_config(config))
    trainer = _Trainer(config, manifest, model=model, data=train_data, device=device)
    last_test: dict[str, Any] | None = None
    last_row: dict[str, Any] = {}
    rounds_done = 0
    for round_index in range(1, config.rounds + 1):
        if not trainer.round_fits(round_index):
            break
        begin = time.perf_counter()
        stats = trainer.train(round_index)
        seconds: dict[str, float] = {"local": time.perf_counter() - begin}
        row: dict[str, Any] = {"round": round_index}
        if round_index % config.eval.every == 0 or round_index == config.rounds:
            begin = time.perf_counter()
            last_test = _evaluate(model, test_data, config)
            seconds["evaluate"] = time.perf_counter() - begin
            row.update(acc=last_test["acc"], auc=last_test["auc"], loss=last_test["loss"])
        if not private(config):  # as the federation's rows: no val, no loss under DP
            row["val"] = _evaluate(model, val_data, config)
            row["train"] = {"loss": stats[2], "steps": stats[0], "samples": stats[1]}
        if trainer.privacy is not None:
            report = trainer.privacy.report()
            row["epsilon"] = {str(POOLED_SITE): report["epsilon"]}
            row["delta"] = {str(POOLED_SITE): report["delta"]}
        seconds["round"] = sum(seconds.values())
        row["seconds"] = seconds
        row["centralized"] = True
        run.append_metrics(row)
        rounds_done, last_row = round_index, row
        log.info("epoch pass %d/%d | test acc %s auc %s loss %s | %.1fs", round_index,
                 config.rounds, *(_fmt(row.get(k)) for k in ("acc", "auc", "loss")),
                 seconds["round"])
    if last_test is None or "acc" not in last_row:  # the final model, tested
        last_test = _evaluate(model, test_data, config)
    _write_model(run, model, config, manifest, mean=mean, std=std, round_index=rounds_done)
    summary: dict[str, Any] = {
        "fedsilo_version": __version__,
        "centralized": True,
        "rounds": config.rounds,
        "rounds_completed": rounds_done,
        "model": config.model.name,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "participants": {str(POOLED_SITE): {"num_samples": len(train_data)}},
        "test": last_test,
        "best_acc": max((r["acc"] for r in run.read_metrics() if "acc" in r), default=None),
        "seconds_this_process": time.perf_counter() - started,
        "data": data_record,
    }
    if not private(config):
        summary["val"] = last_row.get("val") or _evaluate(model, val_data, config)
    if trainer.privacy is not None:
        report = trainer.privacy.report()
        summary["privacy"] = {str(POOLED_SITE): {
            **{k: report[k] for k in ("epsilon", "delta", "target_epsilon", "noise_multiplier",
                                      "sample_rate", "steps", "grad_sample_mode")},
            "accountant": config.dp.accountant, "stopped_round": trainer.stopped_round}}
        summary["stopped"] = {} if trainer.stopped_round is None \
            else {str(POOLED_SITE): trainer.stopped_round}
    dump_json(run.summary, summary)
    log.info("finished: test acc %.4f auc %s loss %.4f -> %s", last_test["acc"],
             _fmt(last_test["auc"]), last_test["loss"], run.root)
    return run.root


class _Trainer:
    """The pooled site's rounds: a fresh optimizer each (as a site's), DP-SGD when on."""

    def __init__(self, config: Config, manifest: Manifest, *, model: Any, data: Any,
                 device: Any) -> None:
        from fedsilo.training import channels_last_for

        self.config, self.model, self.data = config, model, data
        self.train_config = replace(config.train, channels_last=channels_last_for(
            config.train.channels_last, model=model, device=device, dp=config.dp.enabled))
        if self.train_config.channels_last:
            import torch

            model.to(memory_format=torch.channels_last)
        self.augmenter = None
        if config.data.augment.enabled:
            from fedsilo.augment import Augmenter

            self.augmenter = Augmenter(config.data.augment, image_shape=manifest.image_shape,
                                       views=config.dp.augmult if config.dp.enabled else 1)
        self.privacy: Any = None
        self.secret: bytes | None = None
        self.stopped_round: int | None = None
        if config.dp.enabled:
            from fedsilo.privacy.engine import ParticipantPrivacy
            from fedsilo.privacy.secret import new_secret

            # the job-wide settings (dp.sites overrides are for the federation's sites)
            settings = config.dp.for_site(POOLED_SITE, _sites={})
            self.privacy = ParticipantPrivacy(
                model, site=POOLED_SITE, settings=settings, mechanism=config.dp.accountant,
                num_samples=len(data), train=config.train, rounds=config.rounds,
                model_name=config.model.name, sample=data.sample(2),
                mode=config.dp.grad_sample_mode, augmult=config.dp.augmult)
            self.secret = new_secret()

    def round_fits(self, round_index: int) -> bool:
        """Whether the pooled site's DP budget affords round ``round_index``
        (dp.budget_policy: stop here, or abort)."""
        privacy = self.privacy
        if privacy is None or privacy.round_fits():
            return True
        if self.config.dp.budget_policy == "abort":
            raise PrivacyBudgetError(
                f"the pooled site would exceed its privacy budget in round {round_index}: ε "
                f"would reach {privacy.next_round_epsilon():.3f} > target "
                f"{privacy.settings.target_epsilon} (dp.budget_policy=abort)")
        self.stopped_round = round_index
        log.warning("the pooled site stops before round %d: its privacy budget is spent "
                    "(ε = %.3f of %s)", round_index, privacy.epsilon,
                    privacy.settings.target_epsilon)
        return False

    def train(self, round_index: int) -> tuple[int, int, float, float]:
        """One round on the pooled set; (steps, samples, mean loss, seconds)."""
        import torch

        from fedsilo.training import (
            augment_seed,
            make_optimizer,
            round_seed,
            train_local,
        )

        config = self.config
        seed = round_seed(config.seed, round_index, POOLED_SITE)
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        optimizer = make_optimizer(self.model, config.train, round_index=round_index)
        augment = None
        if self.augmenter is not None:
            augment = self.augmenter.bind(torch.Generator().manual_seed(
                augment_seed(config.seed, round_index, POOLED_SITE)))
        if self.privacy is None:
            stats = train_local(self.model, self.data, config=self.train_config,
                                optimizer=optimizer, generator=generator, augment=augment)
            return stats.steps, stats.samples, stats.loss, stats.seconds
        assert self.secret is not None
        steps, samples, loss, seconds = self.privacy.train_round(
            self.data, optimizer=optimizer, secret=self.secret, round_index=round_index,
            augment=augment)
        return int(steps), int(samples), float(loss), float(seconds)


def _normalization(config: Config, manifest: Manifest) -> tuple[Any, Any]:
    """The pixel normalization of the pooled site and of the test: ``data.normalize``
    global or site (the pooled site's own statistics are the union's, the manifest's), or
    none."""
    if config.data.normalize == "none":
        channels = manifest.image_shape[0]
        return [0.0] * channels, [1.0] * channels
    return (list(manifest.normalization_mean),
            list(np.maximum(manifest.normalization_std, 1e-6)))


def _evaluate(model: Any, data: Any, config: Config) -> dict[str, Any]:
    from fedsilo.training import evaluate

    return evaluate(model, data, batch_size=config.eval.batch_size)


def _write_model(run: RunDir, model: Any, config: Config, manifest: Manifest, *,
                 mean: Any, std: Any, round_index: int) -> None:
    """``model.pt`` and its card, as the coordinator writes them (``predict``, ``export``
    and ``personalize`` read it alike)."""
    from fedsilo.modelfile import write_model
    from fedsilo.models import wants_dp_fix
    from fedsilo.weights import WeightLayout

    layout = WeightLayout.of(model)
    state = layout.to_state_dict(layout.flatten(model))
    card = {
        "fedsilo_version": __version__,
        "model": {**config.to_dict()["model"], "weights": None,
                  "dp_fix": "on" if wants_dp_fix(config) else "off"},
        "num_classes": manifest.num_classes,
        "class_names": None if manifest.class_names is None else list(manifest.class_names),
        "image_shape": list(manifest.image_shape),
        "normalization": {"mode": config.data.normalize, "mean": [float(v) for v in mean],
                          "std": [float(v) for v in std]},
        "round": round_index,
        "selected_by": None,
        "threshold": None,
        "eval_batch_size": config.eval.batch_size,
        "centralized": True,
    }
    write_model(run.model, state, card)


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else "-"
