"""Run the ``fedsilo`` command with a fault planted on one rank (fault-injection tests only).

FEDSILO_TEST_FAULT=KIND:RANK:CALL makes the CALL-th local training on RANK fail:
  raise  - raise an unexpected RuntimeError (a bug)
  exit   - the process dies at once with status 3 (a crash: OOM kill, segfault)
  data   - raise a DataError (a foreseeable, recoverable error: a bad batch)
  nan    - train, then poison one weight with NaN (a non-finite update)
  huge   - train, then move one weight by 1e6 (a finite update too large for the ring)
  dpdata - under DP: the CALL-th DP-SGD *step* on RANK raises a DataError, mid-round
  weights - a dishonest coordinator (RANK 0): every plan gives site CALL ten times its weight
  replay - a deviating coordinator (RANK 0): every plan states round CALL (masks and DP noise
           would be drawn again for a round already sent)
  sample - a deviating coordinator (RANK 0): every plan samples only sites 0..CALL-1 (a
           target and a colluder), with the weights the strategy gives that sample
  budget - a deviating coordinator (RANK 0): lists site CALL as out of privacy budget, so
           that the sample shrinks to the sites it wants
  config - a deviating coordinator (RANK 0): broadcasts the configuration with
           aggregation.secure=none (CALL is ignored)
  stall  - the process stops (SIGSTOP) without failing: in the CALL-th local training on a
           participant, or at the CALL-th end of a round on the coordinator (RANK 0)
  stallreduce - a participant stops (SIGSTOP) inside the CALL-th reduction of the updates
           (plain or masked), after the others have entered it: a rank lost mid-Reduce
"""

import os
import sys

kind, rank, call = os.environ["FEDSILO_TEST_FAULT"].split(":")
# the rank from the launcher's environment: under mpirun and in the in-process tier alike
if int(os.environ["OMPI_COMM_WORLD_RANK"]) == int(rank):
    import dataclasses

    import torch

    import fedsilo.coordinator as coordinator
    import fedsilo.participant as participant
    from fedsilo.errors import DataError

    calls = [0]

    if kind == "stallreduce":
        import signal

        from fedsilo.comm import World

        def stalling(original):
            def reduce(self, *args, **kwargs):
                calls[0] += 1
                if calls[0] == int(call):
                    os.kill(os.getpid(), signal.SIGSTOP)
                return original(self, *args, **kwargs)
            return reduce

        World.reduce_sum = stalling(World.reduce_sum)
        World.reduce_ring = stalling(World.reduce_ring)
    elif kind == "stall" and int(rank) == 0:
        import signal

        original_finish = coordinator.Coordinator.finish_round

        def stalling_finish(self, *args, **kwargs):
            calls[0] += 1
            if calls[0] == int(call):
                os.kill(os.getpid(), signal.SIGSTOP)
            return original_finish(self, *args, **kwargs)

        coordinator.Coordinator.finish_round = stalling_finish
    elif kind == "weights":
        original_plan = coordinator.Coordinator.plan

        def inflating_plan(self, round_index):
            plan = original_plan(self, round_index)
            if int(call) in plan.weights:
                weights = dict(plan.weights)
                weights[int(call)] *= 10
                plan = dataclasses.replace(plan, weights=weights)
            return plan

        coordinator.Coordinator.plan = inflating_plan
    elif kind in ("replay", "sample", "budget"):
        from fedsilo.roles import plan_weights

        original_plan = coordinator.Coordinator.plan

        def deviating_plan(self, round_index):
            plan = original_plan(self, round_index)
            if kind == "replay":
                return dataclasses.replace(plan, round=int(call))
            chosen = tuple(range(int(call))) if kind == "sample" else \
                tuple(k for k in plan.participants if k != int(call))
            stopped = (int(call),) if kind == "budget" else plan.stopped
            return dataclasses.replace(
                plan, participants=chosen, stopped=stopped,
                weights=plan_weights(self.config, self.strategy, self.manifest, chosen),
                ranks=tuple(sorted({self.rank_of_site[k] for k in chosen})))

        coordinator.Coordinator.plan = deviating_plan
    elif kind == "config":
        import fedsilo.federation as federation

        original_prepare = federation._prepare

        def weakened_prepare(*args, **kwargs):
            setup = original_prepare(*args, **kwargs)
            config = setup.config
            plain = dataclasses.replace(config.aggregation, secure="none")
            return dataclasses.replace(setup, config=dataclasses.replace(config,
                                                                         aggregation=plain))

        federation._prepare = weakened_prepare
    elif kind == "dpdata":
        from fedsilo.privacy.engine import ParticipantPrivacy

        original_step = ParticipantPrivacy._step

        def faulty_step(self, *args, **kwargs):
            calls[0] += 1
            if calls[0] == int(call):
                raise DataError("injected unreadable batch in DP-SGD")
            return original_step(self, *args, **kwargs)

        ParticipantPrivacy._step = faulty_step
    else:
        original = participant.train_local

        def faulty(model, *args, **kwargs):
            calls[0] += 1
            if calls[0] == int(call):
                if kind == "exit":
                    os._exit(3)
                if kind == "stall":
                    import signal

                    os.kill(os.getpid(), signal.SIGSTOP)
                if kind == "data":
                    raise DataError("injected unreadable batch")
                if kind == "raise":
                    raise RuntimeError("injected failure in local training")
            stats = original(model, *args, **kwargs)
            if calls[0] == int(call) and kind == "nan":
                with torch.no_grad():
                    next(model.parameters()).view(-1)[0] = float("nan")
            if calls[0] == int(call) and kind == "huge":
                with torch.no_grad():
                    next(model.parameters()).view(-1)[0] += 1e6
            return stats

        participant.train_local = faulty

from fedsilo.cli import main  # noqa: E402

sys.exit(main(sys.argv[1:]))
