"""What each diffusion method stores, at the default's scale and at Stable Diffusion's.

Issue 14 asks SLUG's stored bytes to be 100x below ESD's and SalUn's. On the default pipeline
SLUG stores one 128 x 128 text-encoder tensor and ESD-x the cross-attention of a 1.0 M-parameter
UNet, so the ratio is set by the tiny UNet, not by the methods. This bench counts what each
method stores with the methods' own selection of tensors (`attn2_params`, the `hf_clip`
adapter's candidates, `reads`) on models built from their configs, never from weights:
- the default pipeline (params.yaml's `sd.base`, the text tower of models/hf/base), saved with
  safetensors exactly as the `unlearncanvas` stages ship a result, and checked against
  metrics/unlearncanvas.json;
- Stable Diffusion v1.5 (UNet of 859.5 M parameters, CLIP ViT-L/14's text tower) and v2.1
  (865.9 M, OpenCLIP ViT-H/14's text tower with the 23 layers the pipeline reads), built on
  torch's meta device: shapes only, no memory, no download.
SLUG's row is one text-encoder tensor: the smallest and the largest of the candidates the
pipeline reads, and the attention projection (`self_attn.out_proj`) that SLUG edited for 7 of
the 8 default targets. SalUn's is the whole UNet: its saliency mask keeps half of all entries,
and on the default every tensor had one kept (a bound from above elsewhere). ESD-x stores every
cross-attention tensor (`attn2`), UCE and CA their key and value projections.

    python bench/sd_storage_scale.py       # needs models/hf/base (`dvc repro export`); a few seconds
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from unlearn.errors import UnlearnError  # noqa: E402
from unlearn.models.hf_clip import HFClipAdapter  # noqa: E402
from unlearn.params import as_config, load_yaml  # noqa: E402
from unlearn.sd.methods.common import attn2_params  # noqa: E402
from unlearn.sd.model import UnetConfig, build_unet  # noqa: E402
from unlearn.sd.unlearn import pipeline_name, reads  # noqa: E402

CLIP = ROOT / "models/hf/base"
MEASURED = ROOT / "metrics/unlearncanvas.json"
EDITED = "self_attn.out_proj.weight"   # SLUG's layer for 7 of the 8 default targets (metrics/unlearncanvas.json)

# Stable Diffusion's UNets and text towers, as their diffusers/transformers configs give them
SD = {
    "Stable Diffusion v1.5": {
        "unet": dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
                     down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                     up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=768, attention_head_dim=8),
        "text": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, projection_dim=768,
                     vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu"),
        "layers_read": 12, "published_unet": 859_520_964},
    "Stable Diffusion v2.1": {
        "unet": dict(sample_size=96, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
                     down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                     up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=1024,
                     attention_head_dim=(5, 10, 20, 20), use_linear_projection=True),
        "text": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16, projection_dim=1024,
                     vocab_size=49408, max_position_embeddings=77, hidden_act="gelu"),
        "layers_read": 23, "published_unet": 865_910_724},
}


def stored(unet, clip, layers_read: int) -> dict[str, dict[str, torch.Tensor]]:
    """Per method, the tensors it ships, named as the methods name them (`unet.<name>`,
    `text_encoder.<name>`) and selected as they select them."""
    unet_all = {f"unet.{n}": p for n, p in unet.named_parameters()}
    text = dict(clip.model.named_parameters())
    candidates = [n for n in HFClipAdapter(clip.model, None, None).candidate_layers() if reads(n, layers_read)]
    if not candidates:
        raise UnlearnError("the text tower has no SLUG candidate the pipeline reads")
    smallest, largest = min(candidates, key=lambda n: text[n].numel()), max(candidates, key=lambda n: text[n].numel())
    edited = next((n for n in candidates if n.endswith(EDITED)), smallest)

    def slug(n: str) -> dict[str, torch.Tensor]:
        return {f"text_encoder.{pipeline_name(n)}": text[n]}

    def unet_part(ps: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {f"unet.{n}": p for n, p in ps.items()}

    return {
        "slug (smallest candidate)": slug(smallest),
        f"slug ({EDITED.removesuffix('.weight')})": slug(edited),
        "slug (largest candidate)": slug(largest),
        "esd (ESD-x: every attn2 tensor)": unet_part(attn2_params(unet)),
        "uce, ca (attn2 to_k, to_v)": unet_part(attn2_params(unet, ("to_k", "to_v"))),
        "salun (the whole UNet)": unet_all,
    }


def nbytes(tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> int:
    return sum(t.numel() for t in tensors.values()) * dtype.itemsize


def default_pipeline() -> tuple[object, object, int]:
    """The default pipeline's UNet and text tower (untrained weights: only the shapes matter)."""
    from transformers import CLIPConfig, CLIPModel

    if not (CLIP / "config.json").is_file():
        raise UnlearnError(f"{CLIP}/config.json is missing; run `dvc repro export` first")
    p = load_yaml(ROOT / "params.yaml")
    base = dict(p["sd"]["base"])
    cfg = as_config(UnetConfig, dict(base["unet"]), "sd.base.unet")
    vae_levels = len(base["vae"]["channels"])
    latent = int(p["sd"]["image_size"]) // 2 ** (vae_levels - 1)
    config = CLIPConfig.from_pretrained(CLIP)
    torch.manual_seed(0)
    clip = HFClipAdapter(CLIPModel(config), None, None)
    unet = build_unet(cfg, latent, int(base["vae"]["latent_channels"]), config.text_config.hidden_size)
    return unet, clip, config.text_config.num_hidden_layers


