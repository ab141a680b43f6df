"""What each rank does between the collectives of a round: the coordinator and a participant.

Neither class calls MPI; :mod:`fedsilo.federation` owns the order of collectives.
Participant ``k`` is MPI rank ``k`` and owns shard ``site-(k-1)``; no other rank opens it.
"""

from __future__ import annotations

import json
import logging
import pickle
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from fedsilo import __version__
from fedsilo.aggregate import count_nonfinite
from fedsilo.comm import World
from fedsilo.config import Config
from fedsilo.errors import CheckpointError, FedsiloError, ModelError, UpdateError
from fedsilo.models import build_model
from fedsilo.privacy import PrivacyAccountant, userlevel
from fedsilo.progress import RoundProgress
from fedsilo.rundir import RunDir, atomic_torch_save, dump_json, finite_json, load_torch
from fedsilo.runtime import configure_threads, select_device
from fedsilo.shards import Manifest, check_shard, read_shard
from fedsilo.strategies import build_strategy
from fedsilo.training import (LocalStats, TensorSplit, evaluate, make_optimizer, round_seed,
                              train_local)
from fedsilo.weights import WeightLayout

log = logging.getLogger("fedsilo")

#: seeds the user-level DP noise apart from every other random stream of a (round, site)
_NOISE_STREAM = 0x5EED_D9


class _Role:
    """What both roles share: device, threads, the model and its flat weight buffers."""

    def __init__(self, *, world: World, config: Config, manifest: Manifest, run_dir: RunDir,
                 resume_round: int) -> None:
        self.world, self.config, self.manifest, self.run_dir = world, config, manifest, run_dir
        self.resume_round = resume_round
        self.threads = configure_threads(config.runtime.threads, local_size=world.local_size)
        self.device = select_device(config.runtime.device, local_rank=world.local_rank,
                                    is_coordinator=world.is_coordinator)
        torch.manual_seed(config.seed)  # identical initial weights on every rank
        channels, height, width = manifest.image_shape
        self.model = build_model(config.model.name, in_channels=channels,
                                 num_classes=manifest.num_classes, image_size=(height, width),
                                 norm_groups=config.model.norm_groups).to(self.device)
        self.layout = WeightLayout.of(self.model)
        self.pinned = self.device.type == "cuda"
        self.global_weights = self.layout.flatten(self.model,
                                                  out=self.layout.empty(pinned=self.pinned))
        #: encrypted aggregation: the loaded key file and (participants) the codec
        self.keys: Any = None
        self.codec: Any = None

    def key_summary(self) -> dict[str, Any] | None:
        """What this rank tells the others about its keys: ids and parameters, no key."""
        return None if self.keys is None else self.keys.summary()

    def _check_model_fits(self, sample: torch.Tensor) -> None:
        try:
            with torch.no_grad():
                self.model.eval()
                logits = self.model(sample[:1])
        except RuntimeError as exc:
            raise ModelError(f"model {self.config.model.name!r} cannot process images of shape "
                             f"{tuple(sample.shape[1:])}: {exc}") from None
        if logits.shape[-1] != self.manifest.num_classes:
            raise ModelError(f"model {self.config.model.name!r} outputs {logits.shape[-1]} "
                             f"classes, the shard set has {self.manifest.num_classes}")

    def _normalization(self, split: Any) -> tuple[Any, Any]:
        mode = self.config.data.normalize
        if mode == "none":
            channels = self.manifest.image_shape[0]
            return [0.0] * channels, [1.0] * channels
        if mode == "site" and split is not None:
            return split.mean, np.maximum(split.std, 1e-6)
        return self.manifest.normalization_mean, np.maximum(self.manifest.normalization_std, 1e-6)


