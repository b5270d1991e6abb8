"""Distributed training on CPU: 2 ranks (gloo) through the deepspeed launcher, as CI runs it.

- one step on 2 ranks equals one process on the concatenated batch (loss and averaged gradients, 1e-5),
  ZeRO 0, 2 and 3, both training stages, with the embedding tables dense and updated row-wise;
- both stages end to end for ZeRO 1, 2 and 3; the exported fp32 checkpoint evaluated on one process
  gives the run's test score (every test sentence predicted exactly once across ranks);
- the stage-1 checkpoint of a ZeRO-3 run starts a ZeRO-1 fine-tuning in a process without the launcher;
- a run killed in stage 1 and again in stage 2 and restarted with the same command ends where an
  uninterrupted run ends; so does one whose launcher got SIGTERM (every rank saves the same step and stops);
- a rank that dies or hangs makes the other exit with a clear error; a NaN loss on one rank skips the step
  on both; a run of non-finite losses aborts;
- ``nerco train`` destroys its process group before it returns, ending or refused.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nerco_dist.cli import build_parser
from nerco_dist.config import DistributedConfig, OptimConfig, load_config
from nerco_dist.data.readers import read_corpus
from nerco_dist.eval.metrics import evaluate
from nerco_dist.train import trainer
from nerco_dist.checkpoint import load_checkpoint
from nerco_dist.train.steps import NonFiniteLoss
from nerco_dist.inference import load_for_inference, predict
from nerco_dist.train.engines import scaled_lr
from nerco_dist.train.phases import stage_phases


REPO = Path(__file__).resolve().parents[1]
SCRIPTS = Path(__file__).resolve().parent / "dist_scripts"
LIMIT = 45  # sentences per split: odd, so the ranks predict different numbers of test sentences

RUN = ["data.limit=45", "data.max_len=40", "contrastive.enabled=true", "contrastive.phase.optim.epochs=1",
       "contrastive.phase.optim.batch_size=16", "finetune.full.optim.epochs=2", "finetune.full.optim.batch_size=8", "run.threads=1", "run.log_every=1",
       "distributed.checkpoint_every=1", "distributed.timeout_s=60"]


def free_port() -> int:
    """A port free now, below the kernel's ephemeral range: a port the kernel hands out (bind to 0) can be taken
    as an outgoing connection's source port before rank 0 binds it (EADDRINUSE)."""
    try:
        lowest_ephemeral = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        lowest_ephemeral = 32768
    candidates = range(10000, lowest_ephemeral)
    for port in random.Random().sample(candidates, min(100, len(candidates))):  # not the seeded global one
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port found below the ephemeral range")


def env(data_root: Path) -> dict:
    return dict(os.environ, DS_ACCELERATOR="cpu", NERCO_DATA_ROOT=str(data_root), OMP_NUM_THREADS="1",
                PYTHONUNBUFFERED="1")


def deepspeed_cmd(*args: str, ranks: int = 2) -> list[str]:
    launcher = Path(sys.executable).parent / "deepspeed"
    launcher = str(launcher) if launcher.exists() else shutil.which("deepspeed")
    return [launcher, "--num_gpus", str(ranks), "--master_port", str(free_port()), *args]


def nerco_train(out: Path, zero: int, *extra: str) -> list[str]:
    sets = [f"run.out_dir={out}", f"distributed.config=zero{zero}.json", *RUN, *extra]
    return ["--module", "nerco_dist.cli", "train", "configs/tiny.yaml", *[a for s in sets for a in ("--set", s)]]


