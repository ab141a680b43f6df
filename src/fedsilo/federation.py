"""The federated training job: setup, the round loop, and the end of the run.

Every rank runs :func:`run_job`.  The sequence of collectives is written once, in
:func:`_run_rounds`, and is the same on every rank; what differs between the coordinator
and a participant is only the local work between collectives (``coordinator.py``,
``participant.py``), and the messages between them are typed (``messages.py``)::

    quiet barrier · plan (bcast) · weights (Bcast) · local training · quiet barrier ·
    reports + errors (gather to the coordinator, failures bcast) · weighted updates (Reduce) ·
    server step, eval, checkpoint

The weights and the Reduce go only to the ranks that have a site sampled in the round
(partial participation; a sub-communicator, ``World.subset``); non-linear strategies
gather every update instead of reducing (``World.gather_rows``).
Foreseeable errors are agreed at fixed points (configuration, data, each round's reports),
so every rank stops with the same message; anything else aborts the job (``fedsilo.comm``).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence, cast

from fedsilo.comm import COORDINATOR, World
from fedsilo.config import Config, dump_config, load_config, names_torchvision_weights
from fedsilo.errors import (
    AgreedError,
    CheckpointError,
    CommunicationError,
    ConfigError,
    FedsiloError,
    shorten,
)
from fedsilo.messages import RoundPlan
from fedsilo.rundir import RunDir, atomic_write_text, dump_json
from fedsilo.shards import Manifest, load_manifest
from fedsilo.stopping import EXIT_HUNG, EXIT_PREEMPTED, StopFlag, WaitPolicy
from fedsilo.tasks import resolve_task

if TYPE_CHECKING:  # (the roles import torch: a rank loads it only once its checks passed)
    from fedsilo.roles import PlanningRole, RoundRole
    from fedsilo.transport import SecureTransport

log = logging.getLogger("fedsilo")


@dataclass(frozen=True)
class Setup:
    """What the coordinator decides before training and broadcasts to every rank."""

    config: Config
    run_dir: str
    manifest: Manifest
    #: last round with a complete checkpoint (0: start from scratch)
    resume_round: int
    #: a resume on a changed federation (--sites-changed): each site's index in the
    #: checkpoint (None: it joins now), and the checkpoint's sites that left
    site_map: dict[int, int | None] | None = None
    departed: tuple[int, ...] = ()
    #: sites that left earlier and come back with the same data: their archived state
    #: (``departed/index.json`` entries), by their index now
    returning: dict[int, dict[str, Any]] | None = None
    #: later complete rounds whose coordinator.pt does not load: set aside at the commit
    unreadable: tuple[int, ...] = ()


def run_job(world: World, *, config_path: str | None, overrides: Sequence[str],
            out_dir: str | None, resume_dir: str | None, auto_resume: bool = False,
            sites_changed: bool = False) -> int:
    """Run ``fedsilo train`` on this rank; returns the exit status."""
    if world.size < 2:
        raise AgreedError(
            f"fedsilo train needs at least 2 MPI ranks (rank 0 coordinates, ranks 1..P are "
            f"participants), but it was started with {world.size}; launch it as "
            f"'mpirun -n P+1 fedsilo train ...' (or srun under SLURM), P = number of shards")

    _end_with_launcher(world.rank)
    setup, error, lock = None, None, None
    if world.is_coordinator:
        try:
            if auto_resume and out_dir is not None and RunDir(out_dir).config.is_file() \
                    and RunDir(out_dir).holds_run() and resume_dir is None:
                log.info("--auto-resume: %s holds a run; resuming it with its own config.yaml",
                         out_dir)
                config_path, resume_dir = None, out_dir
            if resume_dir is not None and Path(resume_dir).is_dir():
                # before reading its checkpoints: a job still running there rotates them
                lock = RunDir(resume_dir).lock()  # held until this process ends
            setup = _prepare(world, config_path=config_path, overrides=overrides,
                             out_dir=out_dir, resume_dir=resume_dir, sites_changed=sites_changed)
            if lock is None:
                lock = RunDir(setup.run_dir).lock()
        except FedsiloError as exc:
            error = exc
    setup = world.agree_from_coordinator(setup, error, stage="configuration")
    # participants verify, not trust: the privacy policy and the manifest the coordinator
    # broadcast must be what each participant reads itself
    error = None
    if not world.is_coordinator:
        try:
            error = _check_setup(setup, config_path=config_path, overrides=overrides,
                                 out_dir=out_dir, resume_dir=resume_dir,
                                 auto_resume=auto_resume)
        except FedsiloError as exc:
            error = exc
    world.agree(error, stage="checking the coordinator's configuration")
    runtime = setup.config.runtime
    waits = WaitPolicy(hang_timeout_s=runtime.hang_timeout_s,
                       first_round_s=first_round_wait(runtime.hang_timeout_s,
                                                      runtime.first_round_timeout_s),
                       deadline_s=setup.config.train.round_deadline_s)
    startup_wait = runtime.first_round_timeout_s  # loading data and model: not a round
    # one verdict per hang, by the first rank that gives up: the coordinator if it can, a
    # participant naming the coordinator if it cannot (stopped, swapped out)
    world.on_hang = _first_verdict(RunDir(setup.run_dir), _hang_handler(RunDir(setup.run_dir))) \
        if world.is_coordinator else _silent_coordinator(RunDir(setup.run_dir), world.rank)

    # torch-free first: each rank checks the shards it will open (format, shapes, labels,
    # pixels, hashes, the manifest's counts), so bad data is reported before anyone pays
    # for importing torch
    checked, error = [], None
    try:
        checked = _check_own_shards(world, setup)
    except FedsiloError as exc:
        error = exc
    world.quiet_barrier(stage="checking the shards", timeout=_mine(world, startup_wait))
    world.agree(error, stage="checking the shards")

    # torch is imported from here on
    from fedsilo.coordinator import Coordinator
    from fedsilo.participant import Participant

    role: RoundRole | None = None
    error = None
    try:
        cls = Coordinator if world.is_coordinator else Participant
        role = cls(world=world, config=setup.config, manifest=setup.manifest,
                   run_dir=RunDir(setup.run_dir, site_dir=setup.config.checkpoint.site_dir),
                   resume_round=setup.resume_round,
                   site_map=setup.site_map, returning=setup.returning, checked=checked)
    except FedsiloError as exc:
        error = exc
    world.quiet_barrier(stage="loading the data and the model",
                        timeout=_mine(world, startup_wait))
    world.agree(error, stage="loading data and model")
    assert role is not None  # every rank built its role (agreed above)
    if setup.config.he.enabled:
        _agree_on_keys(world, role)
    if setup.config.aggregation.secure != "none":
        _agree_on_identities(world, role)
    # the participants' own communicator: what they compare and draw jointly never passes
    # through the coordinator (verification.py, crypto/session.py)
    peers = world.split_participants()
    role.peers = peers
    if setup.config.aggregation.secure != "none":
        _draw_session(world, role, peers)
    _commit(world, role, setup)

    run = RunDir(setup.run_dir)
    try:
        stop = StopFlag(on_signal=_stop_marker(run) if world.is_coordinator else None).install()
        if not _run_rounds(world, role, setup, stop=stop, waits=waits):
            return EXIT_PREEMPTED
    except BaseException as exc:  # the job fails: say so in the run directory, then end it
        _record_failure(run, exc, rank=world.rank)
        raise
    if world.is_coordinator and stop.requested:  # finished after all: nothing to requeue
        run.stopped.unlink(missing_ok=True)  # written by this job, at the signal
    del lock  # released with the file, at the end of the job
    return 0


def _record_failure(run: RunDir, exc: BaseException, *, rank: int) -> bool:
    """Leave ``failed.json`` for a job that fails once it has committed its run directory:
    an error every rank agreed on is recorded by the coordinator (it knows the ranks and
    their causes); an exception on one rank alone by that rank, before run_guarded aborts
    the job.  Created exclusively: the first party to know stays, and no teardown after a
    hang (``hung.json``) adds a second ending.  Returns whether it was written."""
    agreed = isinstance(exc, AgreedError)
    if agreed and rank != COORDINATOR or run.hung.exists():
        return False
    failures = list(exc.failures) if isinstance(exc, AgreedError) else []
    failures = failures or [(rank, type(exc).__name__)]
    complete = run.complete_rounds()
    last = complete[-1] if complete else None
    status = exc.exit_code if isinstance(exc, FedsiloError) else 1
    record = {"ending": "failed", "written_by": rank,
              "ranks": [r for r, _ in failures], "errors": [name for _, name in failures],
              "agreed": agreed, "message": shorten(str(exc) or type(exc).__name__),
              "last_checkpoint_round": last, "exit_status": status,
              "resumable": last is not None,
              "resume": f"fedsilo train --resume {run.root}" if last is not None else None,
              "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    try:
        written = dump_json(run.failed, record, exclusive=True)
    except OSError as exc_write:  # a full or read-only disk: the message on stderr stays
        log.error("cannot write %s: %s", run.failed, exc_write)
        return False
    if written:
        log.warning("the job failed; %s says how%s", run.failed,
                  f", and '--resume {run.root}' continues from round {last}" if last else "")
    return written


def _run_rounds(world: World, role: RoundRole, setup: Setup, *, stop: StopFlag,
                waits: WaitPolicy) -> bool:
    """The rounds, then the final validation; False if a signal stopped the run early.

    One round: plan · weights · local work · reports · outcome · transport · server step
    and record.  The messages are the dataclasses of :mod:`fedsilo.messages`.  Every long
    wait is a watched quiet barrier (``waits``): a silent rank ends the job, never hangs it.
    """
    config = setup.config
    secure = config.aggregation.secure != "none"
    start_wait = waits.round_timeout()  # the coordinator's wait at a round's start
    # coordinator: the last round's record (test evaluation, checkpoint, metrics row), run
    # while the participants train the next round (runtime.overlap_eval)
    pending: list[Callable[[], None]] = []

    def flush() -> None:
        while pending:
            pending.pop()()

    try:
        return _rounds(world, role, setup, stop=stop, waits=waits, pending=pending,
                       flush=flush, secure=secure, start_wait=start_wait)
    except FedsiloError:
        # an agreed error ends the job on every rank: the coordinator still records the
        # round that finished, so that --resume loses nothing
        if world.is_coordinator and pending:
            try:
                flush()
            except Exception:  # noqa: BLE001 - the original error is the one to report
                log.exception("could not record the last round before stopping")
        raise


def _rounds(world: World, role: RoundRole, setup: Setup, *, stop: StopFlag, waits: WaitPolicy,
            pending: list[Callable[[], None]], flush: Callable[[], None], secure: bool,
            start_wait: float | None) -> bool:
    config = setup.config
    stop_seen = False  # coordinator: some rank reported a stop signal
    planner = cast("PlanningRole", role)  # what only rank 0 is asked (under is_coordinator)
    for round_index in range(setup.resume_round + 1, config.rounds + 1):
        timer = PhaseTimer()
        with timer("coordination"):
            plan: RoundPlan | None = None
            if world.is_coordinator:  # planned before the barrier: the others wait polled
                plan = dataclasses.replace(planner.plan(round_index),
                                           wait_s=waits.round_timeout(),
                                           local_wait_s=waits.local_timeout())
                if not plan.stop and (stop_seen or stop.requested):
                    plan = plan.stopping()
                if plan.stop and not _budget_spent(plan, setup):
                    flush()  # the last round's checkpoint first: --resume continues there
                    # before any rank learns of the stop, so before any rank exits: a batch
                    # script reads this marker even if the launcher kills slow ranks and
                    # reports their status instead of ours
                    _record_stop(RunDir(setup.run_dir), {
                        "signal": stop.signal_name or "received by a participant",
                        "before_round": round_index, "exit_status": EXIT_PREEMPTED})
            if world.is_coordinator:
                start_wait = waits.round_timeout()
            world.quiet_barrier(stage=f"the start of round {round_index}",
                                timeout=_mine(world, start_wait))
            plan = world.bcast_obj(plan)
        if plan.stop and _budget_spent(plan, setup):
            # a clean end, not a pre-emption: the final validation, model.pt and
            # summary.json follow as after the last round, and the status is 0
            log.warning("every site has spent its privacy budget: the job ends after round "
                        "%d of %d", round_index - 1, config.rounds)
            break
        if plan.stop:
            log.warning("stopping before round %d on a signal; --resume continues from the "
                        "last complete checkpoint (exit status %d asks for a requeue)",
                        round_index, EXIT_PREEMPTED)
            return False
        # the ranks with a site sampled this round; the others idle until the next gather
        team = world.subset(plan.ranks)
        if team is not None:
            with timer("broadcast"):
                team.bcast_weights(role.global_weights)
                control = role.global_control  # SCAFFOLD's server control variate
                if control is not None:  # (read once: the coordinator's is a fresh copy)
                    team.bcast_weights(control)
        if plan.wait_s is not None:  # participants: the coordinator's wait, for the next
            start_wait = plan.wait_s
        flush()  # coordinator: the last round's record, while the participants train
        report, error = role.local_round(plan)
        with timer("local"):
            world.quiet_barrier(stage=f"the local work of round {round_index}",
                                timeout=_mine(world, plan.local_wait_s))
        with timer("coordination"):
            # reports go to the coordinator only: no participant sees another's; every rank
            # gets the round's outcome (who contributed), which the transport needs
            gathered, outcome = world.agree_report(
                (report, stop.requested), error, stage=f"round {round_index}",
                summarize=lambda payloads: planner.outcome(plan, [r for r, _ in payloads]))
            if secure:  # each participant checks the outcome against its own sites
                world.agree(role.check_outcome(outcome), stage=f"round {round_index}")
        if gathered is not None:
            stop_seen = any(flag for _, flag in gathered)
        aggregate = None
        if team is not None and not outcome.refused:
            with timer("aggregate"):
                aggregate = role.transport.aggregate(team, role.contribution_of_rank(), outcome)
        if world.is_coordinator:
            pending.append(planner.finish_round(plan, [r for r, _ in gathered], timer,
                                             outcome=outcome, aggregate=aggregate))
            if not config.runtime.overlap_eval:
                flush()
            waits.observe(timer.total())

    flush()
    if world.is_coordinator:
        start_wait = waits.round_timeout()
    world.quiet_barrier(stage="the end of the rounds", timeout=_mine(world, start_wait))
    world.bcast_weights(role.global_weights)
    final, error = role.final_validation()
    world.quiet_barrier(stage="the final validation", timeout=_mine(world, start_wait))
    reports, _ = world.agree_report(final, error, stage="final validation")
    role.finish_job(reports)
    return True


def _check_own_shards(world: World, setup: Setup) -> list[Path]:
    """The shards this rank opens (the coordinator the test shard, a participant its
    sites), checked against the manifest; returns their paths."""
    from fedsilo.participation import assign_sites
    from fedsilo.shards import check_listed_shard

    manifest, config = setup.manifest, setup.config
    if world.is_coordinator:
        entries = [(manifest.test, "test")]
    else:
        mine = assign_sites(num_sites=manifest.num_sites,
                            num_ranks=world.num_participants)[world.rank - 1]
        entries = [(manifest.sites[k], "site") for k in mine]
    for entry, kind in entries:
        check_listed_shard(manifest, config.data.dir, entry, kind=kind,
                           verify_hash=config.data.verify_hashes)
    return [manifest.path_of(entry, config.data.dir) for entry, _ in entries]


def _mine(world: World, timeout: float | None) -> float | None:
    """This rank's wait where the coordinator waits ``timeout`` (participants wait longer)."""
    if timeout is None or world.is_coordinator:
        return timeout
    return WaitPolicy.for_participant(timeout)


