#!/usr/bin/env python
"""Train the FrameTransformer vocal remover on a voxaug library.

    python train.py                              # CPU demo: synthesises a small library, trains the tiny model
    python train.py --instrumentals I --vocals V [--pairs P] [--val-instrumentals VI --val-vocals VV] \
        --out runs/big --preset default --sr 44100
    torchrun --nproc_per_node N train.py ...     # DistributedDataParallel (NCCL on GPU, gloo on CPU)
    python train.py --out runs/demo --resume     # continue exactly where the checkpoint stopped

Loss: L1 between X * mask and Y (magnitudes, per item divided by the mixture max). AdamW, linear warmup then
polynomial decay, gradient accumulation, bf16 autocast on CUDA, gradient clipping. Each epoch is validated
(L1 and the uSDR of the separated vocals: iSTFT of (1 - mask) * mixture with the mixture phase vs the true
vocals). ``OUT/log.csv`` (+ TensorBoard if installed), ``OUT/loss.png`` and ``OUT/checkpoint.pt`` (model,
optimizer, scheduler, step, RNG states, config; written atomically) live in the output folder.
A NaN/Inf loss or gradient skips the step (no update); ``--max-nan`` of them in a row stop the run.
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import random
import sys
import time
import warnings
from typing import List, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from frame_transformer import audio
from frame_transformer.data import ResumableDistributedSampler, SpectrogramCache, build_dataset
from frame_transformer.metrics import batch_sdr
from frame_transformer.model import FrameTransformer, ModelConfig, preset

CHECKPOINT = "checkpoint.pt"


class NanError(RuntimeError):
    pass


def _int_list(s: str) -> List[int]:
    return [int(v) for v in s.split(",") if v.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--instrumentals", help="folder of instrumental tracks")
    g.add_argument("--vocals", help="folder of vocal stems")
    g.add_argument("--pairs", help="folder with mixtures/ and instrumentals/ of matching file names")
    g.add_argument("--val-instrumentals")
    g.add_argument("--val-vocals")
    g.add_argument("--val-pairs")
    g.add_argument("--synth-dir", default="runs/synth_data",
                   help="where the built-in demo library is synthesised when no data folders are given")
    g.add_argument("--synth-tracks", type=int, default=16)
    g.add_argument("--synth-seconds", type=float, default=8.0)
    g.add_argument("--cache-dir", help="spectrogram cache (default OUT/cache)")
    g.add_argument("--sr", type=int, default=None, help="sample rate (default 16000 for the demo data, else 44100)")
    g.add_argument("--hop", type=int, default=None, help="STFT hop (default n_fft // 2)")
    g.add_argument("--cropsize", type=int, default=None, help="frames per item (tiny 64, default 256)")
    g.add_argument("--epoch-size", type=int, default=None, help="items per epoch (voxaug mixes are unlimited)")
    g.add_argument("--val-items", type=int, default=32)
    g.add_argument("--workers", type=int, default=0)
    g = p.add_argument_group("model")
    g.add_argument("--preset", default=None,
                   help="tiny (demo and CPU default) | default (the seed's sizes; default with real data on CUDA) | micro")
    g.add_argument("--channels", type=int)
    g.add_argument("--n-fft", type=int)
    g.add_argument("--num-heads", type=int)
    g.add_argument("--expansion", type=float)
    g.add_argument("--num-attention-maps", type=_int_list, help="comma list, one per level")
    g.add_argument("--channel-mults", type=_int_list, help="comma list, one per level")
    g.add_argument("--levels", type=int)
    g.add_argument("--dropout", type=float)
    g.add_argument("--backend", default="auto", choices=["auto", "triton", "reference"])
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=None)
    g.add_argument("--batch-size", type=int, default=None)
    g.add_argument("--accum", type=int, default=1, help="gradient accumulation (micro-batches per step)")
    g.add_argument("--lr", type=float, default=None)
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--warmup-steps", type=int, default=None)
    g.add_argument("--power", type=float, default=1.0, help="polynomial decay power after warmup")
    g.add_argument("--min-lr-ratio", type=float, default=0.0)
    g.add_argument("--clip", type=float, default=1.0, help="gradient-norm clipping (0 = off)")
    g.add_argument("--no-amp", action="store_true", help="disable bf16 autocast on CUDA")
    g.add_argument("--max-nan", type=int, default=10, help="stop after this many non-finite steps in a row")
    g = p.add_argument_group("run")
    g.add_argument("--out", default="runs/demo")
    g.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="resume from OUT/checkpoint.pt (or the given checkpoint)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default=None)
    g.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default 1 when training on the CPU: the model's many small matmuls run several "
                        "times slower with more threads here, worst on a busy machine; torch's default on CUDA)")
    g.add_argument("--stop-after-steps", type=int, default=None,
                   help="stop (and checkpoint) once this many optimizer steps are done (the schedule is unchanged)")
    g.add_argument("--no-initial-val", action="store_true", help="skip validating the untrained model")
    g.add_argument("--no-progress", action="store_true")
    g.add_argument("--inject-nan-at", default="", help=argparse.SUPPRESS)  # testing: "3,4" or "all"
    return p


def _defaults(args, cuda: bool, synthetic: bool):
    """Unset options: the demo (built-in synthetic data, or any run on the CPU) uses the tiny preset and short
    schedule; real data on CUDA uses the seed's sizes."""
    args.preset = args.preset or ("default" if cuda and not synthetic else "tiny")
    tiny = args.preset != "default"
    fill = dict(sr=16000 if synthetic else 44100, cropsize=64 if tiny else 256, epochs=6 if tiny else 100,
                batch_size=4 if tiny else 8, lr=2e-3 if tiny else 1e-4, epoch_size=256 if tiny else 8000,
                warmup_steps=20 if tiny else 2000)
    for k, v in fill.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


