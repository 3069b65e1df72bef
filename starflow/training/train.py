"""FSDP2 training, as the official release trains: one code path for 1 or N processes.

A single process is an FSDP run of world size 1, so `--nproc N`, `torchrun` and a plain run
differ only in how the process group starts. Every random draw (batch order, noise
augmentation, label dropout) is made for the whole global batch from a generator seeded by
(seed, step), and each rank takes its slice: N processes equal one process within float
rounding, and a resumed run replays the uninterrupted one exactly.

One file (about 440 lines): the options, the launch, the worker and the consolidation of its
checkpoints share one checkpoint format, and read best together.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import shutil
import socket
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.checkpoint.api import CheckpointException

from starflow.core.atomic import atomic_file, check_target, partial_folder, remove_stale, replace_folder
from starflow.core.bounded import parse_json, read_json
from starflow.core.checks import check_count
from starflow.core.config import StarFlowConfig, load_config
from starflow.core.errors import StarflowError
from starflow.core.sampler import to_bits_per_dim
from starflow.model.checkpoint import SafeCheckpointReader, read_checkpoint_metadata
from starflow.model.flow import FlowBlock, StarFlow
from starflow.model.label_encoder import LabelEncoder
from starflow.training.data import Dataset, LatentShards, open_dataset

PRECISIONS = ("auto", "fp32", "bf16")
KEEP_CHECKPOINTS = 2  # older sharded checkpoints are deleted once a newer one is complete
STATE_FILE = "starflow.json"  # config, classes, step, options and files, inside each checkpoint directory
# Options a resumed run may change: they decide how and where it runs, not what it computes.
RESUMABLE = frozenset(
    {"steps", "resume", "nproc", "device", "threads", "progress", "checkpoint_every", "sample_every",
     "log_every", "export_ema", "activation_checkpointing", "out", "config"}  # config: by content
)  # fmt: skip
CKPT_PREFIX = "_checkpoint_wrapped_module."
MAX_STATE_BYTES = 1 << 20  # a state file holds a config and the options: a few KB


@dataclass
class TrainOptions:
    """Everything a run depends on; written into each checkpoint so resume can check it."""

    config: str
    data: str = "digits"
    out: str = "runs/digits"
    steps: int = 1000
    batch_size: int = 64  # global, split evenly over the processes
    lr: float = 1e-3
    min_lr: float = 1e-6
    warmup: int = 100
    weight_decay: float = 1e-4
    grad_clip: float = 1.0
    drop_label: float = 0.1
    latent_reg: float = 1e-4
    ema_decay: float = 0.999
    seed: int = 0
    nproc: int = 1
    device: str = "auto"  # cuda when available, else cpu
    precision: str = "auto"
    activation_checkpointing: bool = False
    checkpoint_every: int = 500
    sample_every: int = 500
    log_every: int = 10
    resume: bool = False
    threads: int = 0  # torch intra-op threads per process; 0 keeps torch's default
    progress: bool = True
    export_ema: bool = True


class Trainee(nn.Module):
    """The flow plus its label encoder: the FSDP root, so one forward unshards both."""

    def __init__(self, flow: StarFlow, labels: LabelEncoder | None):
        super().__init__()
        self.flow = flow
        self.labels = labels

    def forward(self, x: Tensor, cond: Tensor, latent_reg: float) -> tuple[Tensor, Tensor]:
        """(training loss, official NLL): the official loss + latent-norm regulariser on block outputs."""
        y = self.labels(cond) if self.labels is not None else cond
        out = self.flow(x, y)
        nll = StarFlow.loss(out)
        reg = sum(o.float().pow(2).mean() for o in out.outputs[1:-1])
        return nll + latent_reg * reg, nll


# ---- checks made before any process starts ----------------------------------------------
def check_setup(options: TrainOptions) -> tuple[StarFlowConfig, Dataset]:
    """Validate options, config and data together; the errors name what was asked and what exists."""
    if options.device not in ("auto", "cpu", "cuda"):
        raise StarflowError(f"device: expected auto, cpu or cuda, got {options.device!r}")
    if options.device == "cuda" and not torch.cuda.is_available():
        raise StarflowError("device cuda: torch sees no CUDA device here")
    if options.precision not in PRECISIONS:
        raise StarflowError(f"precision: expected one of {list(PRECISIONS)}, got {options.precision!r}")
    limit, unit = (
        (torch.cuda.device_count(), "CUDA devices")
        if _use_cuda(options)
        else (os.cpu_count() or 1, "CPU cores")
    )
    if not 1 <= options.nproc <= limit:
        raise StarflowError(f"nproc {options.nproc}: must be between 1 and {limit} (the {unit} here)")
    if options.batch_size % options.nproc:
        raise StarflowError(
            f"batch_size {options.batch_size} does not split evenly over nproc {options.nproc}"
        )
    for name in ("steps", "batch_size", "checkpoint_every", "log_every"):
        check_count(getattr(options, name), name)
    if not 0 <= options.drop_label < 1:
        raise StarflowError(f"drop_label: must be in [0, 1), got {options.drop_label}")
    config = load_config(options.config)
    data = open_dataset(options.data)
    want = (config.channel_size, config.latent_size, config.latent_size)
    if tuple(data.image_shape) != want:
        raise StarflowError(
            f"dataset {options.data!r} holds {tuple(data.image_shape)} (C, H, W) images but config "
            f"{options.config!r} expects {want} (channel_size, latent size, latent size)"
        )
    if config.txt_size <= 0 or config.txt_dim <= 0:
        raise StarflowError(
            f"config {options.config!r}: training conditions through the text pathway; set txt_size "
            f"and txt_dim > 0 (got {config.txt_size} and {config.txt_dim})"
        )
    if isinstance(data, LatentShards) and data.text_shape[1] != config.txt_dim:
        raise StarflowError(
            f"dataset {options.data!r}: text embeddings are {data.text_shape[1]} wide, the config's "
            f"txt_dim is {config.txt_dim}"
        )
    if len(data) < options.batch_size:
        raise StarflowError(f"dataset {options.data!r}: {len(data)} items, fewer than batch_size")
    return config, data


# ---- launching ----------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train(options: TrainOptions) -> Path:
    """Run training (spawning `nproc` workers, or joining a torchrun job); returns the exported model."""
    from starflow.core.outputs import check_writable

    config, _ = check_setup(options)
    out = Path(options.out)
    if options.resume:
        check_resume(options, config, latest_checkpoint(out))
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise StarflowError(f"out {out}: cannot create it ({err.strerror or err})") from None
    check_writable(out, f"out {out}")
    if "WORLD_SIZE" in os.environ and "RANK" in os.environ:  # launched by torchrun
        if options.nproc != 1:
            raise StarflowError("nproc: leave it at 1 under torchrun (torchrun's --nproc-per-node decides)")
        dist.init_process_group(_backend(options))
        _run_worker(options)
    elif options.nproc == 1:
        dist.init_process_group(_backend(options), store=dist.HashStore(), rank=0, world_size=1)
        _run_worker(options)
    else:
        import torch.multiprocessing as mp

        try:
            mp.spawn(_spawned, args=(options, _free_port()), nprocs=options.nproc, join=True)
        except mp.ProcessRaisedException as err:  # a worker's traceback, as text
            found = re.search(rf"^{StarflowError.__module__}\.StarflowError: (.*)$", str(err), re.MULTILINE)
            if found is None:
                raise
            raise StarflowError(found[1]) from None  # a full disk while saving, say: its one line
    return Path(options.out) / "model.safetensors"


def read_state(checkpoint: Path) -> dict:
    """The step, config, classes, options and files a checkpoint was saved with (its STATE_FILE)."""
    state = read_json(checkpoint / STATE_FILE, MAX_STATE_BYTES, "checkpoint")
    kinds = {"step": int, "config": dict, "classes": (list, type(None)), "options": dict}
    wrong = [
        k
        for k, kind in kinds.items()
        if not isinstance(state.get(k) if isinstance(state, dict) else None, kind)
    ]
    if isinstance(state, dict) and not isinstance(state.get("files", {}), dict):
        wrong.append("files")
    if wrong:
        raise StarflowError(f"checkpoint {checkpoint}: {STATE_FILE} lacks or mistypes {wrong}")
    return state


def check_resume(options: TrainOptions, config: StarFlowConfig, checkpoint: Path) -> None:
    """A resumed run must compute what the saved one did: same model, data and optimisation;
    and its checkpoint's metadata must pass the restricted unpickler."""
    state = read_state(checkpoint)
    read_checkpoint_metadata(checkpoint)
    saved = state["options"]
    changed = [
        f"{key} {saved[key]!r} -> {value!r}"
        for key, value in dataclasses.asdict(options).items()
        if key not in RESUMABLE and key in saved and saved[key] != value
    ]
    model = {k: v for k, v in config.to_dict().items() if k != "extra"}
    model = json.loads(json.dumps(model))  # tuples as lists, as the saved JSON holds them
    changed += [
        f"config {key} {state['config'].get(key)!r} -> {value!r}"
        for key, value in model.items()
        if state["config"].get(key) != value
    ]
    if changed:
        raise StarflowError(
            f"resume: {checkpoint} was saved with other settings ({'; '.join(changed)}); resume with the "
            "saved ones, or train into a new out directory"
        )