class Participant(_Role):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        world, manifest, config = self.world, self.manifest, self.config
        self.site = world.rank - 1
        entry = manifest.sites[self.site]
        path = Path(config.data.dir) / entry.file
        check_shard(path, kind="site",
                    expected_sha256=entry.sha256 if config.data.verify_hashes else None,
                    image_shape=tuple(manifest.image_shape), num_classes=manifest.num_classes,
                    required_splits=("train", "val"))
        shard = read_shard(path)
        mean, std = self._normalization(shard.splits["train"])
        self.train_data = TensorSplit.from_arrays(shard.splits["train"].images,
                                                  shard.splits["train"].labels,
                                                  mean=mean, std=std, device=self.device)
        val = shard.splits["val"]
        self.val_data = TensorSplit.from_arrays(val.images, val.labels, mean=mean, std=std,
                                                device=self.device)
        self._check_model_fits(self.train_data.images)
        self.local_weights = self.layout.empty(pinned=self.pinned)
        self.reduce_buffer = self.layout.empty(pinned=self.pinned)
        self.rounds_trained = 0
        self.privacy = None
        if config.dp.enabled:
            from fedsilo.privacy.engine import ParticipantPrivacy

            self.privacy = ParticipantPrivacy(
                self.model, site=self.site, settings=config.dp.for_site(self.site),
                mechanism=config.dp.accountant, num_samples=len(self.train_data),
                train=config.train, rounds=config.rounds, model_name=config.model.name,
                sample=self.train_data.images, mode=config.dp.grad_sample_mode)
        #: this round's serialized ciphertext (encrypted aggregation only)
        self.payload: bytes | None = None
        if config.he.enabled:
            from fedsilo.crypto import CODECS
            from fedsilo.crypto.ckks import PARTICIPANT_FILE, load_keys
            from fedsilo.crypto.params import validate

            self.keys = load_keys(Path(config.he.keys) / PARTICIPANT_FILE, expect="participant",
                                  num_threads=self.threads)
            validate(self.keys.params, num_participants=world.num_participants)
            self.codec = CODECS.get("ckks")(keys=self.keys)
        if self.resume_round:
            self._load_checkpoint(self.resume_round)

    # -- state that stays on this rank --------------------------------------------------

    def state_dict(self, round_index: int) -> dict[str, Any]:
        # Each round's randomness is derived from (seed, round, site), so no RNG state is
        # needed to continue exactly; later capabilities (DP accountants, control variates)
        # add their state here.
        state = {"round": round_index, "site": self.site, "rounds_trained": self.rounds_trained}
        if self.privacy is not None:
            state["privacy"] = self.privacy.state_dict()
        return state

    def _load_checkpoint(self, round_index: int) -> None:
        path = self.run_dir.participant_checkpoint(round_index, self.site)
        state = load_torch(path)
        if state.get("site") != self.site or state.get("round") != round_index:
            raise CheckpointError(f"checkpoint {path} belongs to site {state.get('site')} round "
                                  f"{state.get('round')}, expected site {self.site} round "
                                  f"{round_index}")
        self.rounds_trained = int(state["rounds_trained"])
        if self.privacy is not None:
            if "privacy" not in state:
                raise CheckpointError(f"checkpoint {path} has no privacy accountant, but this "
                                      f"run trains with DP (dp.enabled); resume it without DP")
            self.privacy.load_state_dict(state["privacy"])

    # -- a round ----------------------------------------------------------------------

    def plan(self, round_index: int) -> None:  # only the coordinator plans
        raise AssertionError("participants do not plan rounds")

    def local_round(self, plan: dict[str, Any]) -> tuple[dict[str, Any], FedsiloError | None]:
        round_index = plan["round"]
        if self.privacy is not None and not self.privacy.round_fits():
            if self.config.dp.budget_policy == "abort":
                return self._sit_out(round_index, reason="budget"), \
                    self.privacy.budget_error(round_index)
            if self.privacy.stopped_round is None:
                self.privacy.stopped_round = round_index
                log.warning("participant %d stops contributing in round %d: another round "
                            "would take ε from %.3f to %.3f > budget %s", self.site,
                            round_index, self.privacy.epsilon,
                            self.privacy.next_round_epsilon(),
                            self.privacy.settings.target_epsilon)
            return self._sit_out(round_index, reason="budget"), None
        if self.site not in plan["weights"]:
            return self._sit_out(round_index, reason="not planned"), None
        weight = plan["weights"][self.site]
        begin = time.perf_counter()
        self.layout.load(self.model, self.global_weights)
        validation = evaluate(self.model, self.val_data, batch_size=self.config.eval.batch_size)
        val_seconds = time.perf_counter() - begin

        seed = round_seed(self.config.seed, round_index, self.site)
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        optimizer = make_optimizer(self.model, self.config.train, round_index=round_index)
        if self.privacy is None:
            stats = train_local(self.model, self.train_data, config=self.config.train,
                                optimizer=optimizer, generator=generator)
        else:
            stats = LocalStats(*self.privacy.train_round(self.train_data, optimizer=optimizer,
                                                         generator=generator))
        self.rounds_trained += 1

        # u_k = n_k / Σn · (w_k − w): weighted here so the transport only adds.
        self.layout.flatten(self.model, out=self.local_weights)
        np.subtract(self.local_weights, self.global_weights, out=self.reduce_buffer)
        user_dp = self.config.dp.user
        delta_norm = None
        if user_dp.enabled:  # DP-FedAvg: clip Δ_k before weighting, noise share after
            delta_norm = userlevel.clip_in_place(self.reduce_buffer, clip_norm=user_dp.clip_norm)
        self.reduce_buffer *= np.float32(weight)
        if user_dp.enabled and user_dp.noise == "distributed":
            userlevel.add_noise(self.reduce_buffer, std=plan["user_noise_std"],
                                seed=(self.config.seed, round_index, self.site, _NOISE_STREAM))
        error = None
        bad = count_nonfinite(self.reduce_buffer)
        if bad:
            error = UpdateError(f"participant {self.site} (site-{self.site:03d}) produced an update "
                                f"with {bad} non-finite values (NaN/Inf) in round {round_index}; "
                                f"lower train.lr or check its data")
            self.reduce_buffer.fill(0)
        he: dict[str, Any] = {}
        if self.codec is not None and error is None:
            he, error = self._encrypt_update(weight, round_index)

        begin_ckpt = time.perf_counter()
        if _checkpoint_due(self.config, round_index) and error is None:
            atomic_torch_save(self.run_dir.participant_checkpoint(round_index, self.site),
                              self.state_dict(round_index))
        now = time.perf_counter()
        report = {"site": self.site, "num_samples": len(self.train_data), "steps": stats.steps,
                  "train_loss": stats.loss, "train_s": stats.seconds, "val": validation,
                  "val_s": val_seconds, "checkpoint_s": now - begin_ckpt,
                  "local_s": now - begin, "contributed": True,
                  "privacy": self._privacy_report(), "update_norm": delta_norm}
        if he:
            report["he"] = he
        return report, error

    def _privacy_report(self) -> dict[str, Any] | None:
        if self.privacy is None:
            return None
        report = self.privacy.report()
        # the coordinator plans the next round with this: a site that cannot afford it sits out
        report["next_round_fits"] = self.privacy.round_fits()
        return report

    def _sit_out(self, round_index: int, *, reason: str) -> dict[str, Any]:
        """This round's report of a participant that does not train (its update is zero)."""
        self.reduce_buffer.fill(0)
        if _checkpoint_due(self.config, round_index):
            atomic_torch_save(self.run_dir.participant_checkpoint(round_index, self.site),
                              self.state_dict(round_index))
        report = {"site": self.site, "num_samples": len(self.train_data), "contributed": False,
                  "reason": reason, "privacy": self._privacy_report()}
        if self.codec is not None:
            # the encrypted tree sums one ciphertext per participant: this one adds zero
            report["he"], _ = self._encrypt_update(1.0, round_index)
        return report

    def _encrypt_update(self, weight: float,
                        round_index: int) -> tuple[dict[str, Any], FedsiloError | None]:
        # The precision guarantee holds while every value stays below max_abs: the update
        # u_k = weight · delta is checked as delta, so every partial sum is bounded too.
        limit = self.keys.params.max_abs * weight
        peak = float(np.abs(self.reduce_buffer).max()) if self.reduce_buffer.size else 0.0
        if peak > limit:
            return {}, UpdateError(
                f"participant {self.site} (site-{self.site:03d}) produced an update with "
                f"|delta| = {peak / weight:.3g} in round {round_index}, beyond the {self.keys.params.max_abs:g} "
                f"the CKKS parameters can encrypt exactly; lower train.lr or create keys with a "
                f"smaller --scale-bits")
        begin = time.perf_counter()
        ciphertext = self.codec.encrypt(self.reduce_buffer)
        self.payload = self.codec.to_bytes(ciphertext)
        del ciphertext
        return {"encrypt_s": time.perf_counter() - begin,
                "ciphertext_bytes": len(self.payload)}, None

    def decrypt_aggregate(self, total: Any) -> dict[str, Any]:
        """On the aggregating participant: decrypt the encrypted sum into ``reduce_buffer``."""
        begin = time.perf_counter()
        self.codec.decrypt_into(total, self.reduce_buffer)
        return {"decrypt_s": time.perf_counter() - begin}

    def finish_round(self, plan: dict[str, Any], reports: Sequence[Any], timer: Any) -> None:
        pass

    def final_validation(self) -> tuple[dict[str, Any], None]:
        self.layout.load(self.model, self.global_weights)
        validation = evaluate(self.model, self.val_data, batch_size=self.config.eval.batch_size)
        return {"site": self.site, "val": validation, "privacy": self._privacy_report()}, None

    def finish_job(self, reports: Sequence[Any]) -> None:
        pass


