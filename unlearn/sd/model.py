"""The Stable Diffusion pipeline of the diffusion track: diffusers' `AutoencoderKL`,
`UNet2DConditionModel` (cross-attention on the text encoder's hidden states) and `DDIMScheduler`,
composed into a `StableDiffusionPipeline` whose text encoder and tokenizer are the text tower of
the project's CLIP (its transformers export, models/hf/base), frozen as in Stable Diffusion.

Saved with `save_pretrained` (safetensors, one folder per component, `model_index.json`), so
`StableDiffusionPipeline.from_pretrained(folder)` loads it offline.  `load_pipeline` is that call
plus the checks that make a foreign folder a one-line error.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

from unlearn.errors import UnlearnError

log = logging.getLogger("unlearn.sd")
# Stable Diffusion v1's noise schedule; training uses DDPM's, sampling DDIM over the same betas.
SCHEDULE = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}


@dataclass(frozen=True)
class VaeConfig:
    channels: list[int] = field(default_factory=lambda: [16, 32])   # one 2x downsampling per step after the first
    latent_channels: int = 4
    steps: int = 1200
    batch_size: int = 64
    lr: float = 0.002
    kl_weight: float = 1e-4


@dataclass(frozen=True)
class UnetConfig:
    channels: list[int] = field(default_factory=lambda: [32, 64])   # the first block plain, the others with cross-attention
    attention_head_dim: int = 8
    steps: int = 8000
    batch_size: int = 64
    lr: float = 0.001
    ema: float = 0.995
    caption_dropout: float = 0.1    # share of captions replaced by "" (classifier-free guidance)
    checkpoints: int = 8            # evaluations of the EMA weights during training (the accuracy-against-minutes curve)
    lr_schedule: str = "constant"   # constant | cosine: diffusers' cosine decay to 0 over the steps, after warmup_steps of linear warm-up
    warmup_steps: int = 0
    snr_gamma: float = 0.0          # Min-SNR-gamma loss weight min(SNR(t), gamma) / SNR(t) (Hang et al., 2023); 0: the plain noise MSE
    RANGES: ClassVar[dict[str, str]] = {"steps": "> 0", "batch_size": "> 0", "lr": "> 0", "ema": "[0, 1)", "caption_dropout": "[0, 1)",
                                        "checkpoints": ">= 0", "warmup_steps": ">= 0", "snr_gamma": ">= 0"}

    def __post_init__(self) -> None:
        if self.lr_schedule not in ("constant", "cosine"):
            raise UnlearnError(f"the UNet's lr_schedule (params.yaml sd.base.unet) is {self.lr_schedule!r}; use constant or cosine")
        if self.warmup_steps and self.lr_schedule != "cosine":
            raise UnlearnError(f"the UNet's warmup_steps (params.yaml sd.base.unet) is {self.warmup_steps} but its lr_schedule is constant, "
                               "which has no warm-up; set lr_schedule: cosine or warmup_steps: 0")
        if self.warmup_steps >= self.steps:
            raise UnlearnError(f"the UNet's warmup_steps (params.yaml sd.base.unet) is {self.warmup_steps}, not below its steps ({self.steps}); "
                               "give fewer warm-up steps")


def _groups(channels: list[int], prefer: int) -> int:
    """GroupNorm groups: `prefer` (8 for the autoencoder, 16 for the UNet: the configurations
    measured in docs/sd.md "Stable Diffusion") when every width allows it, else the largest common
    divisor of the widths below it."""
    g = min(prefer, *channels)
    while any(c % g for c in channels):
        g -= 1
    return g


def build_vae(cfg: VaeConfig):
    from diffusers import AutoencoderKL

    n = len(cfg.channels)
    return AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=tuple(cfg.channels), layers_per_block=1,
                         down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                         latent_channels=cfg.latent_channels, norm_num_groups=_groups(cfg.channels, 8), mid_block_add_attention=False)


def build_unet(cfg: UnetConfig, sample_size: int, latent_channels: int, cross_attention_dim: int):
    from diffusers import UNet2DConditionModel

    n = len(cfg.channels)
    if n < 2:
        raise UnlearnError(f"sd unet.channels is {cfg.channels}; give at least two levels, e.g. [32, 64]")
    return UNet2DConditionModel(sample_size=sample_size, in_channels=latent_channels, out_channels=latent_channels, layers_per_block=1,
                                block_out_channels=tuple(cfg.channels), down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1),
                                up_block_types=("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",), cross_attention_dim=cross_attention_dim,
                                attention_head_dim=cfg.attention_head_dim, norm_num_groups=_groups(cfg.channels, 16))


def train_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(**SCHEDULE)


def sample_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(**SCHEDULE, clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def sample_scheduler_like(scheduler):
    """DDIM over another scheduler's noise schedule (a pipeline trained elsewhere keeps its betas)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(scheduler.config)