def launch(args: list[str], data_root: Path, timeout: float = 300, ranks: int = 2) -> subprocess.CompletedProcess:
    proc = subprocess.run(deepspeed_cmd(*args, ranks=ranks), cwd=REPO, env=env(data_root), capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_local_rank_flag_is_accepted():
    args = build_parser().parse_args(["--local_rank=1", "train", "x.yaml", "--no-resume"])
    assert args.command == "train" and args.no_resume
    assert build_parser().parse_args(["train", "x.yaml", "--local_rank", "0"]).command == "train"


def test_nerco_train_leaves_its_process_group_whether_it_ends_or_is_refused(tmp_path, data_root, monkeypatch,
                                                                              capsys):
    """Left to the interpreter's exit, a gloo group now and then aborted a rank (SIGABRT) after a clean end."""
    import fcntl

    import torch.distributed as tdist

    from nerco_dist.cli import main
    from nerco_dist.train.run import LOCK_FILE

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)  # a group of one, set up by DeepSpeed in this process
    sets = [f"run.out_dir={tmp_path}", "distributed.config=zero1.json", *RUN, "contrastive.enabled=false",
            "finetune.full.optim.epochs=1"]
    args = ["train", "configs/tiny.yaml", "--data-root", str(data_root), *[a for s in sets for a in ("--set", s)]]
    with open(tmp_path / LOCK_FILE, "a+") as held:  # as a second run would find the folder: refused
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert main(args) == 2
    assert "in use by another nerco train" in capsys.readouterr().err
    assert not tdist.is_initialized()
    assert main(args) == 0
    assert "test P " in capsys.readouterr().out
    assert not tdist.is_initialized()


def test_lr_scaling_rules():
    d, optim = DistributedConfig(grad_accum=4, lr_scaling="linear"), OptimConfig(lr=1e-3, batch_size=8)
    assert scaled_lr(optim, d, 2) == pytest.approx(8e-3)  # global batch 64 = 8 x the micro batch
    d.lr_scaling = "sqrt"
    assert scaled_lr(optim, d, 2) == pytest.approx(1e-3 * 8 ** 0.5)
    optim.base_batch = 64
    assert scaled_lr(optim, d, 2) == pytest.approx(1e-3)
    d.lr_scaling = "none"
    assert scaled_lr(optim, d, 2) == 1e-3


def test_a_phase_trained_at_a_larger_batch_leaves_the_other_phases_rates_alone():
    """The recipe docs/distributed.md gives for a global batch of 64 (lr tuned at 10) on a NerCo config, one
    process: the full phase at 1e-3 x sqrt(6.4), stage 1 and the other phases at their own lr."""
    cfg = load_config(REPO / "configs" / "msra_nerco.yaml",
                      ["finetune.full.optim.batch_size=64", "finetune.full.optim.base_batch=10",
                       "distributed.lr_scaling=sqrt"])
    phases = stage_phases(cfg, "contrastive") + stage_phases(cfg, "finetune")
    rates = {p.name: scaled_lr(p.optim, cfg.distributed, 1) for p in phases}
    assert rates.pop("full") == pytest.approx(cfg.finetune.full.optim.lr * 6.4 ** 0.5)
    assert rates == {p.name: p.optim.lr for p in phases if p.name != "full"} and "contrastive" in rates


def test_two_ranks_equal_one_process_on_the_concatenated_batch(tmp_path, data_root):
    """Also with the tables updated row-wise (``/rows``): their averaged row gradients, and one step's tables on
    every rank (clipped by value: half the entries at the clip)."""
    out = tmp_path / "equivalence.json"
    launch([str(SCRIPTS / "equivalence.py"), "--data-root", str(data_root), "--out", str(out),
            "--rows-stages", "0,2,3"], data_root)
    report = json.loads(out.read_text())
    stages = ("contrastive", "finetune")
    assert set(report) == {f"zero{z}/{s}{rows}" for z in (0, 2, 3) for s in stages for rows in ("", "/rows")}
    for name, r in report.items():
        assert r["loss_diff"] <= 1e-5 * max(1.0, abs(r["ref_loss"])), (name, r)
        assert r["max_grad_diff"] <= 1e-5 * max(1.0, r["max_grad"]), (name, r)
        assert r["nonzero_grads"] == r["params_compared"] > 10, (name, r)
        if name.endswith("/rows"):
            assert r["table_step_diff"] <= 1e-5 and r["replicas_equal"], (name, r)
            assert 0.4 < r["clipped_fraction"] < 0.6, (name, r)


