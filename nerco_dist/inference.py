"""Inference from a checkpoint: load it, predict BIO tags, evaluate on a labelled file. Knows nothing of
training (no engine, no TensorBoard); the trainer, the CLI, the analysis and the benchmarks all use it."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from . import distributed as dist
from .checkpoint import load_checkpoint
from .codec import TextCodec
from .data.readers import Sentence, read_corpus
from .model.tagger import NerTagger


def load_for_inference(checkpoint: Path, device: str = "auto") -> tuple[TextCodec, NerTagger]:
    """The codec and the tagger (eval mode, on ``device``) of a self-contained checkpoint."""
    payload = load_checkpoint(checkpoint)
    codec = TextCodec.from_checkpoint(payload)
    model = codec.build_model()
    model.load_state_dict(payload["model"])
    return codec, model.to(dist.device_for_rank(device)).eval()


def model_device(model: NerTagger) -> torch.device:
    return next(model.parameters()).device


def predict(codec: TextCodec, model: NerTagger, sentences: Sequence[Sentence], batch_size: int) -> list[list[str]]:
    """Predicted tags of every sentence. Under several ranks, rank r predicts sentences r, r + W, ... and
    every rank gets all of them, each sentence exactly once."""
    W, r = dist.world_size(), dist.rank()
    mine = codec.predict_tags(model, sentences[r::W], batch_size, model_device(model))
    if W == 1:
        return mine
    predicted: list = [None] * len(sentences)
    for k, part in enumerate(dist.gather_objects(mine)):
        predicted[k::W] = part
    return predicted


def evaluate_checkpoint(checkpoint: Path, data: Path, batch_size: int = 32, device: str = "auto",
                        fmt: str = "auto") -> tuple[list[list[str]], list[list[str]]]:
    """Gold and predicted BIO tags of a labelled corpus file, with nothing but the checkpoint."""
    codec, model = load_for_inference(checkpoint, device)
    sentences = read_corpus(data, fmt).sentences
    return [s.tags for s in sentences], predict(codec, model, sentences, batch_size)
