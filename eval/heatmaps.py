"""Token-to-patch alignment heatmaps of any DualEncoder checkpoint (any stage-one objective).

``alignment_heatmaps(encoder, images, captions, out_png)`` draws one row per (image, caption): the
model's input view of the image (the transform's crop, de-normalised), then, for each word token
of the caption (padding and special tokens excluded, at most ``max_tokens``), SPARC's alignment
weights of that token over the patch grid (``encoders.objectives.sparc.sparc_alignment_weights``
on the checkpoint's local embeddings ``patch_emb`` / ``token_emb``: min-max normalised
similarities, sparsified at ``threshold`` (default 1/P), renormalised), upsampled to the image by
repeating each patch's value over its pixels (nearest: the patch boundaries stay visible) and
overlaid on the image. Each panel is titled with the token's text and its colour scale runs from 0
to that token's largest weight. For non-SPARC checkpoints these are still the SPARC weights of
their dense embeddings, so objectives compare on one footing.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image

from encoders.dual_encoder import DualEncoder
from encoders.objectives.sparc import sparc_alignment_weights
from eval.report import save_figure, subplot_grid


@dataclass
class HeatmapRow:
    """What one row of the figure shows: the caption, its token strings and weights [T, gh, gw]."""

    caption: str
    tokens: list[str]
    weights: np.ndarray


@torch.no_grad()
def alignment_rows(encoder: DualEncoder, images: Sequence[Union[Image.Image, np.ndarray]], captions: Sequence[str],
                   threshold: Optional[float] = None, max_tokens: int = 12) -> tuple[torch.Tensor, list[HeatmapRow]]:
    """(pixel_values [N,3,H,W], one ``HeatmapRow`` per image) with weights from ``sparc_alignment_weights``."""
    if len(images) != len(captions) or not len(images):
        raise ValueError(f"need as many captions as images (and at least one), got {len(images)} and {len(captions)}")
    device = next(encoder.parameters()).device
    pixels = encoder.transform.batch(list(images)).to(device)
    ids, mask = encoder.tokenize(list(captions))
    img = encoder.encode_image(pixels)
    txt = encoder.encode_text(ids.to(device), mask.to(device))
    weights = sparc_alignment_weights(img.patch_emb.float(), txt.token_emb.float(), txt.token_mask, threshold)
    p = weights.shape[-1]
    grid = int(round(p ** 0.5))
    if grid * grid != p:
        raise ValueError(f"{p} patches do not form a square grid")
    rows = []
    for i, caption in enumerate(captions):
        keep = txt.token_mask[i].nonzero().squeeze(1)[:max_tokens].cpu()
        tokens = [encoder.tokenizer.convert_tokens_to_string([t]).strip() or "\u2423"  # a bare space: ␣
                  for t in encoder.tokenizer.convert_ids_to_tokens(ids[i, keep].tolist())]
        rows.append(HeatmapRow(caption, tokens, weights[i, keep].view(-1, grid, grid).cpu().double().numpy()))
    return pixels.cpu(), rows


def _display(pixel_values: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Normalised [3,H,W] -> displayable [H,W,3] in [0, 1]."""
    x = pixel_values * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)
    return x.clamp(0, 1).permute(1, 2, 0).numpy()


def _draw_row(axes, image: np.ndarray, row: HeatmapRow) -> None:
    """One figure row: the image [H,W,3] titled with the caption, then one overlay per token."""
    axes[0].imshow(image)
    axes[0].set_title(row.caption if len(row.caption) <= 40 else row.caption[:37] + "...", fontsize=6)
    size = image.shape[1]  # the input view's width, as the pixels' last dimension
    for j, token in enumerate(row.tokens):
        w = row.weights[j]
        up = np.kron(w, np.ones((size // w.shape[0], size // w.shape[1])))
        ax = axes[j + 1]
        ax.imshow(image)
        ax.imshow(up, cmap="jet", alpha=0.5, vmin=0.0, vmax=max(float(w.max()), 1e-12),
                  extent=(-0.5, image.shape[1] - 0.5, image.shape[0] - 0.5, -0.5))
        ax.set_title(token, fontsize=8)
    for ax in axes:
        ax.axis("off")


def alignment_heatmaps(encoder: DualEncoder, images: Sequence[Union[Image.Image, np.ndarray]],
                       captions: Sequence[str], out_png: Union[str, Path], threshold: Optional[float] = None,
                       max_tokens: int = 12) -> list[HeatmapRow]:
    """Write the heatmap grid (module docstring) to ``out_png``; returns the rows drawn (their
    ``weights`` [T, gh, gw] are exactly the arrays overlaid, before upsampling)."""
    encoder.eval()
    pixels, rows = alignment_rows(encoder, images, captions, threshold, max_tokens)
    n_cols = 1 + max(max(len(r.tokens) for r in rows), 1)
    fig, axes = subplot_grid(len(rows), n_cols, 1.6, 1.8)
    for i, row in enumerate(rows):
        _draw_row(axes[i], _display(pixels[i], encoder.transform.mean, encoder.transform.std), row)
    save_figure(fig, out_png, dpi=100)
    return rows


__all__ = ["HeatmapRow", "alignment_heatmaps", "alignment_rows"]
