"""The paper's analysis, baseline against NerCo on one test set: Span F and Type Acc (Table 4), F1 by
sentence length (Figure 3), and t-SNE of entity-token representations (Figure 4)."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
import torch

from ..atomic import write_json, write_text
from ..codec import TextCodec
from ..data.readers import Sentence, read_corpus
from ..inference import load_for_inference, model_device, predict
from .metrics import evaluate, f1_by_length, write_length_csv

log = logging.getLogger("nerco_dist")


@torch.no_grad()
def entity_token_features(codec: TextCodec, model, sentences: list[Sentence], max_tokens: int, seed: int,
                          device: torch.device) -> tuple[np.ndarray, list[str]]:
    """Encoder features (eval mode) of up to ``max_tokens`` gold entity tokens, with their B-/I- tags.

    The sample is drawn once from the gold tags (seeded), so every model is shown the same tokens."""
    positions = [(k, i) for k, s in enumerate(sentences) for i, t in enumerate(s.tags) if t != "O"]
    positions = sorted(random.Random(seed).sample(positions, min(max_tokens, len(positions))))
    wanted = {}
    for k, i in positions:
        wanted.setdefault(k, []).append(i)
    chosen = [sentences[k] for k in sorted(wanted)]
    features = codec.sentence_features(model, chosen, 64, device)
    rows, tags = [], []
    for sentence, feats, k in zip(chosen, features, sorted(wanted)):
        for i in wanted[k]:
            rows.append(feats[i])
            tags.append(sentence.tags[i])
    return np.stack(rows), tags


def analyze(baseline: Path, nerco: Path, data: Path, out: Path, stage1: Path | None = None,
            tsne_tokens: int = 1500, seed: int = 0, device: str = "auto") -> dict:
    out.mkdir(parents=True, exist_ok=True)
    sentences = read_corpus(data).sentences
    gold = [s.tags for s in sentences]
    models = {"baseline": baseline, "NerCo": nerco}
    reports, by_length, loaded = {}, {}, {}
    for name, path in models.items():
        codec, model = load_for_inference(path, device, tagging=True)
        loaded[name] = (codec, model)
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

    from .plots import plot_f1_by_length, plot_tsne

    plot_f1_by_length(by_length, out / "f1_by_length.png")
    views = [("baseline", *loaded["baseline"])]
    if stage1 is not None:
        views.append(("after stage 1", *load_for_inference(stage1, device)))
    views.append(("NerCo after stage 2", *loaded["NerCo"]))
    for title, codec, model in views:
        features, tags = entity_token_features(codec, model, sentences, tsne_tokens, seed, model_device(model))
        name = "tsne_" + title.lower().replace(" ", "_") + ".png"
        plot_tsne(features, tags, out / name, f"{title}: entity tokens ({len(tags)})", seed=seed)
    log.info("analysis written to %s", out)
    return summary
