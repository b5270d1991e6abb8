"""Multi-node launches on one machine: two nodes at this machine's loopback addresses 127.0.0.2 and 127.0.0.3,
one CPU rank each, started by launch/multi_node.sh (sshd on a port of its own, pdsh), by launch/no_ssh.sh once
per node, and by launch/slurm.sbatch (slurmctld and two slurmd on this machine). Each ends with the scores and
weights of the one-node two-rank run of the same settings (conftest's ``two_rank_reference``), after being
stopped on the way by a signal to one of its launcher processes: every rank on every node stops at one step
with its part of the resume checkpoint, the launchers exit 143 (SIGTERM) or 130 (SIGINT), no process of the
job is left, and the same command goes on from there. A node whose launcher is killed makes the other node's
ranks exit 3 (lost contact).

sshd, pdsh, SLURM and munge are system packages (.ci/run installs them); where one is missing, these tests
install it with apt-get when they run as root, and skip, saying what is missing, where they cannot."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from nerco_dist.checkpoint import load_checkpoint
from nerco_dist.launcher import PER_NODE

from .conftest import REPO, stop_signals_at_their_defaults
from .test_distributed import env, free_port, nerco_train

NODES = ("127.0.0.2", "127.0.0.3")  # addresses of this machine (all of 127.0.0.0/8 is loopback)
TIMEOUT_S = 60  # tests/test_distributed.py's RUN: distributed.timeout_s


# --- what the launches need: system programs, sshd, SLURM ------------------------------------------------------


def provide(programs: dict[str, str]) -> None:
    """Every program (name: its Debian package) found, apt-get installing missing packages when running as
    root; otherwise skip (fail under CI, whose set-up installs them) naming what is missing."""
    def missing() -> dict[str, str]:
        return {p: pkg for p, pkg in programs.items() if not shutil.which(p, path=f"{os.environ['PATH']}:/usr/sbin")}

    if missing() and os.geteuid() == 0 and shutil.which("apt-get"):
        install = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *sorted(set(missing().values()))]
        apt_env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        if subprocess.run(install, env=apt_env, capture_output=True).returncode:
            subprocess.run(["apt-get", "update", "-qq"], env=apt_env, capture_output=True)
            subprocess.run(install, env=apt_env, capture_output=True)
    if missing() or os.geteuid() != 0:
        message = (f"needs root and {', '.join(missing()) or 'its programs'} (Debian packages "
                   f"{' '.join(sorted(set(missing().values())))}): not installed and not installable here")
        pytest.fail(message) if os.environ.get("CI") else pytest.skip(message)


def program(name: str) -> str:
    return shutil.which(name, path=f"{os.environ['PATH']}:/usr/sbin")


def wait_until(ready, what: str, timeout: float = 30) -> None:
    deadline = time.time() + timeout
    while not ready():
        assert time.time() < deadline, f"{what} not ready in {timeout} s"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def ssh_nodes(tmp_path_factory) -> Path:
    """sshd on NODES at a port of its own, accepting a key made for these tests; the folder of an ``ssh`` that
    uses them (first on PATH: pdsh and DeepSpeed's ssh check run ``ssh``). Root's own ssh set-up is untouched."""
    provide({"sshd": "openssh-server", "ssh": "openssh-client", "ssh-keygen": "openssh-client", "pdsh": "pdsh"})
    d, port = tmp_path_factory.mktemp("ssh"), free_port()
    for key in ("host", "user"):
        subprocess.run([program("ssh-keygen"), "-q", "-t", "ed25519", "-N", "", "-f", str(d / key)], check=True)
    (d / "sshd_config").write_text(
        f"Port {port}\n" + "".join(f"ListenAddress {n}\n" for n in NODES) +
        f"HostKey {d}/host\nAuthorizedKeysFile {d}/user.pub\nPidFile {d}/sshd.pid\nPermitRootLogin prohibit-password\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\nLogLevel ERROR\n")
    (d / "known_hosts").write_text(",".join(f"[{n}]:{port}" for n in NODES) + " " + (d / "host.pub").read_text())
    (d / "ssh_config").write_text(
        f"Host {' '.join(NODES)}\n  Port {port}\n  IdentityFile {d}/user\n  IdentitiesOnly yes\n"
        f"  UserKnownHostsFile {d}/known_hosts\n  StrictHostKeyChecking yes\n  BatchMode yes\n  LogLevel ERROR\n")
    (d / "bin").mkdir()
    (d / "bin" / "ssh").write_text(f'#!/bin/sh\nexec {program("ssh")} -F {d}/ssh_config "$@"\n')
    (d / "bin" / "ssh").chmod(0o755)
    Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege separation folder (made by its system service)
    with open(d / "sshd.log", "w") as log:
        sshd = subprocess.Popen([program("sshd"), "-D", "-e", "-f", str(d / "sshd_config")], stdout=log,
                                stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: subprocess.run([str(d / "bin" / "ssh"), NODES[1], "true"], capture_output=True,
                                          timeout=10).returncode == 0, f"sshd ({d / 'sshd.log'})")
        yield d / "bin"
    finally:
        sshd.terminate()
        sshd.wait()


def slurm_conf(d: Path, ports: list[int]) -> str:
    """Nodes n0 and n1 (one CPU each) at NODES on this host; state, spool, logs and munge's socket under ``d``."""
    host = socket.gethostname().split(".")[0]
    nodes = "".join(f"NodeName=n{i} NodeHostname={host} NodeAddr={addr} Port={ports[i + 1]} CPUs=1 RealMemory=500\n"
                    for i, addr in enumerate(NODES))
    return (f"ClusterName=nercotest\nSlurmctldHost={host}(127.0.0.1)\nSlurmctldPort={ports[0]}\nSlurmUser=root\n"
            f"AuthType=auth/munge\nAuthInfo=socket={d}/munge.sock\nStateSaveLocation={d}/state\n"
            f"SlurmdSpoolDir={d}/spool-%n\nSlurmctldPidFile={d}/slurmctld.pid\nSlurmdPidFile={d}/slurmd-%n.pid\n"
            f"SlurmctldLogFile={d}/slurmctld.log\nSlurmdLogFile={d}/slurmd-%n.log\nPlugStackConfig={d}/plugstack.conf\n"
            "MailProg=/bin/true\nProctrackType=proctrack/linuxproc\nTaskPlugin=task/none\nSelectType=select/cons_tres\n"
            "SelectTypeParameters=CR_CPU\nMpiDefault=none\nReturnToService=2\nKillWait=30\n"
            "AccountingStorageType=accounting_storage/none\nJobAcctGatherType=jobacct_gather/none\n" + nodes +
            "PartitionName=test Nodes=n0,n1 Default=YES MaxTime=INFINITE State=UP\n")


@pytest.fixture(scope="module")
def slurm_nodes(tmp_path_factory) -> dict:
    """munged, slurmctld and two slurmd (nodes n0, n1: Debian's SLURM is built for several slurmd on a host)
    started here with a generated slurm.conf: the environment for SLURM's commands."""
    provide({"slurmctld": "slurmctld", "slurmd": "slurmd", "sbatch": "slurm-client", "scancel": "slurm-client",
             "scontrol": "slurm-client", "sinfo": "slurm-client", "munged": "munge", "mungekey": "munge"})
    d = tmp_path_factory.mktemp("slurm")
    for folder in ("state", "spool-n0", "spool-n1"):
        (d / folder).mkdir()
    (d / "plugstack.conf").write_text("")
    (d / "slurm.conf").write_text(slurm_conf(d, [free_port() for _ in range(3)]))
    subprocess.run([program("mungekey"), "-c", "-k", str(d / "munge.key")], check=True)
    daemons = [[program("munged"), "-F", "-f", f"--key-file={d}/munge.key", f"--socket={d}/munge.sock",
                f"--pid-file={d}/munged.pid", f"--seed-file={d}/munged.seed", f"--log-file={d}/munged.log"],
               [program("slurmctld"), "-D", "-f", str(d / "slurm.conf")],
               *[[program("slurmd"), "-D", "-N", f"n{i}", "-f", str(d / "slurm.conf")] for i in range(2)]]
    started = []
    slurm_env = dict(os.environ, SLURM_CONF=str(d / "slurm.conf"))
    try:
        for cmd in daemons:
            with open(d / f"{Path(cmd[0]).name}-{len(started)}.out", "w") as log:
                started.append(subprocess.Popen(cmd, env=slurm_env, stdout=log, stderr=subprocess.STDOUT))
            time.sleep(0.5)  # munged's socket before slurmctld, slurmctld before the slurmd register
        wait_until(lambda: subprocess.run(["sinfo", "-h", "-N", "-o", "%t"], env=slurm_env, capture_output=True,
                                          text=True).stdout.split() == ["idle", "idle"], f"SLURM ({d})")
        yield slurm_env
    finally:
        for daemon in reversed(started):
            daemon.terminate()
            daemon.wait()


# --- launching, stopping, checking --------------------------------------------------------------------------------


def launch_env(data_root: Path, port: int, **extra: str) -> dict:
    """The tests' environment (CPU, the data, one thread) for a launch script meeting at ``port``."""
    return dict(env(data_root), PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}", MASTER_PORT=str(port),
                **extra)


