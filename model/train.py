"""Training a small xGen-MM-Vid on synthetic video QA, on a CPU.

The model is the same architecture as the release (SigLIP-style tower, Perceiver resampler,
temporal encoder, Phi-3 decoder) at a size a 2-core CPU trains in well under an hour; the
tokenizer is a word-level one in the released special-token scheme, built from the task's words.
Loss is on the answer tokens (and the closing `<|end|>`) only. Checkpoints are written in the
released layout, with the trainer state beside them (`trainer_state.json` + `.safetensors`, no
pickle: model/trainer_state.py) so a run resumes where it stopped. Each save replaces the whole run
folder atomically (blip3v.atomic.atomic_dir): weights, trainer state and, at the end, training.json
always belong to the same step, whenever the run is killed.

    blip3v train --preset demo --out runs/demo --steps 4000
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from blip3v.atomic import atomic_dir
from blip3v.data import synth
from blip3v.errors import InputError
from blip3v.model.checkpoint import load_checkpoint, load_tokenizer, save_checkpoint
from blip3v.model.config import DEFAULT_SYSTEM, TemporalConfig, XGenMMConfig, _small
from blip3v.model.tokenizer import base_vocab_size, build_word_tokenizer, encode_prompt
from blip3v.model.trainer_state import (STATE_JSON, TrainerState, has_trainer_state, load_trainer_state,
                                        refuse_legacy, restore_optimizer, restore_rng, rng_states,
                                        save_trainer_state)
from blip3v.model.xgenmm import XGenMMVideoModel
from blip3v.runtime.video import frame_indices, preprocess

# Seeds of the training stream live far from the small seeds users evaluate on; `blip3v eval`
# on any seed below TRAIN_SEED_BASE is held out by construction.
TRAIN_SEED_BASE = 1_000_000
STATE_NAME = STATE_JSON  # its presence marks a resumable run folder
CHECKPOINT_SCRATCH = ".checkpoint"  # save_checkpoint's own folder inside the run folder being written


def task_tokenizer():
    """Word-level tokenizer covering the chat prompt and every question/answer word."""
    prompt_words = re.findall(r"\w+|[^\w\s]", DEFAULT_SYSTEM)
    return build_word_tokenizer(prompt_words + synth.question_words() + ["?"])


def task_config(tokenizer, temporal: str = "gttm", num_tokens: int = 16) -> XGenMMConfig:
    """The demo architecture: 8 frames of 64x64 (8x8 patches -> 64 tokens), 16 latents per frame."""
    width = 64
    t = TemporalConfig(type=temporal, num_tokens=num_tokens, memory_size=4, process_layers=2, heads=4,
                       dim_head=width // 4, ff_mult=2, read_tokens=16)
    return _small(t, vocab_base=base_vocab_size(tokenizer), width=width, text_width=128, image_size=64,
                  patch=8, latents=16, frames=8, vision_layers=2, text_layers=2, resampler_depth=2)


# Preset name -> (temporal encoder, M). `demo` is the shipped model; the others are the ablation.
TASK_PRESETS = {
    "demo": ("gttm", 16),
    **{f"task-{kind.replace('_', '-')}-{m}": (kind, m) for kind in ("tl", "gttm_tl") for m in (4, 8, 16)},
    "task-gttm-16": ("gttm", 16),
    "task-mean-16": ("mean", 16),
    "task-none-128": ("none", 128),
}


@dataclass
class TrainConfig:
    steps: int = 4000
    batch_size: int = 32
    lr: float = 1e-3
    warmup: int = 200
    weight_decay: float = 0.05
    seed: int = 0
    save_every: int = 500
    noise: float = 0.03  # gaussian pixel noise (normalised units): stands in for h264 artefacts
    questions: int = 4  # questions per generated clip: its own + up to 3 of synth.static_questions
    position_gain: float = 1.0  # from-scratch init: vision position embeddings x this (amplify_position_embeddings)
    categories: tuple[str, ...] | None = None  # generated clips' categories (None: all, uniform)
    layout_loss: float = 0.0  # weight of the auxiliary layout loss on the resampler latents (LayoutHead)


def _worker_share() -> tuple[int, int]:
    """(this loader worker's index, the number of workers); (0, 1) outside a DataLoader worker."""
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


class SynthStream(IterableDataset):
    """Endless (pixels, [(question, answer, category), ...]) rendered in memory from the generator.

    The first question is the clip's own (so categories stay uniform); up to `questions - 1` more
    are drawn from `synth.static_questions(scene)`. They share the clip's vision pass, which is most
    of a training step's cost, and each one is another binding of a word to what the tokens show.
    On the demo preset 4 questions reached in 500 steps the accuracy 1 question reached in 4,000
    (benchmarks/RESULTS.md)."""

    def __init__(self, seed: int, num_frames: int, image_size: int, noise: float, start: int = 0,
                 questions: int = 1, categories: tuple[str, ...] | None = None):
        self.seed, self.num_frames, self.image_size, self.noise, self.start = seed, num_frames, image_size, noise, start
        self.questions, self.categories = questions, categories

    def __iter__(self):
        # With k loader workers, worker w renders clips start + w, start + w + k, ...: together they
        # cover the stream once (one worker: every clip in order, as before workers were an option).
        worker, workers = _worker_share()
        key = (self.seed, self.start) if workers == 1 else (self.seed, self.start, worker)
        rng = np.random.default_rng(key)  # pixel noise and picks, reproducible on resume
        for index in itertools.count(self.start + worker, workers):
            ex = synth.example_at(self.seed, index, model_frames=self.num_frames, categories=self.categories)
            frames = ex.frames[frame_indices(len(ex.frames), self.num_frames)]  # (T, H, W, 3)
            pixels = preprocess(frames, self.image_size)  # (T, 3, S, S)
            if self.noise:
                pixels = pixels + rng.normal(0, self.noise, pixels.shape).astype(np.float32)
            qa = [(ex.question, ex.answer, ex.category)]
            if self.questions > 1:
                more = [q for q in synth.static_questions(ex.scene) if q[0] != ex.question]
                qa += [more[i] for i in rng.permutation(len(more))[: self.questions - 1]]
            yield pixels, qa, layout_targets(frames, self.image_size // LAYOUT_CELL)


class FolderStream(IterableDataset):
    """Endless passes over a `blip3v data synth` folder, clips decoded through the runtime's video path
    (one question per clip: qa.jsonl carries no scene)."""

    def __init__(self, data_dir: str | Path, num_frames: int, image_size: int, seed: int, start: int = 0):
        self.rows = synth.read_dataset(data_dir)
        self.num_frames, self.image_size, self.seed, self.start = num_frames, image_size, seed, start

    def __iter__(self):
        from blip3v.runtime.video import load_clip

        worker, workers = _worker_share()
        rng = np.random.default_rng(self.seed)
        i = 0
        while True:
            for j in rng.permutation(len(self.rows)):
                if i >= self.start and i % workers == worker:  # k workers: one pass shared, not repeated
                    r = self.rows[j]
                    yield load_clip(r["path"], self.num_frames, self.image_size), [(r["question"], r["answer"], r["category"])], None
                i += 1


LAYOUT_CELL = 8  # model pixels per layout cell: one cell per patch of the demo tower


def layout_targets(frames: np.ndarray, grid: int) -> np.ndarray:
    """Frames (T, H, W, 3) uint8 -> (T, grid * grid) float32: the share of each cell that is not
    background, the target of the auxiliary layout loss."""
    t, h, w, _ = frames.shape
    fg = (np.abs(frames.astype(np.int16) - np.array(synth.BACKGROUND, np.int16)).max(-1) > 24)  # (T, H, W)
    return fg.reshape(t, grid, h // grid, grid, w // grid).mean((2, 4)).reshape(t, grid * grid).astype(np.float32)


class LayoutHead(nn.Module):
    """Training-only probe that makes the resampler keep where things are in each frame.

    The resampler pools a frame's patches by content, and nothing but `direction` questions asks for
    position, so training lets the latents drop it (a linear probe read direction from them at 0.22
    in a demo model trained without this head, from the patches at 0.98; at 0.995 in the shipped
    demo, trained with it at weight 1, whose direction answers went from the prior to 0.96-1.00).
    This head reads one frame's latents (N x D, flattened) and predicts the share of every layout
    cell that is not background; its binary cross-entropy, times `TrainConfig.layout_loss`, is added
    to the answer loss. It lives in the trainer state only: checkpoints keep the released layout."""

    def __init__(self, num_latents: int, dim: int, grid: int):
        super().__init__()
        self.proj = nn.Linear(num_latents * dim, grid * grid)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        """latents (B, T, N, D) -> layout logits (B, T, grid * grid)."""
        return self.proj(latents.flatten(2))


RESAMPLER_QK_GAIN = 4.0


def sharpen_resampler_attention(model: XGenMMVideoModel, gain: float = RESAMPLER_QK_GAIN) -> None:
    """From-scratch init only: scales the resampler's query and key/value projections by `gain`.

    With PyTorch's default init the latents' attention logits have a standard deviation near 0.2,
    so every latent averages all patches of its frame: colour and count survive the averaging, shape
    and position do not, and the model sits at the answer prior for those categories. At gain 4 the
    logits start near 3.4 and each latent reads a few patches from the first step. Measured on the
    demo preset (1 000 steps, same seed and data): EMA loss 0.54 vs 0.69 at gain 1, held-out
    accuracy 0.445 vs 0.30. Released checkpoints overwrite these weights, so loading is unaffected."""
    with torch.no_grad():
        for attention, _ in model.vlm.vision_tokenizer.layers:
            attention.to_q.weight.mul_(gain)
            attention.to_kv.weight.mul_(gain)


def amplify_position_embeddings(model: XGenMMVideoModel, gain: float) -> None:
    """From-scratch init only: scales the vision tower's position embeddings by `gain`.

    The resampler pools each frame's patches by content, so where a shape is survives the pooling
    only through the position embedding added to its patches. At the default init (std 1/sqrt(width))
    that part is small beside the patch content, and the frames' latents lose the layout: a linear
    probe reads a moving shape's direction from the first and last frame's patch features at 0.98,
    from their resampler latents at 0.43 (chance 0.25; one-object `direction` clips, 600 clips,
    70/30 split). At gain 4 the latents give 0.79 and the 16 video tokens 0.66 (0.41 at gain 1).
    Without the layout loss (`LayoutHead`), training at gain 1 never recovered it (latents 0.22
    after 3,500 steps, direction answers at the prior), and training at gain 4 lost it too (0.36 at
    step 750, tokens 0.26 at 1,500). With the layout loss, gain 4 was behind gain 1 at 2,250 steps
    (0.625 vs 0.68 held-out), so the default stays 1, which the shipped demo used. Released
    checkpoints overwrite these weights."""
    with torch.no_grad():
        model.vlm.vision_encoder.embeddings.position_embedding.weight.mul_(gain)


def init_task_model(preset: str, tokenizer=None, position_gain: float = 1.0) -> XGenMMVideoModel:
    """A training preset's model at its from-scratch init (the seed is the caller's)."""
    kind, m = TASK_PRESETS[preset]
    model = XGenMMVideoModel(task_config(tokenizer or task_tokenizer(), kind, m), attn_implementation="sdpa")
    sharpen_resampler_attention(model)
    amplify_position_embeddings(model, position_gain)  # x 1 by default: exact, the init unchanged
    return model


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)


def collate(batch, cfg: XGenMMConfig, tokenizer):
    """[(pixels, [(question, answer, category), ...], layout or None), ...] ->
    pixels (B, T, 3, S, S), ids (Q, L) right-padded, labels (Q, L - 1 + M) with -100 off-answer,
    owner (Q,): the clip each of the Q questions is about, and layout (B, T, G*G) or None."""
    pixels = torch.from_numpy(np.stack([b[0] for b in batch]))
    layout = torch.from_numpy(np.stack([b[2] for b in batch])) if batch[0][2] is not None else None
    end = cfg.special_token_ids["end"]
    rows, answer_lens, owner = [], [], []
    for clip, (_, qa, _) in enumerate(batch):
        for question, answer, _ in qa:
            answer_ids = list(tokenizer(answer, add_special_tokens=False)["input_ids"]) + [end]
            rows.append(encode_prompt(cfg, tokenizer, question) + answer_ids)
            answer_lens.append(len(answer_ids))
            owner.append(clip)
    width = max(len(r) for r in rows)
    pad = cfg.special_token_ids["pad"]
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    m = cfg.num_video_tokens
    labels = torch.full((len(rows), width - 1 + m), -100, dtype=torch.long)
    for i, (row, n_ans) in enumerate(zip(rows, answer_lens)):
        ids[i, : len(row)] = torch.tensor(row)
        spliced_len = len(row) - 1 + m
        labels[i, spliced_len - n_ans: spliced_len] = torch.tensor(row[-n_ans:])
    return pixels, ids, labels, torch.tensor(owner), layout


def answer_loss(model: XGenMMVideoModel, pixels, ids, labels, owner) -> torch.Tensor:
    """Mean cross-entropy over answer tokens; each clip's video tokens are computed once and
    shared by its questions (`owner`)."""
    return _answer_ce(model, model.encode_video(pixels), ids, labels, owner)


def answer_and_layout_loss(model: XGenMMVideoModel, head: LayoutHead, pixels, ids, labels, owner,
                           layout) -> tuple[torch.Tensor, torch.Tensor]:
    """`answer_loss` and the LayoutHead's loss on the same forward pass (`encode_video` in its two
    halves, the head reading the latents between them)."""
    latents = model.frame_latents(pixels)  # (B, T, N, D)
    video = model.vlm.vision_tokenizer.tokens(latents)  # (B, M, D_lm)
    aux = torch.nn.functional.binary_cross_entropy_with_logits(head(latents).float(), layout)
    return _answer_ce(model, video, ids, labels, owner), aux


def _answer_ce(model: XGenMMVideoModel, video, ids, labels, owner) -> torch.Tensor:
    # Right padding needs no mask: causal attention never lets later pads reach earlier tokens.
    logits, _ = model.decoder(model.splice(ids, video[owner]), use_cache=False)  # (Q, L - 1 + M, V)
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100
    )


def _lr_at(step: int, tc: TrainConfig) -> float:
    if step < tc.warmup:
        return tc.lr * (step + 1) / tc.warmup
    progress = (step - tc.warmup) / max(1, tc.steps - tc.warmup)
    return tc.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def train(preset: str, out: str | Path, tc: TrainConfig, progress: bool = True,
          log=print, data: str | Path | None = None, device: str = "cpu", workers: int = 1) -> dict:
    """Trains (or resumes) `preset` into `out`; returns the final training summary.

    Clips come from the generator on the fly (seeds from TRAIN_SEED_BASE), or from the folder
    `data` written by `blip3v data synth`. `device` runs the model there (cpu or cuda); `workers`
    loader processes render the clips (a GPU step outruns one)."""
    if preset not in TASK_PRESETS:
        raise InputError(f"unknown training preset {preset!r}; known: {', '.join(TASK_PRESETS)}")
    if device not in ("cpu", "cuda"):
        raise InputError(f"unknown device {device!r}; choose cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: this PyTorch build sees no CUDA GPU")
    if tc.layout_loss and data is not None:
        raise InputError("the layout loss needs generated clips (their frames are its target), not --data")
    out = Path(out)
    torch.manual_seed(tc.seed)
    refuse_legacy(out)  # a pickled trainer_state.pt is never opened
    state: TrainerState | None = None
    if has_trainer_state(out):
        state = load_trainer_state(out)
        model, tokenizer = load_checkpoint(out), load_tokenizer(out)
        start, elapsed, history, segments = state.step, state.elapsed, state.history, state.segments
        log(f"resuming {out} at step {start}")
    else:
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise InputError(f"{out} exists and holds no {STATE_NAME}; choose a new --out")
        tokenizer = task_tokenizer()
        model = init_task_model(preset, tokenizer, tc.position_gain)
        start, elapsed, history, segments = 0, 0.0, [], []
    model.to(device).train()
    cfg = model.config
    head = None
    if state is not None and state.layout_head is not None and not tc.layout_loss:
        weight = state.train_config.get("layout_loss")
        weight = weight if isinstance(weight, (int, float)) and not isinstance(weight, bool) and weight else 1.0
        raise InputError(f"{out} was trained with the layout loss; resume it with --layout-loss {weight:g}")
    if tc.layout_loss:
        rc = cfg.vision_tokenizer_config
        head = LayoutHead(rc.num_vis_tokens, rc.vis_feature_dim, cfg.image_size // LAYOUT_CELL).to(device)
        if state is not None:
            if state.layout_head is None:
                raise InputError(f"{out} was trained without the layout loss; resume it without --layout-loss")
            try:
                head.load_state_dict(state.layout_head)
            except RuntimeError as exc:
                raise InputError(f"{out / STATE_NAME}: layout_head does not fit this model "
                                 f"({str(exc).splitlines()[0][:200]})") from None
    params = list(model.parameters()) + (list(head.parameters()) if head is not None else [])
    opt = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay, betas=(0.9, 0.98))
    if state is not None:
        restore_optimizer(opt, state, out / STATE_NAME)
        restore_rng(state, out / STATE_NAME)
    if data is not None:
        stream = FolderStream(data, cfg.num_frames, cfg.image_size, tc.seed, start=start * tc.batch_size)
    else:
        stream = SynthStream(TRAIN_SEED_BASE + tc.seed, cfg.num_frames, cfg.image_size, tc.noise,
                             start=start * tc.batch_size, questions=tc.questions, categories=tc.categories)
    loader = DataLoader(stream, batch_size=tc.batch_size, num_workers=workers, worker_init_fn=_worker_init,
                        collate_fn=lambda b: collate(b, cfg, tokenizer), prefetch_factor=4,
                        pin_memory=device == "cuda")
    from tqdm import tqdm

    bar = tqdm(total=tc.steps, initial=start, disable=not progress, desc=f"train {preset}", unit="step")
    t0 = time.perf_counter() - elapsed
    t_segment = time.perf_counter()
    step, ema = start, None

    def ran() -> list[dict]:
        """Where each stretch of steps ran: a run resumed on another machine says so."""
        here = {"from_step": start, "to_step": step, "device": device, "workers": workers,
                "seconds": round(time.perf_counter() - t_segment, 1)}
        return [*segments, here]

    log_every = max(1, min(50, tc.steps // 20))  # ~20 points in short runs, every 50 steps in long ones

    def save(summary: dict | None = None) -> None:
        """The whole run folder in one atomic replacement: weights, trainer state (and training.json)."""
        with atomic_dir(out) as tmp:
            save_checkpoint(model, tmp / CHECKPOINT_SCRATCH, tokenizer)
            for entry in (tmp / CHECKPOINT_SCRATCH).iterdir():  # the released layout: files at the top
                os.replace(entry, tmp / entry.name)
            shutil.rmtree(tmp / CHECKPOINT_SCRATCH)
            save_trainer_state(tmp, TrainerState(
                step=step, elapsed=time.perf_counter() - t0, preset=preset, train_config=dict(tc.__dict__),
                history=history, segments=ran(), optimizer=opt.state_dict(),
                layout_head=head.state_dict() if head is not None else None, rng=rng_states(device)))
            if summary is not None:
                (tmp / "training.json").write_text(json.dumps(summary, indent=2) + "\n")

    aux_ema = None
    for pixels, ids, labels, owner, layout in loader:
        if step >= tc.steps:
            break
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, tc)
        if device != "cpu":
            pixels, ids, labels, owner = (t.to(device, non_blocking=True) for t in (pixels, ids, labels, owner))
        if head is None:
            loss = answer_loss(model, pixels, ids, labels, owner)
            total = loss
        else:
            loss, aux = answer_and_layout_loss(model, head, pixels, ids, labels, owner, layout.to(device))
            total = loss + tc.layout_loss * aux
            aux_ema = aux.item() if aux_ema is None else 0.98 * aux_ema + 0.02 * aux.item()
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()  # the answer loss alone
        if step % log_every == 0 or step == 1:
            point = {"step": step, "loss": round(loss.item(), 5), "ema_loss": round(ema, 5)}
            if aux_ema is not None:
                point["layout_ema_loss"] = round(aux_ema, 5)
            history.append(point)
        bar.set_postfix(loss=f"{ema:.4f}")
        bar.update(1)
        if step % tc.save_every == 0 and step < tc.steps:
            save()
    bar.close()
    summary = {"preset": preset, "steps": step, "seconds": round(time.perf_counter() - t0, 1),
               "final_ema_loss": ema, "train_config": tc.__dict__, "segments": ran(), "history": history}
    save(summary)
    return summary
