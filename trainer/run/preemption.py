"""Stop at one agreed step when the scheduler says the job is about to end.

Slurm warns a job before its time limit or a preemption (`--signal=B:USR1@120` reaches the batch
script, which passes SIGTERM on to the tasks); torchrun forwards SIGTERM to its workers. A
signal arrives at each rank at a different moment, in the middle of some step, so a rank only
remembers it; after every optimizer step the ranks all-reduce the flag (MAX), and all of them
see the stop at the same step, write one complete checkpoint there and exit.

Under Hydra's submitit launcher the warning is USR2, and submitit's own handler is what requeues
the job (and exits). It is not lost: after the checkpoint, hand_over() passes the signal to the
handler that was installed before ours.
"""

from __future__ import annotations

import signal

from trainer.core import distributed

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


class StopRequest:
    """Installs handlers for STOP_SIGNALS that only record the signal; restore() puts the old ones back."""

    def __init__(self, signals: tuple[signal.Signals, ...] = STOP_SIGNALS) -> None:
        self.received: int | None = None
        self._previous = {sig: signal.signal(sig, self._handle) for sig in signals}

    def _handle(self, signum: int, _frame) -> None:
        self.received = signum

    def agreed(self) -> bool:
        """True on every rank as soon as any rank has received a signal (a collective)."""
        return distributed.any_rank(self.received is not None)

    def hand_over(self) -> None:
        """After the checkpoint: give the received signal to the handler that was there before
        ours (submitit's requeue, say). Default and ignored dispositions are left alone."""
        previous = self._previous.get(self.received) if self.received is not None else None
        self.restore()
        if callable(previous):
            previous(self.received, None)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
