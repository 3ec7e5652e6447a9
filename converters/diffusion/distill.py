"""Distillation of a diffusion teacher into a few-step student: consistency (LCM / consistency distillation)
or the teacher's own trajectories.

The student starts as a copy of the teacher and learns ``f(x_t, t) = c_skip(t) x_t + c_out(t) x0(x_t, t)``,
whose value is the same all along one probability-flow trajectory: a teacher DDIM step from ``t`` to
``t - k`` gives a point of the same trajectory, and a slowly moving average of the student (the target)
gives ``f`` there. ``lcm`` skips ``k = T / 50`` timesteps per solver step with a pseudo-Huber loss (Latent
Consistency Models); ``consistency`` is the original consistency distillation on a finer grid
(``k = T / 100``) with an L2 loss. The result is a diffusers pipeline with an ``LCMScheduler`` config,
sampled in 1-4 steps by :func:`edgekit.converters.diffusion.sampler.sample` (``sampler="consistency"``).

Training data: the miniature's digits, a folder of images, or (``data="teacher"``, for a checkpoint whose
data is not at hand) images the teacher samples itself first.

``trajectory`` needs no data: the teacher solves its probability-flow ODE from noise (DDIM, ``substeps``
steps between two of the student's timesteps), and the student learns to make each of its ``steps``
deterministic DDIM steps land where the teacher's solution is at the next of its timesteps (an L2 loss on
the image at that point; the phases of Phased Consistency Models, learned by regression on the solved
trajectories as in Luhman & Luhman's direct distillation). It samples with plain DDIM at exactly those
timesteps (``sampler="ddim"``, trailing spacing), so every step starts where the teacher's ODE would be and
no noise is re-injected between steps. The solved trajectories are saved with the training state, a piece
at a time, so an interrupted run does not solve them again.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgekit.errors import InputError
from edgekit.progress import ProgressFn, no_progress

METHODS = {"lcm": {"origin_steps": 50, "loss": "huber"}, "consistency": {"origin_steps": 100, "loss": "l2"},
           "trajectory": {"origin_steps": 0, "loss": "l2"}}
TRAJ_CHUNK = 1000  # trajectories whose noises and labels come from one random stream
TRAJ_PIECE = 250  # trajectories solved and saved at a time: what a Ctrl-C can lose


@dataclass(frozen=True)
class DistillConfig:
    """A distillation run.

    steps: the sampling steps the student is meant for (1-8; it samples with any number up to origin_steps).
    method: "lcm", "consistency" or "trajectory" (see the module docstring).
    iters: optimizer steps; minutes: stop after this long (0: no limit); either ends the run, and a rerun
        of an unfinished one resumes from its last save.
    batch, lr: images per step and the learning rate (after a short warmup: constant for the consistency
        methods, a cosine decay to the last iteration for ``trajectory``).
    target_ema: how slowly the target network follows the student (LCM: 0.95).
    huber_c: the pseudo-Huber loss's scale (on images in [-1, 1]).
    data: "digits", "teacher" or a folder of images; None: the digits for the built-in miniature, else the
        teacher's own samples.
    teacher_images: how many images the teacher samples for ``data="teacher"`` (DDIM, 25 steps).
    trajectories, substeps: ``trajectory``: how many ODE solutions the teacher computes, and its DDIM steps
        between two of the student's timesteps.
    """

    steps: int = 4
    method: str = "trajectory"
    iters: int = 4000
    minutes: float = 0.0
    batch: int = 64
    lr: float = 1e-4
    target_ema: float = 0.95
    huber_c: float = 0.001
    data: str | None = None
    teacher_images: int = 1024
    trajectories: int = 16000
    substeps: int = 12
    seed: int = 0
    save_every: int = 100

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise InputError(f"--method must be one of {', '.join(METHODS)}, not {self.method!r}")
        if not 1 <= self.steps <= 8:
            raise InputError("--steps must be between 1 and 8 for a distilled student")
        if self.iters < 1 or self.batch < 1 or self.lr <= 0:
            raise InputError("iters, batch and lr must be positive")
        if not 0 <= self.target_ema < 1:
            raise InputError("target_ema must be in [0, 1)")
        if self.trajectories < 1 or self.substeps < 1:
            raise InputError("trajectories and substeps must be positive")
        if self.method == "trajectory" and self.data is not None:
            raise InputError("--method trajectory learns from the teacher's own trajectories: drop --data")

    @property
    def origin_steps(self) -> int:
        return int(METHODS[self.method]["origin_steps"])


def _training_images(pipe: Any, teacher: Any, cfg: DistillConfig, progress: ProgressFn) -> tuple[Any, Any]:
    """The images (and labels, or None) the student learns on, as torch tensors in [-1, 1]."""
    import torch

    data = cfg.data or ("digits" if str(pipe.info.get("dataset", "")).startswith("sklearn.datasets.load_digits")
                        else "teacher")
    if data == "digits":
        from edgekit.converters.diffusion.miniature import digits

        x, y = digits(pipe.sample_size)
        if pipe.in_channels != 1:
            raise InputError(f"the digits are grayscale; this UNet takes {pipe.in_channels} channels: use --data")
        return torch.from_numpy(x), torch.from_numpy(y) if pipe.num_classes else None
    if data == "teacher":
        from edgekit.converters.diffusion.pipeline import torch_denoiser
        from edgekit.converters.diffusion.sampler import SampleConfig, sample

        n, s = cfg.teacher_images, pipe.sample_size
        labels = np.arange(n) % pipe.num_classes if pipe.num_classes else None
        out = []
        for i in range(0, n, 128):
            lab = None if labels is None else labels[i:i + 128]
            m = min(128, n - i)
            out.append(sample(torch_denoiser(teacher), pipe.schedule(), (m, pipe.in_channels, s, s),
                              SampleConfig(steps=25, seed=cfg.seed + 7919 * (i + 1)), lab))
            progress("sampling the teacher's images", i + m, n)
        y = None if labels is None else torch.from_numpy(labels.astype(np.int64))
        return torch.from_numpy(np.concatenate(out)), y
    return _image_folder(Path(data), pipe)


def _image_folder(folder: Path, pipe: Any) -> tuple[Any, None]:
    import torch
    from PIL import Image, UnidentifiedImageError

    files = sorted(f for f in folder.glob("*") if f.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
    if not folder.is_dir() or not files:
        raise InputError(f"--data {folder}: give 'digits', 'teacher' or a folder of PNG/JPEG images")
    s, mode = pipe.sample_size, {1: "L", 3: "RGB"}.get(pipe.in_channels)
    if mode is None:
        raise InputError(f"images have 1 or 3 channels; this UNet takes {pipe.in_channels}: use --data teacher")
    arrs = []
    for f in files:
        try:
            img = Image.open(f).convert(mode).resize((s, s), Image.BICUBIC)
        except (OSError, UnidentifiedImageError) as exc:
            raise InputError(f"{f} is not a readable image ({exc}); remove it from --data") from exc
        a = np.asarray(img, dtype=np.float32) / 127.5 - 1
        arrs.append(a[None] if a.ndim == 2 else a.transpose(2, 0, 1))
    return torch.from_numpy(np.stack(arrs)), None


def distill(src: str | Path, out: str | Path, cfg: DistillConfig = DistillConfig(), *, force: bool = False,
            progress: ProgressFn = no_progress) -> dict[str, Any]:
    """Distill the pipeline ``src`` into a few-step student pipeline at ``out``.

    A resumable state is kept beside ``out`` (``<out>.distill``) while training: an interrupted or
    time-bounded run picks up where it stopped when run again with the same arguments. Returns the
    distillation record (also in the student's ``edgekit_diffusion.json``); ``{"finished": False}`` when
    ``minutes`` ran out first (the state is kept, nothing written to ``out``)."""
    from edgekit.converters.diffusion.pipeline import open_pipeline
    from edgekit.fsutil import check_output, is_edgekit_output

    pipe = open_pipeline(src)
    out = Path(out).expanduser()
    check_output(out, force, is_edgekit_output)
    state_dir = out.with_name(out.name + ".distill")
    try:
        return _distill(pipe, src, out, state_dir, cfg, force, progress)
    except (KeyboardInterrupt, SystemExit) as exc:  # said on the "interrupted"/"terminated" line: what was kept
        exc.add_note(f"{out.name} was not written; {kept(state_dir, cfg)}")
        raise


def kept(state_dir: Path, cfg: DistillConfig) -> str:
    """What an interrupted distillation left for a rerun to resume from, in words (an empty ``state_dir``
    is removed: nothing half-written stays)."""
    from edgekit.converters.diffusion.trainstate import saved_step

    for half in state_dir.glob("*.partial"):  # cut short while being written
        half.unlink(missing_ok=True)
    parts = []
    solved = sum(_piece_count(f) for f in state_dir.glob(_trajectory_glob(cfg)))
    if cfg.method == "trajectory" and solved:
        parts.append(f"{min(solved, cfg.trajectories)} of {cfg.trajectories} solved trajectories")
    step = saved_step(state_dir)
    if step is not None:
        parts.append(f"the training state at step {step}/{cfg.iters}")
    if not parts:
        if state_dir.is_dir() and not any(state_dir.iterdir()):
            state_dir.rmdir()
        first = f"{TRAJ_PIECE} trajectories" if cfg.method == "trajectory" else f"step {cfg.save_every}"
        return f"nothing was saved yet (the first save is after {first}): the same command starts over"
    return f"kept {' and '.join(parts)} in {state_dir}: the same command resumes from there"


def _distill(pipe: Any, src: str | Path, out: Path, state_dir: Path, cfg: DistillConfig, force: bool,
             progress: ProgressFn) -> dict[str, Any]:
    import torch

    from edgekit.converters.diffusion.pipeline import save_pipeline
    from edgekit.converters.diffusion.trainstate import clear_state, load_state, save_state
    from edgekit.fsutil import atomic_dir
    from edgekit.hashing import sha256_files

    teacher = pipe.load_unet().requires_grad_(False)
    student = copy.deepcopy(teacher).requires_grad_(True).train()
    target = copy.deepcopy(teacher)
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=0.0)
    step, losses, seconds, running = 0, [], 0.0, []
    restored = load_state(state_dir, student, target, opt)
    if restored is not None:
        step, extra = restored
        if extra.get("config") != _resumable(cfg):
            raise InputError(f"{state_dir} holds a distillation with other settings; delete it or give the "
                             "same arguments to resume")
        losses, seconds = list(extra.get("losses", [])), float(extra.get("seconds", 0.0))
        running = list(extra.get("running", []))
    objective: Consistency | Trajectory
    if cfg.method == "trajectory":
        objective = Trajectory(pipe.schedule(), cfg, *solve_trajectories(pipe, teacher, cfg, state_dir, progress))
    else:
        objective = Consistency(pipe.schedule(), cfg, *_training_images(pipe, teacher, cfg, progress))
    t_start = time.monotonic()
    while step < cfg.iters:
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        loss = objective.loss(student, target, teacher, g)
        for group in opt.param_groups:
            group["lr"] = cfg.lr * objective.lr_factor(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        if objective.uses_target:
            with torch.no_grad():
                for pt, ps in zip(target.parameters(), student.parameters(), strict=True):
                    pt.lerp_(ps, 1 - cfg.target_ema)
        step += 1
        running.append(float(loss.detach()))
        if step % 25 == 0:
            losses.append([step, round(float(np.mean(running)), 6)])
            running = []
        progress(f"distilling ({cfg.method}, {cfg.steps} steps)", step, cfg.iters)
        elapsed = seconds + time.monotonic() - t_start
        out_of_time = bool(cfg.minutes) and time.monotonic() - t_start > cfg.minutes * 60
        if step % cfg.save_every == 0 or step == cfg.iters or out_of_time:
            save_state(state_dir, step, student, target, opt,
                       {"losses": losses, "running": running, "seconds": elapsed, "config": _resumable(cfg)})
        if out_of_time and step < cfg.iters:
            return {"finished": False, "step": step, "iters": cfg.iters, "seconds": round(elapsed, 1)}
    student.eval()
    sampling = ({"sampler": "ddim", "steps": cfg.steps, "spacing": "trailing"} if cfg.method == "trajectory" else
                {"sampler": "consistency", "steps": cfg.steps, "origin_steps": cfg.origin_steps})
    record = {**sampling, **({"dataset": pipe.info["dataset"]} if "dataset" in pipe.info else {}),
              "distilled": {**asdict(cfg), "teacher": str(src),  # as given: a shipped record names no machine
                            "teacher_sha256": sha256_files([pipe.weights]),
                            "seconds": round(seconds + time.monotonic() - t_start, 1), "losses": losses,
                            "torch": torch.__version__}}
    base = {k: v for k, v in pipe.scheduler_config.items() if not k.startswith("_")}
    sched_cfg = ({**base, "_class_name": "DDIMScheduler", "timestep_spacing": "trailing"}
                 if cfg.method == "trajectory" else
                 {**base, "_class_name": "LCMScheduler", "original_inference_steps": cfg.origin_steps,
                  "timestep_scaling": objective.sched.timestep_scaling})
    with atomic_dir(out, force=force) as tmp:
        save_pipeline(tmp, student, sched_cfg, record)
    clear_state(state_dir)
    clear_trajectories(state_dir)
    if state_dir.is_dir() and not any(state_dir.iterdir()):
        state_dir.rmdir()
    return {"finished": True, **record}


class Consistency:
    """The consistency-distillation objective on a schedule: the student's ``f`` at ``(x_t, t)`` against the
    target's at the point a teacher DDIM step from ``t`` reaches (``t - k``), on batches of the training
    images ``x_all`` (labels ``y_all`` or None)."""

    uses_target = True

    def __init__(self, sched: Any, cfg: DistillConfig, x_all: Any = None, y_all: Any = None) -> None:
        import torch

        self.sched, self.cfg, self.x_all, self.y_all = sched, cfg, x_all, y_all
        self.abar = torch.tensor(np.concatenate([[1.0], sched.alphas_cumprod]), dtype=torch.float32)  # [t + 1]
        self.T = sched.num_train_timesteps
        self.k = self.T // cfg.origin_steps

    def f(self, model: Any, x: Any, t: Any, y: Any) -> Any:
        """The consistency function at per-item timesteps ``t`` (``t < 0``: the clean end, where f = x)."""
        sched = self.sched
        out = model(x, t.clamp(min=0), class_labels=y).sample
        x0 = _x0(sched.prediction_type, x, out, self.abar[t + 1].view(-1, 1, 1, 1))
        s = (t.clamp(min=0).float() * sched.timestep_scaling).view(-1, 1, 1, 1)
        d = s * s + sched.sigma_data**2
        return (sched.sigma_data**2 / d) * x + (s / d.sqrt()) * x0

    def pair(self, teacher: Any, x0: Any, y: Any, g: Any) -> tuple[Any, Any, Any, Any]:
        """``(x_t, t, x_s, s)``: a noised batch at random grid points and the teacher's DDIM step from each."""
        import torch

        sched, abar = self.sched, self.abar
        n = x0.shape[0]
        t = (torch.randint(1, self.cfg.origin_steps + 1, (n,), generator=g) * self.k - 1).clamp(max=self.T - 1)
        s = t - self.k
        a_t = abar[t + 1].view(-1, 1, 1, 1)
        x_t = a_t.sqrt() * x0 + (1 - a_t).sqrt() * torch.randn(x0.shape, generator=g)
        with torch.no_grad():
            x0_t = _x0(sched.prediction_type, x_t, teacher(x_t, t, class_labels=y).sample, a_t)
            if sched.clip_sample:
                x0_t = x0_t.clamp(-sched.clip_sample_range, sched.clip_sample_range)
            eps_t = (x_t - a_t.sqrt() * x0_t) / (1 - a_t).sqrt()
            a_s = abar[s + 1].view(-1, 1, 1, 1)
            x_s = a_s.sqrt() * x0_t + (1 - a_s).sqrt() * eps_t
        return x_t, t, x_s, s

    def lr_factor(self, step: int) -> float:
        """The learning rate's multiplier: a 100-step warmup, then constant."""
        return min(1.0, (step + 1) / 100)

    def loss(self, student: Any, target: Any, teacher: Any, g: Any) -> Any:
        import torch

        idx = torch.randint(0, len(self.x_all), (self.cfg.batch,), generator=g)
        return self.batch_loss(student, target, teacher, self.x_all[idx],
                               None if self.y_all is None else self.y_all[idx], g)

    def batch_loss(self, student: Any, target: Any, teacher: Any, x0: Any, y: Any, g: Any) -> Any:
        import torch

        x_t, t, x_s, s = self.pair(teacher, x0, y, g)
        with torch.no_grad():
            goal = torch.where((s < 0).view(-1, 1, 1, 1), x_s, self.f(target, x_s, s, y))
        pred = self.f(student, x_t, t, y)
        if METHODS[self.cfg.method]["loss"] == "huber":
            c = self.cfg.huber_c
            return (((pred - goal) ** 2 + c * c).sqrt() - c).mean()
        return torch.nn.functional.mse_loss(pred, goal)


def student_timesteps(sched: Any, steps: int) -> list[int]:
    """The timesteps a ``trajectory`` student steps from, high to low, then -1 (the clean end)."""
    return [*sched.timesteps(steps, "trailing"), -1]


def _phase_timesteps(t: int, t_next: int, substeps: int) -> list[int]:
    """The teacher's DDIM timesteps from ``t`` down to ``t_next`` (both included), ``substeps`` steps."""
    return sorted({int(v) for v in np.round(np.linspace(t, t_next, substeps + 1))}, reverse=True)


def solve_trajectories(pipe: Any, teacher: Any, cfg: DistillConfig, state_dir: Path,
                       progress: ProgressFn = no_progress) -> tuple[Any, Any]:
    """The teacher's ODE solutions from ``cfg.trajectories`` noises: ``states [n, steps + 1, c, h, w]`` (the
    noise, then the solution at each of the student's later timesteps; the last is the image) and the class
    labels (balanced, shuffled; None for an unconditional UNet). Pieces of :data:`TRAJ_PIECE` are saved under
    ``state_dir`` as they are solved and reused by a rerun with the same settings; progress is reported at
    every teacher step."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file, save_file

    from edgekit.converters.diffusion.pipeline import torch_denoiser

    sched, s, c = pipe.schedule(), pipe.sample_size, pipe.in_channels
    edges = student_timesteps(sched, cfg.steps)
    phases = [_phase_timesteps(edges[k], edges[k + 1], cfg.substeps) for k in range(cfg.steps)]
    n_sub = sum(len(ts) - 1 for ts in phases)
    model = torch_denoiser(teacher)
    what = "solving the teacher's trajectories"
    states, labels = [], []
    state_dir.mkdir(parents=True, exist_ok=True)

    def load(f: Path) -> dict[str, Any] | None:
        try:
            return load_file(str(f)) if f.is_file() else None
        except (OSError, ValueError, SafetensorError):  # unreadable: solve it again
            f.unlink(missing_ok=True)
            return None

    for lo in range(0, cfg.trajectories, TRAJ_CHUNK):
        m = min(TRAJ_CHUNK, cfg.trajectories - lo)
        whole = load(_trajectory_file(state_dir, cfg, lo, m))  # saved whole by an earlier version
        if whole is not None:
            states.append(whole["states"])
            labels.append(whole["labels"])
            progress(what, lo + m, cfg.trajectories)
            continue
        rng = np.random.default_rng([cfg.seed, lo])
        x_all = rng.standard_normal((m, c, s, s)).astype(np.float32)
        y_all = (rng.permutation(np.arange(lo, lo + m) % pipe.num_classes).astype(np.int64)
                 if pipe.num_classes else None)
        for p0 in range(0, m, TRAJ_PIECE):
            pm = min(TRAJ_PIECE, m - p0)
            f = _trajectory_file(state_dir, cfg, lo + p0, pm)
            part = load(f)
            if part is None:
                x = x_all[p0:p0 + pm]
                y = None if y_all is None else y_all[p0:p0 + pm]
                path, done = [x], 0
                for ts in phases:
                    for t, t_prev in zip(ts[:-1], ts[1:], strict=True):
                        x = sched.ddim_step(x, model(x, t, y), t, t_prev).astype(np.float32)
                        done += 1
                        progress(what, lo + p0 + pm * done // (n_sub + 1), cfg.trajectories)
                    path.append(x)
                part = {"states": torch.from_numpy(np.stack(path, 1)),
                        "labels": torch.from_numpy(y if y is not None else np.zeros(pm, dtype=np.int64))}
                tmp = f.with_name(f.name + ".partial")  # written whole, then renamed: a kill leaves no piece
                save_file(part, str(tmp))
                tmp.replace(f)
            states.append(part["states"])
            labels.append(part["labels"])
            progress(what, lo + p0 + pm, cfg.trajectories)
    return torch.cat(states), (torch.cat(labels) if pipe.num_classes else None)


def _trajectory_glob(cfg: DistillConfig) -> str:
    return f"trajectories-{cfg.steps}x{cfg.substeps}-{cfg.seed}-*.safetensors"


def _trajectory_file(state_dir: Path, cfg: DistillConfig, start: int, count: int) -> Path:
    """The file of ``count`` solved trajectories from the ``start``-th (its name says which)."""
    return state_dir / _trajectory_glob(cfg).replace("*", f"{start:07d}-{count}")


def _piece_count(f: Path) -> int:
    try:
        return int(f.name.removesuffix(".safetensors").rsplit("-", 1)[1])
    except (IndexError, ValueError):
        return 0


def clear_trajectories(state_dir: Path) -> None:
    for f in state_dir.glob("trajectories-*.safetensors*"):
        f.unlink()


class Trajectory:
    """The ``trajectory`` objective: a student DDIM step from one solved point of a trajectory (at the
    student's timestep ``t_k``) against the teacher's solution at ``t_{k+1}``, mean squared error."""

    uses_target = False

    def __init__(self, sched: Any, cfg: DistillConfig, states: Any, labels: Any) -> None:
        import torch

        self.sched, self.cfg, self.states, self.labels = sched, cfg, states, labels
        self.edges = torch.tensor(student_timesteps(sched, cfg.steps))

    def lr_factor(self, step: int) -> float:
        """A 100-step warmup, then a cosine decay to 0 at the last iteration (the data is fixed: the end of
        the run settles on it)."""
        return min(1.0, (step + 1) / 100) * 0.5 * (1 + float(np.cos(np.pi * step / self.cfg.iters)))

    def step(self, model: Any, x: Any, t: Any, t_prev: Any, y: Any) -> Any:
        """The student's DDIM step from per-item timesteps ``t`` to ``t_prev`` (``-1``: the clean end): the
        sampler's own :meth:`NoiseSchedule.ddim_step`, on tensors (differentiable)."""
        return self.sched.ddim_step(x, model(x, t, class_labels=y).sample, t, t_prev)

    def loss(self, student: Any, target: Any, teacher: Any, g: Any) -> Any:
        import torch

        n = self.cfg.batch
        idx = torch.randint(0, len(self.states), (n,), generator=g)
        k = torch.randint(0, self.cfg.steps, (n,), generator=g)
        y = None if self.labels is None else self.labels[idx]
        pred = self.step(student, self.states[idx, k], self.edges[k], self.edges[k + 1], y)
        return torch.nn.functional.mse_loss(pred, self.states[idx, k + 1])


def _x0(prediction_type: str, x: Any, out: Any, a: Any) -> Any:
    if prediction_type == "epsilon":
        return (x - (1 - a).sqrt() * out) / a.sqrt()
    if prediction_type == "sample":
        return out
    return a.sqrt() * x - (1 - a).sqrt() * out


def _resumable(cfg: DistillConfig) -> dict[str, Any]:
    """The settings a saved state must share with a rerun to resume it (not the time or iteration bound)."""
    d = asdict(cfg)
    for key in ("iters", "minutes", "save_every"):
        d.pop(key)
    return d
