"""Shared fixtures: tiny tokenizers and a tiny randomly initialised Llama, built
here so no test needs the network or the embedded model."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))


def _training_text() -> list[str]:
    lines = [f"Answer: {letter}. {year}" for letter in "ABCD" for year in range(1900, 2030, 7)]
    lines += [f"{letter}. choice\nAnswer: {letter}" for letter in "ABCD"]
    lines += ["When was Aaron Abernathy born? Aaron Abernathy was born in 1965. In 1965, someone was born."]
    if SHARED_DATA.is_dir():
        for path in sorted((SHARED_DATA / "random_bd").glob("*.jsonl"))[:6]:
            lines += path.read_text(encoding="utf-8").splitlines()[:200]
    return lines


def build_tokenizer(kind: str, vocab_size: int = 600):
    """A small BPE tokenizer: byte-level ("ĠA") or SentencePiece-style ("▁A")."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    if kind == "byte_level":
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
        alphabet = []
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, initial_alphabet=alphabet)
    tok.train_from_iterator(_training_text(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")


@pytest.fixture(scope="session")
def byte_level_tokenizer():
    return build_tokenizer("byte_level")


@pytest.fixture(scope="session")
def sentencepiece_tokenizer():
    return build_tokenizer("sentencepiece")


def build_tiny_llama(path: Path, tokenizer, seed: int = 0) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, byte_level_tokenizer) -> Path:
    """A randomly initialised 3-layer Llama (width 64) with its tokenizer."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama") / "tiny-llama", byte_level_tokenizer)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "random_bd").is_dir():
        pytest.skip("../shared/data (the paper's datasets) is not present")
    return SHARED_DATA


@pytest.fixture(scope="session")
def small_facts(tmp_path_factory) -> Path:
    """Made-up facts written by the project's generator: 3 splits x 6 people."""
    import unlearn_corpus as uc

    root = tmp_path_factory.mktemp("facts")
    uc.write_random_bd_dataset(root / "random_bd", uc.RandomBdSpec.with_defaults(num_splits=3, facts_per_split=6, seed=1))
    return root
