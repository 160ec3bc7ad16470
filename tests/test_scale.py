"""Paper-scale machinery on small local models: real loading code, presets, strategies,
LoRA, packing, torch.compile, and the export CLI. Nothing is downloaded: Llama and Qwen2
models of a few layers are saved to disk here, next to a tokenizer with a chat template."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from unittest import mock

import hydra
import pytest
import torch
from hydra.errors import InstantiationException
from omegaconf import OmegaConf
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from conftest import CHATML_TEMPLATE, LLAMA3_TEMPLATE, ROOT, compose_config, with_template
from sedsft.data.chat import IGNORE_INDEX
from sedsft.data.formats import PAPER_SYSTEM_PROMPT
from sedsft.data.packing import PackingCollator
from sedsft.models.hf import CausalLMSpec
from sedsft.models.lora import is_peft, lora_settings, merged_state_dict
from sedsft.sft.strategies import DecoderLayerPolicy, fsdp_strategy
from sedsft.sft.training import build, train
from sedsft.utils.batches import apply_sft_batch
from sedsft.utils.cli import preflight
from sedsft.utils.world import lightning_world

CONFIGS = ROOT / "configs"
EXPERIMENTS = sorted(p.stem for p in (CONFIGS / "experiment").glob("paper_*.yaml"))
TRAINERS = sorted(p.stem for p in (CONFIGS / "trainer").glob("*.yaml"))
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
ARCHS = {
    "llama": (LlamaForCausalLM, LlamaConfig, LLAMA3_TEMPLATE, {"bos": "<|begin_of_text|>", "eos": "<|eot_id|>"}),
    "qwen2": (Qwen2ForCausalLM, Qwen2Config, CHATML_TEMPLATE, {"eos": "<|im_end|>"}),
}


@pytest.fixture(scope="session")
def local_models(tmp_path_factory, base_tokenizer) -> dict[str, Path]:
    """``{"llama": dir, "qwen2": dir}``: 2-layer models saved with ``save_pretrained``,
    each with its tokenizer (Llama-3 / ChatML template) in the same directory."""
    root = tmp_path_factory.mktemp("models")
    out = {}
    for arch, (model_cls, config_cls, template, tokens) in ARCHS.items():
        tokenizer = with_template(base_tokenizer, template, **tokens)
        config = config_cls(
            vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=arch == "qwen2",
        )  # fmt: skip
        torch.manual_seed(0)
        model_cls(config).save_pretrained(root / arch)
        tokenizer.save_pretrained(root / arch)
        out[arch] = root / arch
    return out


def preset(arch: str) -> str:
    return {"llama": "llama32_3b", "qwen2": "qwen25_math_7b"}[arch]


def local_config(tmp_path, cache_dir, models, arch: str, *overrides: str):
    """A model preset pointed at a local model, on a little toy data (no tiny-model build)."""
    small = [
        f"model={preset(arch)}", f"model.name_or_path={models[arch]}", "model.dtype=float32",
        "data.train.n=48", "data.val.n=16", "data.batch_size=8", "data.eval_batch_size=16",
        "trainer.max_epochs=1", "trainer.max_steps=2", "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false", "callbacks=none", "logger=[]",
    ]  # fmt: skip
    return compose_config(tmp_path, cache_dir, *small, *overrides, shrink=False)


# ---------------------------------------------------------------- loading through the presets
@pytest.mark.parametrize("arch", list(ARCHS))
def test_model_preset_loads_a_local_model_with_the_real_code(tmp_path, cache_dir, local_models, arch):
    cfg = local_config(tmp_path, cache_dir, local_models, arch, "model.dtype=bfloat16")
    spec = hydra.utils.instantiate(cfg.model)
    assert type(spec) is CausalLMSpec and spec.gradient_checkpointing and spec.dtype == "bfloat16"
    tokenizer, model = spec.load_tokenizer(), spec.load_model()
    assert isinstance(model, ARCHS[arch][0]) and model.dtype == torch.bfloat16
    assert model.config._attn_implementation == "sdpa" and model.config.use_cache is False
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    assert tokenizer.chat_template == ARCHS[arch][2] and tokenizer.pad_token is not None


@pytest.mark.parametrize("arch", list(ARCHS))
def test_preset_trains_a_local_model_with_packing(tmp_path, cache_dir, local_models, arch):
    cfg = local_config(tmp_path, cache_dir, local_models, arch, "+data.packing=true", "trainer.val_check_interval=2")
    cfg.data.system_prompt = PAPER_SYSTEM_PROMPT
    metrics = train(cfg)
    assert torch.isfinite(torch.tensor(metrics["train/loss"])) and torch.isfinite(torch.tensor(metrics["val/loss"]))


# ---------------------------------------------------------------- presets compose and validate
def test_model_presets(tmp_path, cache_dir):
    names = {"llama32_3b": "meta-llama/Llama-3.2-3B-Instruct", "qwen25_math_7b": "Qwen/Qwen2.5-Math-7B-Instruct"}
    for option, name in names.items():
        spec = hydra.utils.instantiate(compose_config(tmp_path, cache_dir, f"model={option}", shrink=False).model)
        assert (spec.name_or_path, spec.dtype, spec.attn_implementation) == (name, "bfloat16", "sdpa")
        assert spec.gradient_checkpointing and spec.compile is False and lora_settings(spec.lora) is None
        lora = hydra.utils.instantiate(compose_config(tmp_path, cache_dir, f"model={option}", "model.lora.r=16", shrink=False).model)
        assert lora_settings(lora.lora).r == 16
    with pytest.raises(ValueError, match="unknown model.lora option"):
        CausalLMSpec(name_or_path="x", lora={"rank": 8})
    with pytest.raises(ValueError, match="needs LoRA on"):
        CausalLMSpec(name_or_path="x", lora={"r": 0, "quantization": "4bit"})


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_paper_experiment_composes_and_validates(tmp_path, cache_dir, chatml_tokenizer, experiment):
    cfg = compose_config(tmp_path, cache_dir, f"experiment={experiment}", shrink=False)
    OmegaConf.to_container(cfg, resolve=True)
    model_name, loss_name = experiment.removeprefix("paper_").split("_", 2)[-1], None
    for loss in ("sed_nomask", "ce", "sed", "gem", "dft"):
        if experiment.endswith("_" + loss):
            loss_name = loss
            break
    t = cfg.trainer
    assert t.accumulate_grad_batches is None and cfg.batch.sequences_per_step == 128  # derived at run time
    apply_sft_batch(cfg, lightning_world(cfg, {}))  # what src/train.py does first (tests/test_presets.py: other sizes)
    assert t.devices * t.num_nodes * t.accumulate_grad_batches * cfg.data.batch_size == 128
    assert (t.precision, t.max_epochs, t.gradient_clip_val, cfg.seed) == ("bf16-mixed", 2, 1.0, 42)
    assert (cfg.optimizer.lr, list(cfg.optimizer.betas), cfg.scheduler.warmup_ratio) == (2e-5, [0.9, 0.95], 0.03)
    assert cfg.model.gradient_checkpointing and cfg.task_name == experiment and model_name
    assert cfg.data.train.name == "miromind-ai/MiroMind-M1-SFT-719K"
    assert (list(cfg.data.train.rows), list(cfg.data.val.rows)) == ([0, 20000], [20000, 21000])
    assert cfg.data.system_prompt == PAPER_SYSTEM_PROMPT
    # Cheap parts instantiate: model spec (lazy), loss, optimiser, schedule, data module, strategy.
    spec = hydra.utils.instantiate(cfg.model)
    assert ("Llama-3.2-3B" in spec.name_or_path) == ("llama32_3b" in experiment)
    loss = hydra.utils.instantiate(cfg.loss)
    assert cfg.loss.name == loss_name
    if loss_name == "sed":
        assert loss.needs_calibration  # tau comes from calibration before training
    optimizer = hydra.utils.instantiate(cfg.optimizer)(params=[torch.nn.Parameter(torch.zeros(2))])
    hydra.utils.instantiate(cfg.scheduler)(optimizer, num_training_steps=313)
    datamodule = hydra.utils.instantiate(cfg.data, tokenizer=chatml_tokenizer)
    assert datamodule.batch_size == 1 and datamodule.max_length == 32000  # the release's limit
    strategy = hydra.utils.instantiate(cfg.trainer.strategy)
    assert type(strategy).__name__ == "ClippingFSDPStrategy"


def test_paper_experiment_with_deepspeed(tmp_path, cache_dir):
    cfg = compose_config(tmp_path, cache_dir, "experiment=paper_llama32_3b_sed", "trainer=deepspeed_zero2", shrink=False)
    apply_sft_batch(cfg, lightning_world(cfg, {}))
    assert cfg.trainer.accumulate_grad_batches == 16 and cfg.trainer.strategy.stage == 2
    if HAS_DEEPSPEED:
        assert hydra.utils.instantiate(cfg.trainer.strategy).zero_stage_3 is False
    else:
        with pytest.raises(InstantiationException, match=r"pip install 'sedsft\[deepspeed\]'"):
            hydra.utils.instantiate(cfg.trainer.strategy)


@pytest.mark.parametrize("option", TRAINERS)
def test_trainer_option_composes_and_builds(tmp_path, cache_dir, option):
    cfg = compose_config(tmp_path, cache_dir, f"trainer={option}", shrink=False)
    OmegaConf.to_container(cfg, resolve=True)
    strategy_cfg = cfg.trainer.get("strategy")
    if strategy_cfg is None:
        assert option in {"cpu", "default", "gpu"}
        return
    if option.startswith("deepspeed") and not HAS_DEEPSPEED:
        with pytest.raises(InstantiationException, match=r"sedsft\[deepspeed\]"):
            hydra.utils.instantiate(strategy_cfg)
        return
    strategy = hydra.utils.instantiate(strategy_cfg)
    if option == "ddp":  # the whole Trainer builds on the CPU (processes start only in fit)
        trainer = hydra.utils.instantiate(cfg.trainer, accelerator="cpu", devices=2, precision="32-true", logger=False)
        assert trainer.world_size == 2 and type(trainer.strategy).__name__ == "DDPStrategy"
    if option == "fsdp":
        assert isinstance(strategy.kwargs["auto_wrap_policy"], DecoderLayerPolicy)
        assert strategy._state_dict_type == "sharded" and strategy.sharding_strategy.name == "FULL_SHARD"
    if option == "deepspeed_zero3":
        assert strategy.zero_stage_3


# ---------------------------------------------------------------- FSDP units, checkpointing, clipping
@pytest.mark.parametrize("arch", list(ARCHS))
def test_decoder_layer_policy_and_activation_checkpointing(local_models, arch):
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointWrapper,
        apply_activation_checkpointing,
    )

    model = AutoModelForCausalLM.from_pretrained(local_models[arch], dtype=torch.float32)
    holder = torch.nn.ModuleDict({"model": model})  # as inside the LightningModule
    layer_cls = {"llama": "LlamaDecoderLayer", "qwen2": "Qwen2DecoderLayer"}[arch]
    for names in ("auto", [layer_cls], ["LlamaDecoderLayer", "Qwen2DecoderLayer"]):
        targets = DecoderLayerPolicy(names)._run_policy(holder, set(), {"x": 1})
        assert list(targets) == list(model.model.layers) and all(v == {"x": 1} for v in targets.values())
    with pytest.raises(ValueError, match=layer_cls):
        DecoderLayerPolicy(["GPT2Block"])._run_policy(holder, set(), {})

    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    reference = model(input_ids=ids).logits
    reference.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    keys = list(model.state_dict())
    model.zero_grad()
    apply_activation_checkpointing(holder, auto_wrap_policy=DecoderLayerPolicy("auto", skip_if_checkpointed=True))
    assert sum(isinstance(m, CheckpointWrapper) for m in holder.modules()) == 2
    out = model(input_ids=ids).logits
    out.sum().backward()
    torch.testing.assert_close(out, reference)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n.replace("._checkpoint_wrapped_module", "")])
    assert list(model.state_dict()) == keys  # checkpoint wrappers leave parameter names alone

    again = AutoModelForCausalLM.from_pretrained(local_models[arch])
    again.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    assert DecoderLayerPolicy("auto", skip_if_checkpointed=True)._run_policy(again, set(), {}) == {}


def test_fsdp_strategy_clips_by_the_root_modules_norm():
    from lightning.pytorch.plugins.precision import FSDPPrecision

    strategy = fsdp_strategy(layer_cls=["LlamaDecoderLayer"])
    strategy.precision_plugin = FSDPPrecision("bf16-mixed")  # what the Trainer does
    assert strategy.precision_plugin.precision == "bf16-mixed"
    strategy.model = mock.Mock()
    strategy.precision_plugin.clip_gradients(mock.Mock(), clip_val=1.0)
    strategy.model.clip_grad_norm_.assert_called_once_with(1.0)


# ---------------------------------------------------------------- packing
def test_packing_collator_exact_tensors():
    rows = [
        {"input_ids": [11, 12, 13], "labels": [IGNORE_INDEX, 12, 13], "row": 7},
        {"input_ids": [21, 22], "labels": [21, 22], "row": 3},  # a first token with a label
        {"input_ids": [31, 32, 33, 34], "labels": [IGNORE_INDEX, IGNORE_INDEX, 33, 34], "row": 5},
    ]
    batch = PackingCollator()(rows)
    assert set(batch) == {"input_ids", "labels", "position_ids", "rows"}  # no attention mask
    assert batch["input_ids"].tolist() == [[11, 12, 13, 21, 22, 31, 32, 33, 34]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3]]
    assert batch["labels"].tolist() == [[-100, 12, 13, -100, 22, -100, -100, 33, 34]]
    assert batch["rows"].tolist() == [7, 3, 5]
    # After the model step's shift no position predicts across an example boundary.
    shifted = batch["labels"][0, 1:]
    assert shifted[2] == IGNORE_INDEX and shifted[4] == IGNORE_INDEX


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_loss_and_gradients_equal_padded(tmp_path, cache_dir, local_models, arch, attn):
    cfg = local_config(
        tmp_path, cache_dir, local_models, arch,
        "model.gradient_checkpointing=false", f"model.attn_implementation={attn}", "loss=gem",
    )  # fmt: skip
    objects = build(cfg)
    module, datamodule = objects["module"], objects["datamodule"]
    datamodule.setup("fit")
    module.configure_model()
    rows = [datamodule.splits["train"].dataset[i] for i in range(5)]
    rows = [{k: r[k] for k in ("input_ids", "labels")} for r in rows]
    assert len({len(r["input_ids"]) for r in rows}) > 1  # padding really happens
    padded, packed = datamodule.collator(rows), PackingCollator()(rows)
    for fused in ("false", "true"):
        module.fused_loss = fused
        results = []
        for batch in (padded, packed):
            module.model.zero_grad(set_to_none=True)
            out = module.model_step(batch)
            out.loss.backward()
            grads = [p.grad.clone() for p in module.model.parameters()]
            results.append((out, grads))
        (a, ga), (b, gb) = results
        assert a.num_tokens == b.num_tokens
        torch.testing.assert_close(b.loss, a.loss, rtol=1e-5, atol=1e-6)
        for x, y in zip(ga, gb, strict=True):
            torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- torch.compile
def test_compile_option_compiles_each_decoder_layer(local_models):
    plain = CausalLMSpec(name_or_path=str(local_models["llama"]), dtype="float32").load_model()
    spec = CausalLMSpec(name_or_path=str(local_models["llama"]), dtype="float32", compile={"backend": "eager"})
    model = spec.load_model()
    assert all(layer._compiled_call_impl is not None for layer in model.model.layers)
    assert list(model.state_dict()) == list(plain.state_dict())
    ids = torch.randint(0, model.config.vocab_size, (1, 10))
    torch.testing.assert_close(model(input_ids=ids).logits, plain(input_ids=ids).logits)


# ---------------------------------------------------------------- LoRA, exports
QUICK_RUN = [  # two optimiser steps on a little data, a checkpoint and the HF export, no validation
    "data.train.n=32", "data.val.n=8", "trainer.max_steps=2", "+trainer.limit_val_batches=0",
    "callbacks=[model_checkpoint,hf_export]", "callbacks.model_checkpoint.monitor=null", "logger=[]",
]  # fmt: skip


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, cache_dir):
    """Two optimiser steps of LoRA (r=8) on the embedded tiny model; exports merged."""
    out = tmp_path_factory.mktemp("lora")
    cfg = compose_config(out, cache_dir, "+model.lora.r=8", "+model.lora.alpha=16", *QUICK_RUN)
    train(cfg)
    return out, cfg


def test_lora_trains_adapters_only_and_exports_merged_weights(lora_run):
    out, cfg = lora_run
    checkpoint = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    spec = hydra.utils.instantiate(cfg.model)
    peft_model = spec.load_model()
    assert is_peft(peft_model)
    base = {k.replace("base_model.model.", "").replace(".base_layer", ""): v for k, v in peft_model.state_dict().items() if "lora_" not in k}
    state = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
    changed = {k for k, v in state.items() if not torch.equal(v, peft_model.state_dict()[k])}
    assert changed and all("lora_" in k for k in changed)  # the base stayed frozen
    peft_model.load_state_dict(state)

    merged = AutoModelForCausalLM.from_pretrained(out / "hf")  # a plain model, no peft needed
    assert not any("lora" in k for k in merged.state_dict())
    assert any(not torch.equal(merged.state_dict()[k], v) for k, v in base.items())  # adapters are in
    assert AutoTokenizer.from_pretrained(out / "hf").chat_template
    ids = torch.randint(0, merged.config.vocab_size, (2, 16))
    peft_model.eval()
    torch.testing.assert_close(merged(input_ids=ids).logits, peft_model(input_ids=ids).logits, rtol=1e-4, atol=1e-5)
    # The state-dict merge equals peft's own merge_and_unload.
    ours = merged_state_dict(peft_model)
    theirs = peft_model.merge_and_unload().state_dict()
    assert set(ours) == set(theirs)
    for k in theirs:
        torch.testing.assert_close(ours[k], theirs[k])


def load_export_cli():
    spec = importlib.util.spec_from_file_location("sedsft_export_cli", ROOT / "src" / "export.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_export_cli(*overrides: str):
    """``src/export.py`` with these command-line overrides: its preflight, then its Hydra main
    on ``configs/export.yaml`` composed as Hydra does."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    cli = load_export_cli()
    preflight("export.yaml", cli.REQUIRED, argv=list(overrides))
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("export.yaml", overrides=list(overrides))
    return cli.main(cfg)


