"""The part of vLLM's API that ``VLLMBackend`` relies on, pinned and checked from both sides.

vLLM is a CUDA wheel (about 320 MB, with its own torch build), so it is not installed with
the CPU test environment, and ``test_benchmarks.py`` drives the backend through a lenient
stand-in. A change in ``SamplingParams`` or in the outputs would go unnoticed there. Here:

- ``PINNED`` lists every name the backend uses. It was read from the sources of vLLM 0.22.0
  and 0.31.0, the two ends of the range TRL 1.16 accepts (``pip install -e '.[vllm]'``).
- ``test_backend_stays_inside_the_pinned_contract`` runs the backend against a strict
  stand-in built from ``PINNED`` only: an argument or attribute outside it fails, naming it.
- ``test_pinned_contract_holds_in_vllms_source`` reads an installed vLLM's source (or the
  tree in ``$SEDSFT_VLLM_SOURCE``, e.g. an unzipped wheel) without importing it, so it runs
  without a GPU, and fails naming any pinned name that vLLM no longer has.
"""

from __future__ import annotations

import ast
import importlib.util
import math
import os
import sys
from pathlib import Path

import pytest

from sedsft.evaluation.backends import VLLMBackend
from sedsft.evaluation.sampling import SamplingSettings

# name in the backend -> (file under vllm/, class, kind of member, names used)
PINNED = {
    "LLM(...)": ("entrypoints/llm.py", "LLM", "init", {"model", "tensor_parallel_size",
                 "gpu_memory_utilization", "dtype", "enforce_eager", "seed"}),
    # LLM(**kwargs) hands the rest to EngineArgs
    "LLM(**engine args)": ("engine/arg_utils.py", "EngineArgs", "fields", {"max_model_len", "max_logprobs"}),
    "LLM.generate": ("entrypoints/llm.py", "LLM", "generate", {"prompts", "sampling_params", "use_tqdm"}),
    "request": ("inputs/llm.py", "TokensPrompt", "fields", {"prompt_token_ids"}),
    "SamplingParams": ("sampling_params.py", "SamplingParams", "fields",
                       {"n", "temperature", "top_p", "max_tokens", "seed", "logprobs", "stop_token_ids"}),
    "RequestOutput": ("outputs.py", "RequestOutput", "init", {"outputs"}),
    "CompletionOutput": ("outputs.py", "CompletionOutput", "fields", {"text", "token_ids", "logprobs"}),
    "Logprob": ("logprobs.py", "Logprob", "fields", {"logprob", "rank"}),
}  # fmt: skip


def pinned(name: str) -> set[str]:
    return PINNED[name][3]


# -- the backend against a strict stand-in -------------------------------------------------------
class Strict:
    """An object with exactly the pinned attributes of ``kind``: reading another one fails."""

    def __init__(self, kind: str, **values):
        unknown = set(values) - pinned(kind)
        assert not unknown, f"{kind}: {sorted(unknown)} are not pinned"
        object.__setattr__(self, "_kind", kind)
        object.__setattr__(self, "_values", values)

    def __getattr__(self, name):
        if name not in pinned(self._kind):
            raise AssertionError(
                f"VLLMBackend reads {self._kind}.{name}, which is not in the pinned vLLM contract: "
                f"check that vLLM 0.22-0.31 has it, then add it to PINNED[{self._kind!r}]"
            )
        return self._values[name]


def strict_vllm(calls: list):
    """A ``vllm`` module that accepts only pinned arguments and answers with pinned fields:
    two tokens per sample, each position's top-2 log-probabilities log 1/2 and log 1/4."""

    def check_kwargs(what: str, kwargs: dict) -> None:
        unknown = (
            set(kwargs)
            - pinned(what)
            - (pinned("LLM(**engine args)") if what == "LLM(...)" else set())
        )
        assert not unknown, (
            f"VLLMBackend passes {sorted(unknown)} to {what}, outside the pinned vLLM contract: check "
            f"that vLLM 0.22-0.31 accepts them, then add them to PINNED"
        )

    class SamplingParams:
        def __init__(self, **kwargs):
            check_kwargs("SamplingParams", kwargs)
            self.__dict__.update(kwargs)

    class LLM:
        def __init__(self, model, **kwargs):
            check_kwargs("LLM(...)", kwargs)
            calls.append(("init", {"model": model, **kwargs}))

        def generate(self, prompts, sampling_params, *, use_tqdm=True):
            for request in prompts:
                assert set(request) <= pinned("request"), f"request keys {sorted(request)}"
                assert all(isinstance(t, int) for t in request["prompt_token_ids"])
            assert len(sampling_params) == len(prompts)  # one SamplingParams per prompt
            calls.append(("generate", prompts, sampling_params))
            top2 = {
                7: Strict("Logprob", logprob=math.log(0.5), rank=1),
                9: Strict("Logprob", logprob=math.log(0.25), rank=2),
            }
            return [
                Strict("RequestOutput", outputs=[
                    Strict("CompletionOutput", text=f"s{j}", token_ids=[7, 9], logprobs=[top2, top2])
                    for j in range(params.n)
                ])
                for params in sampling_params
            ]  # fmt: skip

    module = type(sys)("vllm")
    module.LLM, module.SamplingParams = LLM, SamplingParams
    return module


