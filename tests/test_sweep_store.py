"""The accuracy sweep reuses a finished run only when its stored config trains the same way as today's."""

from __future__ import annotations

import pytest

from nerco_dist.config import Config, load_config

from .conftest import TINY, script_module


@pytest.fixture(scope="module")
def same_recipe():
    return script_module("nerco_vs_baseline", "experiments").same_recipe


def stored(*overrides: str) -> dict:
    """A config as a finished run's summary holds it, read back as the sweep reads it."""
    return Config.from_dict(load_config(TINY, list(overrides)).to_dict()).to_dict()


def test_where_and_how_fast_a_run_ran_is_not_its_recipe(same_recipe):
    assert same_recipe(stored("run.threads=1", "run.out_dir=a", "run.flush_denormals=false"),
                       stored("run.threads=2", "run.out_dir=b"))
    assert not same_recipe(stored("run.seed=1"), stored("run.seed=2"))
    assert not same_recipe(stored("finetune.full.optim.lr=0.01"), stored("finetune.full.optim.lr=0.02"))


def test_head_probe_keys_count_only_where_the_probe_selects(same_recipe):
    """A run selected on the dev InfoNCE stored the probe defaults of its day (1 epoch); it trained the same."""
    old = stored("contrastive.enabled=true", "contrastive.head_probe_epochs=1", "contrastive.head_probe_lr=1e-3")
    assert same_recipe(old, stored("contrastive.enabled=true"))
    probed = ["contrastive.enabled=true", "contrastive.select=head_f1"]
    assert not same_recipe(stored(*probed, "contrastive.head_probe_epochs=1"), stored(*probed))
    assert not same_recipe(stored(*probed, "contrastive.head_probe_lr=1e-3"), stored(*probed))
    assert same_recipe(stored(*probed), stored(*probed))
