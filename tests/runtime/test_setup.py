"""The run folder: overwrite replaces only a prefalign run and only what it wrote, a new run never lands on
another one, resume keeps the config the run started with, and a folder that cannot be written is named."""

from __future__ import annotations

import errno
import json

import pytest
import yaml

from prefalign import GRPOConfig, OutputError, SFTConfig
from prefalign.errors import ConfigError
from prefalign.runtime import setup
from prefalign.runtime.run_folder import RESUME_MAY_CHANGE, is_run
from prefalign.runtime.setup import prepare_run_dir


def sft_config(folder, **train) -> SFTConfig:
    config = SFTConfig()
    config.train.output_dir = str(folder)
    for key, value in train.items():
        setattr(config.train, key, value)
    return config


def make_run(folder, *, steps: int = 4, checkpoint: int | None = 2, final: bool = True):
    """A folder as an SFT run leaves it: config.yaml, metrics.jsonl, a checkpoint, final/, data_stats.json."""
    prepare_run_dir(sft_config(folder), "sft")
    records = [json.dumps({"step": step, "loss": 1.0}) for step in range(1, steps + 1)]
    (folder / "metrics.jsonl").write_text("".join(record + "\n" for record in records))
    (folder / "data_stats.json").write_text("{}")
    if checkpoint:
        step = folder / "checkpoints" / f"step-{checkpoint:06d}"
        step.mkdir(parents=True)
        (step / "state.json").write_text(json.dumps({"step": checkpoint}))
    if final:
        (folder / "final").mkdir()
        (folder / "final" / "model.safetensors").write_text("weights")
    return folder


def names(folder) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


def test_overwrite_refuses_a_folder_that_is_not_a_run(tmp_path):
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / "notes.txt").write_text("my notes")
    (project / "src" / "main.py").write_text("print('mine')")
    refused = r"project.* is not a prefalign run folder.*notes\.txt.*train\.output_dir"
    with pytest.raises(ConfigError, match=refused):
        prepare_run_dir(sft_config(project, overwrite=True), "sft")
    assert names(project) == ["notes.txt", "src"] and (project / "src" / "main.py").exists()


def test_overwrite_of_the_working_directory_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data.jsonl").write_text("{}\n")
    with pytest.raises(ConfigError, match="is not a prefalign run folder"):
        prepare_run_dir(sft_config(".", overwrite=True), "sft")
    assert names(tmp_path) == ["data.jsonl"]


def test_overwrite_replaces_only_what_the_run_wrote(tmp_path):
    run = make_run(tmp_path / "run")
    (run / "notes.txt").write_text("why this run")
    (run / "analysis").mkdir()
    (run / "analysis" / "plot.py").write_text("")
    (run / "round-1").mkdir()  # iterative DPO's
    (run / ".final-k2j3").mkdir()  # a model save killed midway
    assert is_run(run)
    prepare_run_dir(sft_config(run, overwrite=True), "sft")
    assert names(run) == ["analysis", "config.yaml", "notes.txt"]
    assert (run / "notes.txt").read_text() == "why this run" and (run / "analysis" / "plot.py").exists()
    # An empty or missing folder is simply used.
    prepare_run_dir(sft_config(tmp_path / "new", overwrite=True), "sft")
    assert names(tmp_path / "new") == ["config.yaml"]


def test_a_new_run_never_lands_on_a_run_or_on_files_it_would_replace(tmp_path):
    finished = make_run(tmp_path / "finished")
    with pytest.raises(ConfigError, match="already holds a finished run.*--train.overwrite true"):
        prepare_run_dir(sft_config(finished), "sft")
    unfinished = make_run(tmp_path / "unfinished", final=False)
    refused = r"unfinished run \(metrics up to step 4, checkpoint step 2\).*--train.resume"
    with pytest.raises(ConfigError, match=refused):
        prepare_run_dir(sft_config(unfinished), "sft")
    # The user's own config.yaml beside other files: a run would replace it.
    mine = tmp_path / "experiment"
    mine.mkdir()
    (mine / "config.yaml").write_text("# tuned by hand\ntrain:\n  learning_rate: 0.001\n")
    (mine / "notes.txt").write_text("")
    with pytest.raises(ConfigError, match=r"not a prefalign run folder, but it holds config\.yaml"):
        prepare_run_dir(sft_config(mine), "sft")
    assert (mine / "config.yaml").read_text().startswith("# tuned by hand")
    # Other files (iterative DPO writes a round's pairs before its DPO run starts there) are fine.
    round_dir = tmp_path / "round-1"
    round_dir.mkdir()
    (round_dir / "pairs.jsonl").write_text("")
    prepare_run_dir(sft_config(round_dir), "sft")
    assert names(round_dir) == ["config.yaml", "pairs.jsonl"]