@pytest.fixture(scope="module")
def launched(tmp_path_factory, data_root, tiny_bert, two_rank_reference):
    """Both stages, 2 ranks, for each of ZeRO 1, 2, 3: the output folders. ZeRO 1 also accumulates gradients
    over 2 micro-batches with the learning rate scaled for the global batch; ZeRO 2 is the session's
    reference run (conftest.py); ZeRO 3 has a (tiny) BERT, frozen in stage 1 and in the first fine-tuning epoch."""
    extra = {1: ["distributed.grad_accum=2", "distributed.lr_scaling=linear"],
             3: [f"model.bert={tiny_bert}", "finetune.frozen_bert.optim.epochs=1", "finetune.frozen_bert.optim.batch_size=8",
                 "finetune.full.optim.epochs=1"]}
    runs = {2: two_rank_reference}
    for zero in (1, 3):
        out = tmp_path_factory.mktemp(f"zero{zero}")
        proc = launch(nerco_train(out, zero, *extra[zero]), data_root)
        (out / "launch.log").write_text(proc.stdout + proc.stderr)
        runs[zero] = out
    return runs


def subset_sentences(data_root):
    return read_corpus(data_root / "resume/dev.char.bmes").sentences[:LIMIT]  # tiny.yaml: test = dev = train


@pytest.mark.parametrize("zero", [1, 2, 3])
def test_both_stages_and_export_for_one_device(launched, zero, data_root):
    out = launched[zero]
    results = json.loads((out / "results.json").read_text())
    assert results["machine"]["world_size"] == 2 and results["contrastive"]["epochs_run"] == 1
    assert results["epochs_run"] == 2 and math_finite(results["contrastive"]["best_dev_loss"])
    stage1 = load_checkpoint(out / "contrastive" / "best.pt")
    assert stage1["stage"] == "contrastive" and all(v.dtype != torch.bfloat16 for v in stage1["model"].values())
    # the exported fp32 checkpoint, on one process, scores exactly what the 2-rank run measured: every test
    # sentence was predicted once (no duplicates from the sampler's padding, none missing)
    sentences = subset_sentences(data_root)
    codec, model = load_for_inference(out / "best.pt", "cpu")
    report = evaluate([s.tags for s in sentences], predict(codec, model, sentences, 16))
    assert report.to_dict() == results["test"]
    assert not (out / "resume" / "finetune").exists()  # resume checkpoints go once the stage is done
    log = (out / "launch.log").read_text()
    micro, accum = 8, 2 if zero == 1 else 1
    lr = load_config(REPO / "configs" / "tiny.yaml").finetune.full.optim.lr
    assert f"ZeRO stage {zero}, fp32, micro batch {micro} x accumulation {accum} x 2 ranks = global batch " \
           f"{micro * accum * 2}, lr {lr * accum * 2 if zero == 1 else lr:g}" in log
    tags = tensorboard_tags(out / "tensorboard")
    assert {"train/loss", "train/lr", "train/tokens_per_s", "train/tokens_per_s_rank", "dev/f1"} <= tags
    assert "contrastive/tokens_per_s" in tensorboard_tags(out / "contrastive" / "tensorboard")