def _use_cuda(options: TrainOptions) -> bool:
    return options.device == "cuda" or (options.device == "auto" and torch.cuda.is_available())


def _backend(options: TrainOptions) -> str:
    return "nccl" if _use_cuda(options) else "gloo"


def _spawned(rank: int, options: TrainOptions, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_RANK=str(rank))
    dist.init_process_group(_backend(options), rank=rank, world_size=options.nproc)
    _run_worker(options)


def _run_worker(options: TrainOptions) -> None:
    try:
        Trainer(options).run()
    finally:
        dist.destroy_process_group()


# ---- schedule -----------------------------------------------------------------------------
def lr_at(step: int, options: TrainOptions) -> float:
    """Linear warmup, then cosine from lr to min_lr at the last step (the official schedule)."""
    if step < options.warmup:
        return options.lr * (step + 1) / options.warmup
    progress = (step - options.warmup) / max(options.steps - options.warmup, 1)
    return options.min_lr + 0.5 * (options.lr - options.min_lr) * (1 + math.cos(math.pi * progress))


def _clean(name: str) -> str:
    return name.replace(CKPT_PREFIX, "")


def checkpoints(out: Path) -> list[Path]:
    """Complete sharded checkpoints, oldest first (partial folders and incomplete ones are never listed)."""
    return [c for c in sorted((out / "checkpoints").glob("step_[0-9]*[0-9]")) if not lacks(c)]


