"""End to end through the ``nerco`` CLI: train a tiny model on real data, checkpoint round trip, eval,
predict, and clean failures on bad input."""

import io
import json
import logging
import os
import re
import resource
import select
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nerco_dist.cli import main
from nerco_dist.config import load_config
from nerco_dist.data.readers import read_corpus
from nerco_dist.data.tags import entities
from nerco_dist.errors import InputError
from nerco_dist.eval.metrics import evaluate
from nerco_dist.inference import load_for_inference, predict, predict_tags

from .conftest import LIMIT, REPO, TINY, stop_signals_at_their_defaults

def test_train_writes_checkpoints_results_and_tensorboard(trained):
    results = json.loads((trained / "results.json").read_text())
    assert results["epochs_run"] == 2 and 0.0 < results["test"]["f1"] <= 1.0
    assert (trained / "best.pt").is_file() and (trained / "last.pt").is_file()
    assert any((trained / "tensorboard").iterdir())
    assert not list(trained.glob(".*.tmp"))  # atomic writes leave nothing behind


def test_checkpoint_round_trip_gives_identical_predictions(trained, data_root, tmp_path):
    """Load best.pt twice (fresh process state each time): identical predictions, equal to results.json."""
    sentences = read_corpus(data_root / "resume/dev.char.bmes").sentences[:LIMIT]
    preds = []
    for _ in range(2):
        codec, model = load_for_inference(trained / "best.pt", "cpu")
        preds.append(predict(codec, model, sentences, 64))
    assert preds[0] == preds[1]
    report = evaluate([s.tags for s in sentences], preds[0])
    assert report.f1 == pytest.approx(json.loads((trained / "results.json").read_text())["test"]["f1"], abs=1e-12)


