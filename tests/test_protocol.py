"""The evaluation protocol: where generation stops, greedy decoding, the pass@1 knob."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from sedsft.evaluation.eval_sets import pass1_sampling
from sedsft.evaluation.sampling import (
    SamplingSettings,
    check_greedy,
    end_of_turn_ids,
    sample_completions,
    stop_token_ids,
)
from test_chat_templates import backend, tokenizers  # noqa: F401  (fixtures: the real templates)

END_OF_TURN = {
    "llama3.2_instruct": "<|eot_id|>",
    "qwen2.5_instruct": "<|im_end|>",
    "qwen3": "<|im_end|>",
    "mistral_v0.3_instruct": "</s>",
    "gemma2_it": "<end_of_turn>",
    "phi3_mini_instruct": "<|end|>",
    "deepseek_r1_distill_qwen": "<｜end▁of▁sentence｜>",
}


@pytest.mark.parametrize("name", sorted(END_OF_TURN))
def test_end_of_turn_of_each_real_template(tokenizers, name):  # noqa: F811
    tok = tokenizers[name]
    assert end_of_turn_ids(tok) == [tok.convert_tokens_to_ids(END_OF_TURN[name])]


def test_no_template_no_end_of_turn(chatml_tokenizer):
    tok = chatml_tokenizer.__class__(tokenizer_object=chatml_tokenizer.backend_tokenizer)
    tok.chat_template = None
    assert end_of_turn_ids(tok) == []


@pytest.fixture(scope="module")
def tiny_model(chatml_tokenizer):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(chatml_tokenizer), hidden_size=16, intermediate_size=32,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2)  # fmt: skip
    model = LlamaForCausalLM(config)
    # a base model's generation config: EOS is <|endoftext|>, not the chat's <|im_end|>
    model.generation_config.eos_token_id = chatml_tokenizer.convert_tokens_to_ids("<|endoftext|>")
    return model


def test_generation_stops_at_the_templates_end_of_turn_too(
    tiny_model, chatml_tokenizer, monkeypatch
):
    im_end, base_eos = chatml_tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    assert stop_token_ids(tiny_model, chatml_tokenizer) == [base_eos, im_end]
    seen = []
    real_generate = tiny_model.generate

    def recording_generate(**kwargs):
        seen.append(kwargs)
        return real_generate(**kwargs)

    monkeypatch.setattr(tiny_model, "generate", recording_generate)
    prompts = [[{"role": "user", "content": "What is 2 + 3?"}]]
    greedy = sample_completions(tiny_model, chatml_tokenizer, prompts,
                                SamplingSettings(num_samples=1, max_new_tokens=6, temperature=0.0))  # fmt: skip
    again = sample_completions(tiny_model, chatml_tokenizer, prompts,
                               SamplingSettings(num_samples=1, max_new_tokens=6, temperature=0.0, seed=123))  # fmt: skip
    assert greedy.texts == again.texts  # greedy: the seed does not matter
    assert seen[0]["eos_token_id"] == [base_eos, im_end]
    assert seen[0]["do_sample"] is False and "temperature" not in seen[0]
    sample_completions(
        tiny_model, chatml_tokenizer, prompts, SamplingSettings(num_samples=2, max_new_tokens=4, seed=0)
    )
    assert seen[-1]["do_sample"] is True and seen[-1]["temperature"] == 1.0


def test_greedy_takes_one_sample():
    check_greedy(0.0, 1)
    check_greedy(1.0, 8)
    with pytest.raises(ValueError, match=r"temperature=0 \(greedy\) with num_samples=8"):
        check_greedy(0.0, 8)
    with pytest.raises(ValueError, match="must be >= 0"):
        check_greedy(-0.5, 1)


def test_pass1_knob():
    assert pass1_sampling("greedy") == {"temperature": 0.0, "num_samples": 1}
    assert pass1_sampling("sample") == {"num_samples": 1}
    assert pass1_sampling("mean@8") == {"num_samples": 8}
    with pytest.raises(ValueError, match=r"pass1='mean@0': unknown; use pass1=greedy"):
        pass1_sampling("mean@0")
