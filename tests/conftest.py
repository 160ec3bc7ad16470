"""Shared fixtures: a tokenizer trained inside the tests, chat templates of real shapes,
and the composed Hydra config shrunk to run in seconds on a CPU."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("PROJECT_ROOT", str(ROOT))

# Shaped like the real Llama-3.x template: BOS, a system header with the date lines,
# content trimmed, turns closed by <|eot_id|>; no {% generation %} markers.
LLAMA3_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content']|trim %}"
    "{%- set messages = messages[1:] %}{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{{- 'Cutting Knowledge Date: December 2023\\nToday Date: 26 Jul 2024\\n\\n' }}"
    "{{- system_message }}{{- '<|eot_id|>' }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

# Qwen2.5's ChatML shape, with its default system prompt when none is given.
CHATML_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# The same ChatML with {% generation %} markers, which transformers can mask by itself.
CHATML_GENERATION_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}{% generation %}{{- message['content'] + '<|im_end|>\\n' }}{% endgeneration %}"
    "{%- else %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

SPECIALS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|im_start|>", "<|im_end|>", "<|endoftext|>"]


@pytest.fixture(scope="session")
def base_tokenizer():
    """A byte-level BPE trained here on toy text, knowing both template families' tokens."""
    from sedsft.data import toy_math
    from sedsft.models.tiny import train_tokenizer

    tokenizer = train_tokenizer(toy_math.corpus(200, seed=3) + ["system user assistant"] * 20, 600)
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIALS})
    return tokenizer


def with_template(tokenizer, template: str, bos: str | None = None, eos: str = "<|im_end|>"):
    tok = tokenizer.__class__(tokenizer_object=tokenizer.backend_tokenizer.__class__.from_str(tokenizer.backend_tokenizer.to_str()))
    tok.add_special_tokens({"additional_special_tokens": SPECIALS})
    tok.chat_template = template
    tok.eos_token = eos
    tok.pad_token = "<|endoftext|>"
    if bos:
        tok.bos_token = bos
    return tok


@pytest.fixture(scope="session")
def llama3_tokenizer(base_tokenizer):
    return with_template(base_tokenizer, LLAMA3_TEMPLATE, bos="<|begin_of_text|>", eos="<|eot_id|>")


@pytest.fixture(scope="session")
def chatml_tokenizer(base_tokenizer):
    return with_template(base_tokenizer, CHATML_TEMPLATE)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One cache (built tiny model, tokenised data) shared by the whole test session."""
    return Path(os.environ.get("SEDSFT_TEST_CACHE") or tmp_path_factory.mktemp("cache"))


def project_cache() -> Path:
    """The cache ``src/train.py`` builds into (``paths.cache_dir``): a test of the default base
    loads the quick start's build instead of building its own (same recipe, same key)."""
    return Path(os.environ.get("SEDSFT_CACHE") or ROOT / ".cache")


@pytest.fixture(autouse=True)
def _small_threads():
    # Under pytest-xdist the cores are shared by the workers: more torch threads than a
    # worker's share make them thrash (one process beside another ran many times slower).
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    share = max(1, (os.cpu_count() or 1) // workers)
    torch.set_num_threads(min(2, share, torch.get_num_threads()))


_COMPOSED: dict[tuple[str, ...], object] = {}


@pytest.fixture
def composed(tmp_path_factory):
    """``compose_config`` (unshrunk) once per set of overrides in this process (composition
    is the slow part); each test gets its own copy to change."""
    import copy

    def get(*overrides: str, name: str = "train.yaml"):
        key = (name, *overrides)
        if key not in _COMPOSED:
            where = tmp_path_factory.mktemp("cfg")
            _COMPOSED[key] = compose_config(where, where, *overrides, shrink=False, name=name)
        return copy.deepcopy(_COMPOSED[key])

    return get


def compose_config(tmp_path: Path, cache_dir: Path, *overrides: str, shrink: bool = True, name: str = "train.yaml"):
    """The real ``configs/<name>`` with paths in ``tmp_path``; ``shrink`` makes the toy
    data and the trainer small enough for a CPU test."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    GlobalHydra.instance().clear()
    small = [
        "model.pretrain_steps=4",  # exercises pretraining; the full prior costs CPU minutes
        "data.train.n=96",
        "data.val.n=24",
        "data.batch_size=8",
        "data.eval_batch_size=24",
        "trainer.max_epochs=1",
        "trainer.max_steps=4",
        "trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
    ]
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(name, overrides=[*(small if shrink else []), *overrides], return_hydra_config=True)
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path)
        cfg.paths.log_dir = str(tmp_path / "logs")
        cfg.paths.cache_dir = str(cache_dir)
        del cfg.hydra
    return cfg


@pytest.fixture
def make_config(tmp_path, cache_dir):
    return lambda *overrides: compose_config(tmp_path, cache_dir, *overrides)
