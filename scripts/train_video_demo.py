"""Train the embedded STARFlow-V demo model (moving digits) on CPU and write it into the package.

The flow and its learned denoiser train together as in the official trainer: the flow on the
official loss of noise-augmented clips, the denoiser (its own optimizer) on the gradient of that
loss with respect to the noisy input. The official target is `noise_std * numel * grad`, which
makes the official sampler's `x - 0.3 * D(x)` the Tweedie step at noise_std 0.3; this model is
trained at its own noise_std, so the target is scaled by noise_std / 0.3 to keep that step
Tweedie's. As STARFlow-V starts from a STARFlow image model, the flow starts from the embedded
digits image model by default (`--from-image`): with RoPE and the frame index as the third
coordinate its weights fit the video flow unchanged (to them frame 0 is an image, on a larger
canvas than they were trained on); training then adapts them and teaches the deep block the
motion. One process, one thread by default (the machine is shared);
an EMA of the weights is what gets written.

    python scripts/train_video_demo.py [--steps 2000] [--out runs/digits-video] [--install]
    python scripts/train_video_demo.py --init runs/digits-video/model.safetensors --lr 4e-4 --warmup 50
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from starflow.core.config import DEMO_CHECKPOINT, load_config
from starflow.model.checkpoint import load_model, save_model
from starflow.model.flow import LEARNED_DENOISER_STEP, StarFlow
from starflow.model.label_encoder import LabelEncoder, labels_path, load_label_encoder, save_label_encoder
from starflow.training.moving_digits import MOTIONS, moving_digits_dataset

CONFIG = Path(__file__).resolve().parents[1] / "starflow" / "configs" / "digits-video.yaml"
ASSET = Path(__file__).resolve().parents[1] / "starflow" / "assets" / "digits-video.safetensors"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=CONFIG)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument(
        "--speed", type=int, help="pixels per frame (default: the patch size, so whole patches move)"
    )
    parser.add_argument(
        "--motion",
        choices=MOTIONS,
        default="scroll",
        help="how the digits move (see starflow.training.moving_digits)",
    )
    parser.add_argument("--init", type=Path, help="resume from this video checkpoint (and its label table)")
    parser.add_argument(
        "--from-image",
        type=Path,
        default=DEMO_CHECKPOINT,
        help="image checkpoint whose flow (and label table) the video flow starts from",
    )
    parser.add_argument("--from-scratch", action="store_true", help="no --from-image start")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--clips-per-digit", type=int, default=4)
    parser.add_argument("--drop-label", type=float, default=0.1, help="label dropout, for guidance")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save-every", type=int, default=250, help="write the EMA model every N steps")
    parser.add_argument("--out", type=Path, default=Path("runs/digits-video"))
    parser.add_argument("--install", action="store_true", help=f"copy the result to {ASSET}")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    config = load_config(args.config)
    data = moving_digits_dataset(
        "train",
        frames=args.frames,
        canvas=config.img_size,
        clips_per_digit=args.clips_per_digit,
        speed=args.speed or config.patch_size,
        motion=args.motion,
    )
    flow = StarFlow(config)
    labels = LabelEncoder(data.classes, config.txt_size, config.txt_dim)
    if args.init is not None:
        flow.load_state_dict(load_model(None, args.init).state_dict())
        labels = load_label_encoder(labels_path(args.init), config.txt_size, config.txt_dim)
    elif not args.from_scratch:
        start_from_image(flow, args.from_image)
        labels = load_label_encoder(labels_path(args.from_image), config.txt_size, config.txt_dim)
    denoiser = flow.learnable_self_denoiser
    flow_params = [p for n, p in flow.named_parameters() if not n.startswith("learnable_self_denoiser.")]
    flow_params += list(labels.parameters())
    optimizer = torch.optim.AdamW(flow_params, lr=args.lr, betas=(0.9, 0.95), weight_decay=1e-4)
    denoiser_optimizer = torch.optim.AdamW(denoiser.parameters(), lr=args.lr, weight_decay=1e-4)
    ema = {k: v.detach().clone() for k, v in flow.state_dict().items()}
    ema_labels = labels.embedding.weight.detach().clone()
    target_scale = config.noise_std / LEARNED_DENOISER_STEP
    generator = torch.Generator().manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    for step in range(args.steps):
        lr = args.lr * min(1.0, (step + 1) / args.warmup)
        lr *= 0.5 * (1 + math.cos(math.pi * step / args.steps)) * 0.99 + 0.01
        for group in optimizer.param_groups + denoiser_optimizer.param_groups:
            group["lr"] = lr
        index = torch.randint(len(data), (args.batch_size,), generator=generator)
        x, cond = data.batch(index)
        x = x + config.noise_std * torch.randn(x.shape, generator=generator)
        drop = torch.rand(args.batch_size, generator=generator) < args.drop_label
        y = labels(torch.where(drop, labels.null_label, cond))
        x.requires_grad_(True)
        out = flow(x, y)
        loss = StarFlow.loss(out) + 1e-4 * sum(o.pow(2).mean() for o in out.outputs[1:-1])
        loss.backward()
        score = (x.grad * x.numel() * config.noise_std * target_scale).detach()
        torch.nn.utils.clip_grad_norm_(flow_params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        correction = flow.learned_denoise_step(y.detach())  # x - 0.3 * D(x): the sampler's step
        denoised = correction(x.detach())
        denoiser_loss = F.mse_loss((x.detach() - denoised) / LEARNED_DENOISER_STEP, score)
        denoiser_loss.backward()
        torch.nn.utils.clip_grad_norm_(denoiser.parameters(), 1.0)
        denoiser_optimizer.step()
        denoiser_optimizer.zero_grad(set_to_none=True)
        x.grad = None
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for k, v in flow.state_dict().items():
                ema[k].lerp_(v, 1 - decay) if v.is_floating_point() else ema[k].copy_(v)
            ema_labels.lerp_(labels.embedding.weight, 1 - decay)
        if step % 50 == 0 or step == args.steps - 1:
            bpd = (StarFlow.loss(out).item() + 0.5 * math.log(2 * math.pi)) / math.log(2)
            print(
                f"step {step:5d} loss {loss.item():.4f} bpd {bpd:.3f} denoiser {denoiser_loss.item():.4f} "
                f"lr {lr:.2e} {time.perf_counter() - began:.0f}s",
                flush=True,
            )
        if (step + 1) % args.save_every == 0 or step == args.steps - 1:
            checkpoint = save_ema(config, ema, labels, ema_labels, args.out / "model.safetensors")
    print(f"wrote {checkpoint} and its label table ({time.perf_counter() - began:.0f}s)")
    if args.install:
        save_ema(config, ema, labels, ema_labels, ASSET)
        print(f"installed as {ASSET}")


def start_from_image(flow: StarFlow, checkpoint: Path) -> None:
    """Every flow weight from the image model; only the learned denoiser starts fresh."""
    image = load_model(None, checkpoint).state_dict()
    missing, unexpected = flow.load_state_dict(image, strict=False)
    fresh = [k for k in missing if not k.startswith("learnable_self_denoiser.")]
    if fresh or unexpected:
        raise SystemExit(
            f"{checkpoint}: its flow does not fit this video config "
            f"(missing {fresh[:3]}, unexpected {unexpected[:3]})"
        )


def save_ema(
    config, ema: dict[str, torch.Tensor], labels: LabelEncoder, ema_labels: torch.Tensor, path: Path
) -> Path:
    """The EMA weights as a checkpoint and its label table beside it (atomic writes)."""
    model = StarFlow(config)
    model.load_state_dict(ema)
    table = LabelEncoder(labels.classes, labels.txt_size, labels.txt_dim)
    table.embedding.weight.data.copy_(ema_labels)
    save_model(model, path)
    save_label_encoder(table, labels_path(path))
    return path


if __name__ == "__main__":
    main()