def test_backend_stays_inside_the_pinned_contract(monkeypatch, chatml_tokenizer):
    calls = []
    monkeypatch.setitem(sys.modules, "vllm", strict_vllm(calls))
    backend = VLLMBackend(
        "/models/x", chatml_tokenizer, prompts_per_call=2, entropy_top_k=2, seed=3
    )
    prompts = [[{"role": "user", "content": f"q{i}"}] for i in range(3)]
    settings = SamplingSettings(
        num_samples=2, max_new_tokens=16, temperature=1.0, top_p=0.9, seed=10
    )
    out = dict(backend.generate(prompts, settings, keys=[4, 5, 6]))
    assert calls[0] == ("init", {
        "model": "/models/x", "tensor_parallel_size": 1, "gpu_memory_utilization": 0.9, "dtype": "auto",
        "max_model_len": None, "enforce_eager": False, "seed": 3, "max_logprobs": 20,
    })  # fmt: skip
    params = [p for call in calls[1:] for p in call[2]]
    sampling = ("n", "temperature", "top_p", "max_tokens", "seed", "logprobs")
    assert [{k: getattr(p, k) for k in sampling} for p in params] == [
        {
            "n": 2,
            "temperature": 1.0,
            "top_p": 0.9,
            "max_tokens": 16,
            "seed": 10 + key,
            "logprobs": 2,
        }
        for key in (4, 5, 6)
    ]
    for p in params:  # stop tokens, when the backend passes them: token ids
        assert all(isinstance(i, int) for i in getattr(p, "stop_token_ids", None) or [])
    # top-2 entropy of a position: -(1/2 log 1/2 + 1/4 log 1/4) = log 2; two positions a sample
    per_position = math.log(2)
    for samples in out.values():
        assert samples.texts == ["s0", "s1"] and samples.num_tokens == [2, 2]
        assert samples.entropy_sums == pytest.approx([2 * per_position] * 2)


def test_strict_stand_in_names_what_is_outside_the_contract(monkeypatch, chatml_tokenizer):
    """The stand-in does fail: an argument or attribute the pin does not list is named."""
    module = strict_vllm([])
    with pytest.raises(AssertionError, match=r"passes \['best_of'\] to SamplingParams"):
        module.SamplingParams(n=1, best_of=2)
    with pytest.raises(AssertionError, match=r"reads CompletionOutput.cumulative_logprob"):
        _ = Strict("CompletionOutput", text="", token_ids=[], logprobs=None).cumulative_logprob


# -- the pin against vLLM's source ----------------------------------------------------------------
def vllm_source() -> Path | None:
    """vLLM's package directory: ``$SEDSFT_VLLM_SOURCE`` (a tree holding ``vllm/``), else an
    installed vLLM (located, not imported: importing needs its CUDA build)."""
    if os.environ.get("SEDSFT_VLLM_SOURCE"):
        return Path(os.environ["SEDSFT_VLLM_SOURCE"]) / "vllm"
    spec = importlib.util.find_spec("vllm")
    return Path(spec.origin).parent if spec is not None and spec.origin else None


def members(tree: ast.Module, cls: str, kind: str) -> set[str]:
    """Annotated fields, ``__init__`` parameters or ``generate`` parameters of class ``cls``."""
    node = next((n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls), None)
    if node is None:
        return set()
    if kind == "fields":
        return {
            n.target.id
            for n in node.body
            if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)
        }
    name = "__init__" if kind == "init" else kind
    fn = next((n for n in node.body if isinstance(n, ast.FunctionDef) and n.name == name), None)
    if fn is None:
        return set()
    return {a.arg for a in fn.args.posonlyargs + fn.args.args + fn.args.kwonlyargs}


@pytest.mark.skipif(
    vllm_source() is None,
    reason="vLLM is not installed (a CUDA wheel); set SEDSFT_VLLM_SOURCE to an unzipped wheel to check the pin",
)
def test_pinned_contract_holds_in_vllms_source():
    root = vllm_source()
    missing = []
    for use, (path, cls, kind, names) in PINNED.items():
        found = members(ast.parse((root / path).read_text()), cls, kind)
        missing += [f"{use}: {cls}.{n} ({path})" for n in sorted(names - found)]
    assert not missing, f"vLLM at {root} lacks what VLLMBackend uses: {missing}"
    # logprobs come as a list (one dict {token id: Logprob} per position) unless a caller
    # asks for FlatLogprobs: the backend iterates .values() of each position.
    sampling = ast.parse((root / "sampling_params.py").read_text())
    node = next(
        n for n in sampling.body if isinstance(n, ast.ClassDef) and n.name == "SamplingParams"
    )
    flat = [
        n
        for n in node.body
        if isinstance(n, ast.AnnAssign) and getattr(n.target, "id", "") == "flat_logprobs"
    ]
    assert all(isinstance(n.value, ast.Constant) and n.value.value is False for n in flat), (
        "SamplingParams.flat_logprobs no longer defaults to False: VLLMBackend reads per-position dicts"
    )