def tensorboard_tags(directory: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for events in directory.glob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    return tags


def math_finite(x) -> bool:
    return x is not None and x == x and abs(x) != float("inf")


def test_stage_one_of_zero3_starts_zero1_finetuning_without_launcher(launched, tmp_path, data_root,
                                                                    tiny_bert):
    """Also: a new engine for each trainable set of fine-tuning (head alone, + encoder, + BERT)."""
    init = launched[3] / "contrastive" / "best.pt"
    phases = [f"finetune.{name}.optim.{key}={value}" for name in ("head", "frozen_bert", "full")
              for key, value in (("epochs", 1), ("batch_size", 8))]
    sets = [f"run.out_dir={tmp_path}", "distributed.config=zero1.json", *RUN, *phases, f"model.bert={tiny_bert}"]
    cmd = [sys.executable, "-m", "nerco_dist.cli", "train", "configs/tiny.yaml", "--stage", "finetune",
           "--init", str(init), *[a for s in sets for a in ("--set", s)]]
    proc = subprocess.run(cmd, cwd=REPO, env=env(data_root), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "stage 2 starts from the encoder" in proc.stderr
    assert proc.stderr.count("DeepSpeed: ZeRO stage 1, fp32, micro batch 8 x accumulation 1 x 1 ranks") == 3
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["machine"]["world_size"] == 1 and results["epochs_run"] == 3 and "test" in results
    from transformers import BertModel

    bert0 = {f"bert.{k}": v for k, v in BertModel.from_pretrained(str(tiny_bert), add_pooling_layer=False)
             .state_dict().items()}
    stage1, last = load_checkpoint(init)["model"], load_checkpoint(tmp_path / "last.pt")["model"]
    assert all(torch.equal(stage1[k], v) for k, v in bert0.items())  # frozen in the 2-rank ZeRO-3 stage 1
    assert any(not torch.equal(last[k], v) for k, v in bert0.items())  # trained in the last epoch


def kill_when(args: list[str], data_root: Path, ready: Path, log: Path, timeout: float = 300, ranks: int = 2) -> str:
    """Launch, and kill the launcher and every rank (SIGKILL) as soon as ``ready`` exists; the output."""
    with open(log, "w") as out:
        proc = subprocess.Popen(deepspeed_cmd(*args, ranks=ranks), cwd=REPO, env=env(data_root), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + timeout
    try:
        while not ready.exists():
            assert proc.poll() is None, f"the run ended (status {proc.returncode}) before {ready} appeared"
            assert time.time() < deadline, f"{ready} did not appear in {timeout} s"
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return log.read_text()


def test_killed_twice_and_restarted_ends_like_an_uninterrupted_run(launched, tmp_path, data_root):
    out = tmp_path / "run"
    args = nerco_train(out, 2)
    kill_when(args, data_root, out / "resume" / "contrastive" / "latest.json", tmp_path / "1.log")  # mid stage 1
    assert not (out / "resume" / "contrastive.done.json").exists()
    second = kill_when(args, data_root, out / "resume" / "finetune" / "latest.json", tmp_path / "2.log")  # mid 2
    assert re.search(r"contrastive: resuming at phase 1, epoch \d+, batch \d+ \(step [1-9]", second), second[-3000:]
    assert (out / "resume" / "contrastive.done.json").exists() and not (out / "results.json").exists()
    saved = json.loads((out / "resume" / "finetune" / "latest.json").read_text())
    seconds_before_last_kill = saved["progress"]["seconds"]
    assert seconds_before_last_kill > 0
    proc = launch(args, data_root)
    assert re.search(r"finetune: resuming at phase 1, epoch \d+, batch \d+ \(step [1-9]", proc.stdout + proc.stderr)

    reference = launched[2]  # the same command, never interrupted
    ours, theirs = (json.loads((d / "results.json").read_text()) for d in (out, reference))
    assert ours["test"] == theirs["test"] and ours["best_dev_f1"] == theirs["best_dev_f1"]
    assert dict(ours["contrastive"], wall_time_s=0) == dict(theirs["contrastive"], wall_time_s=0)
    assert ours["wall_time_s"] > seconds_before_last_kill  # the killed runs' training time is counted
    for name in ("contrastive/best.pt", "best.pt", "last.pt"):
        a, b = load_checkpoint(out / name)["model"], load_checkpoint(reference / name)["model"]
        assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-6) for k in a), name


def test_a_kill_inside_a_save_at_the_step_of_the_save_before_leaves_a_resumable_run(launched, tmp_path, data_root):
    """``checkpoint_every`` saves the epoch's last step, then the epoch end saves that step again: rank 0 is
    killed while that second save's first file is half-written (truncated, as DeepSpeed writes in place). The
    checkpoint ``latest.json`` names must be whole: the same command continues and ends as the uninterrupted
    run did."""
    out = tmp_path / "run"
    args = nerco_train(out, 2)
    killed = subprocess.run(deepspeed_cmd(str(SCRIPTS / "faults.py"), "die_in_repeated_save", "0", "--", *args[2:]),
                            cwd=REPO, env=env(data_root), capture_output=True, text=True, timeout=300)
    assert killed.returncode != 0, killed.stdout[-3000:] + killed.stderr[-3000:]
    latest = json.loads((out / "resume" / "contrastive" / "latest.json").read_text())
    named = out / "resume" / "contrastive" / latest["tag"]
    assert all(f.stat().st_size > 100 for f in named.iterdir()), sorted((f.name, f.stat().st_size)
                                                                        for f in named.iterdir())
    resumed = launch(args, data_root)
    assert "contrastive: resuming at phase 1" in resumed.stdout + resumed.stderr
    ours, theirs = (json.loads((d / "results.json").read_text()) for d in (out, launched[2]))
    assert ours["test"] == theirs["test"] and ours["best_dev_f1"] == theirs["best_dev_f1"]


def test_sigterm_to_the_launcher_stops_every_rank_at_one_step_and_the_same_command_continues(
        launched, tmp_path, data_root):
    """A scheduler ending the job signals the launcher, which passes SIGTERM on to every rank (rank 0 first,
    giving each 30 s before SIGKILL): the ranks agree on one step, write its resume checkpoint together and
    stop; the same command then ends exactly as the uninterrupted run did."""
    out = tmp_path / "run"
    args = nerco_train(out, 2)
    stopped = subprocess.run(deepspeed_cmd(str(SCRIPTS / "faults.py"), "sigterm_parent", "4", "--", *args[2:]),
                             cwd=REPO, env=env(data_root), capture_output=True, text=True, timeout=300)
    output = stopped.stdout + stopped.stderr
    assert stopped.returncode != 0, output[-3000:]
    stop = re.search(r"nerco: stopped by SIGTERM at (\w+) phase .*; resume checkpoint in (\S+): run the same "
                     r"command again to continue", output)
    assert stop, output[-3000:]
    assert "Traceback" not in output
    stage = stop.group(1)
    assert json.loads((out / "resume" / stage / "latest.json").read_text())["progress"]["step"] >= 1
    resumed = launch(args, data_root)
    assert f"{stage}: resuming at phase 1" in resumed.stdout + resumed.stderr
    ours, theirs = (json.loads((d / "results.json").read_text()) for d in (out, launched[2]))
    assert ours["test"] == theirs["test"] and ours["best_dev_f1"] == theirs["best_dev_f1"]
    for name in ("contrastive/best.pt", "best.pt", "last.pt"):
        a, b = load_checkpoint(out / name)["model"], load_checkpoint(launched[2] / name)["model"]
        assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-6) for k in a), name