def model_config(args) -> ModelConfig:
    over = {k: v for k, v in dict(channels=args.channels, n_fft=args.n_fft, num_heads=args.num_heads,
                                  expansion=args.expansion, num_attention_maps=args.num_attention_maps,
                                  channel_mults=args.channel_mults, num_levels=args.levels,
                                  dropout=args.dropout).items() if v is not None}
    return preset(args.preset, **over)


def lr_lambda_factory(warmup: int, total: int, power: float, min_ratio: float):
    def f(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * (1 - progress) ** power
    return f


def atomic_save(obj, path: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def rng_state(loader_gen: torch.Generator) -> dict:
    return dict(python=random.getstate(), numpy=np.random.get_state(), torch=torch.get_rng_state(),
                cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                loader=loader_gen.get_state())


def set_rng_state(state: dict, loader_gen: torch.Generator) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    loader_gen.set_state(state["loader"])


def plot_history(history: List[dict], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    rows = [h for h in history if h.get("train_loss") not in (None, "")]
    if rows:
        a1.plot([h["step"] for h in rows], [h["train_loss"] for h in rows], "o-", label="train L1")
    a1.plot([h["step"] for h in history], [h["val_loss"] for h in history], "s-", label="val L1")
    a1.set_xlabel("step"), a1.set_ylabel("L1"), a1.legend(), a1.grid(alpha=0.3)
    a2.plot([h["step"] for h in history], [h["val_sdr"] for h in history], "s-", color="C2")
    a2.set_xlabel("step"), a2.set_ylabel("vocals uSDR (dB)"), a2.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


class Trainer:
    def __init__(self, args):
        self.args = args
        self.distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
        if args.device:
            self.device = torch.device(args.device)
        else:
            self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.distributed:
            if self.device.type == "cuda":
                local = int(os.environ.get("LOCAL_RANK", "0"))
                torch.cuda.set_device(local)
                self.device = torch.device("cuda", local)
            if not dist.is_initialized():
                dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
            self.rank, self.world = dist.get_rank(), dist.get_world_size()
        else:
            self.rank, self.world = 0, 1
        self.main = self.rank == 0
        self.out = args.out
        os.makedirs(self.out, exist_ok=True)
        self.inject = set()
        if args.inject_nan_at == "all":
            self.inject = None
        elif args.inject_nan_at:
            self.inject = set(_int_list(args.inject_nan_at))

    def log(self, *a):
        if self.main:
            print(*a, flush=True)

    # ------------------------------------------------------------------------------------------
    def setup_data(self):
        a = self.args
        synthetic = not (a.instrumentals or a.pairs)
        if synthetic:
            from frame_transformer import synth

            if self.main:
                paths = synth.make_library(a.synth_dir, sr=a.sr, tracks=a.synth_tracks, seconds=a.synth_seconds,
                                           seed=0)
            if self.distributed:
                dist.barrier()
            paths = synth.make_library(a.synth_dir, sr=a.sr, tracks=a.synth_tracks, seconds=a.synth_seconds,
                                       seed=0, verbose=False)
            inst, voc, pairs = paths["instrumentals"], paths["vocals"], None
            v_inst, v_voc, v_pairs = paths["val_instrumentals"], paths["val_vocals"], None
        else:
            inst, voc, pairs = a.instrumentals, a.vocals, a.pairs
            v_inst, v_voc, v_pairs = a.val_instrumentals, a.val_vocals, a.val_pairs
            if not (v_inst or v_pairs):  # no held-out folders: validate on fixed plain mixes of the training files
                v_inst, v_voc, v_pairs = inst, voc, pairs
        cfg = self.model_cfg
        hop = a.hop or cfg.n_fft // 2
        a.hop = hop
        cache = SpectrogramCache(a.cache_dir or os.path.join(self.out, "cache"), a.sr, cfg.n_fft, hop)
        # rank 0 fills the cache first, the others then find it there
        if self.main:
            build_dataset(cache, inst, voc, pairs, progress=not a.no_progress, cropsize=a.cropsize)
        if self.distributed:
            dist.barrier()
        self.train_set = build_dataset(cache, inst, voc, pairs, cropsize=a.cropsize, epoch_size=a.epoch_size,
                                       seed=a.seed, augment=True)
        self.val_set = build_dataset(cache, v_inst, v_voc, v_pairs, cropsize=a.cropsize, epoch_size=a.val_items,
                                     seed=a.seed + 7919, augment=False, return_complex=True)
        self.hop, self.n_fft = hop, cfg.n_fft
        n_i, n_v = len(self.train_set.instrumentals), len(self.train_set.vocals)
        self.log(f"data: {n_i} instrumentals, {n_v} vocals, {len(self.train_set.pairs)} pairs "
                 f"({len(cache.failed)} unreadable skipped); {len(self.val_set)} validation items")

    def setup_model(self):
        a = self.args
        torch.manual_seed(a.seed)
        self.model = FrameTransformer(self.model_cfg, backend=a.backend).to(self.device)
        self.log(f"FrameTransformer ({a.preset}): {self.model.num_parameters():,} parameters")
        self.ddp = self.model
        if self.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.ddp = DDP(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=a.lr, weight_decay=a.weight_decay)
        self.steps_per_epoch = a.epoch_size // (a.batch_size * a.accum * self.world)
        if self.steps_per_epoch < 1:
            raise SystemExit(f"--epoch-size {a.epoch_size} is smaller than one step "
                             f"({a.batch_size} x {a.accum} accum x {self.world} processes)")
        self.total_steps = self.steps_per_epoch * a.epochs
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda_factory(a.warmup_steps, self.total_steps, a.power, a.min_lr_ratio))
        self.loader_gen = torch.Generator()
        self.loader_gen.manual_seed(a.seed)
        self.sampler = ResumableDistributedSampler(self.train_set, num_replicas=self.world, rank=self.rank,
                                                   shuffle=True, seed=a.seed, drop_last=True)
        self.step = self.epoch = self.step_in_epoch = 0
        self.nan_total = self.nan_run = 0
        self.history: List[dict] = []

    # ------------------------------------------------------------------------------------------
    def checkpoint(self) -> dict:
        return dict(model=self.model.state_dict(), optimizer=self.optimizer.state_dict(),
                    scheduler=self.scheduler.state_dict(), step=self.step, epoch=self.epoch,
                    step_in_epoch=self.step_in_epoch, nan_total=self.nan_total, nan_run=self.nan_run,
                    history=self.history, rng=rng_state(self.loader_gen),
                    config=dict(model=self.model_cfg.to_dict(), sr=self.args.sr, n_fft=self.n_fft, hop=self.hop,
                                cropsize=self.args.cropsize, args=vars(self.args)))

    def save(self):
        if self.main:
            atomic_save(self.checkpoint(), os.path.join(self.out, CHECKPOINT))

    def load(self, path: str):
        ck = torch.load(path, map_location="cpu", weights_only=False)
        self.model.load_state_dict(ck["model"])
        self.optimizer.load_state_dict(ck["optimizer"])
        self.scheduler.load_state_dict(ck["scheduler"])
        self.step, self.epoch, self.step_in_epoch = ck["step"], ck["epoch"], ck["step_in_epoch"]
        self.nan_total, self.nan_run = ck["nan_total"], ck["nan_run"]
        self.history = ck["history"]
        set_rng_state(ck["rng"], self.loader_gen)
        self.log(f"resumed from {path} at step {self.step} (epoch {self.epoch}, step {self.step_in_epoch} of it)")

    # ------------------------------------------------------------------------------------------
    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16,
                              enabled=self.device.type == "cuda" and not self.args.no_amp)

    @torch.no_grad()
    def validate(self) -> dict:
        model = self.model
        was = model.training
        model.eval()
        loader = DataLoader(self.val_set, batch_size=self.args.batch_size, shuffle=False, num_workers=0)
        losses, sdrs = [], []
        for x, y, xc, vc in loader:
            x, y = x.to(self.device), y.to(self.device)
            with self.autocast():
                mask = model(x)
            mask = mask.float()
            losses.append(torch.nn.functional.l1_loss(x * mask, y, reduction="none").flatten(1).mean(1).cpu())
            xc, vc = xc.to(self.device), vc.to(self.device)
            length = (x.shape[-1] - 1) * self.hop
            est = audio.istft((1 - mask).to(xc.real.dtype) * xc, self.n_fft, self.hop, length)
            ref = audio.istft(vc, self.n_fft, self.hop, length)
            sdr = batch_sdr(est, ref).cpu()
            has_vocals = ref.flatten(1).abs().amax(1).cpu() > 1e-6
            sdrs.append(sdr[has_vocals])
        model.train(was)
        return dict(val_loss=float(torch.cat(losses).mean()),
                    val_sdr=float(torch.cat(sdrs).mean()) if sum(len(s) for s in sdrs) else float("nan"))

    def record(self, row: dict):
        self.history.append(row)
        if not self.main:
            return
        path = os.path.join(self.out, "log.csv")
        keys = ["epoch", "step", "train_loss", "val_loss", "val_sdr", "lr", "nan_skipped", "elapsed_s"]
        with open(path + ".tmp", "w", newline="") as f:
            w = csv.DictWriter(f, keys, extrasaction="ignore")
            w.writeheader()
            for h in self.history:
                w.writerow(h)
        os.replace(path + ".tmp", path)
        if self.tb is not None:
            for k in ("train_loss", "val_loss", "val_sdr", "lr"):
                if row.get(k) not in (None, ""):
                    self.tb.add_scalar(k, row[k], row["step"])
        plot_history(self.history, os.path.join(self.out, "loss.png"))

    # ------------------------------------------------------------------------------------------
    def train_step(self, batches) -> Optional[float]:
        """One optimizer step over ``accum`` micro-batches; returns the loss, or None when skipped."""
        a = self.args
        self.ddp.train()
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        finite = True
        for i, (x, y) in enumerate(batches):
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            sync = i == len(batches) - 1
            ctx = self.ddp.no_sync() if (self.distributed and not sync) else _null()
            with ctx:
                with self.autocast():
                    mask = self.ddp(x)
                loss = torch.nn.functional.l1_loss(x * mask.float(), y)
                if self.inject is None or (self.step + 1) in self.inject:
                    loss = loss * float("nan")
                (loss / len(batches)).backward()
            total += float(loss.detach()) / len(batches)
            finite = finite and math.isfinite(float(loss.detach()))
        if a.clip > 0:
            gnorm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), a.clip))
        else:
            gnorm = float(sum(p.grad.detach().float().square().sum() for p in self.model.parameters()
                              if p.grad is not None)) ** 0.5
        ok = torch.tensor([1.0 if (finite and math.isfinite(gnorm)) else 0.0])
        if self.distributed:
            ok = ok.to(self.device)
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        if float(ok) > 0:
            self.optimizer.step()
            self.nan_run = 0
            result = total
        else:
            self.optimizer.zero_grad(set_to_none=True)
            self.nan_total += 1
            self.nan_run += 1
            self.log(f"\nwarning: non-finite loss/gradient at step {self.step + 1}; step skipped "
                     f"({self.nan_run} in a row, {self.nan_total} total)")
            result = None
        with warnings.catch_warnings():  # a skipped first step makes torch warn about the call order
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
            self.scheduler.step()
        self.step += 1
        if self.nan_run >= a.max_nan:
            self.save()
            raise NanError(f"stopping: {self.nan_run} consecutive steps had a non-finite loss or gradient "
                           f"(last at step {self.step}); lower --lr, check the data, or resume from an earlier checkpoint")
        return result

    def check_replicas(self) -> List[float]:
        """All-gather a checksum of every replica's weights; they must agree (DDP keeps replicas identical)."""
        flat = torch.cat([p.detach().double().flatten() for p in self.model.parameters()])
        weights = torch.linspace(1.0, 2.0, flat.numel(), dtype=torch.float64, device=flat.device)
        mine = (flat * weights).sum().reshape(1)
        got = [torch.zeros_like(mine) for _ in range(self.world)]
        dist.all_gather(got, mine)
        sums = [float(g) for g in got]
        self.log(f"replica weight checksums: {sums}")
        if any(s != sums[0] for s in sums):
            raise RuntimeError(f"DDP replicas diverged: weight checksums {sums}")
        return sums

    def run(self):
        a = self.args
        self.model_cfg = model_config(a)
        self.setup_data()
        self.setup_model()
        self.tb = None
        if self.main:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(os.path.join(self.out, "tb"))
            except Exception:
                self.tb = None
        if a.resume:
            path = os.path.join(self.out, CHECKPOINT) if a.resume == "auto" else a.resume
            if not os.path.exists(path):
                raise SystemExit(f"--resume: no checkpoint at {path}")
            self.load(path)
        self.log(f"{self.total_steps} steps ({a.epochs} epochs x {self.steps_per_epoch}), batch {a.batch_size} x "
                 f"accum {a.accum} x {self.world} process(es), crop {a.cropsize} frames, device {self.device}")
        t0 = time.time()
        if self.step == 0 and not a.no_initial_val and not self.history:
            if self.main:
                v = self.validate()
                self.log(f"untrained: val L1 {v['val_loss']:.5f}  val vocals uSDR {v['val_sdr']:.2f} dB")
                self.record(dict(epoch=0, step=0, train_loss="", lr=self.scheduler.get_last_lr()[0],
                                 nan_skipped=0, elapsed_s=0.0, **v))
            if self.distributed:
                dist.barrier()
        stopped = False
        while self.epoch < a.epochs and not stopped:
            self.train_set.set_epoch(self.epoch)
            self.sampler.set_epoch(self.epoch)
            self.sampler.set_start(self.step_in_epoch * a.batch_size * a.accum)
            loader = DataLoader(self.train_set, batch_size=a.batch_size, sampler=self.sampler,
                                num_workers=a.workers, generator=self.loader_gen, drop_last=True,
                                pin_memory=self.device.type == "cuda", persistent_workers=False)
            it = iter(loader)
            bar = None
            if self.main and not a.no_progress:
                from tqdm import tqdm

                bar = tqdm(total=self.steps_per_epoch, initial=self.step_in_epoch, desc=f"epoch {self.epoch + 1}/{a.epochs}",
                           unit="step", dynamic_ncols=True, leave=True)
            losses = []
            while self.step_in_epoch < self.steps_per_epoch:
                batches = [next(it) for _ in range(a.accum)]
                loss = self.train_step(batches)
                self.step_in_epoch += 1
                if loss is not None:
                    losses.append(loss)
                if bar is not None:
                    bar.set_postfix(loss=f"{loss:.5f}" if loss is not None else "skip",
                                    lr=f"{self.scheduler.get_last_lr()[0]:.2e}")
                    bar.update(1)
                if a.stop_after_steps is not None and self.step >= a.stop_after_steps:
                    stopped = True
                    break
            if bar is not None:
                bar.close()
            del it, loader
            if stopped and self.step_in_epoch < self.steps_per_epoch:
                break
            self.epoch += 1
            self.step_in_epoch = 0
            train_loss = float(np.mean(losses)) if losses else float("nan")
            if self.distributed:
                t = torch.tensor([train_loss], device=self.device)
                dist.all_reduce(t)
                train_loss = float(t) / self.world
            if self.main:
                v = self.validate()
                self.log(f"epoch {self.epoch}: train L1 {train_loss:.5f}  val L1 {v['val_loss']:.5f}  "
                         f"val vocals uSDR {v['val_sdr']:.2f} dB  ({time.time() - t0:.0f} s)")
                self.record(dict(epoch=self.epoch, step=self.step, train_loss=train_loss,
                                 lr=self.scheduler.get_last_lr()[0], nan_skipped=self.nan_total,
                                 elapsed_s=round(time.time() - t0, 1), **v))
            self.save()
            if self.distributed:
                dist.barrier()
        self.save()
        if self.distributed:
            self.check_replicas()
            dist.barrier()
        if self.main and self.history:
            first, last = self.history[0], self.history[-1]
            self.log(f"done: step {self.step}, val vocals uSDR {first['val_sdr']:.2f} -> {last['val_sdr']:.2f} dB; "
                     f"checkpoint {os.path.join(self.out, CHECKPOINT)}")
        return self


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def main(argv=None):
    args = build_parser().parse_args(argv)
    cuda = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    if args.resume:  # keep the run's settings; the command line may not repeat them
        path = os.path.join(args.out, CHECKPOINT) if args.resume == "auto" else args.resume
        if os.path.exists(path):
            saved = torch.load(path, map_location="cpu", weights_only=False)["config"]["args"]
            keep = {"resume", "stop_after_steps", "no_progress", "workers", "device", "inject_nan_at", "max_nan",
                    "threads"}
            for k, v in saved.items():
                if k not in keep:
                    setattr(args, k, v)
    args = _defaults(args, cuda, synthetic=not (args.instrumentals or args.pairs))
    if args.threads or not cuda:
        torch.set_num_threads(args.threads or 1)
    trainer = Trainer(args)
    try:
        trainer.run()
    except NanError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
    finally:
        if trainer.distributed and dist.is_initialized():
            dist.destroy_process_group()
    return trainer


if __name__ == "__main__":
    main()
