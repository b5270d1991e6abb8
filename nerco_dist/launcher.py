"""``python -m nerco_dist.launcher ARGS``: the ``deepspeed`` command (the same ARGS), with stop signals that
reach every rank on every node. launch/*.sh run it.

DeepSpeed's own launcher loses ranks on SIGINT or SIGTERM. Its runner, on one node or with ``--no_ssh``, has
no handler: it ends at once and its ranks train on as orphans. Over pdsh it kills pdsh, whose ssh connections
carry the remote ranks' output, and runs ``pkill -f`` on every host for every DeepSpeed launch of its Python,
other jobs' included. Each node's ``deepspeed.launcher.launch`` ends its ranks one by one and exits 1.

Here a stop signal to any launcher process goes to the ranks, which stop together after their next optimizer
step with a resume checkpoint (train/stopping.py); each launcher waits for them and exits with their status
(130 for SIGINT, 143 for SIGTERM, 129 for SIGHUP):

- the runner (this module without ``--per-node``) passes it to each node's launcher: its own child, or over
  pdsh a ``--signal`` command run on every host, which finds that host's launcher of this job;
- each node's launcher (this module with ``--per-node``, which the runner starts in place of
  ``deepspeed.launcher.launch`` and which runs it) passes it to its ranks.

The runner's job runs in a session of its own, so a terminal's Ctrl-C reaches the runner alone (never pdsh's
ssh clients). A node's launcher dies with the runner that started it, and a rank with its node's launcher
(SIGKILL as the parent-death signal): a killed launcher leaves no rank behind, and the ranks of the other
nodes then stop within ``distributed.timeout_s`` with exit status 3.
"""

from __future__ import annotations

import ctypes
import functools
import os
import signal
import subprocess
import sys
import types

from .train.stopping import STOP_SIGNALS

MODULE = "nerco_dist.launcher"
PER_NODE = "--per-node"  # each node's launcher
SIGNAL = "--signal"  # run on every host by pdsh: ``--signal NAME`` and the arguments naming the job's launcher
DEEPSPEED_NODE_LAUNCHER = "deepspeed.launcher.launch"
JOB_ARGUMENTS = ("--node_rank=", "--master_addr=", "--master_port=")  # tell a job's node launcher from others'
PR_SET_PDEATHSIG = 1
# Linux's prctl, looked up before any fork (a child between fork and exec should not load libraries)
PRCTL = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None


class Job:
    """The processes a launcher started (each node's launcher, or the node's ranks), and the stop signals it
    passes on to them instead of ending. A signal ignored when the launcher began stays ignored; one that comes
    before anything was started ends the launcher (with the status a shell would report)."""

    def __init__(self, new_session: bool, receivers: str):
        self.new_session, self.receivers = new_session, receivers
        self.started: list[tuple[subprocess.Popen, list[str], dict | None]] = []
        for signum in STOP_SIGNALS:
            if signal.getsignal(signum) is not signal.SIG_IGN:
                signal.signal(signum, self._pass_on)

    def popen(self, cmd: list[str], **kwargs) -> subprocess.Popen:
        """``subprocess.Popen`` for DeepSpeed's launcher: DeepSpeed's node launcher replaced by this module's;
        the child dies with this process (and has a session of its own when ``new_session``)."""
        if DEEPSPEED_NODE_LAUNCHER in cmd:
            at = cmd.index(DEEPSPEED_NODE_LAUNCHER)
            cmd = [*cmd[:at], MODULE, PER_NODE, *cmd[at + 1:]]
        preexec = functools.partial(_die_with, os.getpid()) if PRCTL else None
        proc = subprocess.Popen(cmd, start_new_session=self.new_session, preexec_fn=preexec, **kwargs)
        self.started.append((proc, cmd, kwargs.get("env")))
        return proc

    def _pass_on(self, signum: int, frame) -> None:
        if not self.started:
            raise SystemExit(128 + signum)
        print(f"nerco launcher: {signal.Signals(signum).name} passed on to {self.receivers}: every rank stops after "
              "its next step with a resume checkpoint", file=sys.stderr, flush=True)
        for proc, cmd, env in self.started:
            if proc.poll() is not None:
                continue
            if os.path.basename(cmd[0]) != "pdsh":
                proc.send_signal(signum)
                continue
            try:
                subprocess.run(pdsh_signal_command(cmd, signum), env=env, timeout=120)
            except (OSError, subprocess.SubprocessError) as err:
                print(f"nerco launcher: could not pass the signal on over pdsh ({err})", file=sys.stderr, flush=True)

    def exit_status(self) -> int:
        """0, or 128 + N when a child was ended by signal N (DeepSpeed's runner reports that as success)."""
        codes = [proc.returncode for proc, _, _ in self.started if proc.returncode and proc.returncode < 0]
        return 128 - codes[0] if codes else 0


def _die_with(parent: int) -> None:
    """A child's ``preexec_fn``: SIGKILL when the process that started it ends (Linux's parent-death signal)."""
    PRCTL(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # it ended before the line above
        os._exit(128 + signal.SIGKILL)


def pdsh_signal_command(pdsh_cmd: list[str], signum: int) -> list[str]:
    """The pdsh command that sends ``signum`` to this job's launcher on every host: the one that started them
    (its hosts, exports, folder and Python) up to the module, then ``--signal`` and the job's arguments (pdsh
    puts each host's node rank for ``%n``)."""
    module = pdsh_cmd.index(MODULE)
    ids = [next(a for a in pdsh_cmd[module:] if a.startswith(prefix)) for prefix in JOB_ARGUMENTS]
    return [*pdsh_cmd[:module + 1], SIGNAL, signal.Signals(signum).name, *ids]


def signal_node_launcher(name: str, job: list[str]) -> int:
    """``--signal``: send signal ``name`` to this host's node launcher(s) started with the arguments ``job`` (by
    this Python: pdsh's ssh clients have the same arguments)."""
    import psutil

    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info["cmdline"] or []
        if cmd[:1] == [sys.executable] and PER_NODE in cmd and all(a in cmd for a in job):
            proc.send_signal(signal.Signals[name])
    return 0


def _module_with(module: types.ModuleType, **replaced) -> types.SimpleNamespace:
    """A stand-in for ``module`` in a DeepSpeed module's globals: the same names, ``replaced`` replaced."""
    return types.SimpleNamespace(**{**vars(module), **replaced})


def _keeping_stop_handlers(signum: int, handler):
    """``signal.signal`` for DeepSpeed's launcher: its handlers of the stop signals are not installed (``Job``'s
    stay)."""
    return signal.getsignal(signum) if signum in STOP_SIGNALS else signal.signal(signum, handler)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [SIGNAL]:
        return signal_node_launcher(argv[1], argv[2:])
    per_node = argv[:1] == [PER_NODE]
    job = Job(new_session=not per_node, receivers="this node's ranks" if per_node else "each node's launcher")
    from deepspeed.launcher import launch, runner  # a signal during this slow import ends this process

    deepspeed_module = launch if per_node else runner
    deepspeed_module.signal = _module_with(signal, signal=_keeping_stop_handlers)
    deepspeed_module.subprocess = _module_with(subprocess, Popen=job.popen)
    try:
        if per_node:
            sys.argv = [DEEPSPEED_NODE_LAUNCHER, *argv[1:]]
            launch.main()
        else:
            runner.main(argv)
    except SystemExit as end:  # DeepSpeed's node launcher exits with a rank's status, negative for a signal
        code = 0 if end.code is None else end.code if isinstance(end.code, int) else 1
        return 128 - code if code < 0 else code
    return job.exit_status()


if __name__ == "__main__":
    sys.exit(main())
