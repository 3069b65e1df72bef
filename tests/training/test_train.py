"""FSDP training: 2 processes equal 1, resume is exact, consolidation loads, bad input fails cleanly."""

from __future__ import annotations

import json
import shutil
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from starflow import load_model
from starflow.cli.main import app
from starflow.core.errors import StarflowError
from starflow.training.data import LatentShards, image_folder_dataset
from starflow.training.train import TrainOptions, checkpoints, consolidate, latest_checkpoint, train

TINY = dict(
    channel_size=1, img_size=8, patch_size=1, channels=32, layers_per_block=[1, 1], head_dim=32,
    rope=True, sos=True, txt_size=1, txt_dim=8, cond_top_only=True, use_softplus=True,
    use_final_norm=True, soft_clip=4.0, seq_order="L2R", noise_std=0.1,
)  # fmt: skip


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "tiny.yaml"
    path.write_text(yaml.safe_dump({"model": TINY}))
    return path


def options(config: Path, out: Path, **overrides) -> TrainOptions:
    # lr 1e-3 (the default): the key part of qkv.bias has an analytically zero gradient (softmax
    # ignores a per-query constant), and Adam scales its rounding noise by lr / eps.
    base = dict(
        config=str(config), data="digits", out=str(out), steps=4, batch_size=8, lr=1e-3, warmup=1,
        checkpoint_every=2, sample_every=0, log_every=1, threads=1, progress=False, export_ema=False,
        device="cpu",
    )  # fmt: skip
    return TrainOptions(**{**base, **overrides})


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def single_run(tiny_config: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("single")
    train(options(tiny_config, out))
    return out


def test_two_processes_equal_one(tiny_config: Path, single_run: Path, tmp_path: Path) -> None:
    train(options(tiny_config, tmp_path, nproc=2))
    one, two = load_file(single_run / "model.safetensors"), load_file(tmp_path / "model.safetensors")
    assert one.keys() == two.keys()
    errors = {k: (one[k] - two[k]).abs().max().item() for k in one}
    assert max(errors.values()) < 1e-5, errors
    labels = load_file(single_run / "model.labels.safetensors")["embedding.weight"]
    labels2 = load_file(tmp_path / "model.labels.safetensors")["embedding.weight"]
    assert (labels - labels2).abs().max().item() < 1e-5
    assert losses(tmp_path) == pytest.approx(losses(single_run), abs=1e-5)
    assert losses(single_run)[-1] < losses(single_run)[0]


def test_resume_is_exact(tiny_config: Path, single_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(single_run, run)
    # Interrupted after the step-2 checkpoint: the last checkpoint and the export never happened.
    shutil.rmtree(run / "checkpoints" / "step_0000004")
    (run / "model.safetensors").unlink()
    train(options(tiny_config, run, resume=True))
    before, after = load_file(single_run / "model.safetensors"), load_file(run / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert losses(run) == losses(single_run)


def test_resume_skips_an_incomplete_checkpoint_and_a_torn_log_line(
    tiny_config: Path, single_run: Path, tmp_path: Path
) -> None:
    """Killed after the step-4 checkpoint lost a shard (a copy cut short) and mid-way through a
    metrics line: the run resumes from step 2, with a warning for each, and ends as if uninterrupted."""
    run = tmp_path / "run"
    shutil.copytree(single_run, run)
    (shard,) = (run / "checkpoints" / "step_0000004").glob("*.distcp")
    shard.unlink()
    with (run / "metrics.jsonl").open("a") as log:
        log.write('{"step": 5, "loss": 0.')
    (run / "model.safetensors").unlink()
    with pytest.warns(UserWarning) as warned:
        train(options(tiny_config, run, resume=True))
    messages = [str(w.message) for w in warned]
    assert any("step_0000004: incomplete (" in m and "resuming from step_0000002" in m for m in messages)
    assert any("metrics.jsonl: dropped its last line" in m for m in messages)
    before, after = load_file(single_run / "model.safetensors"), load_file(run / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert losses(run) == losses(single_run)


def test_resume_skips_a_checkpoint_whose_state_file_is_truncated(single_run: Path, tmp_path: Path) -> None:
    """A truncated starflow.json (a copy cut short) makes that checkpoint incomplete, not the
    run's end: resume takes the one before with a warning, and the pruning after a save (which
    lists the complete checkpoints) goes on."""
    run = tmp_path / "run"
    shutil.copytree(single_run / "checkpoints", run / "checkpoints")
    state = run / "checkpoints" / "step_0000004" / "starflow.json"
    state.write_bytes(state.read_bytes()[:20])
    assert [c.name for c in checkpoints(run)] == ["step_0000002"]
    with pytest.warns(
        UserWarning,
        match=r"step_0000004: incomplete \(unreadable starflow.json \(.*resuming from step_0000002",
    ):
        assert latest_checkpoint(run).name == "step_0000002"


def test_a_full_disk_while_saving_is_one_error_and_leaves_no_partial(
    tiny_config: Path, tmp_path: Path, monkeypatch
) -> None:
    """The first save also meets a link planted where the old code put its temp folder
    (step_N.tmp): it is neither followed nor in the way. The second save finds the disk full."""
    from torch.distributed.checkpoint.filesystem import FileSystem

    victim = tmp_path / "victim"
    victim.mkdir()
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "step_0000001.tmp").symlink_to(victim)
    create_stream = FileSystem.create_stream

    def filling(self, path, mode):
        if "step_0000002" in str(path):
            raise OSError(28, "No space left on device")
        return create_stream(self, path, mode)

    monkeypatch.setattr(FileSystem, "create_stream", filling)
    final = tmp_path / "run" / "checkpoints" / "step_0000002"
    message = f"checkpoint {final}: cannot write \\(No space left on device\\); not saved"
    with pytest.raises(StarflowError, match=message):
        train(options(tiny_config, tmp_path / "run", steps=2, checkpoint_every=1))
    assert sorted(p.name for p in final.parent.iterdir()) == ["step_0000001", "step_0000001.tmp"]
    assert list(victim.iterdir()) == []


def test_a_workers_error_is_its_one_line(tiny_config: Path, tmp_path: Path, monkeypatch) -> None:
    """With --nproc N a worker's StarflowError (a full disk while saving) reaches the parent as a
    traceback in text; the user sees its one line."""
    import torch.multiprocessing as mp

    def failing(*args, **kwargs):
        try:
            raise StarflowError("checkpoint x: full")
        except StarflowError:  # what torch's spawn reports: the worker's traceback as text
            trace = traceback.format_exc()
        raise mp.ProcessRaisedException(f"\n\n-- Process 1 terminated with this error:\n{trace}", 1, 7)

    monkeypatch.setattr(mp, "spawn", failing)
    with pytest.raises(StarflowError, match="^checkpoint x: full$"):
        train(options(tiny_config, tmp_path, nproc=2))


def test_activation_checkpointing_changes_nothing(
    tiny_config: Path, single_run: Path, tmp_path: Path
) -> None:
    train(options(tiny_config, tmp_path, activation_checkpointing=True))
    plain, wrapped = load_file(single_run / "model.safetensors"), load_file(tmp_path / "model.safetensors")
    assert plain.keys() == wrapped.keys()  # the wrapper's module prefix never reaches a checkpoint
    assert max((plain[k] - wrapped[k]).abs().max().item() for k in plain) < 1e-6


def test_resume_without_checkpoint(tiny_config: Path, tmp_path: Path) -> None:
    with pytest.raises(StarflowError, match="resume: no complete checkpoint"):
        train(options(tiny_config, tmp_path, resume=True))


def test_consolidate_cli_exports_ema_that_load_model_reads(single_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "ema.safetensors"
    ckpt = checkpoints(single_run)[-1]
    result = CliRunner().invoke(app, ["checkpoint", "consolidate", str(ckpt), "--out", str(out)])
    assert result.exit_code == 0, result.output
    model = load_model(None, out)
    assert model.config.txt_dim == TINY["txt_dim"]
    raw = load_file(single_run / "model.safetensors")
    ema = model.state_dict()
    # EMA (decay 0.999 over 4 steps) stays near the init, unlike the raw weights: they must differ.
    assert any(not torch.equal(raw[k], ema[k]) for k in raw)
    assert (tmp_path / "ema.labels.safetensors").is_file()


def test_consolidate_rejects_unfinished_save(single_run: Path, tmp_path: Path) -> None:
    tmp = tmp_path / "step_0000002.tmp"
    shutil.copytree(checkpoints(single_run)[0], tmp)
    (tmp / "starflow.json").unlink()  # a save that died before its last file
    with pytest.raises(StarflowError, match="not a complete training checkpoint"):
        consolidate(tmp, tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


# ---- bad input: clear errors, nothing written ---------------------------------------------
def write_png(path: Path, size: tuple[int, int]) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros(size, dtype=np.uint8)).save(path)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda root: None, "no such folder"),
        (lambda root: root.mkdir(), "no class sub-folders"),
        (lambda root: (root / "a").mkdir(parents=True), "holds no images"),
        (
            lambda root: (write_png(root / "a" / "1.png", (8, 8)), write_png(root / "b" / "2.png", (8, 9))),
            "mixed image sizes",
        ),
    ],
    ids=["missing", "empty", "empty-class", "mixed-sizes"],
)
def test_bad_dataset_folder(tiny_config: Path, tmp_path: Path, make, message: str) -> None:
    make(tmp_path / "data")
    out = tmp_path / "out"
    with pytest.raises(StarflowError, match=message):
        train(options(tiny_config, out, data=str(tmp_path / "data")))
    assert not out.exists()


def test_config_latent_size_mismatch(tmp_path: Path) -> None:
    config = tmp_path / "big.yaml"
    config.write_text(yaml.safe_dump({"model": {**TINY, "img_size": 16}}))
    with pytest.raises(StarflowError, match=r"holds \(1, 8, 8\) .* expects \(1, 16, 16\)"):
        train(options(config, tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_nproc_too_large_via_cli(tiny_config: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = ["train", "--config", str(tiny_config), "--out", str(out), "--nproc", "100000"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert "nproc 100000: must be between 1 and" in result.output
    assert not out.exists()


def test_image_folder_labels_follow_sorted_class_folders(tmp_path: Path) -> None:
    for name in ("cat", "ant"):
        write_png(tmp_path / name / "0.png", (8, 8))
    data = image_folder_dataset(tmp_path)
    assert data.classes == ["ant", "cat"]
    x, labels = data.batch(torch.tensor([0, 1]))
    assert x.shape == (2, 1, 8, 8) and x.min() == -1 and labels.tolist() == [0, 1]


def test_latent_shards_read_rows_across_shards(tmp_path: Path) -> None:
    for i in range(2):
        latents = torch.full((3, 4, 2, 2), float(i))
        save_file({"latents": latents, "text": torch.zeros(3, 5, 6)}, tmp_path / f"{i}.safetensors")
    data = LatentShards(tmp_path)
    x, text = data.batch(torch.tensor([0, 4]))
    assert len(data) == 6 and data.image_shape == (4, 2, 2)
    assert x[:, 0, 0, 0].tolist() == [0.0, 1.0] and text.shape == (2, 5, 6)