def test_export_cli_from_lora_checkpoint_merged_and_adapter(lora_run, tmp_path):
    from peft import PeftModel

    out, _ = lora_run
    run_export_cli(f"ckpt={out / 'checkpoints' / 'last.ckpt'}", f"out={tmp_path / 'merged'}", "dtype=bfloat16")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    reference = AutoModelForCausalLM.from_pretrained(out / "hf")
    assert merged.dtype == torch.bfloat16
    for k, v in reference.state_dict().items():
        torch.testing.assert_close(merged.state_dict()[k], v.to(torch.bfloat16))
    assert (tmp_path / "merged" / "sedsft.json").is_file()

    run_export_cli(f"ckpt={out / 'checkpoints' / 'last.ckpt'}", f"out={tmp_path / 'adapter'}", "merge=false")
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert not (tmp_path / "adapter" / "model.safetensors").exists()
    base = AutoModelForCausalLM.from_pretrained(hydra.utils.instantiate(lora_run[1].model).resolved_path())
    adapted = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    ids = torch.randint(0, merged.config.vocab_size, (1, 12))
    torch.testing.assert_close(adapted(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=1e-4, atol=1e-5)


def test_export_cli_from_full_and_sharded_checkpoints(make_config, tmp_path):
    import torch.distributed.checkpoint as dcp

    train(make_config("loss=sed", *QUICK_RUN))
    checkpoint_path = tmp_path / "checkpoints" / "last.ckpt"
    run_export_cli(f"ckpt={checkpoint_path}", f"out={tmp_path / 'from_file'}")
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").state_dict()
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "from_file").state_dict()
    assert set(exported) == set(reference)
    for k, v in reference.items():
        torch.testing.assert_close(exported[k], v)
    tau = (tmp_path / "from_file" / "sedsft.json").read_text()
    assert tau == (tmp_path / "hf" / "sedsft.json").read_text() and '"tau": null' not in tau

    # The layout FSDPStrategy(state_dict_type="sharded") writes: DCP shards + meta.pt.
    checkpoint = torch.load(checkpoint_path, weights_only=True)
    sharded = tmp_path / "sharded.ckpt"
    dcp.save({"model": checkpoint.pop("state_dict")}, checkpoint_id=sharded, no_dist=True)
    checkpoint.pop("optimizer_states", None)
    torch.save(checkpoint, sharded / "meta.pt")
    run_export_cli(f"ckpt={sharded}", f"out={tmp_path / 'from_shards'}")
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "from_shards").state_dict()
    for k, v in reference.items():
        torch.testing.assert_close(exported[k], v)

    deepspeed_dir = tmp_path / "ds.ckpt"
    deepspeed_dir.mkdir()
    (deepspeed_dir / "latest").write_text("checkpoint")
    if not HAS_DEEPSPEED:
        with pytest.raises(ImportError, match="sedsft"):
            run_export_cli(f"ckpt={deepspeed_dir}", f"out={tmp_path / 'x'}")
    with pytest.raises(SystemExit) as missing:  # preflight: out= is missing, exit 2
        run_export_cli(f"ckpt={checkpoint_path}")
    assert missing.value.code == 2