#: with only runtime.hang_timeout_s set: the first round may take this much longer than
#: the others (warm-up: first batches, allocator, thread pools), and at least this factor
FIRST_ROUND_EXTRA_S, FIRST_ROUND_FACTOR = 10.0, 2.0


def first_round_wait(hang_timeout_s: float | None, first_round_timeout_s: float) -> float:
    """The watchdog's wait for the first round after a (re)start.

    ``runtime.first_round_timeout_s`` when it is set, or when the watchdog is automatic;
    with only ``hang_timeout_s`` set (first_round_timeout_s left at its default), the first
    round follows it: twice as long, and at least 10 s more.  Loading the data and the
    model is not a round: it keeps first_round_timeout_s either way.

    >>> first_round_wait(None, 1800.0), first_round_wait(5.0, 1800.0)
    (1800.0, 15.0)
    >>> first_round_wait(300.0, 1800.0), first_round_wait(5.0, 60.0)
    (600.0, 60.0)
    """
    from fedsilo.config import RuntimeConfig

    if hang_timeout_s is None or first_round_timeout_s != RuntimeConfig.first_round_timeout_s:
        return first_round_timeout_s
    return max(FIRST_ROUND_FACTOR * hang_timeout_s, hang_timeout_s + FIRST_ROUND_EXTRA_S)


