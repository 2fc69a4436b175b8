"""Is a category's answer in a checkpoint's video tokens? A linear probe, for the demo diagnosis in
RESULTS.md ("Where shape goes", "Where direction goes").

    python benchmarks/token_probe.py CHECKPOINT_DIR|init [--category shape|direction] [--pool]
                                     [--stage tokens|latents|patches] [--position-gain G]

`init` probes a fresh demo model with `blip3v train`'s from-scratch init (`--position-gain` as
`blip3v train --position-gain`). --stage picks what is read:
the video tokens (default), or the first and last frame's resampler latents or vision-tower patch
features (the two stages before the temporal encoder, where a frame's layout can still be seen).

Renders 1,200 clips of the category (seed 3), keeps the video tokens of the frozen model, and fits a
logistic regression (Adam, 300 steps, 70/30 split) on the standardised tokens: all M tokens
concatenated, or with --pool their mean and max (a position-free read-out, as attention gives).
Prints the held-out accuracy on the one-object clips (shape: chance 0.33; direction: the moving
shape alone, chance 0.25) and on all clips.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from blip3v.data import synth
from blip3v.model.checkpoint import load_checkpoint
from blip3v.model.train import init_task_model
from blip3v.runtime.video import frame_indices, preprocess


def read(model, pixels: torch.Tensor, stage: str) -> torch.Tensor:
    """pixels (B, T, 3, S, S) -> what the probe reads, (B, K, D)."""
    if stage == "tokens":
        return model.encode_video(pixels)  # (B, M, D_lm)
    b, t = pixels.shape[:2]
    patches = model.vlm.vision_encoder(pixel_values=pixels.flatten(0, 1)).last_hidden_state
    patches = patches.view(b, t, *patches.shape[1:])  # (B, T, N_in, D)
    if stage == "latents":
        patches = model.vlm.vision_tokenizer.resample(patches)  # (B, T, N, D)
    return torch.cat([patches[:, 0], patches[:, -1]], 1)  # first and last frame


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("--category", choices=("shape", "direction"), default="shape")
    p.add_argument("--pool", action="store_true", help="probe the tokens' mean and max instead of all tokens")
    p.add_argument("--stage", choices=("tokens", "latents", "patches"), default="tokens")
    p.add_argument("--position-gain", type=float, default=1.0, help="with `init`: as blip3v train --position-gain")
    p.add_argument("--clips", type=int, default=1200)
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = (init_task_model("demo", position_gain=args.position_gain) if args.checkpoint == "init" else load_checkpoint(args.checkpoint)).eval()
    rng = np.random.default_rng(3)
    answers = synth.SHAPES if args.category == "shape" else synth.DIRECTIONS
    pixels, labels, objects = [], [], []
    for _ in range(args.clips):
        ex = synth.sample_example(rng, categories=[args.category])
        pixels.append(preprocess(ex.frames[frame_indices(len(ex.frames), model.config.num_frames)],
                                 model.config.image_size))
        labels.append(answers.index(ex.answer))
        objects.append(len(ex.scene["objects"]))
    x, y, k = torch.from_numpy(np.stack(pixels)), torch.tensor(labels), torch.tensor(objects)
    with torch.no_grad():
        tokens = torch.cat([read(model, x[i:i + 100], args.stage) for i in range(0, len(x), 100)])  # (N, K, D)
    feats = torch.cat([tokens.mean(1), tokens.abs().amax(1)], -1) if args.pool else tokens.flatten(1)
    feats = (feats - feats.mean(0)) / (feats.std(0) + 1e-5)
    for name, keep in (("one-object clips", k == 1), ("all clips", torch.ones_like(k, dtype=torch.bool))):
        f, t = feats[keep], y[keep]
        train = int(len(f) * 0.7)
        w = torch.zeros(f.shape[1], len(answers), requires_grad=True)
        b = torch.zeros(len(answers), requires_grad=True)
        opt = torch.optim.Adam([w, b], lr=1e-2)
        for _ in range(300):
            loss = torch.nn.functional.cross_entropy(f[:train] @ w + b, t[:train]) + 1e-3 * (w ** 2).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
        acc = ((f[train:] @ w + b).argmax(-1) == t[train:]).float().mean().item()
        print(f"{name}: {int(keep.sum())} clips, held-out probe accuracy {acc:.3f}")


if __name__ == "__main__":
    main()