def script_args(out: Path) -> list[str]:
    """A launch script's arguments for the reference run's settings: the config and nerco train's --set."""
    return nerco_train(out, 2)[3:]


class Jobs:
    """The launchers a test starts; what is left of their jobs is killed when the test ends (a failed test
    leaves no rank training)."""

    def __init__(self):
        self.launchers: list[subprocess.Popen] = []
        self.ports: set[int] = set()

    def start(self, cmd: list[str], run_env: dict, log: Path) -> subprocess.Popen:
        with open(log, "w") as output:
            launcher = subprocess.Popen(cmd, cwd=REPO, env=run_env, stdout=output, stderr=subprocess.STDOUT,
                                        preexec_fn=stop_signals_at_their_defaults)
        self.launchers.append(launcher)
        self.ports.add(int(run_env["MASTER_PORT"]))
        return launcher

    def kill_leftovers(self) -> None:
        running = [launcher for launcher in self.launchers if launcher.poll() is None]
        for proc in [proc for port in self.ports for proc in job_processes(running, port)]:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        for launcher in running:
            launcher.wait()


@pytest.fixture
def jobs():
    started = Jobs()
    yield started
    started.kill_leftovers()


def wait_for(path: Path, launchers: list[subprocess.Popen], timeout: float = 300) -> None:
    """Until ``path`` exists, the launchers still running."""
    deadline = time.time() + timeout
    while not path.exists():
        assert all(p.poll() is None for p in launchers), f"a launcher ended before {path} appeared"
        assert time.time() < deadline, f"{path} did not appear in {timeout} s"
        time.sleep(0.02)