def check_text_encoder(te, tower, pipe_name: str, clip_name: str) -> int:
    """The pipeline's text encoder `te` is the CLIP's text tower `tower`: the same tensors (names
    relative to the tower, shapes, values up to half-precision rounding).  A pipeline may hold only
    the first layers of the CLIP's encoder (SD 2.x's converted encoders stop at the penultimate
    layer): the CLIP's later layers are then not compared.  Returns how many layers it holds."""
    if te is None:
        raise UnlearnError(f"the pipeline {pipe_name} has no text encoder; SLUG edits the text encoder of a full pipeline")
    theirs, ours = dict(te.named_parameters()), dict(tower.named_parameters())
    n_pipe = len(te.encoder.layers)
    beyond = {n for n in ours if ".layers." in n and int(n.split(".layers.")[1].split(".")[0]) >= n_pipe}
    mismatch = sorted(set(theirs) ^ (set(ours) - beyond)) or [n for n in theirs if theirs[n].shape != ours[n].shape]
    if mismatch:
        raise UnlearnError(f"the text encoder of {pipe_name} does not match the CLIP {clip_name} (first difference: {mismatch[0]}); "
                           "give the CLIPModel whose text tower the pipeline uses (openai/clip-vit-large-patch14 for SD v1.x)")
    with torch.no_grad():
        moved = [n for n in sorted(theirs) if not torch.allclose(theirs[n].float().cpu(), ours[n].float().cpu(), rtol=1e-3, atol=1e-4)]
    if moved:
        raise UnlearnError(f"the text encoder of {pipe_name} has the CLIP {clip_name}'s names and shapes but other values ({len(moved)} tensors, "
                           f"first: {moved[0]}); give the CLIPModel the pipeline was trained with (its text encoder was fine-tuned, or is another CLIP)")
    return n_pipe


def load_text_encoder(clip_dir: str | Path, device: str = "cpu"):
    """The CLIP's text tower and tokenizer (a transformers CLIPModel folder), frozen."""
    from transformers import CLIPTextModel, CLIPTokenizerFast

    clip_dir = Path(clip_dir)
    if not (clip_dir / "config.json").is_file():
        raise UnlearnError(f"no transformers CLIP at {clip_dir}; run `dvc repro export` (or give a CLIPModel folder)")
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the vision weights in the folder are unused here, by design
    try:
        te = CLIPTextModel.from_pretrained(clip_dir).to(device).eval().requires_grad_(False)
    finally:
        hf_logging.set_verbosity(verbosity)
    return te, CLIPTokenizerFast.from_pretrained(clip_dir)


@torch.no_grad()
def text_states(text_encoder, tokenizer, prompts: list[str]) -> torch.Tensor:
    """The encoder's last hidden states (N, L, D) for `prompts`, padded to the tokenizer's length,
    as StableDiffusionPipeline computes them."""
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
    return text_encoder(ids.to(text_encoder.device))[0]


def build_pipeline(vae, unet, text_encoder, tokenizer, dtype: torch.dtype = torch.float32):
    """The track's pipeline from its parts; it draws in `dtype` (`drawing_dtype`, under autocast)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=sample_scheduler(),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.drawing_dtype = dtype  # read by `evaluate.draw`
    return pipe


PRECISIONS = ("auto", "float32", "float16", "bfloat16")


def drawing_dtype(precision: str, device: str | torch.device) -> torch.dtype:
    """The dtype a pipeline draws in (`sd.precision`): `auto` is float16 on a CUDA device and
    float32 elsewhere."""
    if precision not in PRECISIONS:
        raise UnlearnError(f"sd.precision is {precision!r}; use one of {', '.join(PRECISIONS)} (auto: float16 on a GPU, float32 on a CPU)")
    if precision == "auto":
        precision = "float16" if torch.device(device).type == "cuda" else "float32"
    return getattr(torch, precision)


def load_pipeline(folder: str | Path, device: str = "cpu", precision: str = "float32"):
    """`StableDiffusionPipeline.from_pretrained(folder)` offline, with one-line errors for a folder
    that is not a pipeline or lacks a text encoder.  The weights stay float32 (the text encoder is
    the CLIP tower SLUG computes gradients on and edits); with `precision` other than float32 the
    pipeline draws under autocast in that dtype (`drawing_dtype`; `evaluate.draw`), so the UNet
    and the autoencoder compute in half precision on a GPU."""
    dtype = drawing_dtype(precision, device)
    from diffusers import StableDiffusionPipeline

    folder = Path(folder)
    if not (folder / "model_index.json").is_file():
        raise UnlearnError(f"{folder} is not a diffusers pipeline folder (no model_index.json); give a StableDiffusionPipeline folder")
    for part in ("text_encoder", "tokenizer", "unet", "vae"):
        if not (folder / part).is_dir():
            raise UnlearnError(f"the pipeline at {folder} has no {part}/ folder; SLUG edits the text encoder of a full "
                               "StableDiffusionPipeline folder")
    try:
        pipe = StableDiffusionPipeline.from_pretrained(folder, dtype=torch.float32, safety_checker=None,
                                                       requires_safety_checker=False, local_files_only=True)
    except (OSError, ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UnlearnError(f"the pipeline at {folder} does not load: {first}") from None
    pipe.set_progress_bar_config(disable=True)
    pipe.drawing_dtype = dtype  # read by `evaluate.draw`
    return pipe.to(device)