def lacks(checkpoint: Path) -> str:
    """What a checkpoint folder lacks ("" when complete): its state file (or a readable one),
    DCP's .metadata, or a shard its state lists (missing, or not the size it was saved with). The
    .metadata's content is the restricted unpickler's to judge (`read_checkpoint_metadata`)."""
    for name in (STATE_FILE, ".metadata"):
        if not (checkpoint / name).is_file():
            return f"no {name}"
    try:
        files = read_state(checkpoint).get("files", {})
    except StarflowError as err:  # truncated by a copy cut short, say: the folder is incomplete
        return f"unreadable {STATE_FILE} ({err})"
    for name, size in files.items():
        file = checkpoint / name
        if not file.is_file() or file.stat().st_size != size:
            return f"{name} missing or not its saved {size} bytes"
    return ""


def latest_checkpoint(out: Path) -> Path:
    """The latest complete checkpoint to resume from; newer incomplete ones (a copy cut short, a
    damaged disk) are skipped with a warning naming what they lack."""
    complete = checkpoints(out)
    if not complete:
        raise StarflowError(f"resume: no complete checkpoint under {out / 'checkpoints'}")
    for folder in sorted((out / "checkpoints").glob("step_[0-9]*[0-9]")):
        if folder.name > complete[-1].name:
            warnings.warn(
                f"checkpoint {folder}: incomplete ({lacks(folder)}); resuming from {complete[-1].name}",
                stacklevel=2,
            )
    return complete[-1]