def job_processes(launchers: list[subprocess.Popen], port: int) -> list[psutil.Process]:
    """Every process of the job meeting at ``port`` now: the (running) launchers and their descendants, and on
    every node the job's node launchers and their ranks (over ssh they descend from sshd, not from a launcher)."""
    roots = []
    for launcher in launchers:
        with contextlib.suppress(psutil.NoSuchProcess):
            roots.append(psutil.Process(launcher.pid))
    python = os.path.realpath(sys.executable)  # the launch scripts run `python`, pytest may run as python3
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info["cmdline"] or []
        if cmd and os.path.realpath(shutil.which(cmd[0]) or cmd[0]) == python and PER_NODE in cmd \
                and f"--master_port={port}" in cmd:
            roots.append(proc)
    found = {}
    for root in roots:
        found[root.pid] = root
        with contextlib.suppress(psutil.NoSuchProcess):
            found.update({child.pid: child for child in root.children(recursive=True)})
    return list(found.values())


def ranks_of(job: list[psutil.Process]) -> list[psutil.Process]:
    ranks = [proc for proc in job if "-m" in proc.cmdline()
             and proc.cmdline()[proc.cmdline().index("-m") + 1] == "nerco_dist.cli"]
    assert len(ranks) == 2, [proc.cmdline()[:6] for proc in job]
    return ranks


def left_running(procs: list[psutil.Process]) -> list[str]:
    """The processes of ``procs`` still running (a zombie has ended: this machine's init does not reap orphans)."""
    running = []
    for proc in procs:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                running.append(f"{proc.pid}: {' '.join(proc.cmdline()[:5])}")
        except psutil.NoSuchProcess:
            pass
    return running


def finish(launcher: subprocess.Popen, log: Path, timeout: float = 300) -> tuple[int, str]:
    """The launcher's exit status and output."""
    return launcher.wait(timeout=timeout), log.read_text(errors="replace")


def assert_stopped_with_checkpoint(output: str, signame: str, out: Path) -> str:
    """Rank 0 says where every rank stopped; that step's resume checkpoint holds both ranks' parts. The stage."""
    stop = re.search(rf"nerco: stopped by {signame} at (\w+) phase .*; resume checkpoint in (\S+): run the same "
                     "command again to continue", output)
    assert stop, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    latest = json.loads((out / "resume" / stop.group(1) / "latest.json").read_text())
    parts = sorted(p.name for p in (out / "resume" / stop.group(1) / latest["tag"]).glob("zero_pp_rank_*"))
    assert parts == [f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)], parts
    return stop.group(1)