def _budget_spent(plan: RoundPlan, setup: Setup) -> bool:
    """Whether ``plan`` ends the job because every site has spent its privacy budget (the
    coordinator lists them all as stopped), not on a signal."""
    return plan.stop and len(set(plan.stopped)) >= setup.manifest.num_sites


def _record_stop(run: RunDir, record: dict[str, Any]) -> bool:
    """Leave ``stopped.json`` unless the job already ended as hung: the SIGCONT and SIGTERM
    of a teardown reach a coordinator that was stopped, and its stop is no requeue."""
    if run.hung.exists():
        log.warning("a signal arrived after the watchdog ended the job (%s); no stopped.json",
                    run.hung)
        return False
    dump_json(run.stopped, record)
    return True


def _first_verdict(run: RunDir, handler: Callable[..., None]) -> Callable[..., None]:
    """The coordinator's watchdog handler, unless a rank that gave up earlier has already
    left ``hung.json``: a coordinator continued after a stop would otherwise name the ranks
    that waited for it."""

    def handle(*args: Any, **kwargs: Any) -> None:
        if run.hung.exists():
            log.error("watchdog: %s already holds the verdict of the rank that gave up "
                      "first; it stays", run.hung)
            return
        handler(*args, **kwargs)

    return handle


def _silent_coordinator(run: RunDir, rank: int) -> Callable[..., None]:
    """A participant's watchdog handler.  A participant waits longer than the coordinator
    (``WaitPolicy.for_participant``), so when its watchdog fires the coordinator has not
    ended the job itself: it is the silent one.  The first participant to give up leaves
    ``hung.json`` naming rank 0; the file is created exclusively, so no later verdict (of
    another participant, or of the coordinator once continued) replaces it.  The
    checkpoint is named, not loaded: coordinator.pt is the coordinator's private state."""

    def handle(stage: str, silent: list[int], message: str, **_: Any) -> None:
        complete = run.complete_rounds()
        last = complete[-1] if complete else 0
        named = list(silent) or [0]  # (a barrier's watchdog on a participant names none)
        record = {"stage": stage, "silent_ranks": named,
                  "message": f"{message} (rank {rank} gave up first: the coordinator, which "
                             f"waits less, did not end the job itself)",
                  "written_by": rank, "last_checkpoint_round": last,
                  "exit_status": EXIT_HUNG, "resume": f"fedsilo train --resume {run.root}"}
        if dump_json(run.hung, record, exclusive=True):
            log.error("watchdog: rank(s) %s silent; %s names them, and '--resume %s' "
                      "continues from round %d", named, run.hung, run.root, last)

    return handle