def kept_metrics(path: Path, step: int) -> str:
    """The records of metrics.jsonl up to `step`, which a resumed run keeps (it rewrites the later
    ones). A last line that is not a record, what a kill mid-write leaves, is dropped with a
    warning; a bad line before it is an error naming the line."""
    try:
        lines = path.read_bytes().splitlines()
    except FileNotFoundError:
        return ""
    except OSError as err:
        raise StarflowError(f"metrics {path}: cannot read it ({err.strerror or err})") from None
    kept = []
    for number, line in enumerate(lines, 1):
        try:
            saved = parse_json(line, f"metrics {path}: line {number}")["step"]
            if not isinstance(saved, int):
                raise TypeError(saved)
        except (StarflowError, TypeError, KeyError):
            if number < len(lines):
                raise StarflowError(f"metrics {path}: line {number} is not a record with a step") from None
            warnings.warn(f"metrics {path}: dropped its last line, cut short by a killed run", stacklevel=2)
            break
        if saved <= step:
            kept.append(line.decode() + "\n")
    return "".join(kept)


def _os_error(err: BaseException) -> OSError | None:
    """The OSError behind a failed save (DCP wraps each rank's in a CheckpointException)."""
    if isinstance(err, OSError):
        return err
    if isinstance(err, CheckpointException):
        return next((e for e, _ in err.failures.values() if isinstance(e, OSError)), None)
    return None