def assert_same_run(out: Path, reference: Path) -> None:
    ours, theirs = (json.loads((d / "results.json").read_text()) for d in (out, reference))
    assert ours["machine"]["world_size"] == 2
    assert ours["test"] == theirs["test"] and ours["best_dev_f1"] == theirs["best_dev_f1"]
    assert dict(ours["contrastive"], wall_time_s=0) == dict(theirs["contrastive"], wall_time_s=0)
    for name in ("contrastive/best.pt", "best.pt", "last.pt"):
        a, b = load_checkpoint(out / name)["model"], load_checkpoint(reference / name)["model"]
        assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=0, atol=1e-5) for k in a), name


# --- the tests ----------------------------------------------------------------------------------------------------


def sigterm_in_stage_one(launcher, port: int, out: Path, log: Path) -> None:
    """SIGTERM to ``launcher`` once stage 1 has a resume checkpoint: it exits 143, no process of the job is
    left, and every rank stopped at one step of stage 1 with its checkpoint."""
    wait_for(out / "resume" / "contrastive" / "latest.json", [launcher])
    job = job_processes([launcher], port)
    ranks_of(job)
    launcher.send_signal(signal.SIGTERM)
    code, output = finish(launcher, log)
    assert code == 143, output[-3000:]
    assert not left_running(job), left_running(job)
    assert assert_stopped_with_checkpoint(output, "SIGTERM", out) == "contrastive"


def test_sigterm_to_launch_cpu_sh_stops_both_ranks_with_a_checkpoint_and_leaves_none(tmp_path, data_root, jobs):
    """The script (which is the runner: it execs nerco_dist.launcher) gets SIGTERM in stage 1; DeepSpeed's own
    runner ended at once there, its ranks training on as orphans."""
    out, port = tmp_path / "run", free_port()
    launcher = jobs.start(["bash", "launch/cpu.sh", *script_args(out)], launch_env(data_root, port), tmp_path / "1.log")
    sigterm_in_stage_one(launcher, port, out, tmp_path / "1.log")


def write_hostfile(folder: Path) -> Path:
    hostfile = folder / "hostfile"
    hostfile.write_text("".join(f"{node} slots=1\n" for node in NODES))
    return hostfile


def test_two_nodes_over_ssh_stop_on_sigterm_to_the_script_and_end_like_one_node(
        ssh_nodes, two_rank_reference, tmp_path, data_root, jobs):
    """launch/multi_node.sh on node 0 starts both nodes' launchers over ssh (pdsh; DS_ENV_FILE: the
    .deepspeed_env the remote ranks need). SIGTERM to the script in stage 1: the runner passes it to each
    node's launcher with a pdsh command of its own; the same command then ends as the one-node run did."""
    deepspeed_env = tmp_path / "deepspeed_env"
    deepspeed_env.write_text(f"NERCO_DATA_ROOT={data_root}\nDS_ACCELERATOR=cpu\nOMP_NUM_THREADS=1\n")
    out, port = tmp_path / "run", free_port()
    run_env = launch_env(data_root, port, HOSTFILE=str(write_hostfile(tmp_path)), NUM_NODES="2", NUM_GPUS="1",
                         MASTER_ADDR=NODES[0], DS_ENV_FILE=str(deepspeed_env))
    run_env["PATH"] = f"{ssh_nodes}:{run_env['PATH']}"
    cmd = ["bash", "launch/multi_node.sh", *script_args(out)]
    launcher = jobs.start(cmd, run_env, tmp_path / "1.log")
    sigterm_in_stage_one(launcher, port, out, tmp_path / "1.log")

    code, output = finish(jobs.start(cmd, run_env, tmp_path / "2.log"), tmp_path / "2.log")
    assert code == 0, output[-3000:]
    assert "contrastive: resuming at phase 1" in output
    for rank, node in enumerate(NODES):  # pdsh names the host of each line
        assert re.search(rf"^{re.escape(node)}: .*node_rank={rank}$", output, re.MULTILINE), output[-3000:]
    assert_same_run(out, two_rank_reference)