def _end_with_launcher(rank: int, *, poll_s: float = 0.5) -> None:
    """A rank ends within ``poll_s`` of its launcher (``prterun``/``orted``, ``slurmstepd``)
    dying: an orphaned rank would otherwise wait in a barrier, or train, until its own
    watchdog fires, long after ``mpirun`` was killed.  A daemon thread watches the parent
    process id; the process exits at once (nobody is left to read its status)."""
    import os
    import sys
    import threading

    parent = os.getppid()
    if parent <= 1:  # started without a launcher (or already orphaned): nothing to watch
        return

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        print(f"[rank {rank}] fedsilo: the launcher (process {parent}) is gone; ending this "
              f"rank", file=sys.stderr, flush=True)
        os._exit(1)

    threading.Thread(target=watch, name="fedsilo-launcher-watch", daemon=True).start()


def _stop_marker(run: RunDir) -> Any:
    """The coordinator's first act on a stop signal: ``stopped.json`` at once, naming the
    last complete checkpoint, in case the launcher kills the ranks before the round
    boundary (SIGTERM to mpirun); the boundary rewrites it."""

    def mark(signal_name: str) -> None:
        complete = run.complete_rounds()
        last = complete[-1] if complete else 0
        if not _record_stop(run, {"signal": signal_name, "before_round": None,
                                  "last_checkpoint_round": last,
                                  "exit_status": EXIT_PREEMPTED}):
            return
        log.warning("if the ranks are killed before this round ends, '--resume %s' continues "
                    "from round %d", run.root, last)

    return mark