# ---- the worker ---------------------------------------------------------------------------
class Trainer:
    def __init__(self, options: TrainOptions):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        self.options = o = options
        if o.threads:
            torch.set_num_threads(o.threads)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        local = int(os.environ.get("LOCAL_RANK", 0))
        self.device = torch.device(f"cuda:{local}" if _use_cuda(o) else "cpu")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.out = Path(o.out)
        self.config, self.data = check_setup(o)
        self.classes = list(self.data.classes)

        torch.manual_seed(o.seed)  # same init on every rank; fully_shard keeps each rank's shard
        labels = (
            LabelEncoder(self.classes, self.config.txt_size, self.config.txt_dim) if self.classes else None
        )
        self.model = Trainee(StarFlow(self.config), labels).to(self.device)
        if o.activation_checkpointing:
            from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

            for block in self.model.flow.blocks:
                if isinstance(block, FlowBlock):
                    for j, layer in enumerate(block.attn_blocks):
                        block.attn_blocks[j] = checkpoint_wrapper(layer)
        bf16 = o.precision == "bf16" or (o.precision == "auto" and self.device.type == "cuda")
        policy = MixedPrecisionPolicy(
            param_dtype=torch.bfloat16 if bf16 else torch.float32, reduce_dtype=torch.float32
        )
        # An explicit mesh: FSDP's default would pick CUDA whenever it exists, even for --device cpu.
        mesh = init_device_mesh(self.device.type, (self.world,))
        for block in self.model.flow.blocks:
            if isinstance(block, FlowBlock):
                for layer in block.attn_blocks:
                    fully_shard(layer, mesh=mesh, mp_policy=policy)
        fully_shard(self.model, mesh=mesh, mp_policy=policy)
        self.params = dict((_clean(n), p) for n, p in self.model.named_parameters())
        self.optimizer = torch.optim.AdamW(
            self.params.values(), lr=o.lr, betas=(0.9, 0.95), weight_decay=o.weight_decay
        )
        self.ema = {n: p.detach().clone() for n, p in self.params.items()}
        self.step = 0

    # -- data: one global batch per step, each rank takes its slice --
    def batch(self, step: int) -> tuple[Tensor, Tensor]:
        o, n = self.options, len(self.data)
        per_epoch = n // o.batch_size
        epoch, k = divmod(step, per_epoch)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(o.seed * 1_000_003 + epoch))
        indices = order[k * o.batch_size : (k + 1) * o.batch_size]
        x, cond = self.data.batch(indices)
        g = torch.Generator().manual_seed(o.seed * 1_000_003 + 500_009 + step)
        x = x + self.config.noise_std * torch.randn(x.shape, generator=g)
        drop = torch.rand(o.batch_size, generator=g) < o.drop_label
        if self.classes:
            cond = torch.where(drop, self.model.labels.null_label, cond)
        else:  # text: the zero embedding is the empty prompt
            cond = torch.where(drop[:, None, None], torch.zeros_like(cond), cond)
        part = o.batch_size // self.world
        mine = slice(self.rank * part, (self.rank + 1) * part)
        return x[mine].to(self.device), cond[mine].to(self.device)

    def train_step(self) -> dict[str, float]:
        o = self.options
        lr = lr_at(self.step, o)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        x, cond = self.batch(self.step)
        loss, nll = self.model(x, cond, o.latent_reg)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.optimizer.param_groups[0]["params"], o.grad_clip)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        finite = bool(torch.isfinite(norm))  # the norm is global, so every rank agrees
        if finite:
            self.optimizer.step()
            # Warm the EMA up: a fixed 0.999 would still hold 37% of the random init at step 1000.
            decay = min(o.ema_decay, (1 + self.step) / (10 + self.step))
            with torch.no_grad():
                for name, p in self.params.items():
                    self.ema[name].lerp_(p.detach(), 1 - decay)
        self.optimizer.zero_grad(set_to_none=True)
        stats = torch.stack([nll.detach().float(), loss.detach().float()])
        dist.all_reduce(stats)  # a sum: gloo has no AVG
        nll_mean, loss_mean = (stats / self.world).tolist()
        self.step += 1
        bpd = to_bits_per_dim(nll_mean)
        return dict(
            step=self.step, loss=loss_mean, nll=nll_mean, bits_per_dim=bpd, lr=lr,
            grad_norm=float(norm), skipped=not finite,
        )  # fmt: skip

    # -- checkpoints --
    def _state(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        return {"model": model_state, "optim": optim_state, "ema": self.ema}

    def save(self) -> None:
        """Sharded save into a hidden partial folder (`starflow.core.atomic`), renamed whole once
        complete: a kill or a full disk leaves no step_N folder, only a partial that the next
        run removes. The state file, written last, lists the saved shards and their sizes."""
        final = self.out / "checkpoints" / f"step_{self.step:07d}"
        staged: list[Path | None] = [None]
        try:
            if self.rank == 0:
                final.parent.mkdir(exist_ok=True)
                staged = [partial_folder(final)]
            dist.broadcast_object_list(staged, src=0)
            dcp.save(self._state(), checkpoint_id=staged[0])
            if self.rank == 0:
                meta = {
                    "step": self.step,
                    "config": {k: v for k, v in self.config.to_dict().items() if k != "extra"},
                    "classes": self.classes,
                    "options": dataclasses.asdict(self.options),
                    "files": {
                        f.name: f.stat().st_size for f in sorted(staged[0].iterdir()) if f.name != ".metadata"
                    },
                }
                with atomic_file(staged[0] / STATE_FILE) as f:
                    f.write(json.dumps(meta, indent=1).encode())
                replace_folder(staged[0], final)
                for old in checkpoints(self.out)[:-KEEP_CHECKPOINTS]:
                    shutil.rmtree(old)
        except (OSError, CheckpointException) as err:
            cause = _os_error(err)
            if cause is None:
                raise
            raise StarflowError(
                f"checkpoint {final}: cannot write ({cause.strerror or cause}); not saved, the "
                "checkpoints before it stay"
            ) from None
        finally:
            if self.rank == 0 and staged[0] is not None:
                shutil.rmtree(staged[0], ignore_errors=True)  # gone already when it was renamed
        dist.barrier()

    def load_latest(self) -> None:
        from torch.distributed.checkpoint.state_dict import set_state_dict

        latest = checkpoints(self.out)[-1]
        state = self._state()
        dcp.load(state, storage_reader=SafeCheckpointReader(latest))
        set_state_dict(
            self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]
        )
        self.step = read_state(latest)["step"]

    # -- records --
    @torch.no_grad()
    def sample_grid(self) -> None:
        """A PNG of EMA samples, one column per class; every rank samples (the layers are sharded)."""
        from starflow.core.outputs import save_png
        from starflow.core.sampler import SampleOptions
        from starflow.model.reference import ReferenceGenerator
        from starflow.model.text_encoder import LabelTextEncoder

        backup = {n: p.detach().clone() for n, p in self.params.items()}
        for name, p in self.params.items():
            p.detach().copy_(self.ema[name])
        self.model.unshard()
        try:
            generator = ReferenceGenerator(self.model.flow, LabelTextEncoder(self.model.labels))
            sampling = SampleOptions(guidance=self.config.cfg)
            images = generator.generate(self.classes * 2, sampling=sampling, denoise=False).images
        finally:
            self.model.reshard()
            for name, p in self.params.items():
                p.detach().copy_(backup[name])
        if self.rank == 0:
            path = self.out / "samples" / f"step_{self.step:07d}.png"
            path.parent.mkdir(exist_ok=True)
            save_png(path, images, columns=len(self.classes))

    def run(self) -> None:
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        from starflow.core.outputs import save_text

        o = self.options
        if o.resume:
            self.load_latest()
        metrics_path = self.out / "metrics.jsonl"
        if self.rank == 0:
            remove_stale(self.out / "checkpoints")  # the partial saves of killed runs
            # a resumed run rewrites the steps after its checkpoint
            save_text(metrics_path, kept_metrics(metrics_path, self.step) if o.resume else "")
        progress = Progress(
            TextColumn("step {task.completed}/{task.total}"),
            BarColumn(),
            TextColumn("{task.fields[status]}"),
            TimeRemainingColumn(),
            disable=not (o.progress and self.rank == 0),
        )
        task = progress.add_task("train", total=o.steps, completed=self.step, status="")
        began, mark = time.perf_counter(), (self.step, time.perf_counter())
        with progress, metrics_path.open("a") if self.rank == 0 else contextlib.nullcontext() as log:
            while self.step < o.steps:
                record = self.train_step()
                if self.step % o.log_every == 0 or self.step == o.steps:
                    now = time.perf_counter()
                    its = (self.step - mark[0]) / (now - mark[1])
                    mark = (self.step, now)
                    record.update(it_per_s=its, images_per_s=its * o.batch_size, seconds=now - began)
                    if log is not None:
                        try:
                            log.write(json.dumps(record) + "\n")
                            log.flush()
                        except OSError as err:
                            raise StarflowError(
                                f"metrics {metrics_path}: cannot write ({err.strerror or err})"
                            ) from None
                    progress.update(
                        task,
                        status=f"loss {record['loss']:.4f} bpd {record['bits_per_dim']:.3f} "
                        f"lr {record['lr']:.2e} {its:.1f} it/s",
                    )
                progress.update(task, completed=self.step)
                if o.sample_every and self.classes and self.step % o.sample_every == 0:
                    self.sample_grid()
                if self.step % o.checkpoint_every == 0 or self.step == o.steps:
                    self.save()
        if self.rank == 0:
            consolidate(checkpoints(self.out)[-1], self.out / "model.safetensors", ema=o.export_ema)
        dist.barrier()


