"""Loading a checkpoint never runs code from it: harmless payloads (each would create a
marker directory if it ran) through every route a checkpoint is read by -- pickled objects in
a .ckpt file, in an FSDP shard's metadata and meta.pt, and under a third-party loader that
asks to unpickle objects; a stored model or loss config naming a callable, nesting one,
or turning remote code on; and Lightning's resume of src/train.py ckpt_path=."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from sedsft.checkpoints import (
    UnsafeCheckpointError,
    load_checkpoint,
    load_model,
    loss_from_stored,
    model_from_checkpoint,
    spec_from_stored,
    weights_only_loads,
)


class Payload:
    """Unpickling this calls ``os.mkdir(marker)``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def plain_checkpoint(model: dict, loss: dict | None = None) -> dict:
    """A checkpoint of plain data only, shaped like src/train.py's."""
    return {
        "state_dict": {"model.w": torch.zeros(2)},
        "sedsft": {"config": {"model": model, "loss": loss or {"_target_": "sedsft.losses.build_loss", "name": "ce"}}},
    }


def test_pickled_objects_in_a_ckpt_are_refused_by_every_loader(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "sedsft": Payload(marker)}, path)
    with pytest.raises(UnsafeCheckpointError, match="pickled Python objects"):
        load_checkpoint(path)
    with pytest.raises(UnsafeCheckpointError):
        load_model(path)  # the route of src/eval.py ckpt= and src/rl.py policy=
    from test_scale import run_export_cli

    with pytest.raises(UnsafeCheckpointError):
        run_export_cli(f"ckpt={path}", f"out={tmp_path / 'out'}")
    assert not marker.exists()


def test_a_file_that_is_no_checkpoint_gets_a_clear_error(tmp_path):
    for name, text in (("notes.ckpt", "not a checkpoint"), ("steps.ckpt", "step,loss\n1,0.5\n"), ("empty.ckpt", "")):
        path = tmp_path / name
        path.write_text(text)
        with pytest.raises(ValueError, match=rf"{name}: not a readable checkpoint.*Lightning \.ckpt"):
            load_checkpoint(path)


def test_sharded_fsdp_metadata_and_meta_pt_cannot_run_code(tmp_path):
    import torch.distributed.checkpoint as dcp

    marker = tmp_path / "ran"
    good = tmp_path / "good.ckpt"
    dcp.save({"model": {"model.w": torch.ones(3)}}, checkpoint_id=good, no_dist=True)
    torch.save({"sedsft": {"config": {}}}, good / "meta.pt")
    assert torch.equal(load_checkpoint(good)["state_dict"]["model.w"], torch.ones(3))

    evil_meta = tmp_path / "evil_meta.ckpt"
    dcp.save({"model": {"model.w": torch.ones(3)}}, checkpoint_id=evil_meta, no_dist=True)
    torch.save({"sedsft": Payload(marker)}, evil_meta / "meta.pt")
    with pytest.raises(UnsafeCheckpointError):
        load_checkpoint(evil_meta)

    evil_dcp = tmp_path / "evil_dcp.ckpt"
    dcp.save({"model": {"model.w": torch.ones(3)}}, checkpoint_id=evil_dcp, no_dist=True)
    torch.save({"sedsft": {"config": {}}}, evil_dcp / "meta.pt")
    (evil_dcp / ".metadata").write_bytes(pickle.dumps(Payload(marker)))  # torch reads it with pickle.load
    with pytest.raises(UnsafeCheckpointError, match="os.mkdir|posix.mkdir"):
        load_checkpoint(evil_dcp)
    assert not marker.exists()


def test_third_party_loaders_asking_for_pickle_run_weights_only(tmp_path):
    """Lightning's DeepSpeed converter asks torch.load to unpickle objects; inside the
    project's loaders that call is forced to weights_only=True."""
    marker = tmp_path / "ran"
    path = tmp_path / "zero_state.pt"
    torch.save({"optimizer_state_dict": Payload(marker)}, path)
    asked = False  # what the converter passes
    with weights_only_loads(), pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=asked)
    assert not marker.exists() and "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ


@pytest.mark.parametrize(
    ("model", "match"),
    [
        ({"_target_": "os.mkdir", "path": "MARKER"}, "not a model spec"),
        ({"_target_": "builtins.open", "file": "MARKER", "mode": "w"}, "not a model spec"),
        ({"_target_": "sedsft.models.hf.missing_local_path", "text": "MARKER"}, "not a model spec"),
        (
            {"_target_": "sedsft.models.hf.CausalLMSpec", "name_or_path": "org/m",
             "model_kwargs": {"x": {"_target_": "os.mkdir", "path": "MARKER"}}},
            r"instantiation keys \['model.model_kwargs.x._target_'\]",
        ),
        ({"_target_": "sedsft.models.hf.CausalLMSpec", "name_or_path": "org/m", "trust_remote_code": True}, "trust_remote_code"),
        (
            {"_target_": "sedsft.models.hf.CausalLMSpec", "name_or_path": "org/m", "model_kwargs": {"trust_remote_code": True}},
            "trust_remote_code",
        ),
    ],
)  # fmt: skip
def test_a_stored_model_config_never_chooses_code(tmp_path, model, match):
    marker = tmp_path / "ran"
    model = {k: (str(marker) if v == "MARKER" else v) for k, v in model.items()}
    path = tmp_path / "plain.ckpt"
    torch.save(plain_checkpoint(model), path)
    checkpoint = load_checkpoint(path)  # plain data: loads
    with pytest.raises(UnsafeCheckpointError, match=match):
        model_from_checkpoint(checkpoint, path)
    assert not marker.exists()


def test_the_projects_own_specs_build_as_data_and_remote_code_only_by_the_caller():
    spec = spec_from_stored({"_target_": "sedsft.models.tiny.TinyLMSpec", "seed": 3, "pretrain_steps": 0})
    assert type(spec).__name__ == "TinyLMSpec" and spec.seed == 3 and spec.trust_remote_code is False
    stored = {"_target_": "sedsft.models.hf.CausalLMSpec", "name_or_path": "org/m", "trust_remote_code": True}
    assert spec_from_stored(stored, overrides={"trust_remote_code": True}).trust_remote_code is True
    with pytest.raises(ValueError, match=r"unknown model option\(s\) \['surprise'\]"):
        spec_from_stored({"_target_": "sedsft.models.hf.CausalLMSpec", "name_or_path": "org/m", "surprise": 1})


def test_a_stored_loss_is_built_through_the_registry_only(tmp_path):
    marker = tmp_path / "ran"
    assert type(loss_from_stored({"_target_": "sedsft.losses.build_loss", "name": "sed", "lam": 0.5})).__name__ == "SEDLoss"
    with pytest.raises(UnsafeCheckpointError, match="only sedsft.losses.build_loss"):
        loss_from_stored({"_target_": "os.mkdir", "path": str(marker)})
    assert not marker.exists()


def test_train_resume_from_a_crafted_checkpoint_runs_no_code(make_config, tmp_path):
    from sedsft.sft.training import train

    marker = tmp_path / "ran"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "epoch": 0, "global_step": 0, "sedsft": Payload(marker)}, path)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        train(make_config("logger=[]", "callbacks=[]", f"ckpt_path={path}"))
    assert not marker.exists()