def _hang_handler(run: RunDir) -> Any:
    """The coordinator's last act when the watchdog fires: check that the last complete
    checkpoint loads, and leave ``hung.json`` saying who fell silent where."""

    def handle(stage: str, silent: list[int], message: str,
               hosts: dict[int, str] | None = None) -> None:
        from fedsilo.rundir import load_torch

        complete = run.complete_rounds()
        last = complete[-1] if complete else 0
        if last:
            load_torch(run.coordinator_checkpoint(last))  # raises if it does not load
        record = {"stage": stage, "silent_ranks": silent, "message": message,
                  "last_checkpoint_round": last, "exit_status": EXIT_HUNG,
                  "resume": f"fedsilo train --resume {run.root}"}
        if hosts:  # where each silent rank ran: a cut wire silences a whole node
            record["silent_hosts"] = {str(rank): hosts[rank] for rank in silent if rank in hosts}
        dump_json(run.hung, record)
        log.error("watchdog: the last complete checkpoint is round %d (it loads); "
                  "'--resume %s' continues from it", last, run.root)

    return handle


def _check_secure_floor(config: Config, manifest: Manifest) -> None:
    """A secure mode needs at least aggregation.min_contributors sites in every round."""
    aggregation = config.aggregation
    if aggregation.secure == "none":
        return
    from fedsilo.participation import sample_size

    floor = aggregation.min_contributors
    if manifest.num_sites < floor:
        raise ConfigError(f"aggregation.secure={aggregation.secure} needs at least "
                          f"aggregation.min_contributors = {floor} sites, but the shard set has "
                          f"{manifest.num_sites}: a sum of fewer would be one site's update")
    share = config.participation
    sampled = sample_size(manifest.num_sites, fraction=share.fraction, minimum=share.min)
    if sampled < floor:
        raise ConfigError(f"participation samples {sampled} of {manifest.num_sites} sites per "
                          f"round, fewer than aggregation.min_contributors = {floor}, so every "
                          f"secure round would be refused; raise participation.min to {floor}")


def _agree_on_identities(world: World, role: RoundRole) -> None:
    """Before any training: every rank read the same list of public identity keys (each
    participant has already checked its own private keys against it)."""
    listed = world.agree_gather(role.identity_summary(), None, stage="identity keys")
    digests = {s for s in listed[1:]}
    if len(digests) > 1:
        groups: dict[str, list[int]] = {}
        for rank, digest in enumerate(listed):
            if rank:
                groups.setdefault(digest, []).append(rank)
        raise AgreedError("identity keys failed on every rank: participants read different "
                          "public key lists (" + "; ".join(
                              f"ranks {r} read public.json {d[:12]}" for d, r in groups.items())
                          + "); give every participant the same public.json from "
                          "'fedsilo keys --identity'")


