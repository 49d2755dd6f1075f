"""A pipeline stage's process (pipeline.py runs train.py, generate.py and precompute.py this way): run
to its end, with the pipeline's SIGINT / SIGTERM passed on so that the stage saves before it stops."""
import signal
import subprocess
from typing import List

import utils


class StageInterrupted(utils.RunError):
    """SIGINT / SIGTERM / SIGHUP reached the pipeline during a stage: the stage saved and stopped."""
    kind, exit_code = "stopped", 130


def run(cmd: List[str]) -> int:
    """Run one stage's command and wait for it to end, however it ends. SIGINT and SIGTERM sent to
    the pipeline are passed on to the stage, which saves a checkpoint at its next step boundary and
    exits; then StageInterrupted stops the pipeline (the same command resumes it).

    Why not subprocess.run: on KeyboardInterrupt it kills the child 0.25 s later, before the stage's
    promised save, and the stage's own workers (self-launched FSDP ranks) are orphaned while its run
    lock is released. The stage runs in its own process group, so a Ctrl-C in the terminal reaches
    it once, from here, rather than twice (its third signal would stop it without a checkpoint)."""
    proc = subprocess.Popen(cmd, process_group=0)
    received: List[int] = []

    def forward(signum, frame):
        received.append(signum)
        if proc.poll() is None:  # a hangup (the terminal closed) stops the stage as SIGTERM does
            proc.send_signal(signal.SIGTERM if signum == signal.SIGHUP else signum)
    # SIGHUP too: the stage's own process group does not get the terminal's hangup, and the
    # pipeline's default action on it (exit at once) would leave the stage running unwatched.
    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        rc = proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if received:
        raise StageInterrupted(f"{signal.Signals(received[0]).name}: the stage saved a checkpoint and stopped "
                               f"(exit code {rc}); run the same command again to continue (finished stages are "
                               "skipped, the interrupted one resumes)")
    return rc
