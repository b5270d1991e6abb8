"""Inference from a checkpoint: load it, predict BIO tags, evaluate on a labelled file. Knows nothing of
training (no engine, no TensorBoard); the trainer, the CLI, the analysis and the benchmarks all use it."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from . import distributed as dist
from .checkpoint import load_checkpoint, require_same_shape, require_trained_head
from .data.dataset import LatticeEncoder, Piece, collate
from .data.readers import Sentence, read_corpus
from .data.tags import entities
from .errors import InputError
from .model.build import build_tagger
from .model.config import ModelConfig
from .model.tagger import NerTagger

log = logging.getLogger("nerco_dist")


def load_for_inference(checkpoint: Path, device: str = "auto", *, tagging: bool = False
                       ) -> tuple[LatticeEncoder, NerTagger]:
    """The text codec and the tagger (eval mode, on ``device``) of a self-contained checkpoint, from its
    ``codec`` and ``model_args`` sections. ``tagging``: the tags are wanted, so a stage-1 checkpoint is
    refused (only its encoder's features mean something)."""
    payload = load_checkpoint(checkpoint)
    if tagging:
        require_trained_head(checkpoint, payload)
    codec = LatticeEncoder.from_state_dict(payload["codec"])
    model = build_tagger(codec, ModelConfig.from_args(payload["model_args"]))
    require_same_shape(checkpoint, payload["model"], model, saved_config=payload["model_args"],
                       config=payload["model_args"], against="the one its own config builds")
    model.load_state_dict(payload["model"])
    return codec, model.to(dist.device_for_rank(device)).eval()


def model_device(model: NerTagger) -> torch.device:
    return next(model.parameters()).device


def eval_batches(codec: LatticeEncoder, model: NerTagger, sentences: Sequence[Sentence], batch_size: int,
                 device: torch.device) -> Iterator[tuple[list[Piece], dict[str, torch.Tensor]]]:
    """Pieces of whole sentences (cut without looking at gold), in eval-mode batches of similar length."""
    pieces = codec.encode(sentences, with_labels=False)
    order = sorted(range(len(pieces)), key=lambda i: pieces[i].lattice_len)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            chunk = [pieces[i] for i in order[start : start + batch_size]]
            yield chunk, {k: t.to(device) for k, t in collate(chunk).items()}
    finally:
        model.train(was_training)


@torch.no_grad()
def tags_by_batch(codec: LatticeEncoder, model: NerTagger, sentences: Sequence[Sentence], batch_size: int,
                  device: torch.device) -> Iterator[list[tuple[int, list[str]]]]:
    """BIO predictions for whole sentences, handed over as they are made (so that a caller can write each
    one early): after each batch of pieces, the ``(index, tags)`` of the sentences whose last piece it held.
    Long sentences are cut into pieces and joined back; sentences without characters come first, untagged."""
    predicted = [["O"] * len(s) for s in sentences]
    untagged = [len(s) for s in sentences]  # characters not yet predicted
    empty = [(i, predicted[i]) for i, n in enumerate(untagged) if n == 0]
    if empty:
        yield empty
    for chunk, batch in eval_batches(codec, model, sentences, batch_size, device):
        done = []
        for piece, label_ids in zip(chunk, model.predict(batch)):
            predicted[piece.sentence][piece.start : piece.start + piece.num_chars] = [
                codec.labels.labels[i] for i in label_ids]
            untagged[piece.sentence] -= piece.num_chars
            if untagged[piece.sentence] == 0:
                done.append((piece.sentence, predicted[piece.sentence]))
        yield done


def predict_tags(codec: LatticeEncoder, model: NerTagger, sentences: Sequence[Sentence], batch_size: int,
                 device: torch.device) -> list[list[str]]:
    """BIO predictions for whole sentences: long sentences are cut into pieces and joined back."""
    predicted: list = [None] * len(sentences)
    for done in tags_by_batch(codec, model, sentences, batch_size, device):
        for i, tags in done:
            predicted[i] = tags
    return predicted


@torch.no_grad()
def sentence_features(codec: LatticeEncoder, model: NerTagger, sentences: Sequence[Sentence], batch_size: int,
                      device: torch.device) -> list[np.ndarray]:
    """Encoder features (n_chars, hidden) of each whole sentence, pieces joined back."""
    features = [np.zeros((len(s), model.cfg.hidden), dtype=np.float32) for s in sentences]
    for chunk, batch in eval_batches(codec, model, sentences, batch_size, device):
        encoded = model.encode(batch).float().cpu().numpy()
        for b, piece in enumerate(chunk):
            features[piece.sentence][piece.start : piece.start + piece.num_chars] = encoded[b, : piece.num_chars]
    return features


def predict(codec: LatticeEncoder, model: NerTagger, sentences: Sequence[Sentence], batch_size: int) -> list[list[str]]:
    """Predicted tags of every sentence. Under several ranks, rank r predicts sentences r, r + W, ... and
    every rank gets all of them, each sentence exactly once."""
    W, r = dist.world_size(), dist.rank()
    mine = predict_tags(codec, model, sentences[r::W], batch_size, model_device(model))
    if W == 1:
        return mine
    predicted: list = [None] * len(sentences)
    for k, part in enumerate(dist.gather_objects(mine)):
        predicted[k::W] = part
    return predicted


def evaluate_checkpoint(checkpoint: Path, data: Path, batch_size: int = 32, device: str = "auto",
                        fmt: str = "auto") -> tuple[list[list[str]], list[list[str]]]:
    """Gold and predicted BIO tags of a labelled corpus file, with nothing but the checkpoint. Scores that
    would measure nothing are not given silently: a file without gold entities is refused (every score would
    be 0), and gold types the model was never trained on are named in a warning (it cannot predict them)."""
    sentences = read_corpus(data, fmt).sentences
    gold = [s.tags for s in sentences]
    gold_types = {e.type for tags in gold for e in entities(tags)}
    if not gold_types:
        raise InputError(data, "no gold entities: nothing to score (for unlabelled text, use nerco predict)")
    codec, model = load_for_inference(checkpoint, device, tagging=True)
    unknown = gold_types - set(codec.labels.classes)
    if unknown:
        log.warning("%s: entity types the model was not trained on (it cannot predict them, so they count as "
                    "misses): %s", data, ", ".join(sorted(unknown)))
    return gold, predict(codec, model, sentences, batch_size)