def _check_setup(setup: Setup, *, config_path: str | None, overrides: Sequence[str],
                 out_dir: str | None, resume_dir: str | None,
                 auto_resume: bool) -> FedsiloError | None:
    """A participant's own reading of the configuration and the manifest, against what the
    coordinator broadcast (``verification.check_policy``)."""
    from fedsilo.verification import check_policy

    run = resume_dir
    if run is None and auto_resume and out_dir is not None \
            and RunDir(out_dir).config.is_file() and RunDir(out_dir).holds_run():
        run = out_dir
    own = load_config(RunDir(run).config if run is not None else config_path,
                      overrides=overrides)
    data_dir = Path(own.data.dir).expanduser().resolve()
    manifest = load_manifest(data_dir) if data_dir == Path(setup.config.data.dir) else None
    if manifest is None:
        return CommunicationError(
            f"participant refuses the job: the coordinator's data.dir "
            f"{setup.config.data.dir} is not the {data_dir} this participant reads")
    return check_policy(own, setup.config, own_manifest=manifest,
                        given_manifest=setup.manifest)


def _draw_session(world: World, role: RoundRole, peers: Any) -> None:
    """Secure modes: the participants draw the launch's joint seed by commit-then-reveal
    among themselves (``crypto/session.py``); the mask nonce and every round's mask graph
    follow from it, so no single party chooses or repeats them."""
    from fedsilo.crypto import session

    error = None
    if not world.is_coordinator:
        own = session.new_contribution()
        index = peers.Get_rank()
        with world.watched("drawing the joint randomness"):
            commitments = peers.allgather(session.commitment(own, index=index))
            reveals = peers.allgather(own)
        try:
            seed = session.joint_seed(commitments, reveals, own_index=index, own=own)
            cast("SecureTransport", role.transport).start_session(seed)
            role.session = session.digest(seed)
        except FedsiloError as exc:
            error = exc
    world.agree(error, stage="drawing the secure aggregation's joint randomness")


def _agree_on_keys(world: World, role: RoundRole) -> None:
    """Before any training: every participant holds the same key, and the coordinator's
    public context belongs to it.  Every rank judges the same gathered list the same way."""
    from fedsilo.crypto.params import key_mismatch

    summaries = world.agree_gather(role.key_summary(), None, stage="encryption keys")
    problem = key_mismatch(summaries)
    if problem:
        raise AgreedError(f"encryption keys failed on every rank: {problem}")