class Coordinator(_Role):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        config, manifest = self.config, self.manifest
        path = Path(config.data.dir) / manifest.test.file
        check_shard(path, kind="test",
                    expected_sha256=manifest.test.sha256 if config.data.verify_hashes else None,
                    image_shape=tuple(manifest.image_shape), num_classes=manifest.num_classes,
                    required_splits=("test",))
        split = read_shard(path).splits["test"]
        mean, std = self._normalization(None)
        self.test_data = TensorSplit.from_arrays(split.images, split.labels, mean=mean, std=std,
                                                 device=self.device)
        self._check_model_fits(self.test_data.images)
        self.strategy = build_strategy(config.strategy.name, dict(config.strategy.options))
        self.num_samples = {i: int(site.num_samples["train"]) for i, site in enumerate(manifest.sites)}
        self.reduce_buffer = self.layout.empty(pinned=self.pinned)
        #: the aggregating participant's report of the last encrypted reduction
        self.he_round: dict[str, Any] | None = None
        if config.he.enabled:
            from fedsilo.crypto.ckks import COORDINATOR_FILE, load_keys

            # only the public context: the coordinator never opens the participant key
            self.keys = load_keys(Path(config.he.keys) / COORDINATOR_FILE, expect="coordinator")
        self.last_test: dict[str, Any] | None = None
        #: each participant's latest privacy report, and the round a site stopped in
        self.privacy: dict[int, dict[str, Any]] = {}
        self.stopped: dict[int, int] = {}
        self.user_accountant = PrivacyAccountant("rdp") if config.dp.user.enabled else None
        self.started = time.perf_counter()
        if self.resume_round:
            self._load_checkpoint(self.resume_round)
        self.progress = RoundProgress(total=config.rounds, done=self.resume_round,
                                      mode=config.runtime.progress)
        log.info("%d participants, model %s with %d parameters (%.1f MB per transfer), "
                 "%d threads per rank, device %s", self.world.num_participants, config.model.name,
                 self.layout.numel, self.layout.numel * 4 / 1e6, self.threads, self.device)

    def _load_checkpoint(self, round_index: int) -> None:
        path = self.run_dir.coordinator_checkpoint(round_index)
        state = load_torch(path)
        if list(state.get("layout", [])) != list(self.layout.names):
            raise CheckpointError(f"checkpoint {path} holds a different model than "
                                  f"{self.config.model.name!r}")
        self.global_weights[:] = state["weights"].numpy()
        self.strategy.load_state_dict({k: v.numpy() if torch.is_tensor(v) else v
                                       for k, v in state["strategy"].items()})
        self.last_test = state.get("last_test")
        privacy = json.loads(state.get("privacy", "{}"))
        self.privacy = {int(k): v for k, v in privacy.get("reports", {}).items()}
        self.stopped = {int(k): v for k, v in privacy.get("stopped", {}).items()}
        if self.user_accountant is not None:
            self.user_accountant.load_state_dict(privacy["user_accountant"])
        rows = self.run_dir.read_metrics()
        if (not rows or rows[-1]["round"] < round_index) and state.get("metrics_row"):
            self.run_dir.append_metrics(json.loads(state["metrics_row"]))

    def plan(self, round_index: int) -> dict[str, Any]:
        if self.config.dp.budget_policy == "stop":
            for site, report in sorted(self.privacy.items()):
                if not report["next_round_fits"]:
                    self._mark_stopped(site, round_index)
        participants = [k for k in sorted(self.num_samples) if k not in self.stopped]
        if not participants:
            log.warning("every participant has spent its privacy budget; the job ends before "
                        "round %d", round_index)
            return {"round": round_index, "stop": True, "participants": [], "weights": {}}
        weights = self.strategy.client_weights({k: self.num_samples[k] for k in participants})
        plan = {"round": round_index, "stop": False, "participants": participants,
                "weights": weights}
        user_dp = self.config.dp.user
        if user_dp.enabled:
            plan["user_noise_std"] = userlevel.noise_std(
                noise_multiplier=user_dp.noise_multiplier, clip_norm=user_dp.clip_norm,
                weights=weights, share=user_dp.noise == "distributed")
        return plan

    def local_round(self, plan: dict[str, Any]) -> tuple[None, None]:
        return None, None  # the coordinator adds nothing to the sum (World.reduce_sum)

    def finish_round(self, plan: dict[str, Any], reports: Sequence[Any], timer: Any) -> None:
        round_index = plan["round"]
        self._note_privacy(round_index, reports[1:])
        # A planned site that sat out (its budget ran out before the coordinator knew) sent
        # zeros: renormalize the weights over those that did contribute.
        contributed = sum(plan["weights"][r["site"]] for r in reports[1:]
                          if r["contributed"] and r["site"] in plan["weights"])
        if 0 < contributed < 1 - 1e-6:
            self.reduce_buffer *= np.float32(1 / contributed)
        if self.user_accountant is not None:
            if self.config.dp.user.noise == "central":
                userlevel.add_noise(self.reduce_buffer, std=plan["user_noise_std"],
                                    seed=(self.config.seed, round_index, _NOISE_STREAM))
            # every participant is in every round: sampling rate = participation fraction 1
            self.user_accountant.spend(noise_multiplier=self.config.dp.user.noise_multiplier,
                                       sample_rate=1.0, num_steps=1)
        with timer("server_step"):
            self.strategy.server_step(self.global_weights, self.reduce_buffer,
                                      out=self.global_weights)
            if count_nonfinite(self.global_weights):
                raise UpdateError(f"the aggregated model of round {round_index} is not finite")
        test = None
        if round_index % self.config.eval.every == 0 or round_index == self.config.rounds:
            with timer("evaluate"):
                self.layout.load(self.model, self.global_weights)
                test = evaluate(self.model, self.test_data, batch_size=self.config.eval.batch_size)
            self.last_test = test
        row = self._metrics_row(plan, reports[1:], timer, test)
        if _checkpoint_due(self.config, round_index):
            begin = time.perf_counter()
            atomic_torch_save(self.run_dir.coordinator_checkpoint(round_index), {
                "round": round_index,
                "weights": torch.from_numpy(self.global_weights.copy()),
                "layout": list(self.layout.names),
                "strategy": {k: torch.as_tensor(v) if isinstance(v, np.ndarray) else v
                             for k, v in self.strategy.state_dict().items()},
                "last_test": self.last_test,
                "privacy": json.dumps({
                    "reports": self.privacy, "stopped": self.stopped,
                    "user_accountant": self.user_accountant.state_dict()
                    if self.user_accountant is not None else None}),
                # the row goes in too: a crash between this file and metrics.jsonl loses nothing
                "metrics_row": json.dumps(finite_json(row)),
                "fedsilo_version": __version__,
            })
            self.run_dir.prune(keep=self.config.checkpoint.keep, current=round_index)
            row["seconds"]["checkpoint"] = time.perf_counter() - begin
        row["seconds"]["round"] = timer.total()  # everything, the checkpoint included
        self.run_dir.append_metrics(row)
        self.progress.update(round_index, row)

    def _note_privacy(self, round_index: int, reports: Sequence[dict[str, Any]]) -> None:
        for r in reports:
            if r.get("privacy") is not None:
                self.privacy[r["site"]] = r["privacy"]
            if not r["contributed"] and r["reason"] == "budget":
                self._mark_stopped(r["site"], round_index)

    def _mark_stopped(self, site: int, round_index: int) -> None:
        """Site ``site`` cannot afford round ``round_index``: plans leave it out from there."""
        if site in self.stopped:
            return
        self.stopped[site] = round_index
        report = self.privacy[site]
        log.warning("participant %d has spent its privacy budget (ε = %.3f of %s, δ = %g) and "
                    "stops contributing from round %d; %d participant(s) continue", site,
                    report["epsilon"], report["target_epsilon"], report["delta"], round_index,
                    len(self.num_samples) - len(self.stopped))

    def _metrics_row(self, plan: dict[str, Any], reports: Sequence[dict[str, Any]], timer: Any,
                     test: dict[str, Any] | None) -> dict[str, Any]:
        seconds = dict(timer.seconds)
        everyone, reports = reports, [r for r in reports if r["contributed"]]
        seconds["local_train_max"] = max((r["train_s"] for r in reports), default=0.0)
        seconds["local_val_max"] = max((r["val_s"] for r in reports), default=0.0)
        # the critical path of local work: the slowest participant's training + validation
        seconds["local_compute_max"] = max((r["train_s"] + r["val_s"] for r in reports),
                                           default=0.0)
        seconds["round"] = timer.total()  # provisional: finish_round adds the checkpoint
        n = len(everyone)
        weight_bytes = self.layout.numel * 4
        row: dict[str, Any] = {"round": plan["round"]}
        if test is not None:
            row.update(acc=test["acc"], auc=test["auc"], loss=test["loss"])
        row["val"] = _weighted_validation(reports)
        row["participants"] = {str(r["site"]): {
            "num_samples": r["num_samples"], "steps": r["steps"], "train_loss": r["train_loss"],
            "train_s": r["train_s"], "val_s": r["val_s"], "checkpoint_s": r["checkpoint_s"],
            "local_s": r["local_s"], "val_acc": r["val"]["acc"], "val_auc": r["val"]["auc"],
        } for r in reports}
        if self.config.dp.enabled:
            for r in reports:
                row["participants"][str(r["site"])]["epsilon"] = r["privacy"]["epsilon"]
            row["epsilon"] = {str(k): v["epsilon"] for k, v in sorted(self.privacy.items())}
            row["delta"] = {str(k): v["delta"] for k, v in sorted(self.privacy.items())}
            row["stopped"] = {str(k): v for k, v in sorted(self.stopped.items())}
        row["sat_out"] = [r["site"] for r in everyone if not r["contributed"]]
        if self.user_accountant is not None:
            row["user_epsilon"] = self.user_accountant.epsilon(delta=self.config.dp.delta)
            row["user_delta"] = self.config.dp.delta
            for r in reports:
                row["participants"][str(r["site"])]["update_norm"] = r["update_norm"]
        row["seconds"] = seconds
        row["bytes"] = {"broadcast": weight_bytes * n, "reduce": weight_bytes * n,
                        "metadata": len(pickle.dumps(plan)) + len(pickle.dumps(list(everyone)))}
        if self.keys is not None:
            row["he"] = self._he_row(everyone)
            # the tree: every participant but the aggregator sends one ciphertext-sized
            # message; the aggregator sends the plaintext aggregate to the coordinator
            row["bytes"]["reduce"] = sum(row["he"]["ciphertext_bytes"].values()) \
                - row["he"]["ciphertext_bytes"][str(everyone[0]["site"])] + weight_bytes
        return row

    def _he_row(self, reports: Sequence[dict[str, Any]]) -> dict[str, Any]:
        info = self.he_round or {}
        sizes = {str(r["site"]): r["he"]["ciphertext_bytes"] for r in reports}
        return {
            "encrypt_s": max(r["he"]["encrypt_s"] for r in reports),
            "reduce_s": info.get("reduce_s"),
            "decrypt_s": info.get("decrypt_s"),
            "encrypt_s_per_site": {str(r["site"]): r["he"]["encrypt_s"] for r in reports},
            "ciphertext_bytes": sizes,
            "ciphertext_bytes_per_param": max(sizes.values()) / self.layout.numel,
            # what the coordinator receives: the plaintext aggregate only, float32
            "coordinator_receives_bytes": self.layout.numel * 4,
        }

    def final_validation(self) -> tuple[None, None]:
        return None, None

    def finish_job(self, reports: Sequence[Any]) -> None:
        self.progress.close()
        if self.last_test is None or self.resume_round == self.config.rounds:
            self.layout.load(self.model, self.global_weights)
            self.last_test = evaluate(self.model, self.test_data,
                                      batch_size=self.config.eval.batch_size)
        atomic_torch_save(self.run_dir.model, self.layout.to_state_dict(self.global_weights))
        rows = self.run_dir.read_metrics()
        validations = [r for r in reports[1:]]
        summary = {
            "fedsilo_version": __version__,
            "rounds": self.config.rounds,
            "rounds_completed": rows[-1]["round"] if rows else 0,
            "model": self.config.model.name,
            "num_parameters": self.layout.numel,
            "participants": {str(k): {"num_samples": v} for k, v in self.num_samples.items()},
            "test": self.last_test,
            "val": _weighted_validation(validations),
            "val_per_site": {str(r["site"]): r["val"] for r in validations},
            "best_acc": max((r["acc"] for r in rows if "acc" in r), default=None),
            "seconds_this_process": time.perf_counter() - self.started,
            "resumed_from_round": self.resume_round or None,
        }
        if self.config.dp.enabled:
            summary["privacy"] = {str(r["site"]): {
                "epsilon": r["privacy"]["epsilon"], "delta": r["privacy"]["delta"],
                "target_epsilon": r["privacy"]["target_epsilon"],
                "noise_multiplier": r["privacy"]["noise_multiplier"],
                "sample_rate": r["privacy"]["sample_rate"], "steps": r["privacy"]["steps"],
                "accountant": self.config.dp.accountant,
                "grad_sample_mode": r["privacy"]["grad_sample_mode"],
                "stopped_round": self.stopped.get(r["site"]),
            } for r in validations}
            summary["stopped"] = {str(k): v for k, v in sorted(self.stopped.items())}
        if self.user_accountant is not None:
            user_dp = self.config.dp.user
            summary["user_privacy"] = {
                "epsilon": self.user_accountant.epsilon(delta=self.config.dp.delta),
                "delta": self.config.dp.delta, "noise_multiplier": user_dp.noise_multiplier,
                "clip_norm": user_dp.clip_norm, "noise": user_dp.noise,
                "rounds": self.user_accountant.num_steps, "accountant": "rdp"}
        dump_json(self.run_dir.summary, summary)
        log.info("finished: test acc %.4f auc %.4f loss %.4f -> %s", self.last_test["acc"],
                 self.last_test["auc"], self.last_test["loss"], self.run_dir.root)


def _checkpoint_due(config: Config, round_index: int) -> bool:
    return round_index % config.checkpoint.every == 0 or round_index == config.rounds


def _weighted_validation(reports: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Federated validation: sample-weighted mean of the sites' own validation metrics."""
    total = sum(r["val"]["num_samples"] for r in reports)
    if not total:
        return {}
    out = {}
    for key in ("acc", "loss"):
        out[key] = sum(r["val"][key] * r["val"]["num_samples"] for r in reports) / total
    aucs = [(r["val"]["auc"], r["val"]["num_samples"]) for r in reports
            if not np.isnan(r["val"]["auc"])]
    if aucs:
        out["auc"] = sum(a * n for a, n in aucs) / sum(n for _, n in aucs)
    out["num_samples"] = total
    return out
