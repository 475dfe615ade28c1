"""A weight-free patch "encoder" of colour and texture statistics, for fast CPU demos of the slide-level stages.

A randomly initialised ViT gives patch features that barely tell tissue types apart, and no pretrained weights
may be downloaded; these hand-made statistics (stain optical density, grey-level quantiles, bright/dark area
fractions at several scales, local contrast) describe tissue composition (lumens and fat, nuclei and lymphocyte
clusters, stroma) well enough for the aggregator to have something to learn from. It takes the same normalised
input as the ViTs (so `mstar extract` and the preprocessing record work unchanged) and is pure tensor ops.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

N_FEATURES = 41


class TissueStats(nn.Module):
    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.num_features = N_FEATURES

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rgb = (x * self.std + self.mean).clamp(0, 1)
        b = rgb.shape[0]
        od = -torch.log(rgb.clamp(min=1 / 255))  # optical density per channel
        grey = rgb.mean(1, keepdim=True)
        feats = [od.mean((2, 3)), od.std((2, 3))]  # 6
        flat = grey.flatten(1)
        feats.append(torch.quantile(flat, torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95], device=x.device), dim=1).t())
        bright = (grey > 0.8).float()
        dark = (grey < 0.45).float()
        pink = ((od[:, 1:2] - od[:, 2:3]) > 0.15).float() * (1 - bright)  # eosin-rich (green absorbed)
        for mask in (bright, dark, pink):  # area fraction and clumping at 3 scales: 3 x 7 = 21
            feats.append(mask.mean((2, 3)))
            for k in (4, 8, 16):
                pooled = F.avg_pool2d(mask, k)
                feats.append(pooled.amax((2, 3)))
                feats.append((pooled > 0.5).float().mean((2, 3)))
        gx = grey[..., :, 1:] - grey[..., :, :-1]
        gy = grey[..., 1:, :] - grey[..., :-1, :]
        feats.append(gx.abs().mean((2, 3)) + gy.abs().mean((2, 3)))
        for k in (2, 4, 8, 16):  # local contrast at 4 scales
            mu = F.avg_pool2d(grey, k)
            var = F.avg_pool2d(grey * grey, k) - mu * mu
            feats.append(var.clamp(min=0).sqrt().mean((2, 3)))
            feats.append(mu.std((2, 3)))
        return torch.cat([f.reshape(b, -1) for f in feats], dim=1)