def sd_pipeline(spec: dict) -> tuple[object, object]:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPConfig, CLIPModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**spec["unet"])
        config = CLIPConfig(text_config=spec["text"], vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                                                        num_attention_heads=2, image_size=32, patch_size=16),
                            projection_dim=spec["text"]["projection_dim"])
        clip = HFClipAdapter(CLIPModel(config), None, None)
    return unet, clip


def table(name: str, ships: dict[str, dict[str, torch.Tensor]], sizes: dict[str, int], measured: dict[str, int] | None = None) -> list[str]:
    edited = next(m for m in sizes if m.startswith(f"slug ({EDITED.removesuffix('.weight')}"))
    esd, salun = sizes["esd (ESD-x: every attn2 tensor)"], sizes["salun (the whole UNet)"]
    lines = [f"\n### {name}\n", "| method | tensors | stored | ESD-x / it | SalUn / it |" + (" measured |" if measured else ""),
             "|---|---|---|---|---|" + ("---|" if measured else "")]
    for m, b in sizes.items():
        tensors = (f"`{next(iter(ships[m]))}` ({' x '.join(map(str, next(iter(ships[m].values())).shape))})" if len(ships[m]) == 1
                   else f"{len(ships[m])} tensors, {sum(t.numel() for t in ships[m].values()):,} values")
        row = f"| {m} | {tensors} | {b / 1e6:.3f} MB | {esd / b:.1f}x | {salun / b:.1f}x |"
        if measured:
            row += f" {measured[m] / 1e6:.3f} MB |" if m in measured else " |"
        lines.append(row)
    lines.append(f"\nSLUG's edited projection against ESD-x: **{esd / sizes[edited]:.0f}x** less; against SalUn: "
                 f"**{salun / sizes[edited]:.0f}x** less (issue 14 asks 100x for both).")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/sd_storage_scale.md")
    args = ap.parse_args()
    import safetensors.torch

    out = ["# What each diffusion method stores: the default pipeline and Stable Diffusion",
           "", "Written by `python bench/sd_storage_scale.py`; tensor counts from the methods' own selection, "
           "models built from configs (Stable Diffusion's on the meta device: no weights). Each method ships only the tensors it "
           "changed; UnlearnCanvas's published leaderboard counts a whole checkpoint per unlearned model instead (ESD 4.3 GB, "
           "SalUn 4.0 GB, UCE 1.7 GB, CA 4.2 GB against SLUG's 0.04 GB), where the ratios are those of the SalUn column."]
    unet, clip, n_layers = default_pipeline()
    ships = stored(unet, clip, n_layers)
    shipped = {m: len(safetensors.torch.save({k: v.detach().contiguous() for k, v in t.items()})) for m, t in ships.items()}
    measured = {}
    if MEASURED.is_file():
        methods = json.loads(MEASURED.read_text())["methods"]
        measured = {"esd (ESD-x: every attn2 tensor)": methods["esd"]["stored_bytes"], "uce, ca (attn2 to_k, to_v)": methods["uce"]["stored_bytes"],
                    "salun (the whole UNet)": methods["salun"]["stored_bytes"], f"slug ({EDITED.removesuffix('.weight')})": methods["slug"]["stored_bytes"]}
        for m, b in measured.items():
            if shipped[m] != b:
                raise SystemExit(f"{m}: counted {shipped[m]} B as safetensors, but metrics/unlearncanvas.json has {b} B: the count is wrong")
    out += table(f"The default pipeline (UNet {sum(p.numel() for p in unet.parameters()):,} parameters; text width "
                 f"{clip.model.config.text_config.hidden_size}): float32 safetensors, as the unlearncanvas stages ship them", ships, shipped,
                 measured or None)
    if measured:
        out.append("\nEvery counted size equals the stored bytes in metrics/unlearncanvas.json (safetensors, header included).")
    else:
        out.append(f"\n({MEASURED.relative_to(ROOT)} is missing: the counts are not checked against a run.)")
    for name, spec in SD.items():
        unet, clip = sd_pipeline(spec)
        total = sum(p.numel() for p in unet.parameters())
        if total != spec["published_unet"]:
            raise SystemExit(f"{name}: the UNet built from its config has {total:,} parameters, not the published {spec['published_unet']:,}")
        ships = stored(unet, clip, spec["layers_read"])
        out += table(f"{name} (UNet {total:,} parameters, as published; text width {spec['text']['hidden_size']}, "
                     f"{spec['layers_read']} layers read): the tensors' bytes in half precision", ships, {m: nbytes(t, torch.float16) for m, t in ships.items()})
    text = "\n".join(out) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"written: {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}")


if __name__ == "__main__":
    try:
        main()
    except UnlearnError as e:
        raise SystemExit(f"error: {e}") from None