def test_eval_prints_table_and_writes_json(trained, dev_subset, tmp_path, capsys):
    out = tmp_path / "report.json"
    assert main(["eval", str(trained / "best.pt"), "--data", str(dev_subset),
                 "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "micro" in printed and "Type Acc" in printed
    report = json.loads(out.read_text())
    assert report["f1"] == pytest.approx(json.loads((trained / "results.json").read_text())["test"]["f1"])
    rows = report["f1_by_length"]
    assert sum(r["sentences"] for r in rows) == LIMIT and sum(r["gold_entities"] for r in rows) == report["n_gold"]
    assert out.with_suffix(".length.csv").is_file()
    assert out.with_suffix(".length.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_refuses_a_file_without_gold_entities(trained, tmp_path, capsys):
    """All-zero scores with exit status 0 would read as a (terrible) measurement."""
    data = tmp_path / "unlabelled.bmes"
    data.write_text("高 O\n勇 O\n\n男 O\n", encoding="utf-8")
    assert main(["eval", str(trained / "best.pt"), "--data", str(data), "--output", str(tmp_path / "r.json")]) == 2
    assert capsys.readouterr().err.startswith(f"nerco: error: {data}: no gold entities")
    assert not (tmp_path / "r.json").exists()


def test_eval_warns_of_gold_types_the_model_never_saw(trained, tmp_path, caplog):
    data = tmp_path / "planets.bmes"
    data.write_text("高 B-NAME\n勇 E-NAME\n去 O\n火 B-PLANET\n星 E-PLANET\n\n木 S-MOON\n", encoding="utf-8")
    assert main(["eval", str(trained / "best.pt"), "--data", str(data), "--output", str(tmp_path / "r.json")]) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert [w for w in warnings if "not trained on" in w] == [
        f"{data}: entity types the model was not trained on (it cannot predict them, so they count as misses): "
        "MOON, PLANET"]


NO_TENSORBOARD = """import sys
sys.modules["tensorboard"] = sys.modules["torch.utils.tensorboard"] = None  # as if not installed
from nerco_dist.cli import main
code = main(sys.argv[1:])
assert not [m for m in sys.modules if m.startswith("nerco_dist.train")], "inference imported training code"
sys.exit(code)
"""


def test_eval_and_predict_need_no_training_code_nor_tensorboard(trained, dev_subset, tmp_path):
    text = tmp_path / "raw.txt"
    text.write_text("高勇，男，中国国籍。\n", encoding="utf-8")
    for args in (["eval", str(trained / "best.pt"), "--data", str(dev_subset), "--output", str(tmp_path / "r.json")],
                 ["predict", str(trained / "best.pt"), str(text)]):
        proc = subprocess.run([sys.executable, "-c", NO_TENSORBOARD, *args], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["text"] == "高勇，男，中国国籍。"


def test_predict_raw_text_json_lines(trained, tmp_path):
    """One JSON line per input line, blank lines included: a consumer can pair them up by position. Each line's
    entities are those of the line tagged alone, a line longer than max_len (60) included."""
    text = tmp_path / "raw.txt"
    lines = ["高勇，男，中国国籍，无境外居留权。", "", "   ", "\t", "\u3000", "1966年出生，汉族，中共党员，本科学历，工程师。",
             "王明，男，1972年出生，中国国籍，研究生学历，高级经济师，现任浙江省杭州市某某科技股份有限公司董事长、总经理，"
             "兼任北京大学光华管理学院客座教授。", "李华"]
    text.write_text("\n".join(lines) + "\n", encoding="utf-8")
    proc = subprocess.run([sys.executable, "-m", "nerco_dist.cli", "predict", str(trained / "best.pt"), str(text),
                           "--batch-size", "2"], capture_output=True, text=True, check=True)
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["text"] for r in rows] == lines
    assert rows[1:5] == [{"text": t, "entities": []} for t in lines[1:5]]
    codec, model = load_for_inference(trained / "best.pt", "cpu")
    from nerco_dist.data.readers import Sentence

    assert len(lines[6]) > 60
    for i in (0, 5, 6, 7):
        expected = predict_tags(codec, model, [Sentence(list(lines[i]), ["O"] * len(lines[i]))], 8, torch.device("cpu"))
        found = [(e["start"], e["end"], e["type"]) for e in rows[i]["entities"]]
        assert found == [tuple(e) for e in entities(expected[0])], lines[i]
    assert rows[0]["entities"] and rows[6]["entities"]  # the comparison is not of empty lists alone
    for r in rows:
        for e in r["entities"]:
            assert r["text"][e["start"]:e["end"]] == e["mention"]


def test_predict_takes_a_lone_cr_as_a_line_break(trained, tmp_path):
    """As the corpus readers do: a file with old Mac line ends gives a JSON line per line, no entity across."""
    text = tmp_path / "cr.txt"
    text.write_bytes("张三毕业于北京大学\r李四，男，汉族\r\n王五\r".encode("utf-8"))
    proc = subprocess.run([sys.executable, "-m", "nerco_dist.cli", "predict", str(trained / "best.pt"), str(text)],
                          capture_output=True, text=True, check=True)
    assert [json.loads(line)["text"] for line in proc.stdout.splitlines()] == ["张三毕业于北京大学", "李四，男，汉族", "王五"]


def test_predict_batches_the_arrived_lines_by_length_and_writes_each_answer_once_those_before_it_are(
        trained, tmp_path, monkeypatch):
    """All the lines read at once are sorted by length into batches (not each batch of lines as read), and an
    answer is written as soon as its line and every line before it are tagged. Lines of x's: the lexicon has no
    word of them, so a line's lattice is its characters and its length names it."""
    from nerco_dist.model.tagger import NerTagger

    lengths = [5, 1, 9, 3, 0, 7, 2, 8, 0, 4, 6]  # 0: a blank line, never given to the model
    text = tmp_path / "lines.txt"
    text.write_text("".join("x" * n + "\n" for n in lengths), encoding="utf-8")
    out, calls, tag = io.StringIO(), [], NerTagger.predict

    def recording(model, batch):
        assert torch.equal(batch["lattice_mask"].sum(1), batch["char_mask"].sum(1))  # no word in any lattice
        calls.append((batch["char_mask"].sum(1).tolist(), out.getvalue().count("\n")))
        return tag(model, batch)

    monkeypatch.setattr(NerTagger, "predict", recording)
    monkeypatch.setattr(sys, "stdout", out)
    assert main(["predict", str(trained / "best.pt"), str(text), "--batch-size", "3"]) == 0
    assert [json.loads(line)["text"] for line in out.getvalue().splitlines()] == ["x" * n for n in lengths]
    assert [batch for batch, _ in calls] == [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
    # before batch k: the lines before the first one that batches 0..k-1 did not hold (a blank line needs none)
    assert [written for _, written in calls] == [0, 0, 2]


GOOD_AND_BAD = "高勇，男，中国国籍。\n".encode() + "王明在".encode() + b"\xff\xfe" + "北京。\n\n1966年出生。\n".encode()


def test_predict_line_not_utf8_is_an_error_after_every_other_line(trained, tmp_path):
    """Strict UTF-8 per line, from a file as from standard input: the bad line is named, every other line gets
    its JSON line (valid UTF-8), and the exit status is 2."""
    raw = tmp_path / "raw.txt"
    raw.write_bytes(GOOD_AND_BAD)
    for source, stdin, name in ((str(raw), None, str(raw)), ("-", GOOD_AND_BAD, "<stdin>")):
        proc = subprocess.run([sys.executable, "-m", "nerco_dist.cli", "predict", str(trained / "best.pt"), source],
                              input=stdin, capture_output=True)
        assert proc.returncode == 2, proc.stderr.decode(errors="replace")[-2000:]
        assert f"nerco: error: {name}:2: not valid UTF-8 (byte 0xff".encode() in proc.stderr
        rows = [json.loads(line) for line in proc.stdout.decode("utf-8").splitlines()]  # strict: valid UTF-8
        assert [r["text"] for r in rows] == ["高勇，男，中国国籍。", "", "1966年出生。"]


def test_predict_skip_bad_lines_warns_and_goes_on(trained, monkeypatch, capsys, caplog):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(GOOD_AND_BAD)))
    assert main(["predict", str(trained / "best.pt"), "--skip-bad-lines", "--batch-size", "1"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["text"] for r in rows] == ["高勇，男，中国国籍。", "", "1966年出生。"]
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
        "<stdin>:2: not valid UTF-8 (byte 0xff at byte 10 of the line); line skipped"]


def test_predict_answers_each_line_while_the_input_is_still_open(trained):
    """predict can sit in a pipe: a line's JSON line comes out before the next line is written."""
    proc = subprocess.Popen([sys.executable, "-m", "nerco_dist.cli", "predict", str(trained / "best.pt")],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        for text in ("高勇，男，中国国籍。", "1966年出生，汉族。"):
            proc.stdin.write(text.encode() + b"\n")
            proc.stdin.flush()
            ready, _, _ = select.select([proc.stdout], [], [], 120)
            assert ready, f"no output for {text!r} while the input is open"
            assert json.loads(proc.stdout.readline())["text"] == text
        proc.stdin.close()
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()


def test_ctrl_c_stops_predict_with_status_130_and_no_traceback(trained):
    proc = subprocess.Popen([sys.executable, "-m", "nerco_dist.cli", "predict", str(trained / "best.pt")],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=stop_signals_at_their_defaults)
    try:
        proc.stdin.write("高勇，男，中国国籍。\n".encode())
        proc.stdin.flush()
        assert json.loads(proc.stdout.readline())["text"] == "高勇，男，中国国籍。"  # waiting for the next line now
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 128 + signal.SIGINT
        err = proc.stderr.read().decode()
        assert err.rstrip().endswith("nerco: interrupted") and "Traceback" not in err, err
    finally:
        proc.kill()


def test_predict_stops_quietly_when_its_reader_leaves(trained, tmp_path):
    """``nerco predict ... | head -n 1``: no traceback once the reader has closed the pipe."""
    text = tmp_path / "many.txt"
    text.write_text("高勇，男，中国国籍。\n" * 3000, encoding="utf-8")
    proc = subprocess.Popen([sys.executable, "-m", "nerco_dist.cli", "predict", str(trained / "best.pt"), str(text)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert json.loads(proc.stdout.readline())["text"] == "高勇，男，中国国籍。"
    proc.stdout.close()
    assert proc.wait(timeout=120) == 128 + signal.SIGPIPE
    assert b"Traceback" not in proc.stderr.read()


def test_predict_to_a_full_device_is_an_error(trained, tmp_path):
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full here")
    text = tmp_path / "raw.txt"
    text.write_text("高勇，男，中国国籍。\n" * 3, encoding="utf-8")
    with open("/dev/full", "w") as full:
        proc = subprocess.run([sys.executable, "-m", "nerco_dist.cli", "predict", str(trained / "best.pt"), str(text)],
                              stdout=full, stderr=subprocess.PIPE, text=True)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines()[-1] == "nerco: error: standard output: cannot write: No space left on device"
    assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr, proc.stderr


def test_predict_with_its_standard_output_closed_is_an_error(trained):
    """``nerco predict ... >&-``: Python starts with no ``sys.stdout``; the answers would vanish silently."""
    proc = subprocess.run([sys.executable, "-m", "nerco_dist.cli", "predict", str(trained / "best.pt")],
                          input="高勇\n", stderr=subprocess.PIPE, text=True, preexec_fn=lambda: os.close(1))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == "nerco: error: standard output: closed: nowhere to write the JSON lines\n"


@pytest.mark.parametrize("device, problem", [
    ("cuda", "torch sees no CUDA device here (allowed here: auto, cpu)"),
    ("cuda:0", "torch sees no CUDA device here (allowed here: auto, cpu)"),
    ("gpu", "not a device (allowed: auto, cpu, cuda, cuda:N)")])
def test_eval_and_predict_refuse_a_device_this_machine_lacks(trained, dev_subset, device, problem):
    if device.startswith("cuda") and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    for argv in (["eval", str(trained / "best.pt"), "--data", str(dev_subset)], ["predict", str(trained / "best.pt")]):
        proc = run_cli(*argv, "--device", device)
        assert (proc.returncode, proc.stderr) == (2, f"nerco: error: --device={device}: {problem}\n")


def test_eval_predict_and_analyze_take_threads_and_default_to_auto(trained, dev_subset, tmp_path, monkeypatch,
                                                                     caplog):
    """4 cores, a load of 2.2: auto leaves the 2 busy cores (2.2 rounds to 2) and takes the other 2."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(4)), raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    monkeypatch.setattr(os, "getloadavg", lambda: (2.2, 0.0, 0.0))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.delenv("LOCAL_SIZE", raising=False)
    text = tmp_path / "raw.txt"
    text.write_text("高勇\n", encoding="utf-8")
    commands = {"eval": ["eval", str(trained / "best.pt"), "--data", str(dev_subset), "--output",
                         str(tmp_path / "r.json")],
                "predict": ["predict", str(trained / "best.pt"), str(text)],
                "analyze": ["analyze", "--baseline", str(trained / "best.pt"), "--nerco", str(trained / "best.pt"),
                            "--data", str(dev_subset), "--out", str(tmp_path / "analysis"), "--tsne-tokens", "30"]}
    for name, argv in commands.items():
        caplog.clear()
        torch.set_num_threads(1)
        with caplog.at_level(logging.INFO, logger="nerco_dist"):
            assert main(argv) == 0
        assert torch.get_num_threads() == 2, name
        assert "--threads=auto: 2 torch threads (4 cores, 2.2 busy, 1 rank on this node)" in caplog.messages
        assert main(argv + ["--threads", "3"]) == 0 and torch.get_num_threads() == 3, name
    for value in ("-1", "many"):
        proc = run_cli(*commands["predict"], "--threads", value)
        assert proc.returncode == 2 and "--threads: expected auto or a whole number >= 0" in proc.stderr, proc.stderr


@pytest.mark.parametrize("value", ["0", "-1", "many"])
def test_eval_and_predict_refuse_a_batch_size_below_one(trained, dev_subset, value):
    for argv in (["eval", str(trained / "best.pt"), "--data", str(dev_subset)], ["predict", str(trained / "best.pt")]):
        proc = run_cli(*argv, "--batch-size", value)
        assert proc.returncode == 2 and "--batch-size: expected a whole number >= 1" in proc.stderr, proc.stderr


def test_long_sentences_are_evaluated_whole(trained, tmp_path):
    """A sentence longer than max_len (60 in tiny.yaml) is cut into pieces and joined back: one prediction of full
    length per input sentence."""
    codec, model = load_for_inference(trained / "best.pt", "cpu")
    from nerco_dist.data.readers import Sentence

    long = Sentence(list("高勇，男，中国国籍，无境外居留权。" * 9), ["O"] * 153)
    pred = predict_tags(codec, model, [long], 8, torch.device("cpu"))
    assert len(pred) == 1 and len(pred[0]) == 153
    assert len(codec.encode([long], with_labels=False)) > 1


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "nerco_dist.cli", *args], capture_output=True, text=True)


def test_bad_corpus_exits_nonzero_with_file_and_line(tmp_path, data_root):
    bad = tmp_path / "bad.bmes"
    bad.write_text("中 B-ORG\n国 Q-ORG\n", encoding="utf-8")
    proc = run_cli("train", str(TINY), "--data-root", str(data_root), "--set", f"data.train={bad}",
                   "--set", f"run.out_dir={tmp_path / 'out'}")
    assert proc.returncode == 2
    assert f"{bad}:2" in proc.stderr and "ill-formed tag" in proc.stderr
    assert not (tmp_path / "out" / "best.pt").exists()


def test_bad_config_and_checkpoint(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("finetune:\n  full:\n    optim:\n      lr: 0.1\n      epochz: 3\n")
    proc = run_cli("train", str(cfg))
    assert proc.returncode == 2 and "epochz" in proc.stderr
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    proc = run_cli("predict", str(junk))
    assert proc.returncode == 2 and "not a readable checkpoint" in proc.stderr


def test_bert_name_that_is_not_a_directory_is_refused(tmp_path, data_root):
    proc = run_cli("train", str(TINY), "--data-root", str(data_root), "--set", "model.bert=bert-base-chinese",
                   "--set", f"run.out_dir={tmp_path}")
    assert proc.returncode == 2 and "download" in proc.stderr


def test_base_config_is_merged_under_the_file(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("finetune:\n  full:\n    patience: 4\n    optim:\n      lr: 0.1\n      epochs: 3\nmodel:\n  hidden: 64\n")
    child = tmp_path / "child.yaml"
    child.write_text("base: base.yaml\nfinetune:\n  full:\n    optim:\n      epochs: 7\n")
    cfg = load_config(child)  # merged at every depth
    full = cfg.finetune.full
    assert (full.optim.lr, full.optim.epochs, full.patience, cfg.model.hidden) == (0.1, 7, 4, 64)
    loop = tmp_path / "loop.yaml"
    loop.write_text("base: loop.yaml\n")
    with pytest.raises(Exception, match="loops"):
        load_config(loop)
    nerco = load_config(REPO / "configs" / "weibo_nerco.yaml")
    assert nerco.contrastive.enabled and nerco.contrastive.temperature == 0.08
    assert nerco.data.format == "weibo" and nerco.contrastive.phase.optim.batch_size == 40
    baseline = load_config(REPO / "configs" / "weibo.yaml").finetune
    assert nerco.finetune.full == baseline.full and baseline.head.optim.epochs == 0  # the baseline's one phase
    assert nerco.finetune.head.optim.epochs > 0  # NerCo's head phase comes first


def test_the_stage_optimiser_is_stated_once_and_each_phase_says_what_differs(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("finetune:\n  optim: {optimizer: sgd, lr: 0.002, momentum: 0.8}\n"
                    "  head: {optim: {optimizer: adamw, epochs: 3}}\n  full: {optim: {epochs: 7, lr: 0.001}}\n")
    cfg = load_config(path)
    head, full, frozen = cfg.finetune.head.optim, cfg.finetune.full.optim, cfg.finetune.frozen_bert.optim
    assert (head.optimizer, head.lr, head.momentum, head.epochs) == ("adamw", 0.002, 0.8, 3)
    assert (full.optimizer, full.lr, full.momentum, full.epochs) == ("sgd", 0.001, 0.8, 7)
    assert (frozen.optimizer, frozen.lr, frozen.epochs) == ("sgd", 0.002, 0)  # still skipped: 0 epochs
    path.write_text("finetune:\n  optim: {epochs: 5}\n")
    with pytest.raises(InputError, match="finetune.optim.epochs: epochs are set per phase"):
        load_config(path)


def test_an_overlay_file_changes_only_what_it_says(tmp_path):
    overlay = tmp_path / "budget.yaml"
    overlay.write_text("contrastive:\n  phase:\n    patience: 5\n    optim: {epochs: 30}\n")
    plain = load_config(REPO / "configs" / "weibo_nerco.yaml")
    budget = load_config(REPO / "configs" / "weibo_nerco.yaml", ["run.seed=4"], [overlay])
    assert (budget.contrastive.phase.optim.epochs, budget.contrastive.phase.patience, budget.run.seed) == (30, 5, 4)
    assert budget.contrastive.phase.optim.lr == plain.contrastive.phase.optim.lr and budget.finetune == plain.finetune
    shipped = load_config(REPO / "configs" / "weibo_nerco.yaml", [], [REPO / "configs" / "budget" / "cpu.yaml"])
    assert shipped == budget.__class__.from_dict({**budget.to_dict(), "run": plain.to_dict()["run"]})


def test_overrides_are_typed():
    cfg = load_config(TINY, ["finetune.full.optim.lr=0.5", "model.bert=null", "data.max_len=7"])
    assert cfg.finetune.full.optim.lr == 0.5 and cfg.model.bert is None and cfg.data.max_len == 7


def test_exponent_floats_are_floats_in_files_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("base: " + str(TINY) + "\nfinetune:\n  full:\n    optim:\n      lr: 1e-3\n      weight_decay: 0\n")
    cfg = load_config(path, ["contrastive.phase.optim.lr=3e-4"])  # YAML 1.1 reads '1e-3' as a string
    full = cfg.finetune.full.optim
    assert full.lr == 0.001 and cfg.contrastive.phase.optim.lr == 0.0003 and type(full.weight_decay) is float


@pytest.mark.parametrize("override, message", [
    ("finetune.full.optim.epochs=2.5", "finetune.full.optim.epochs: expected int, got 2.5"),
    ("finetune.full.optim.epochs=true", "finetune.full.optim.epochs: expected int, got True"),
    ("contrastive.enabled=1", "contrastive.enabled: expected bool, got 1"),
    ("finetune.full.optim.lr=fast", "finetune.full.optim.lr: expected float, got 'fast'"),
    ("run.device=3", "run.device: expected str, got 3"),
    ("finetune.head.hand_off=first", "finetune.head.hand_off='first': expected one of last, best"),
    ("data.max_len=null", "data.max_len: expected int, got None"),
])
def test_values_of_the_wrong_type_are_refused_by_name(override, message):
    with pytest.raises(InputError, match=re.escape(message)):
        load_config(TINY, [override])


@pytest.mark.parametrize("key, moved_to", [
    ("train.lr=0.1", "train.lr -> finetune.full.optim.lr"),
    ("train.head_only_epochs=1", "train.head_only_epochs -> finetune.head.optim.epochs"),
    ("contrastive.epochs=3", "contrastive.epochs has moved to contrastive.phase.optim.epochs"),
    ("contrastive.joint=true", "contrastive.joint has moved to ablation.joint"),
    ("train.seed=2", "train.seed -> run.seed"),
])
def test_a_key_that_moved_is_refused_naming_its_new_place(key, moved_to):
    with pytest.raises(InputError, match=re.escape(moved_to)):
        load_config(TINY, [key])


def test_a_retired_key_at_its_old_default_is_dropped_and_at_any_other_refused():
    """A stored config of an earlier version (``distributed.base_batch: 0``, each phase's own batch) reads as
    today's default; a base set there applied to every phase, so that is refused, naming the key per phase."""
    assert load_config(TINY, ["distributed.base_batch=0"]) == load_config(TINY)
    with pytest.raises(InputError, match=re.escape("distributed.base_batch has moved to PHASE.optim.base_batch")):
        load_config(TINY, ["distributed.base_batch=10"])


def test_every_shipped_config_loads():
    for path in sorted((REPO / "configs").glob("*.yaml")):
        load_config(path)


@pytest.mark.parametrize("command", ["train", "eval", "predict"])
def test_help_on_every_subcommand(command):
    proc = run_cli(command, "--help")
    assert proc.returncode == 0 and "usage" in proc.stdout


HEAVY = ("torch", "deepspeed", "transformers", "triton", "matplotlib", "numpy", "jieba", "seqeval", "gensim", "tqdm")
LOADED_AFTER = """import sys
from nerco_dist.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
print(*sorted(sys.modules), sep="\\n", file=sys.stderr)
"""


@pytest.mark.parametrize("command", [[], ["train"], ["vectors"], ["eval"], ["predict"], ["analyze"]])
def test_help_imports_no_heavy_library(command):
    """Each command imports what it uses when it runs; ``--help`` runs none."""
    proc = subprocess.run([sys.executable, "-c", LOADED_AFTER, *command, "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: nerco"), proc.stderr[-2000:]
    loaded = proc.stderr.split()
    assert "nerco_dist.cli" in loaded
    assert [m for m in loaded if m.split(".")[0] in HEAVY] == []


def test_help_costs_a_small_fraction_of_a_cpu_second():
    """CPU time (user + system) of the whole child, the interpreter's start included: under 0.3 s. It took
    about 1.1 s when every command paid for torch. The least of three runs, so that one disturbed run on a
    busy machine does not decide."""
    def cpu_seconds() -> float:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        subprocess.run([sys.executable, "-m", "nerco_dist.cli", "--help"], capture_output=True, check=True)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        return after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime

    assert min(cpu_seconds() for _ in range(3)) < 0.3