def test_two_nodes_without_ssh_stop_on_sigint_to_a_node_launcher_fail_with_a_killed_one_and_end_like_one_node(
        two_rank_reference, tmp_path, data_root, jobs):
    """launch/no_ssh.sh once per node. SIGINT to node 1's launcher (the per-node process its script started)
    in stage 1 stops both nodes (130); SIGKILL to node 1's script in stage 2 takes its rank with it, and node
    0's rank loses contact (3) within distributed.timeout_s; the same commands then end as on one node."""
    out, port, hostfile = tmp_path / "run", free_port(), write_hostfile(tmp_path)

    def both_nodes(name: str) -> list[subprocess.Popen]:
        return [jobs.start(["bash", "launch/no_ssh.sh", *script_args(out)],
                           launch_env(data_root, port, NODE_RANK=str(rank), HOSTFILE=str(hostfile),
                                      MASTER_ADDR=NODES[0]), tmp_path / f"{name}-node{rank}.log") for rank in (0, 1)]

    nodes = both_nodes("1")
    wait_for(out / "resume" / "contrastive" / "latest.json", nodes)
    job = job_processes(nodes, port)
    ranks_of(job)
    next(p for p in job if PER_NODE in p.cmdline() and "--node_rank=1" in p.cmdline()).send_signal(signal.SIGINT)
    ended = [finish(node, tmp_path / f"1-node{rank}.log") for rank, node in enumerate(nodes)]
    assert [code for code, _ in ended] == [130, 130], ended[1][1][-3000:]
    assert not left_running(job), left_running(job)
    assert assert_stopped_with_checkpoint(ended[0][1], "SIGINT", out) == "contrastive"

    nodes = both_nodes("2")
    wait_for(out / "resume" / "finetune" / "latest.json", nodes)
    job = job_processes(nodes, port)
    ranks_of(job)
    nodes[1].kill()
    killed = time.time()
    code, output = finish(nodes[0], tmp_path / "2-node0.log")
    assert code == 3 and "lost contact with the other ranks" in output, output[-3000:]
    assert time.time() - killed < TIMEOUT_S
    assert nodes[1].wait() == -signal.SIGKILL and not left_running(job), left_running(job)

    nodes = both_nodes("3")
    ended = [finish(node, tmp_path / f"3-node{rank}.log") for rank, node in enumerate(nodes)]
    assert [code for code, _ in ended] == [0, 0], ended[0][1][-3000:]
    assert "finetune: resuming at phase 1" in ended[0][1]
    assert_same_run(out, two_rank_reference)


def sbatch(args: list[str], run_env: dict, log_folder: Path) -> str:
    """Submit launch/slurm.sbatch for two one-rank CPU nodes; the job id."""
    cmd = ["sbatch", "--parsable", "--nodes=2", "--cpus-per-task=1", f"--output={log_folder}/slurm-%j.out",
           "launch/slurm.sbatch", *args]
    return subprocess.run(cmd, cwd=REPO, env=run_env, check=True, capture_output=True, text=True).stdout.strip()


def job_ended(job: str, run_env: dict, timeout: float = 300) -> str:
    """The job's state once SLURM is done with it (every process of it ended)."""
    wait_until(lambda: not subprocess.run(["squeue", "-h", "-j", job], env=run_env, capture_output=True,
                                          text=True).stdout.strip(), f"the end of job {job}", timeout)
    shown = subprocess.run(["scontrol", "show", "job", job], env=run_env, capture_output=True, text=True).stdout
    return re.search(r"JobState=(\w+)", shown).group(1)


def test_a_slurm_job_cancelled_mid_epoch_resumes_to_the_one_node_result(
        slurm_nodes, two_rank_reference, tmp_path, data_root):
    """sbatch launch/slurm.sbatch on two SLURM nodes (n0, n1: one CPU each) of this machine; scancel after the
    first step of a fine-tuning epoch: every rank stops with the checkpoint before SLURM's KillWait, each
    node's launcher exits 143; the same sbatch then ends as the one-node run did."""
    out, port = tmp_path / "run", free_port()
    run_env = launch_env(data_root, port, SLURM_CONF=slurm_nodes["SLURM_CONF"], RANKS_PER_NODE="1")
    submitted = []
    try:
        submitted.append(sbatch(script_args(out), run_env, tmp_path))
        wait_for(out / "resume" / "finetune" / "latest.json", [])
        job = job_processes([], port)
        ranks_of(job)
        subprocess.run(["scancel", submitted[0]], env=run_env, check=True)
        assert job_ended(submitted[0], run_env) == "CANCELLED"
        output = (tmp_path / f"slurm-{submitted[0]}.out").read_text()
        assert assert_stopped_with_checkpoint(output, "SIGTERM", out) == "finetune"
        assert sorted(re.findall(r"task (\d): Exited with exit code 143", output)) == ["0", "1"], output[-3000:]
        assert not left_running(job), left_running(job)

        submitted.append(sbatch(script_args(out), run_env, tmp_path))
        assert job_ended(submitted[1], run_env) == "COMPLETED"
        output = (tmp_path / f"slurm-{submitted[1]}.out").read_text()
        assert "finetune: resuming at phase 1" in output, output[-3000:]
        assert_same_run(out, two_rank_reference)
    finally:
        for job_id in submitted:
            subprocess.run(["scancel", job_id], env=run_env)
            (REPO / "runs" / f"hostfile-{job_id}").unlink(missing_ok=True)