# ---- consolidation ------------------------------------------------------------------------
def consolidate(checkpoint: Path, out: Path, ema: bool = True) -> Path:
    """One sharded checkpoint -> `out` (.safetensors, config embedded) + `<out>.labels.safetensors`.

    Runs in one process without a process group: DCP reshards the saved shards into full tensors.
    """
    from starflow.core.config import config_from_dict
    from starflow.model.checkpoint import save_model
    from starflow.model.label_encoder import labels_path, save_label_encoder

    checkpoint = Path(checkpoint)
    missing = lacks(checkpoint)
    if missing:
        raise StarflowError(f"checkpoint {checkpoint}: not a complete training checkpoint ({missing})")
    if out.suffix != ".safetensors":
        raise StarflowError(f"out {out}: expected a .safetensors path")
    for file in (out, labels_path(out)):
        check_target(file, f"out {file}")  # a symlink or a device there is refused before loading
    meta = read_state(checkpoint)
    read_checkpoint_metadata(checkpoint)  # refused before torch reads it (its errors come wrapped)
    config = config_from_dict(meta["config"], f"checkpoint {checkpoint}")
    classes = meta["classes"]
    labels = LabelEncoder(classes, config.txt_size, config.txt_dim) if classes else None
    model = Trainee(StarFlow(config), labels)
    state = {n: p.detach() for n, p in model.named_parameters()}
    key = "ema" if ema else "model"
    with warnings.catch_warnings():  # "assuming ... a single process": exactly what is meant here
        warnings.simplefilter("ignore", UserWarning)
        dcp.load({key: state}, storage_reader=SafeCheckpointReader(checkpoint), no_dist=True)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if labels is not None:
            save_label_encoder(labels, labels_path(out))
        save_model(model.flow.eval(), out)
    except OSError as err:
        raise StarflowError(f"out {out}: cannot write ({err.strerror or err}); nothing was written") from None
    return out
