"""Stopping on SIGTERM (a preempted VM, a scheduler) or SIGINT (Ctrl-C): every process stops after the
same step, saves that one checkpoint together, and exits with a status a scheduler can act on.

A signal may reach one host only (one preempted VM) or the hosts at different steps. Each process keeps
its own flag; at every step boundary it dispatches an all-reduce (max) of the flags over all processes
and reads the previous step's result, which every process reads at the same step: the host does not wait
on the vote, and no process leaves the others blocked in a collective. On one process the flag is read
directly.
"""
import signal

import jax
import jax.numpy as jnp
import numpy as np

# The exit status of a run a signal stopped after saving: SIGTERM gives EX_TEMPFAIL (75: preempted,
# checkpoint saved, rerun the same command to resume), SIGINT the shell's 130.
EXIT_STATUS = {'SIGTERM': 75, 'SIGINT': 130}
OTHER_PROCESS = 'SIGTERM on another process'


class StopSignal:
    """SIGTERM/SIGINT handlers for one stage's loop; `agreed()` at each step boundary says when to stop."""

    def __init__(self):
        self.received = None  # the signal this process got, by name
        self._previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        self._vote = None
        if jax.process_count() > 1:
            mesh = jax.sharding.Mesh(np.array(jax.devices()), ('processes',))
            self._in = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('processes'))
            self._max = jax.jit(jnp.max, out_shardings=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))

    def _handle(self, signum, frame):
        del frame
        self.received = signal.Signals(signum).name
        # A second signal gets the default behaviour (a second Ctrl-C ends the run at once); that is
        # safe because a checkpoint only counts once it is complete.
        self.restore()

    def agreed(self) -> str | None:
        """Call once per step, after dispatching it, on every process: the reason to stop after this
        step (the same on every process at the same step), or None to go on."""
        if jax.process_count() == 1:
            return self.received
        flags = np.full((jax.local_device_count(),), self.received is not None, np.int32)
        vote = self._max(jax.make_array_from_process_local_data(self._in, flags, (jax.device_count(),)))
        previous, self._vote = self._vote, vote
        if previous is None or not int(previous):
            return None
        return self.received or OTHER_PROCESS

    def restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def exit_status(reason: str) -> int:
    """The exit status for a run stopped by `reason` (a signal name or OTHER_PROCESS)."""
    return EXIT_STATUS.get(reason, EXIT_STATUS['SIGTERM'])