NO_DROPOUT = [f"model.{name}_dropout=0" for name in ("embed", "ff", "residual", "output", "word")]


@pytest.mark.parametrize("zero, then, now", [(0, 2, 1), (2, 2, 1), (2, 1, 2)])
def test_fine_tuning_killed_on_some_ranks_continues_on_others_making_the_same_micro_batches_a_step(
        tmp_path, data_root, zero, then, now):
    """Killed on ``then`` ranks, fine-tuning continues on ``now`` ranks, 2 micro-batches a step either way (2
    ranks, or 1 accumulating 2; ZeRO 2 through DeepSpeed's universal checkpoint, ZeRO 0 keeps its
    optimizer whole): with dropout off (the ranks' random streams start anew on other ranks), it ends where the
    uninterrupted run ends, to rounding. Launched with the saved accumulation it is refused with the setting
    that continues it, and its checkpoint kept. (ZeRO 3: below.)"""
    def args(out: Path, ranks: int, accum: int) -> list[str]:
        return nerco_train(out, zero, "contrastive.enabled=false", *NO_DROPOUT, f"distributed.grad_accum={accum}")

    reference, out = tmp_path / "reference", tmp_path / "run"
    launch(args(reference, then, 2 // then), data_root, ranks=then)
    kill_when(args(out, then, 2 // then), data_root, out / "resume" / "finetune" / "latest.json",
              tmp_path / "killed.log", ranks=then)
    saved = json.loads((out / "resume" / "finetune" / "latest.json").read_text())
    assert saved["progress"]["step"] >= 1
    refused = subprocess.run(deepspeed_cmd(*args(out, now, 2 // then), ranks=now), cwd=REPO, env=env(data_root),
                             capture_output=True, text=True, timeout=300)
    output = refused.stdout + refused.stderr
    assert refused.returncode != 0 and "Traceback" not in output
    assert (f"saved at 2 micro-batches a step ({then} ranks x distributed.grad_accum {2 // then}), launched with "
            f"{now} x {2 // then}: pass --set distributed.grad_accum={2 // now} to continue it") in output, output[-3000:]
    assert json.loads((out / "resume" / "finetune" / "latest.json").read_text()) == saved

    resumed = launch(args(out, now, 2 // now), data_root, ranks=now)
    log = resumed.stdout + resumed.stderr
    assert f"finetune: continuing on {now} ranks what {then} ranks saved" in log
    assert f"finetune: resuming at phase 1, epoch 1, batch {saved['progress']['batch'] * then // now} " \
           f"(step {saved['progress']['step']})" in log
    assert ("converted to DeepSpeed's universal form" in log) == (zero > 0)
    ours, theirs = (json.loads((d / "results.json").read_text()) for d in (out, reference))
    assert ours["test"] == theirs["test"] and ours["best_dev_f1"] == theirs["best_dev_f1"]
    for name in ("best.pt", "last.pt"):  # 1e-3: AdamW (lr 0.01) turns the rounding noise that is all the
        # gradient of an attention key's bias into whole steps; a lost optimizer state or step moves weights 1e-2
        a, b = load_checkpoint(out / name)["model"], load_checkpoint(reference / name)["model"]
        assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-3) for k in a), name


def test_zero3_fine_tuning_continues_only_on_the_ranks_that_saved_it(tmp_path, data_root):
    """DeepSpeed's universal form restores a ZeRO-3 model of several parameter groups wrongly, so a ZeRO-3
    checkpoint on another number of ranks is refused in one line that says how to continue it, and kept."""
    out = tmp_path / "run"
    args = nerco_train(out, 3, "contrastive.enabled=false")
    kill_when(args, data_root, out / "resume" / "finetune" / "latest.json", tmp_path / "killed.log")
    saved = sorted(p.relative_to(out) for p in (out / "resume").rglob("*"))
    refused = subprocess.run(deepspeed_cmd(*args, "--set", "distributed.grad_accum=2", ranks=1), cwd=REPO,
                             env=env(data_root), capture_output=True, text=True, timeout=300)
    output = refused.stdout + refused.stderr
    assert refused.returncode != 0 and "Traceback" not in output
    assert re.search(r"nerco: error: \S+: saved by 2 rank\(s\) under ZeRO 3, which continues only on as many .*: "
                     r"launch 2; --no-resume trains the finetune stage afresh", output), output[-3000:]
    assert sorted(p.relative_to(out) for p in (out / "resume").rglob("*")) == saved


def test_weights_frozen_in_a_later_phase_resume_as_the_earlier_phase_trained_them(tmp_path, data_root):
    """``frozen_bert`` trains the embedding tables, ``full`` freezes them: a run of one DeepSpeed process killed
    inside ``full`` continues with the tables ``frozen_bert`` left (not those the stage started from), and ends
    with the uninterrupted run's weights."""
    def command(out: Path) -> list[str]:
        sets = [f"run.out_dir={out}", "distributed.config=zero2.json", *RUN, "contrastive.enabled=false",
                "finetune.frozen_bert.optim.epochs=1", "finetune.frozen_bert.optim.batch_size=8",
                "finetune.full.freeze_embeddings=true"]
        return [sys.executable, "-m", "nerco_dist.cli", "train", "configs/tiny.yaml",
                *[a for s in sets for a in ("--set", s)]]

    reference, out = tmp_path / "reference", tmp_path / "run"
    subprocess.run(command(reference), cwd=REPO, env=env(data_root), capture_output=True, check=True, timeout=300)
    latest = out / "resume" / "finetune" / "latest.json"
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen(command(out), cwd=REPO, env=env(data_root), stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 300
        while not (latest.is_file() and json.loads(latest.read_text())["progress"]["phase"] == 1):
            assert proc.poll() is None and time.time() < deadline, (tmp_path / "killed.log").read_text()[-3000:]
            time.sleep(0.02)
    finally:
        proc.kill()
        proc.wait()
    resumed = subprocess.run(command(out), cwd=REPO, env=env(data_root), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0 and "finetune: resuming at phase 2" in resumed.stderr, resumed.stderr[-3000:]
    a, b = (load_checkpoint(d / "last.pt")["model"] for d in (out, reference))
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-6) for k in a)


def fault_pair(mode: str, out: Path, data_root: Path, *extra: str, zero: int = 2) -> list[subprocess.Popen]:
    """Two ranks of ``nerco train`` (fine-tuning, ZeRO ``zero``) started by hand, a fault injected on rank 1."""
    port = str(free_port())
    sets = [f"run.out_dir={out}", f"distributed.config=zero{zero}.json", *RUN, "finetune.full.optim.epochs=1",
            *extra]
    procs = []
    for rank in (0, 1):
        e = dict(env(data_root), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                 MASTER_PORT=port)
        cmd = [sys.executable, str(SCRIPTS / "faults.py"), mode, "2", "--", "train", "configs/tiny.yaml",
               "--stage", "finetune", *[a for s in sets for a in ("--set", s)]]
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, start_new_session=True))
    return procs


def kill_pairs(pairs: dict) -> None:
    """Every rank of ``fault_pair``'s pairs still running, with its process group."""
    for procs in pairs.values():
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


def test_a_rank_alone_when_the_process_group_forms_exits_3_with_one_line(tmp_path, data_root):
    """Rank 0 waits for a rank 1 that never starts; rank 1 (of another run) finds no rank 0: both give up after
    distributed.timeout_s with the one-line message, no traceback, exit status 3."""
    timeout_s = 5
    sets = ["distributed.config=zero2.json", *RUN, f"distributed.timeout_s={timeout_s}"]
    alone = {}
    for rank in (0, 1):
        e = dict(env(data_root), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                 MASTER_PORT=str(free_port()))
        cmd = [sys.executable, "-m", "nerco_dist.cli", "train", "configs/tiny.yaml", "--stage", "finetune",
               *[a for s in [*sets, f"run.out_dir={tmp_path / str(rank)}"] for a in ("--set", s)]]
        alone[rank] = subprocess.Popen(cmd, cwd=REPO, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                       text=True)
    message = {}
    for rank, proc in alone.items():
        _, err = proc.communicate(timeout=180)
        assert proc.returncode == 3 and "Traceback" not in err, err[-3000:]
        message[rank] = [line for line in err.splitlines() if line.startswith("nerco: error:")]
        assert len(message[rank]) == 1, err[-3000:]
        assert f"rank {rank} of 2: the process group did not form at 127.0.0.1:" in message[rank][0]
        assert f"within distributed.timeout_s={timeout_s} s" in message[rank][0]
    assert "(1 of 2 ranks joined)" in message[0][0]  # the waiting rank 0 counts who came


def test_dead_or_hung_rank_fails_the_others_and_nan_is_skipped_everywhere(tmp_path, data_root):
    timeout_s = 15
    pairs = {mode: fault_pair(mode, tmp_path / mode, data_root, f"distributed.timeout_s={timeout_s}")
             for mode in ("die", "hang", "nan")}
    started = time.time()
    try:
        finished = {}
        for mode, (rank0, rank1) in pairs.items():
            _, err = rank0.communicate(timeout=240)
            finished[mode] = (rank0.returncode, err, time.time() - started)
        code, err, _ = finished["die"]
        assert code == 3 and "lost contact with the other ranks" in err, err[-2000:]
        assert pairs["die"][1].wait(timeout=60) == 17
        code, err, _ = finished["hang"]
        assert code == 3 and "lost contact with the other ranks" in err, err[-2000:]
        code, err, _ = finished["nan"]
        assert code == 0, err[-2000:]
        assert pairs["nan"][1].wait(timeout=60) == 0
        results = json.loads((tmp_path / "nan" / "results.json").read_text())
        assert results["nonfinite_skipped"] == 1 and "test" in results
    finally:
        kill_pairs(pairs)


def test_a_rank_hung_in_backward_fails_the_other_within_the_timeout_for_every_zero_stage(tmp_path, data_root):
    """Rank 0 waits in DeepSpeed's gradient reduction (a process group DeepSpeed makes itself, which had
    torch's 30-minute default): it must give up after distributed.timeout_s all the same."""
    timeout_s = 15
    pairs = {zero: fault_pair("hang_backward", tmp_path / f"zero{zero}", data_root,
                              f"distributed.timeout_s={timeout_s}", zero=zero) for zero in (1, 2, 3)}
    try:
        for zero, (rank0, _) in pairs.items():
            _, err = rank0.communicate(timeout=300)  # start-up on a busy machine, then timeout_s
            assert rank0.returncode == 3 and "lost contact with the other ranks" in err, (zero, err[-2000:])
    finally:
        kill_pairs(pairs)


def test_local_engine_accumulation_equals_one_step_on_the_whole_batch():
    from nerco_dist.config import OptimConfig
    from nerco_dist.train.engines import build_engine

    torch.manual_seed(0)
    x, y = torch.randn(8, 3), torch.randn(8, 1)
    cfg = OptimConfig(optimizer="sgd", momentum=0.0, lr=0.1, warmup=0.0, clip_value=None, batch_size=4, epochs=1)
    after = []
    for accum, chunks in ((1, [slice(0, 8)]), (2, [slice(0, 4), slice(4, 8)])):
        torch.manual_seed(1)
        model = torch.nn.Linear(3, 1)
        engine = build_engine(model, cfg, [(list(model.parameters()), 1.0)], 2,
                              distributed=DistributedConfig(grad_accum=accum))
        for part in chunks:
            engine.backward(torch.nn.functional.mse_loss(model(x[part]), y[part]))
            engine.step()
        assert engine.steps == 1 and engine.at_boundary
        after.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.allclose(after[0], after[1], atol=1e-6)


def test_a_run_of_nonfinite_losses_aborts_with_a_message(tmp_path, data_root):
    def nan_loss(phase, loss):
        return lambda model, batch: loss(model, batch) * float("nan")

    cfg = load_config(REPO / "configs" / "tiny.yaml", [f"run.out_dir={tmp_path}", "data.limit=40",
                                                        "distributed.max_nonfinite=3"], data_root=data_root)
    with pytest.raises(NonFiniteLoss, match="3 non-finite losses in a row"):
        trainer.train(cfg, stage="finetune", wrap_loss=nan_loss)


def test_a_skipped_micro_batch_still_counts_toward_its_accumulated_step(tmp_path, data_root, caplog):
    """With 2 micro-batches a step, a non-finite loss on the second leaves every step where the sampler put it:
    the step is the first micro-batch's alone, stood in for by a zero-weighted pass of it, and the run ends
    with the weights of a run whose second loss is the first one's times zero (without the stand-in, each later
    step would take one batch of the next)."""
    def run(out: Path, second) -> list:
        calls = []

        def wrap(phase, loss):
            def wrapped(model, batch):
                calls.append(batch)
                return second(loss, model, calls[0]) if len(calls) == 2 else loss(model, batch)
            return wrapped

        cfg = load_config(REPO / "configs" / "tiny.yaml", [f"run.out_dir={out}", "data.limit=40", "run.threads=1",
                                                            "distributed.grad_accum=2", "finetune.full.optim.epochs=2"],
                          data_root=data_root)
        trainer.train(cfg, stage="finetune", wrap_loss=wrap)
        return calls

    with caplog.at_level(logging.WARNING, logger="nerco_dist"):
        skipped = run(tmp_path / "nan", lambda loss, model, first: loss(model, first) * float("nan"))
    assert [r.getMessage() for r in caplog.records if "non-finite" in r.getMessage()] == [
        "non-finite loss in phase 'full', epoch 1, batch 2: not trained on (1 in a row, 1 in all)"]
    assert skipped[2] is skipped[0]  # the stand-in pass
    # the same passes, so the same dropout draws: one thrown away, then the first batch's times zero
    zeroed = run(tmp_path / "zero", lambda loss, model, first: (loss(model, first), loss(model, first) * 0.0)[1])
    assert len(zeroed) == len(skipped) - 1
    a, b = (load_checkpoint(tmp_path / name / "last.pt")["model"] for name in ("nan", "zero"))
    assert all(torch.equal(a[k], b[k]) for k in a)
