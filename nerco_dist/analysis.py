"""The paper's analysis, baseline against NerCo on one test set: Span F and Type Acc (Table 4), F1 by
sentence length (Figure 3), and t-SNE of entity-token representations (Figure 4).

Each step is logged as it starts and ends, with its wall time: on a full test set the analysis takes
minutes (mostly the t-SNE runs), which would otherwise pass in silence."""

from __future__ import annotations

import logging
import random
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from .atomic import write_json, write_text
from .data.dataset import LatticeEncoder
from .data.readers import Sentence, read_corpus
from .errors import InputError
from .eval.metrics import evaluate, f1_by_length, write_length_csv
from .inference import load_for_inference, model_device, predict, sentence_features

log = logging.getLogger("nerco_dist")


@contextmanager
def logged_step(what: str) -> Iterator[None]:
    """``analyze: WHAT...`` as the step starts, ``analyze: WHAT done in N s`` as it ends."""
    log.info("analyze: %s...", what)
    start = time.perf_counter()
    yield
    log.info("analyze: %s done in %.1f s", what, time.perf_counter() - start)


def sample_entity_tokens(sentences: list[Sentence], max_tokens: int, seed: int) -> list[tuple[int, int]]:
    """Up to ``max_tokens`` (sentence, character) positions of gold entity tokens, seeded and sorted: drawn
    once, so every model is shown the same tokens."""
    positions = [(k, i) for k, s in enumerate(sentences) for i, t in enumerate(s.tags) if t != "O"]
    return sorted(random.Random(seed).sample(positions, min(max_tokens, len(positions))))


@torch.no_grad()
def entity_token_features(codec: LatticeEncoder, model, sentences: list[Sentence], positions: list[tuple[int, int]],
                          device: torch.device) -> tuple[np.ndarray, list[str]]:
    """Encoder features (eval mode) of the tokens at ``positions``, with their B-/I- tags."""
    wanted = {}
    for k, i in positions:
        wanted.setdefault(k, []).append(i)
    chosen = [sentences[k] for k in sorted(wanted)]
    features = sentence_features(codec, model, chosen, 64, device)
    rows, tags = [], []
    for sentence, feats, k in zip(chosen, features, sorted(wanted)):
        for i in wanted[k]:
            rows.append(feats[i])
            tags.append(sentence.tags[i])
    return np.stack(rows), tags


def analyze(baseline: Path, nerco: Path, data: Path, out: Path, *, stage1: Path | None = None,
            tsne_tokens: int = 1500, seed: int = 0, device: str = "auto") -> dict:
    start = time.perf_counter()
    sentences = read_corpus(data).sentences
    gold = [s.tags for s in sentences]
    entity_tokens = sum(t != "O" for tags in gold for t in tags)
    if entity_tokens < 4:  # refused before anything is written: t-SNE needs 4 points, the scores one entity
        raise InputError(data, f"{entity_tokens} gold entity characters: the analysis needs at least 4")
    out.mkdir(parents=True, exist_ok=True)
    models = {"baseline": baseline, "NerCo": nerco}
    reports, by_length, loaded = {}, {}, {}  # loaded: checkpoint -> (codec, model), for the t-SNE too
    for k, (name, path) in enumerate(models.items(), 1):
        with logged_step(f"scoring {name} on {data.name} ({len(sentences):,} sentences, {k}/{len(models)})"):
            codec, model = loaded[path] = load_for_inference(path, device, tagging=True)
            pred = predict(codec, model, sentences, 64)
            reports[name] = evaluate(gold, pred)
            by_length[name] = f1_by_length(gold, pred)
    summary = {name: dict(precision=r.precision, recall=r.recall, f1=r.f1, span_f=r.span_f1, type_acc=r.type_acc)
               for name, r in reports.items()}
    write_json(out / "table4.json", dict(data=str(data), checkpoints={k: str(v) for k, v in models.items()},
                                         scores=summary))
    lines = ["| model | P | R | F1 | Span F | Type Acc |", "|---|---|---|---|---|---|"]
    lines += [f"| {name} | " + " | ".join(f"{100 * s[k]:.2f}" for k in ("precision", "recall", "f1", "span_f",
                                                                           "type_acc")) + " |"
              for name, s in summary.items()]
    write_text(out / "table4.md", "\n".join(lines) + "\n")
    write_length_csv(by_length, out / "f1_by_length.csv")

    from .eval.plots import plot_f1_by_length, plot_tsne

    with logged_step("plotting F1 by length"):
        plot_f1_by_length(by_length, out / "f1_by_length.png")
    positions = sample_entity_tokens(sentences, tsne_tokens, seed)
    views = {title: path for title, path in (("baseline", baseline), ("after stage 1", stage1),
                                             ("NerCo after stage 2", nerco)) if path is not None}
    for k, (title, path) in enumerate(views.items(), 1):
        with logged_step(f"t-SNE of {len(positions):,} entity tokens, {title} ({k}/{len(views)})"):
            codec, model = loaded.get(path) or load_for_inference(path, device)
            features, tags = entity_token_features(codec, model, sentences, positions, model_device(model))
            name = "tsne_" + title.lower().replace(" ", "_") + ".png"
            plot_tsne(features, tags, out / name, f"{title}: entity tokens ({len(tags)})", seed=seed)
    log.info("analyze: written to %s in %.1f s", out, time.perf_counter() - start)
    return summary