class PhaseTimer:
    """Accumulates wall-clock seconds per named phase of a round."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.start = time.perf_counter()

    def __call__(self, name: str) -> "_Phase":
        return _Phase(self, name)

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def total(self) -> float:
        return time.perf_counter() - self.start


class _Phase:
    def __init__(self, timer: PhaseTimer, name: str) -> None:
        self.timer, self.name = timer, name

    def __enter__(self) -> None:
        self.begin = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.timer.add(self.name, time.perf_counter() - self.begin)


def _prepare(world: World, *, config_path: str | None, overrides: Sequence[str],
             out_dir: str | None, resume_dir: str | None, sites_changed: bool = False) -> Setup:
    """Coordinator only: resolve the configuration, the run directory and the resume point."""
    if resume_dir is not None:
        if config_path is not None:
            raise ConfigError("--resume continues a run with its own config.yaml; give changes "
                              "with --set instead of --config")
        if out_dir is not None and Path(out_dir).resolve() != Path(resume_dir).resolve():
            raise ConfigError("--out and --resume name different directories; --resume RUN_DIR "
                              "writes into RUN_DIR")
        run = RunDir(resume_dir)
        if not run.config.is_file():
            raise CheckpointError(f"--resume {resume_dir}: no config.yaml there, so it is not a "
                                  f"fedsilo run directory")
        config = load_config(run.config, overrides=overrides)
        resume_round, unreadable = _loadable_round(run)
        if resume_round:
            log.info("resuming %s from the checkpoint of round %d", run.root, resume_round)
        else:
            log.info("resuming %s: no complete checkpoint, starting from round 1", run.root)
        if config.rounds < resume_round:
            raise ConfigError(f"--resume {run.root}: the run has completed {resume_round} "
                              f"rounds, so rounds={config.rounds} would end it before where it "
                              f"already is; give rounds >= {resume_round} (to extend it, more)")
    else:
        if out_dir is None:
            raise ConfigError("fedsilo train needs --out RUN_DIR (or --resume RUN_DIR)")
        if Path(out_dir).exists() and not Path(out_dir).is_dir():
            raise ConfigError(f"--out {out_dir} is an existing file, not a directory; give a "
                              f"directory for the run (it is created if missing)")
        config = load_config(config_path, overrides=overrides)
        run = RunDir(out_dir)
        if run.holds_run():
            raise ConfigError(f"{run.root} already holds a run (metrics or checkpoints); continue "
                              f"it with --resume {run.root}, or choose another --out")
        resume_round, unreadable = 0, ()

    # Pin the data directory so the saved config means the same thing from any directory.
    data_dir = Path(config.data.dir).expanduser().resolve()
    from dataclasses import replace
    config = replace(config, data=replace(config.data, dir=str(data_dir)),
                     he=replace(config.he, keys=str(Path(config.he.keys).expanduser().resolve())),
                     aggregation=replace(config.aggregation, keys=str(
                         Path(config.aggregation.keys).expanduser().resolve())))
    weights = config.model.weights
    if weights is not None and not names_torchvision_weights(weights):  # a file
        config = replace(config, model=replace(config.model, weights=str(
            Path(weights).expanduser().resolve())))
    manifest = load_manifest(data_dir)
    config = resolve_task(config, manifest)  # task: auto follows the shard set
    if manifest.num_sites < world.num_participants:
        raise CommunicationError(
            f"the shard set {data_dir} has {manifest.num_sites} sites, so the job needs at "
            f"most {manifest.num_sites + 1} MPI ranks (1 coordinator + 1 to "
            f"{manifest.num_sites} participants, each training one or more sites), but it "
            f"was started with {world.size}; use 'mpirun -n {manifest.num_sites + 1} ...'")
    _check_secure_floor(config, manifest)
    unknown_sites = [k for k in config.dp.sites if k >= manifest.num_sites]
    if unknown_sites:
        raise ConfigError(f"config key 'dp.sites' overrides site(s) {unknown_sites}, but the "
                          f"shard set has sites 0..{manifest.num_sites - 1} (keys are site "
                          f"indexes: site-00K.h5 is site K, run by MPI rank K+1)")
    if sites_changed and not resume_round:
        raise ConfigError("--sites-changed applies to --resume of a run with a checkpoint")
    site_map: dict[int, int | None] | None = None
    departed: tuple[int, ...] = ()
    returning: dict[int, dict[str, Any]] = {}
    if resume_round:
        saved = _saved_shard_set(run, resume_round)
        site_map, departed = match_sites(saved, manifest, changed_ok=sites_changed,
                                         where=run.coordinator_checkpoint(resume_round),
                                         data_dir=data_dir)
        archived = _departed_index(run)
        for k, was in (site_map or {}).items():
            sha = manifest.sites[k].sha256
            if was is None and sha in archived:
                returning[k] = archived[sha]
                log.info("site %d left in round %d and comes back with the same data: it "
                         "resumes its archived state (DP budget spent so far included)", k,
                         archived[sha]["round"])
            elif was is None:
                log.info("site %d joins the federation: a fresh DP budget and state", k)
    run.root.mkdir(parents=True, exist_ok=True)
    # config.yaml, metrics.jsonl and stopped.json change only once every rank has checked
    # its data, model, checkpoint and keys (_commit): a refused resume changes nothing
    return Setup(config=config, run_dir=str(run.root.resolve()), manifest=manifest,
                 resume_round=resume_round, site_map=site_map, departed=departed,
                 returning=returning, unreadable=unreadable)


def _loadable_round(run: RunDir) -> tuple[int, tuple[int, ...]]:
    """The last complete round whose ``coordinator.pt`` loads (0: none), and the later
    complete rounds whose file does not (a truncated copy, a disk that lied about a sync).
    A resume falls back round by round, saying so; if no checkpoint loads, the last one's
    error stands."""
    from fedsilo.checkpointfile import read_coordinator_state

    complete = run.complete_rounds()
    unreadable: list[int] = []
    for round_index in reversed(complete):
        try:
            read_coordinator_state(run.coordinator_checkpoint(round_index))
        except CheckpointError as exc:
            if round_index == complete[0]:
                raise
            unreadable.append(round_index)
            earlier = max(r for r in complete if r < round_index)
            log.warning("%s; resuming from round %d, the previous complete checkpoint (round "
                        "%d is set aside as %s.unreadable)", exc, earlier, round_index,
                        run.round_dir(round_index).name)
            continue
        return round_index, tuple(unreadable)
    return 0, ()


def _saved_shard_set(run: RunDir, round_index: int) -> dict[str, Any] | None:
    from fedsilo.checkpointfile import read_coordinator_state

    saved = read_coordinator_state(run.coordinator_checkpoint(round_index)).get("shard_set")
    return saved if isinstance(saved, dict) else None


def match_sites(saved: dict[str, Any] | None, manifest: Manifest, *, changed_ok: bool,
                where: Any, data_dir: Any) -> tuple[dict[int, int | None] | None,
                                                    tuple[int, ...]]:
    """Compare the shard set a run trained on (``saved``) with ``manifest``.

    Unchanged: ``(None, ())``.  Changed sites without ``changed_ok``: a CheckpointError
    naming what changed.  With it (``--sites-changed``), sites are matched by their data
    (sha256), not by position: returns each current site's index in the checkpoint (None:
    it joins) and the checkpoint's sites that left.  Classes, image shape and the test
    shard must stay the same either way.
    """
    if saved is None:  # a checkpoint from before this record
        return None, ()
    now = manifest.record()
    fixed = [f"{key} {saved[key]} -> {now[key]}" for key in ("num_classes", "image_shape")
             if saved[key] != now[key]]
    if saved["test"] != now["test"]:
        fixed.append("test.h5 holds other data")
    old, new = list(saved["sites"]), now["sites"]
    if old == new and not fixed:
        return None, ()
    changes = list(fixed)
    changed = [k for k in range(min(len(old), len(new))) if old[k] != new[k]]
    if changed:
        changes.append(f"site(s) {changed} hold other data")
    if len(new) > len(old):
        changes.append(f"site(s) {list(range(len(old), len(new)))} were added")
    if len(new) < len(old):
        changes.append(f"site(s) {list(range(len(new), len(old)))} are gone")
    if fixed or not changed_ok:
        hint = ("the test shard, classes and image shape cannot change within a run" if fixed
                else "if sites joined or left on purpose, resume with --sites-changed")
        raise CheckpointError(
            f"checkpoint {where} was trained on another shard set than {data_dir}: "
            f"{'; '.join(changes)}; {hint} (docs/training.md, 'Changing the federation')")
    if len(set(new)) != len(new) or len(set(old)) != len(old):
        raise CheckpointError(f"two sites of the shard set hold identical data, so sites "
                              f"cannot be matched by their data across the change ({data_dir})")
    index_of = {sha: k for k, sha in enumerate(old)}
    site_map = {k: index_of.get(sha) for k, sha in enumerate(new)}
    departed = tuple(k for k, sha in enumerate(old) if sha not in set(new))
    for k, was in site_map.items():  # a joining site is told by the caller: it may be back
        if was is not None and was != k:
            log.info("site %d was site %d of the checkpoint (same data)", k, was)
    for k in departed:
        log.info("site %d of the checkpoint left the federation: its state is archived in "
                 "departed/", k)
    return site_map, departed


def _departed_index(run: RunDir) -> dict[str, dict[str, Any]]:
    """``departed/index.json``: each departed site's archived state, by its shard's sha256."""
    import json

    path = run.root / "departed" / "index.json"
    if not path.is_file():
        return {}
    try:
        index = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from None
    return index if isinstance(index, dict) else {}


def _archive(run: RunDir, round_index: int, site: int, sha256: str) -> None:
    """A departed site's last state, kept out of the way of the pruning of old checkpoints:
    its own checkpoint (accountant, secret, control variate; 0600 like the original) and
    the coordinator's user-level accountants of it, indexed by its data in
    ``departed/index.json``, so that a site that comes back with the same data resumes its
    privacy spending instead of starting it over."""
    import json
    import shutil

    from fedsilo.rundir import load_torch

    source = run.participant_checkpoint(round_index, site)
    target = run.root / "departed" / f"site-{site:03d}-round-{round_index:04d}.pt"
    target.parent.mkdir(exist_ok=True)
    if source.is_file():
        shutil.copy2(source, target)
    privacy = json.loads(load_torch(run.coordinator_checkpoint(round_index)).get("privacy",
                                                                                 "{}"))
    user = privacy.get("user_accountant") or {}
    index = _departed_index(run)
    index[sha256] = {"file": target.name if source.is_file() else None, "site": site,
                     "round": round_index,
                     "user_accountant": {name: (user.get(name) or {}).get(str(site))
                                         for name in ("released", "coordinator")}}
    dump_json(run.root / "departed" / "index.json", index)


def _commit(world: World, role: RoundRole, setup: Setup) -> None:
    """After every check passed on every rank: write the resolved config.yaml, drop the rows
    of rounds without a complete checkpoint, and clear a previous stop marker."""
    error = None
    if world.is_coordinator:
        run = RunDir(setup.run_dir)
        try:
            for tmp in run.remove_temporaries():  # left by a crash mid-write
                log.info("removed %s, left by an interrupted write", tmp)
            for round_index in setup.unreadable:  # kept aside, never deleted
                log.warning("set aside %s", run.set_aside(round_index))
            run.truncate_metrics(last_round=setup.resume_round)
            saved = _saved_shard_set(run, setup.resume_round) if setup.departed else None
            for site in setup.departed:
                assert saved is not None  # a departure is only known from the record
                _archive(run, setup.resume_round, site, saved["sites"][site])
            cast("PlanningRole", role).restore_metrics_row()
            for kept in run.keep_markers():  # this run goes on; how it ended stays on record
                log.info("the previous ending's marker is kept as %s", kept)
            atomic_write_text(run.config, dump_config(setup.config))
        except OSError as exc:
            error = CheckpointError(f"cannot write the run directory {run.root}: "
                                    f"{exc.strerror or exc}")
    world.agree(error, stage="writing the run directory")
