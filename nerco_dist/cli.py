"""``nerco``: train, evaluate and predict from the command line."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Iterator

from .data.tags import entities
from .errors import InputError

log = logging.getLogger("nerco_dist")


def _train(args: argparse.Namespace, wrap_loss=None) -> int:
    """``nerco train``; ``wrap_loss`` is ``train``'s seam for a test's own loss."""
    from . import distributed
    from .config import default_data_root, load_config
    from .train.stopping import StopRequested
    from .train.steps import NonFiniteLoss
    from .train.trainer import train

    cfg = load_config(args.config, args.set, args.overlays, data_root=default_data_root(args.data_root))
    try:
        results = train(cfg, args.stage, Path(args.init) if args.init else None,
                        resume=not args.no_resume, wrap_loss=wrap_loss)
        if distributed.is_main() and "test" in results:
            t = results["test"]
            print(f"test P {100 * t['precision']:.2f} R {100 * t['recall']:.2f} F1 {100 * t['f1']:.2f} "
                  f"(best dev epoch {results['best_epoch']}, {results['wall_time_s']:.0f} s)")
        return 0
    except (NonFiniteLoss, distributed.PeerLost) as err:
        print(f"nerco: error: {err}", file=sys.stderr)
        return 3
    except StopRequested as stop:  # every rank stops here together; rank 0 says how to go on
        if distributed.is_main():
            again = " again to continue" if stop.checkpoint else ""
            print(f"\nnerco: {stop}: run the same command{again}", file=sys.stderr, flush=True)
        return stop.exit_status
    except KeyboardInterrupt:  # a second Ctrl-C, or one before training began
        print(f"\nnerco: interrupted at once: the same command continues from the last resume checkpoint in "
              f"{cfg.run.out_dir}/resume, if there is one", file=sys.stderr, flush=True)
        return 128 + signal.SIGINT
    except Exception as err:
        if distributed.world_size() > 1 and distributed.is_peer_failure(err):
            # another rank died or hung: say so and leave now (tearing down a broken process group can hang)
            print(f"\nnerco: error: rank {distributed.rank()}: lost contact with the other ranks "
                  f"({type(err).__name__}: {str(err).strip()[:300]}); a rank died, hung for more than "
                  f"distributed.timeout_s={cfg.distributed.timeout_s:g} s or failed: see its log", file=sys.stderr,
                  flush=True)
            os._exit(3)
        raise
    finally:  # not after a peer failure (os._exit): tearing down a broken process group can hang
        distributed.leave()


def _inference_setup(args: argparse.Namespace) -> str:
    """``eval``/``predict``/``analyze``: torch's threads from ``--threads`` and the device ``--device`` names,
    resolved (a device this machine lacks is refused here, before any file is read)."""
    from .distributed import device_for_rank
    from .machine import apply_threads

    device = device_for_rank(args.device, "--device")
    apply_threads(args.threads, "--threads")
    return str(device)


def _eval(args: argparse.Namespace) -> int:
    from .atomic import write_json
    from .eval.metrics import evaluate, f1_by_length, write_length_csv
    from .inference import evaluate_checkpoint

    device = _inference_setup(args)
    gold, pred = evaluate_checkpoint(Path(args.checkpoint), Path(args.data), args.batch_size, device, args.format)
    report = evaluate(gold, pred)
    print(report.format_table())
    out = Path(args.output) if args.output else Path(args.checkpoint).with_suffix(".eval.json")
    name = str(args.checkpoint)
    by_length = {name: f1_by_length(gold, pred)}
    write_json(out, dict(checkpoint=name, data=str(args.data), **report.to_dict(),
                         f1_by_length=[row._asdict() for row in by_length[name]]))
    write_length_csv(by_length, out.with_suffix(".length.csv"))
    print("F1 by sentence length: " + "; ".join(f"{row.bucket}: {100 * row.f1:.2f} ({row.sentences} sentences)"
                                                for row in by_length[name] if row.sentences))
    written = [out, out.with_suffix(".length.csv")]
    try:
        from .eval.plots import plot_f1_by_length

        plot_f1_by_length(by_length, out.with_suffix(".length.png"), title=f"F1 by sentence length, {args.data}")
        written.append(out.with_suffix(".length.png"))
    except ImportError as err:
        log.warning("F1-by-length plot skipped: %s", err)
    print("wrote " + ", ".join(map(str, written)))
    return 0


# predict tags the lines that have arrived together, sorted by length into batches, up to this many bytes of
# them (a file gives that much at once, a pipe what it holds: 64 KiB on Linux)
WINDOW_BYTES = 1 << 20


def _predict(args: argparse.Namespace) -> int:
    """One JSON line per input line, in order, each written as soon as it and every line before it are tagged
    (so that predict can sit in a pipe). A line that is not UTF-8 gets no JSON line: it is an error (exit
    status 2, once every other line is written) or, with ``--skip-bad-lines``, a warning."""
    from .inference import load_for_inference

    if sys.stdout is None:  # started with its standard output closed (``>&-``)
        raise InputError("standard output", "closed: nowhere to write the JSON lines")
    device = _inference_setup(args)
    if args.input == "-":
        name, stream = "<stdin>", contextlib.nullcontext(sys.stdin.buffer)
    elif Path(args.input).is_file():
        name, stream = args.input, open(args.input, "rb")
    else:
        raise InputError(args.input, "file not found")
    codec, model = load_for_inference(Path(args.checkpoint), device, tagging=True)
    bad_lines = 0
    try:
        with stream as lines:
            for arrived in _arrived_lines(lines, WINDOW_BYTES):
                texts, bad = _decoded_lines(arrived, name, args.skip_bad_lines)
                bad_lines += bad
                for rows in _answers(codec, model, texts, args.batch_size):
                    _write(rows)
    except BrokenPipeError:  # the reader left (`nerco predict ... | head`): stop quietly, as cat does
        _stdout_to_devnull()
        return 128 + signal.SIGPIPE
    return 2 if bad_lines and not args.skip_bad_lines else 0


def _arrived_lines(stream, window: int) -> Iterator[list[tuple[int, bytes]]]:
    """The numbered lines of a binary stream (line break removed), in groups of those already read: ``read1``
    returns what has arrived, up to ``window`` bytes, without waiting for more, so a line is never held back
    for the ones after it."""
    lineno, pending = 0, b""
    while chunk := stream.read1(window):
        *complete, pending = (pending + chunk).split(b"\n")
        complete = [part for line in complete for part in _cr_parts(line)]
        if complete:
            yield list(enumerate(complete, start=lineno + 1))
            lineno += len(complete)
    if pending:
        yield list(enumerate(_cr_parts(pending), start=lineno + 1))


def _cr_parts(line: bytes) -> list[bytes]:
    """A line whose ``\\n`` is removed, cut at each lone ``\\r`` (a line break too, as the corpus readers
    take it); the ``\\r`` of a ``\\r\\n`` is removed."""
    return (line[:-1] if line.endswith(b"\r") else line).split(b"\r")


def _decoded_lines(numbered: list[tuple[int, bytes]], name: str, skip_bad_lines: bool) -> tuple[list[str], int]:
    """The lines that are UTF-8, as text, and how many were not (each one reported as it is met: an error
    line, or a warning with ``skip_bad_lines``)."""
    texts, bad = [], 0
    for lineno, raw in numbered:
        try:
            texts.append(_decoded(raw, name, lineno))
        except InputError as err:
            bad += 1
            if skip_bad_lines:
                log.warning("%s; line skipped", err)
            else:
                print(f"nerco: error: {err}", file=sys.stderr, flush=True)
    return texts, bad


def _decoded(raw: bytes, name: str, lineno: int) -> str:
    """A line as text, decoded strictly (the CR of a CRLF line end and a first line's BOM removed)."""
    try:
        text = raw.rstrip(b"\r").decode("utf-8")
    except UnicodeDecodeError as err:
        raise InputError(name, f"not valid UTF-8 (byte 0x{raw[err.start]:02x} at byte {err.start + 1} of the line)",
                         lineno) from None
    return text[1:] if lineno == 1 and text.startswith("\ufeff") else text


def _answers(codec, model, texts: list[str], batch_size: int) -> Iterator[list[str]]:
    """The JSON lines of ``texts`` in their order, handed over after each batch the model tags (the batches
    hold lines of similar length) as far as every line before them is tagged too. A blank line has no
    entities and is not given to the model."""
    from .data.readers import Sentence
    from .inference import model_device, tags_by_batch

    tagged = [i for i, text in enumerate(texts) if text.strip()]
    rows = [None if text.strip() else _json_line(text, []) for text in texts]
    sentences = [Sentence(list(texts[i]), ["O"] * len(texts[i])) for i in tagged]
    ready = 0  # rows[:ready] are handed over
    for done in tags_by_batch(codec, model, sentences, batch_size, model_device(model)):
        for k, tags in done:
            rows[tagged[k]] = _json_line(texts[tagged[k]], tags)
        start = ready
        while ready < len(rows) and rows[ready] is not None:
            ready += 1
        yield rows[start:ready]
    yield rows[ready:]  # the blank lines after the last tagged one


def _json_line(text: str, tags: list[str]) -> str:
    found = [dict(start=e.start, end=e.end, type=e.type, mention=text[e.start : e.end]) for e in entities(tags)]
    return json.dumps(dict(text=text, entities=found), ensure_ascii=False) + "\n"


def _write(rows: list[str]) -> None:
    """JSON lines to standard output, flushed so that a reader in a pipe has them now. A write that fails (a
    full disk, ``> /dev/full``) is an error naming why; a reader that left (BrokenPipeError) is the caller's."""
    if not rows:
        return
    try:
        sys.stdout.write("".join(rows))
        sys.stdout.flush()
    except BrokenPipeError:
        raise
    except OSError as err:
        _stdout_to_devnull()
        raise InputError("standard output", f"cannot write: {err.strerror or err}") from None


def _stdout_to_devnull() -> None:
    """Standard output becomes /dev/null, so that what is left in its buffer cannot fail again at exit."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _vectors(args: argparse.Namespace) -> int:
    from .config import DataConfig, default_data_root, resolve_data_path
    from .data.lexicon import Lexicon
    from .data.vectors import build_vectors, check_options

    check_options(args.dim, args.epochs, args.min_count, args.window, args.workers)
    root = default_data_root(args.data_root)
    words_by_lexicon = "word" in args.kinds and args.segmenter == "fmm"
    lexicon = Lexicon.load(DataConfig(root=str(root), lexicon=args.lexicon).lexicon_reference()) \
        if words_by_lexicon else None
    written = build_vectors([resolve_data_path(p, root) for p in args.raw],
                            [resolve_data_path(p, root) for p in args.corpus], lexicon, Path(args.out),
                            dim=args.dim, epochs=args.epochs, min_count=args.min_count, window=args.window,
                            seed=args.seed, workers=args.workers, segmenter=args.segmenter, kinds=args.kinds)
    print("wrote " + ", ".join(map(str, written.values())))
    return 0


def _analyze(args: argparse.Namespace) -> int:
    from .analysis import analyze

    device = _inference_setup(args)
    summary = analyze(Path(args.baseline), Path(args.nerco), Path(args.data), Path(args.out),
                      stage1=Path(args.stage1) if args.stage1 else None, tsne_tokens=args.tsne_tokens, seed=args.seed,
                      device=device)
    for name, s in summary.items():
        print(f"{name:10s} F1 {100 * s['f1']:.2f}  Span F {100 * s['span_f']:.2f}  Type Acc {100 * s['type_acc']:.2f}")
    print(f"wrote {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nerco", description="NerCo Chinese NER: FLAT (+BERT) + CRF")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    # the deepspeed launcher passes --local_rank=N before the subcommand; LOCAL_RANK is read from the environment
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_vectors(sub)
    _add_inference(sub)
    return parser


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a tagger from a YAML config",
                       description="Train a tagger from a YAML config. Ctrl-C (SIGINT), SIGTERM or SIGHUP (a closed "
                                   "terminal) stops after the next optimizer step with a resume checkpoint (exit "
                                   "status 130 / 143 / 129); the same command continues from it.")
    p.add_argument("config", help="YAML config (see configs/)")
    p.add_argument("overlays", nargs="*", metavar="OVERLAY",
                   help="YAML files merged over CONFIG in order, saying only what they change (configs/budget/cpu.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value (repeatable), e.g. --set finetune.full.optim.epochs=5")
    p.add_argument("--data-root", help="root of the corpus paths in the config (default $NERCO_DATA_ROOT or data/)")
    p.add_argument("--stage", choices=("contrastive", "finetune", "both"),
                   help="which stage(s) to run (default: both when contrastive.enabled, else finetune)")
    p.add_argument("--init", help="stage-1 checkpoint for fine-tuning to start from")
    p.add_argument("--no-resume", action="store_true",
                   help="start afresh instead of continuing from the resume checkpoints in run.out_dir")
    p.add_argument("--local_rank", "--local-rank", type=int, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    p.set_defaults(func=_train)


def _add_vectors(sub) -> None:
    from .data.vectors import KINDS, MIN_COUNT, SEGMENTERS

    p = sub.add_parser("vectors", help="train character, bigram and word vectors (word2vec text files)")
    p.add_argument("out", help="folder for char.vec, bigram.vec, word.vec")
    p.add_argument("--raw", action="append", default=[], help="raw text file, one paragraph per line (repeatable)")
    p.add_argument("--corpus", action="append", default=[],
                   help="labelled TRAINING split whose characters are added (repeatable; never a test split)")
    p.add_argument("--lexicon", help="segments the words (--segmenter fmm): as data.lexicon (default jieba's "
                                     "dictionary; a+b: a union)")
    p.add_argument("--segmenter", choices=SEGMENTERS, default="fmm",
                   help="word tokens by forward maximum matching against --lexicon, or by jieba's segmentation")
    p.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    p.add_argument("--dim", type=int, default=50)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--min-count", type=int, default=MIN_COUNT,
                   help="tokens seen fewer times get no vector (keeps the files, and the frozen rows a checkpoint "
                        "carries, small)")
    p.add_argument("--window", type=int, default=5)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--workers", type=int, default=None,
                   help="training threads (default: every core); 1 repeats the files exactly for a seed")
    p.add_argument("--data-root", help="root of relative --raw/--corpus/--lexicon paths")
    p.set_defaults(func=_vectors)


def _whole_number(text: str, minimum: int, words: tuple[str, ...] = ()) -> int | str:
    """``text`` as a whole number of at least ``minimum``, or one of ``words`` as it is; else argparse's error."""
    if text in words:
        return text
    expected = " or ".join([*words, f"a whole number >= {minimum}"])
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {value}")
    return value


def positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1 (a batch of 0 or -1 sentences tags nothing)."""
    return _whole_number(text, 1)


def thread_setting(text: str) -> int | str:
    """An argparse type: ``auto`` or a whole number of at least 0, as the config's ``run.threads``."""
    return _whole_number(text, 0, ("auto",))


DEVICE_HELP = "auto (a GPU when torch sees one, else the CPU), cpu, cuda or cuda:N"
THREADS_HELP = ("torch CPU threads: auto (the default, as run.threads=auto: the cores the 1-minute load average "
                "does not show busy; logged), a number, or 0 for torch's default of a thread per core")


def _add_inference(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a checkpoint on a labelled corpus file")
    p.add_argument("checkpoint", help="a fine-tuned checkpoint (best.pt or last.pt of a run; not stage 1's)")
    p.add_argument("--data", required=True, help="labelled corpus file (CoNLL, Weibo or CLUENER JSON lines)")
    p.add_argument("--format", default="auto", help="corpus format: auto, conll, weibo, cluener")
    p.add_argument("--output", help="JSON report path (default: CHECKPOINT.eval.json)")
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--threads", type=thread_setting, default="auto", help=THREADS_HELP)
    p.set_defaults(func=_eval)

    p = sub.add_parser("predict", help="tag raw text, one sentence per line; prints JSON lines",
                       description="One JSON line per input line: {\"text\", \"entities\": [{\"start\", \"end\", "
                                   "\"type\", \"mention\"}]}; start and end are character offsets, end exclusive "
                                   "(mention = text[start:end]), in input order. The lines that have arrived (up to "
                                   "1 MiB) are tagged in batches of similar length, and each answer is written as "
                                   "soon as it and every line before it are tagged.")
    p.add_argument("checkpoint", help="a fine-tuned checkpoint (best.pt or last.pt of a run; not stage 1's)")
    p.add_argument("input", nargs="?", default="-", help="text file, or - for standard input (default)")
    p.add_argument("--batch-size", type=positive_int, default=32,
                   help="most lines (or pieces of a line longer than the model's max_len) tagged at once")
    p.add_argument("--skip-bad-lines", action="store_true",
                   help="skip a line that is not UTF-8 with a warning (default: an error, exit status 2)")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--threads", type=thread_setting, default="auto", help=THREADS_HELP)
    p.set_defaults(func=_predict)

    p = sub.add_parser("analyze", help="baseline vs NerCo: Span F / Type Acc, F1 by length, t-SNE plots")
    p.add_argument("--baseline", required=True, help="baseline (fine-tuning only) checkpoint")
    p.add_argument("--nerco", required=True, help="NerCo stage-2 checkpoint")
    p.add_argument("--stage1", help="NerCo stage-1 checkpoint, for the t-SNE after the contrastive stage")
    p.add_argument("--data", required=True, help="labelled test corpus file")
    p.add_argument("--out", required=True, help="output folder for the tables and PNG plots")
    p.add_argument("--tsne-tokens", type=positive_int, default=1500, help="entity tokens sampled for t-SNE")
    p.add_argument("--seed", type=int, default=0, help="seed of the t-SNE token sample and layout")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--threads", type=thread_setting, default="auto", help=THREADS_HELP)
    p.set_defaults(func=_analyze)


def main(argv: list[str] | None = None, *, wrap_loss=None) -> int:
    """``wrap_loss``: for ``train``, the trainer's seam for a test's own loss (see ``train.trainer.train``)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    try:
        return args.func(args, wrap_loss) if args.command == "train" else args.func(args)
    except (InputError, FileNotFoundError, ValueError) as err:
        print(f"nerco: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C in eval, predict, analyze or vectors: nothing to keep, no traceback
        print("\nnerco: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT


if __name__ == "__main__":
    sys.exit(main())