def test_resume_refuses_a_changed_config_and_keeps_the_original(tmp_path):
    run = make_run(tmp_path / "run", final=False)
    original = (run / "config.yaml").read_text()
    changed = sft_config(run, resume=True, learning_rate=1e-3, batch_size=4)
    changed.data.max_samples = 10
    with pytest.raises(ConfigError) as error:
        prepare_run_dir(changed, "sft")
    message = str(error.value)
    changes = (
        "train.learning_rate: 2e-05 -> 0.001", "train.batch_size: 8 -> 4", "data.max_samples: None -> 10",
    )
    assert all(change in message for change in changes), message
    assert "train.log_every" in message  # what may change is listed
    # What cannot alter a training step may change; config.yaml keeps the values the run started with.
    allowed = sft_config(
        run, resume=True, log_every=5, save_every=3, eval_every=2, num_threads=1, progress=False,
        report_to=["tensorboard"], keep_checkpoints=1,
    )
    prepare_run_dir(allowed, "sft")
    assert (run / "config.yaml").read_text() == original
    assert {"train.log_every", "train.num_threads", "train.progress"} <= RESUME_MAY_CHANGE


def test_resume_without_a_checkpoint_is_refused_before_anything_loads(tmp_path):
    run = make_run(tmp_path / "run", checkpoint=None, final=False)
    with pytest.raises(ConfigError, match="no checkpoint in .*nothing to resume"):
        prepare_run_dir(sft_config(run, resume=True), "sft")


def test_resume_takes_the_value_a_run_fitted_at_run_time(tmp_path):
    """GRPO's max_new_tokens = 0 is fitted to the model's context and written back to config.yaml; a resume
    that leaves it unset takes the run's value, one that sets another is refused."""
    config = GRPOConfig()
    config.train.output_dir = str(tmp_path)
    config.max_new_tokens = 12
    prepare_run_dir(config, "grpo")
    (tmp_path / "checkpoints" / "step-000001").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step-000001" / "state.json").write_text("{}")
    config.max_new_tokens, config.train.resume = 0, True
    prepare_run_dir(config, "grpo")
    assert config.max_new_tokens == 12
    config.max_new_tokens = 20
    with pytest.raises(ConfigError, match="max_new_tokens: 12 -> 20"):
        prepare_run_dir(config, "grpo")


def test_a_folder_that_cannot_be_written_is_named(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(OutputError, match=r"cannot write .*a-file.*train\.output_dir"):
        prepare_run_dir(sft_config(blocker / "run"), "sft")

    def read_only(config, path):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(setup, "save_config", read_only)
    with pytest.raises(OutputError, match=r"cannot write '.*run': it is not writable.*train\.output_dir"):
        prepare_run_dir(sft_config(tmp_path / "run"), "sft")


def test_the_resolved_config_is_written_whole(tmp_path):
    prepare_run_dir(sft_config(tmp_path / "run"), "sft")
    written = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert written["train"]["output_dir"] == str(tmp_path / "run")
    assert names(tmp_path / "run") == ["config.yaml"]  # no staging file left behind


def test_fsdp_loads_float32_master_weights_and_refuses_half_precision_ones(monkeypatch):
    config = SFTConfig()
    assert setup.master_weights(config) is config.model  # DDP: model.dtype as given
    config.distributed.strategy = "fsdp"
    assert setup.master_weights(config) is config.model  # one process, no group: nothing to shard
    monkeypatch.setattr(setup.distributed, "group_active", lambda: True)
    assert setup.master_weights(config).dtype == "float32"  # auto: never bf16 shards
    assert config.model.dtype == "auto"  # the run's own config is left as the user wrote it
    config.model.dtype = "bfloat16"
    with pytest.raises(ConfigError, match="set --distributed.compute_dtype bfloat16 for bf16 forwards"):
        setup.master_weights(config)


def test_a_frozen_copy_of_fsdp_master_weights_takes_the_compute_dtype(monkeypatch):
    import torch

    config = SFTConfig()
    config.distributed.strategy = "fsdp"
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert setup.copy_dtype(config, cuda) is None  # no process group: nothing is sharded
    monkeypatch.setattr(setup.distributed, "group_active", lambda: True)
    assert setup.copy_dtype(config, cuda) == torch.bfloat16  # auto on CUDA: bf16, as DDP's model would be
    assert setup.copy_dtype(config, cpu) is None  # fp32 forwards: the copy stays as loaded
    config.distributed.strategy = "ddp"
    assert setup.copy_dtype(config, cuda) is None
