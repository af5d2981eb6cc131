"""Speed harness of issue 15: plain diffusers and our rollout path side by side, in one process on one device.

At each depth (``full``: HunyuanVideo's 20 dual + 40 single blocks; ``half``: 10 + 20) a random-init transformer is
built once in bf16 and every variant runs on the same weights and the same inputs (a group of 8, latent
16x8x60x60, 256 text tokens, all real: every member of a group shares its prompt):

* ``forward``: one forward of the group, warm-up then ``--reps`` synchronized repetitions, medians:
  ``plain`` (diffusers' ``HunyuanVideoTransformer3DModel`` forward, default SDPA, the attention mask as diffusers
  builds it), then our policy (``HunyuanVideoPolicy.velocity``: bf16 autocast, fp32 out) with
  ``unmasked`` (``model.unpadded_attention``), ``compiled`` (+ ``model.compile: blocks``), and after LoRA
  adapters are added (rank ``--lora-rank``, random B) ``lora`` (compiled, adapters unmerged) and ``lora_merged``
  (+ ``model.merge_lora``). Each output is checked against its reference by ‖a − b‖/‖b‖ (``--tolerance``).
* ``sampling``: a whole 16-step sampling of the group: plain diffusers in an Euler loop vs our rollout
  (``step.rollout``: the SDE, log-probs, per-sample noise) on the fast path, every step timed.
* ``guidance``: our rollout with reward-gradient guidance on upstream's window (steps 12-15 of 16) from a latent
  PRM of the policy's first ``--prm-blocks`` dual blocks; the PRM's share of the whole rollout.
* ``learner``: the LoRA GRPO learner step (``learning.grpo_update``: bf16 base, fp32 adapters, activation
  checkpointing, one sample's transitions per forward) plain and compiled; MFU = 3 x forward FLOPs / time over
  the bf16 peak (:func:`forward_flops` writes the count down; checkpointing's recompute is not credited).

Timing: ``torch.cuda.synchronize`` around every timed region, wall clock between; warm-up first (compilation
stays out of the numbers and is reported on its own). JSON and a plot go to ``--out``; a table is printed last.

    python bench/speed.py --out bench/results/speed                      # on an H200 (about 8 minutes)
    python bench/speed.py --tiny --device cpu --out /tmp/speed           # anywhere, seconds
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.fullsize_models import build_transformer  # noqa: E402
from euphonium_ray.config import RunConfig, load_config  # noqa: E402
from euphonium_ray.learning import compute_advantages, grpo_update  # noqa: E402
from euphonium_ray.models.base import TextConditioning  # noqa: E402
from euphonium_ray.models.hunyuan import HunyuanVideoPolicy, add_lora, set_tf32  # noqa: E402
from euphonium_ray.step import build_optimizer, rollout  # noqa: E402

FULL_DEPTH = (20, 40)  # HunyuanVideo: dual-stream, single-stream blocks
TINY = dict(in_channels=16, out_channels=16, num_attention_heads=2, attention_head_dim=16, num_refiner_layers=1,
            patch_size=2, patch_size_t=1, text_embed_dim=32, pooled_projection_dim=16, rope_axes_dim=(4, 6, 6))
TINY_DEPTH = (2, 4)
H100_H200_BF16_DENSE_TFLOPS = 989.4  # datasheet, SXM parts (dense, no sparsity)
TOLERANCE_WHY = (
    "bf16 keeps 8 significant bits (relative spacing 2^-8 = 0.39%). Two exact implementations of one function that "
    "round in different places (another SDPA kernel without the mask, fused kernels under torch.compile, W0 + s*B*A "
    "rounded once instead of two bf16 matmuls) differ by a few spacings per block; summed over the residual stream "
    "of 60 blocks, relative L2 differences of 1e-3 to 1e-2 are rounding (METHOD.md: bf16 results land 1e-3 to 1e-2 "
    "from an fp32 reference, so two of them up to about twice that; the issue's probe saw 1.3% of the largest "
    "value). A wrong function (a dropped mask on padded text, a missing adapter, a wrong timestep) is off by O(1)."
)


# ---------------------------------------------------------------------------------------------- helpers
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def repeat(fn: Callable[[], Any], device: torch.device, reps: int, warmup: int) -> tuple[list[float], list[float], Any]:
    """(warm-up seconds, timed seconds, last output)."""
    warm, times, out = [], [], None
    for _ in range(warmup):
        s, out = timed(fn, device)
        warm.append(s)
    for _ in range(reps):
        s, out = timed(fn, device)
        times.append(s)
    return warm, times, out


def compare(out: Tensor, ref: Tensor) -> dict[str, float]:
    """‖out − ref‖/‖ref‖ and max|out − ref|/max|ref| in fp32; NaN anywhere fails."""
    a, b = out.detach().float(), ref.detach().float()
    diff = a - b
    finite = bool(torch.isfinite(a).all() and torch.isfinite(b).all())
    rel = float(diff.norm() / b.norm().clamp_min(1e-30)) if finite else math.inf
    mx = float(diff.abs().max() / b.abs().max().clamp_min(1e-30)) if finite else math.inf
    return {"rel_l2": rel, "max_abs_over_max_ref": mx}


class SyncTimed:
    """A callable whose every call is timed between two device synchronizations (seconds summed)."""

    def __init__(self, fn: Callable[..., Any], device: torch.device) -> None:
        self.fn, self.device, self.seconds, self.calls = fn, device, 0.0, 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        s, out = timed(lambda: self.fn(*args, **kwargs), self.device)
        self.seconds += s
        self.calls += 1
        return out


class TimedPolicy:
    """A policy whose ``velocity`` is synchronized and timed; everything else is the policy's."""

    def __init__(self, policy: HunyuanVideoPolicy, device: torch.device) -> None:
        self.policy = policy
        self.velocity = SyncTimed(policy.velocity, device)

    def __getattr__(self, name: str) -> Any:
        if name == "policy":
            raise AttributeError(name)
        return getattr(self.policy, name)


def dynamo_graphs() -> int:
    """Graphs torch.compile has made so far in this process (a recompile adds to it)."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:  # pragma: no cover
        return 0
    return int(counters["stats"]["unique_graphs"])


# ------------------------------------------------------------------------------------------------ FLOPs
def forward_flops(cfg: Any, batch: int, latent_shape: tuple[int, ...], text_tokens: int) -> dict[str, float]:
    """Matmul FLOPs (2 per multiply-add) of one HunyuanVideo forward, written down term by term.

    d = heads·head_dim, h = int(d·mlp_ratio), N_v = (T/p_t)(H/p)(W/p) video tokens, N_t text tokens, N = N_v + N_t.
    Per dual- or single-stream block (both come to the same count):
      projections 8·N·d² (q, k, v, out on every token), MLP 4·N·d·h, attention 4·N²·d (QKᵀ and AV),
      modulation 24·d² (dual: two AdaLN-zero of d→6d) or 6·d² (single: d→3d) per sample;
      a single block's q, k, v (6·N·d²) and proj_out ((d+h)→d: 2·N·(d+h)·d) plus proj_mlp (2·N·d·h) give
      8·N·d² + 4·N·d·h as well.
    Token refiner (R layers on N_t tokens, mlp ratio 4): proj_in 2·N_t·D_text·d; per layer 8·N_t·d² + 16·N_t·d²
      + 4·N_t²·d + 4·d² (AdaNorm d→2d); its timestep/pooled-text embedders 2·(256·d + d² + D_text·d + d²).
    Condition embedding: timestep and guidance 2·(256·d + d²) each, pooled text 2·(P·d + d²).
    Patch embedding 2·N_v·C·p_t·p²·d; output 4·d² (AdaLN d→2d) + 2·N_v·d·p_t·p²·C_out.
    Everything else (norms, RoPE, activations, softmax) is not a matmul and is not counted. ×batch.
    """
    c = dict(cfg)
    d = int(c["num_attention_heads"]) * int(c["attention_head_dim"])
    h = int(d * float(c["mlp_ratio"]))
    p, pt = int(c["patch_size"]), int(c["patch_size_t"])
    ch, t_, hh, ww = latent_shape
    nv = (t_ // pt) * (hh // p) * (ww // p)
    nt = int(text_tokens)
    n = nv + nt
    dt, pooled, cout = int(c["text_embed_dim"]), int(c["pooled_projection_dim"]), int(c["out_channels"] or ch)
    dual, single, refiner = int(c["num_layers"]), int(c["num_single_layers"]), int(c["num_refiner_layers"])
    block_tokens = 8 * n * d * d + 4 * n * d * h + 4 * n * n * d
    dual_f = dual * (block_tokens + 24 * d * d)
    single_f = single * (block_tokens + 6 * d * d)
    refiner_f = (2 * nt * dt * d + refiner * (8 * nt * d * d + 16 * nt * d * d + 4 * nt * nt * d + 2 * d * 2 * d)
                 + 2 * (256 * d + d * d) + 2 * (dt * d + d * d))
    cond_f = 2 * (256 * d + d * d) * (2 if c.get("guidance_embeds", True) else 1) + 2 * (pooled * d + d * d)
    io_f = 2 * nv * ch * pt * p * p * d + 2 * d * 2 * d + 2 * nv * d * pt * p * p * cout
    per_sample = dual_f + single_f + refiner_f + cond_f + io_f
    return {"per_sample": float(per_sample), "total": float(per_sample * batch), "blocks_share":
            (dual_f + single_f) / per_sample, "video_tokens": nv, "text_tokens": nt}


def matmul_ceiling(device: torch.device, dtype: torch.dtype, n: int) -> dict[str, float]:
    """bf16 matmul rate on random data (n³, median of 10 after 3 warm-ups): the measured ceiling for MFU."""
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    _, times, _ = repeat(lambda: a @ b, device, reps=10, warmup=3)
    med = statistics.median(times)
    return {"n": n, "median_s": med, "tflops": 2 * n**3 / med / 1e12}


# ------------------------------------------------------------------------------------------------ setup
def make_cond(transformer: Any, batch: int, tokens: int, real_tokens: int, device: torch.device,
              dtype: torch.dtype, seed: int) -> TextConditioning:
    """One prompt for the whole group (its rows equal), ``real_tokens`` of ``tokens`` real."""
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randn(1, tokens, transformer.config.text_embed_dim, generator=g)
    mask = torch.zeros(1, tokens, dtype=torch.long)
    mask[:, :real_tokens] = 1
    pooled = torch.randn(1, transformer.config.pooled_projection_dim, generator=g)
    return TextConditioning(prompt, mask, pooled).to(device, dtype).repeat_interleave(batch)


def run_config(args: argparse.Namespace, rgg: bool) -> RunConfig:
    return load_config(None, [
        f"sampler.group_size={args.group}", f"sampler.num_steps={args.steps}", "steps=1", "optim.lr=1e-5",
        "optim.grad_accum=1", "optim.samples_per_forward=1", f"rgg.enabled={str(rgg).lower()}",
        f"rgg.start={max(args.steps - 4, 0)}", "advantage.mode=both" if rgg else "advantage.mode=none",
        "rewards.latent_outcome=false",
    ], use_env=False)


# ------------------------------------------------------------------------------------------------- parts
class Run:
    """One depth's measurements; every part is recorded as it finishes (a later failure keeps the earlier ones)."""

    def __init__(self, args: argparse.Namespace, name: str, depth: tuple[int, int], device: torch.device,
                 dtype: torch.dtype, report: dict[str, Any], save: Callable[[], None], started: float) -> None:
        self.args, self.name, self.depth, self.device, self.dtype = args, name, depth, device, dtype
        self.out: dict[str, Any] = {"layers": list(depth), "forward": {}, "skipped": []}
        report["depths"][name] = self.out
        self.save, self.started = save, started
        shape = dict(TINY if args.tiny else {}, num_layers=depth[0], num_single_layers=depth[1])
        t, self.transformer = timed(lambda: build_transformer(shape, device, dtype, args.seed), device)
        self.out["build_seconds"] = t
        self.out["parameters"] = sum(p.numel() for p in self.transformer.parameters())
        self.latent_shape = (16, (args.frames - 1) // 4 + 1, args.size // 8, args.size // 8)
        self.cond = make_cond(self.transformer, args.group, args.text_tokens, args.real_tokens, device, dtype,
                              args.seed + 1)
        g = torch.Generator().manual_seed(args.seed + 2)
        self.latents = torch.randn(args.group, *self.latent_shape, generator=g).to(device)
        self.sigma = torch.full((args.group,), 0.7, dtype=torch.float64)
        autocast = torch.bfloat16 if (device.type == "cuda" and dtype == torch.bfloat16) else None
        self.autocast = autocast
        self.flops = forward_flops(self.transformer.config, args.group, self.latent_shape, args.text_tokens)
        self.out["flops_per_forward"] = self.flops
        self.plain_out: Tensor | None = None
        self.prm: Any = None

    def policy(self, **speed: Any) -> HunyuanVideoPolicy:
        p = HunyuanVideoPolicy(self.transformer, None, autocast_dtype=self.autocast)
        p.configure_speed(**speed)
        if p.fast is not None and p.fast.compile_blocks:
            p.fast.compile_options = {"backend": self.args.compile_backend}
        return p

    def time_left(self) -> bool:
        return time.monotonic() - self.started < self.args.deadline_s

    def part(self, name: str, fn: Callable[[], None]) -> None:
        if name not in self.args.parts:
            return
        if not self.time_left():
            self.out["skipped"].append(f"{name}: --deadline-s {self.args.deadline_s} reached")
            print(f"[{self.name}] skip {name}: deadline", flush=True)
            return
        t0 = time.monotonic()
        print(f"[{self.name}] {name} ...", flush=True)
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - recorded (out of memory included); the other parts still run
            self.out.setdefault("errors", {})[name] = "".join(traceback.format_exception_only(exc)).strip()[:2000]
            print(f"[{self.name}] {name} FAILED: {exc!r}"[:2000], flush=True)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        self.out.setdefault("part_seconds", {})[name] = time.monotonic() - t0
        print(f"[{self.name}] {name} done in {time.monotonic() - t0:.1f}s", flush=True)
        self.save()

    # --- forward
    def _forward(self, variant: str, fn: Callable[[], Tensor], ref: Tensor | None) -> Tensor:
        before = dynamo_graphs()
        warm, times, out = repeat(fn, self.device, self.args.reps, self.args.warmup)
        entry: dict[str, Any] = {"median_s": statistics.median(times), "times_s": times, "warmup_s": warm,
                                 "graphs_compiled": dynamo_graphs() - before}
        entry["tflops"] = self.flops["total"] / entry["median_s"] / 1e12
        plain = self.out["forward"].get("plain")
        if plain:
            entry["speedup_vs_plain"] = plain["median_s"] / entry["median_s"]
        if ref is not None:
            entry.update(compare(out, ref))
            entry["within_tolerance"] = entry["rel_l2"] <= self.args.tolerance
        self.out["forward"][variant] = entry
        return out

    def forward_base(self) -> None:
        inputs = self.policy().forward_inputs(self.latents, self.sigma, self.cond)
        with torch.no_grad():
            self.plain_out = self._forward("plain", lambda: self.transformer(**inputs, return_dict=False)[0], None)
            unmasked = self.policy(unpadded_attention=True)
            self._forward("unmasked", lambda: unmasked.velocity(self.latents, self.sigma, self.cond), self.plain_out)
            if "compiled" in self.args.variants:
                compiled = self.policy(unpadded_attention=True, compile="blocks")
                self._forward("compiled", lambda: compiled.velocity(self.latents, self.sigma, self.cond),
                              self.plain_out)

    def fast_policy(self) -> HunyuanVideoPolicy:
        return self.policy(unpadded_attention=True, compile="blocks" if "compiled" in self.args.variants else "none")

    # --- whole sampling
    def sampling(self) -> None:
        t = self.transformer
        cfg = run_config(self.args, rgg=False)
        sigmas = cfg.sampler.schedule()
        inputs = self.policy().forward_inputs(self.latents, self.sigma, self.cond)

        def plain_loop() -> list[float]:  # diffusers' flow-matching Euler loop, each step synchronized
            x, steps = self.latents.clone(), []
            for i in range(self.args.steps):
                s, s_next = float(sigmas[i]), float(sigmas[i + 1])
                step_inputs = dict(inputs, hidden_states=x.to(self.dtype),
                                   timestep=torch.full((x.shape[0],), int(1000 * s), device=self.device))
                sec, v = timed(lambda: t(**step_inputs, return_dict=False)[0], self.device)
                x = x + (s_next - s) * v.float()
                steps.append(sec)
            return steps

        with torch.no_grad():
            whole, steps = timed(plain_loop, self.device)
        plain = {"whole_s": whole, "step_median_s": statistics.median(steps), "steps_s": steps}
        policy = TimedPolicy(self.fast_policy(), self.device)
        seeds = list(range(self.args.group))
        # warm-up: one forward of the same shape under no_grad, as the rollout calls it (compiles here when the
        # forward part did not run; outside no_grad it would compile a second, grad-mode graph)
        with torch.no_grad():
            timed(lambda: policy.policy.velocity(self.latents, self.sigma, self.cond), self.device)
        whole, traj = timed(lambda: rollout(policy, self.cond, cfg, prm=None, latent_shape=self.latent_shape,
                                            seeds=seeds), self.device)
        ours = {"whole_s": whole, "policy_s": policy.velocity.seconds, "forwards": policy.velocity.calls,
                "loop_overhead_s": whole - policy.velocity.seconds}
        self.out["sampling"] = {"steps": self.args.steps, "plain_diffusers": plain, "ours": ours,
                                "speedup_whole": plain["whole_s"] / ours["whole_s"],
                                "speedup_forwards": sum(steps) / ours["policy_s"],
                                "ours_config": {"unpadded_attention": True,
                                                "compile": "blocks" if "compiled" in self.args.variants else "none"}}
        self.traj = traj

    # --- reward guidance
    def build_prm(self) -> None:
        from euphonium_ray.registry import PRMS

        blocks = min(self.args.prm_blocks, self.depth[0])
        self.prm = PRMS.component_class("latent").from_policy(self.transformer, num_dual_blocks=blocks,
                                                              num_single_blocks=0)
        self.prm.requires_grad_(False)
        self.prm_blocks = blocks

    def guidance(self) -> None:
        from euphonium_ray.roles import MicroBatchedPRM

        cfg = run_config(self.args, rgg=True)
        prm = MicroBatchedPRM(self.prm, self.args.prm_micro_batch)
        timed_grad = SyncTimed(prm.score_and_grad, self.device)

        class _PRM:  # the rollout's view of the PRM: only the timed gradient (RGG scores and differentiates)
            score_and_grad = timed_grad

        policy = TimedPolicy(self.fast_policy(), self.device)
        sig = torch.full((self.args.group,), 0.3, device=self.device)
        timed(lambda: prm.score_and_grad(self.latents, sig, self.cond), self.device)  # warm-up
        with torch.no_grad():
            timed(lambda: policy.policy.velocity(self.latents, self.sigma, self.cond), self.device)
        whole, traj = timed(lambda: rollout(policy, self.cond, cfg, prm=_PRM(), latent_shape=self.latent_shape,
                                            seeds=list(range(self.args.group))), self.device)
        guided = int(traj.process_evaluated[0].sum())
        unguided = self.out.get("sampling", {}).get("ours", {}).get("whole_s")
        self.out["guidance"] = {
            "prm_dual_blocks": self.prm_blocks, "prm_micro_batch": self.args.prm_micro_batch,
            "prm_parameters": sum(p.numel() for p in self.prm.parameters()), "guided_steps": guided,
            "rollout_whole_s": whole, "policy_s": policy.velocity.seconds, "prm_s": timed_grad.seconds,
            "prm_s_per_guided_step": timed_grad.seconds / max(guided, 1),
            "prm_share_of_rollout": timed_grad.seconds / whole,
            "added_vs_unguided_rollout": (whole - unguided) / whole if unguided else None,
            "target_share": 0.10,
        }
        self.traj = traj

    # --- LoRA: unmerged, merged, a weight sync
    def lora(self) -> None:
        add_lora(self.transformer, rank=self.args.lora_rank, alpha=float(self.args.lora_rank), seed=self.args.seed)
        g = torch.Generator().manual_seed(self.args.seed + 3)
        with torch.no_grad():
            for name, p in self.transformer.named_parameters():
                if "lora_B" in name:  # B = 0 at init would make the adapters a no-op (and zeros time differently)
                    p.copy_(torch.randn(p.shape, generator=g) * 1e-3)
        self.transformer.requires_grad_(False)
        with torch.no_grad():
            unmerged = self.policy(unpadded_attention=True, compile="blocks" if "compiled" in self.args.variants
                                   else "none")
            ref = self._forward("lora", lambda: unmerged.velocity(self.latents, self.sigma, self.cond), None)
            merged = self.policy(unpadded_attention=True, merge_lora=True,
                                 compile="blocks" if "compiled" in self.args.variants else "none")
            self._forward("lora_merged", lambda: merged.velocity(self.latents, self.sigma, self.cond), ref)
            # a weight sync: new adapters copied in place and merged again; no recompilation may follow
            state = {n: t * 1.5 for n, t in merged.sync_state_dict().items()}
            before = dynamo_graphs()
            sync_s, _ = timed(lambda: merged.load_sync_state_dict(state), self.device)
            after_out = merged.velocity(self.latents, self.sigma, self.cond)
            recompiles = dynamo_graphs() - before
            assert merged.lora_merge is not None
            merged.lora_merge.unmerge()
            unmerged_after = unmerged.velocity(self.latents, self.sigma, self.cond)
        self.out["lora"] = {"rank": self.args.lora_rank,
                            "adapter_parameters": sum(p.numel() for n, p in self.transformer.named_parameters()
                                                      if "lora_" in n),
                            "sync_and_merge_s": sync_s, "graphs_compiled_after_weight_sync": recompiles,
                            "after_sync_merged_vs_unmerged": compare(after_out, unmerged_after)}
        self.out["lora"]["after_sync_within_tolerance"] = \
            self.out["lora"]["after_sync_merged_vs_unmerged"]["rel_l2"] <= self.args.tolerance

    # --- learner
    def learner(self) -> None:
        if not hasattr(self, "traj"):
            self.out["skipped"].append("learner: no trajectories (sampling and guidance did not run)")
            return
        if not any("lora_" in n for n, _ in self.transformer.named_parameters()):
            add_lora(self.transformer, rank=self.args.lora_rank, alpha=float(self.args.lora_rank),
                     seed=self.args.seed)
        for name, p in self.transformer.named_parameters():  # the learner's adapters: fp32, trainable
            if "lora_" in name:
                p.data = p.data.float()
                p.requires_grad_(True)
        self.transformer.enable_gradient_checkpointing()
        self.transformer.train()
        cfg = run_config(self.args, rgg=bool(self.traj.guided_steps.numel()))
        orm = torch.randn(self.args.group, generator=torch.Generator().manual_seed(5))
        adv = compute_advantages(self.traj, orm, None, cfg)
        samples = 1 + self.args.learner_samples
        results: dict[str, Any] = {}
        for variant in self.args.learner_variants:
            compile_mode = "blocks" if variant == "compiled" else "none"
            policy = self.policy(unpadded_attention=variant == "compiled", compile=compile_mode)
            optimizer = build_optimizer(policy.trainable_parameters(), cfg.optim)
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            seconds, stats, graphs = [], [], []
            for i in range(min(samples, self.args.group)):
                rows = [i]
                traj = self.traj.select(rows)
                terms = [(w, a[rows]) for w, a in adv.terms]
                before = dynamo_graphs()
                update = functools.partial(grpo_update, policy, optimizer, traj, terms, cfg,
                                           generator=torch.Generator().manual_seed(10 + i))
                s, st = timed(update, self.device)
                graphs.append(dynamo_graphs() - before)
                seconds.append(s)
                stats.append(st)
            timed_s = seconds[1:] or seconds
            transitions = int(stats[-1]["num_transitions"])
            step_flops = 3 * forward_flops(self.transformer.config, transitions, self.latent_shape,
                                           self.args.text_tokens)["total"]
            med = statistics.median(timed_s)
            achieved = step_flops / med / 1e12
            results[variant] = {
                "warmup_s": seconds[0], "sample_s": timed_s, "median_sample_s": med,
                "transitions_per_sample": transitions, "flops_per_sample": step_flops, "tflops": achieved,
                "mfu_vs_datasheet": achieved / H100_H200_BF16_DENSE_TFLOPS,
                "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if self.device.type == "cuda" else None,
                "first_ratio_max": stats[0].get("first_ratio_max"), "graphs_compiled_per_sample": graphs,
            }
            ceiling = self.report_ceiling
            if ceiling:
                results[variant]["mfu_vs_measured_matmul"] = achieved / ceiling
            optimizer.zero_grad(set_to_none=True)
        self.out["learner"] = {"lora_rank": self.args.lora_rank, "activation_checkpointing": True,
                               "adapters": "fp32", "base": str(self.dtype), "samples_per_forward": 1,
                               "flop_count": "3 x forward_flops(transitions of one sample); recompute not credited",
                               **results}

    report_ceiling: float | None = None


def plot(report: dict[str, Any], path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        return f"no plot: {exc}"
    depths = [d for d in report["depths"].values() if d.get("forward")]
    if not depths:
        return "no plot: no forward measured"
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / len(depths)
    names = list(report["depths"])
    for k, (name, d) in enumerate(zip(names, depths)):
        variants = list(d["forward"])
        xs = [i + k * width for i in range(len(variants))]
        meds = [d["forward"][v]["median_s"] for v in variants]
        axes[0].bar(xs, meds, width, label=f"{name} depth {d['layers']}")
        for x, v in zip(xs, variants):
            sp = d["forward"][v].get("speedup_vs_plain")
            if sp:
                axes[0].annotate(f"{sp:.2f}x", (x, d["forward"][v]["median_s"]), ha="center", va="bottom",
                                 fontsize=8)
        axes[0].set_xticks([i + width * (len(depths) - 1) / 2 for i in range(len(variants))], variants)
    axes[0].set_ylabel("seconds per forward of the group (median)")
    axes[0].legend()
    labels, values = [], []
    for name, d in report["depths"].items():
        s = d.get("sampling")
        if s:
            labels += [f"{name}\nplain", f"{name}\nours"]
            values += [s["plain_diffusers"]["whole_s"], s["ours"]["whole_s"]]
        gd = d.get("guidance")
        if gd:
            labels.append(f"{name}\nours+RGG")
            values.append(gd["rollout_whole_s"])
    if values:
        axes[1].bar(range(len(values)), values)
        axes[1].set_xticks(range(len(values)), labels)
        axes[1].set_ylabel("seconds per whole sampling of the group")
    fig.suptitle(f"bench/speed.py on {report['device']} ({report['dtype']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def environment(device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    import diffusers

    env: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "diffusers": diffusers.__version__, "python": platform.python_version(),
        "dtype": str(dtype),
        "tf32": {"cuda.matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32,
                 "cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,
                 "float32_matmul_precision": torch.get_float32_matmul_precision()},
    }
    try:
        import peft

        env["peft"] = peft.__version__
    except ImportError:
        env["peft"] = None
    if device.type == "cuda":
        env["sdpa_backends_enabled"] = {"flash": torch.backends.cuda.flash_sdp_enabled(),
                                        "mem_efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
                                        "math": torch.backends.cuda.math_sdp_enabled(),
                                        "cudnn": torch.backends.cuda.cudnn_sdp_enabled()}
    return env


def table(report: dict[str, Any]) -> str:
    lines = []
    for name, d in report["depths"].items():
        lines.append(f"== {name} depth {d['layers']} ({d.get('parameters', 0) / 1e9:.2f} B parameters)")
        for v, e in d["forward"].items():
            tol = "" if "rel_l2" not in e else (f"  rel_l2 {e['rel_l2']:.2e} max {e['max_abs_over_max_ref']:.2e} "
                                                 f"{'ok' if e['within_tolerance'] else 'OVER TOLERANCE'}")
            sp = f"  {e['speedup_vs_plain']:.2f}x" if "speedup_vs_plain" in e else ""
            lines.append(f"  forward {v:<12} {e['median_s']:8.3f} s  {e['tflops']:7.1f} TFLOP/s{sp}{tol}")
        s = d.get("sampling")
        if s:
            lines.append(f"  sampling ({s['steps']} steps) plain {s['plain_diffusers']['whole_s']:.2f} s, ours "
                         f"{s['ours']['whole_s']:.2f} s: {s['speedup_whole']:.2f}x whole, "
                         f"{s['speedup_forwards']:.2f}x forwards (loop overhead {s['ours']['loop_overhead_s']:.2f} s)")
        gd = d.get("guidance")
        if gd:
            lines.append(f"  guidance: PRM {gd['prm_s']:.2f} s of {gd['rollout_whole_s']:.2f} s = "
                         f"{100 * gd['prm_share_of_rollout']:.1f}% of the rollout (target <= 10%)")
        lr = d.get("lora")
        if lr:
            lines.append(f"  LoRA sync+merge {lr['sync_and_merge_s']:.3f} s, graphs compiled after the sync: "
                         f"{lr['graphs_compiled_after_weight_sync']}")
        ln = d.get("learner")
        if ln:
            for v in ("plain", "compiled"):
                if v in ln:
                    e = ln[v]
                    extra = f", {100 * e['mfu_vs_measured_matmul']:.1f}% of measured matmul" \
                        if "mfu_vs_measured_matmul" in e else ""
                    lines.append(f"  learner {v:<8} {e['median_sample_s']:.2f} s/sample, {e['tflops']:.1f} TFLOP/s, "
                                 f"MFU {100 * e['mfu_vs_datasheet']:.1f}% of 989 TFLOP/s{extra}")
        for s in d["skipped"]:
            lines.append(f"  skipped {s}")
    lines.append(f"all outputs within tolerance ({report['tolerance']['rel_l2']}): {report['all_within_tolerance']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench/results/speed")
    p.add_argument("--tiny", action="store_true", help="tiny transformer (2+4 blocks, width 32; a CPU check)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--depths", default="full,half", help="comma list of full, half")
    p.add_argument("--layers", type=int, default=None, help="dual blocks at full depth (default 20; tiny 2)")
    p.add_argument("--single-layers", type=int, default=None, help="single blocks at full depth (default 40; tiny 4)")
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--frames", type=int, default=None, help="video frames (default 29: 8 latent frames; tiny 5)")
    p.add_argument("--size", type=int, default=None, help="video height = width (default 480: 60x60 latent; tiny 32)")
    p.add_argument("--text-tokens", type=int, default=None, help="prompt tokens (default 256; tiny 32)")
    p.add_argument("--real-tokens", type=int, default=None, help="of which real (default all)")
    p.add_argument("--steps", type=int, default=16, help="sampling steps")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions of each forward")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--parts", default="forward,sampling,guidance,lora,learner")
    p.add_argument("--variants", default="compiled", help="'compiled' adds the torch.compile variants; '' leaves them out")
    p.add_argument("--half-parts", default="forward,sampling", help="parts run at half depth")
    p.add_argument("--compile-backend", default="inductor")
    p.add_argument("--prm-blocks", type=int, default=8)
    p.add_argument("--prm-micro-batch", type=int, default=2)
    p.add_argument("--lora-rank", type=int, default=64)
    p.add_argument("--learner-samples", type=int, default=1, help="timed samples per learner variant (after one warm-up)")
    p.add_argument("--learner-variants", default="plain,compiled")
    p.add_argument("--tolerance", type=float, default=2e-2, help="max ‖ours − plain‖/‖plain‖")
    p.add_argument("--tf32", action="store_true", help="TF32 on (model.tf32); off by default as in the project")
    p.add_argument("--matmul-n", type=int, default=None, help="size of the ceiling matmul (default 8192; tiny 256)")
    p.add_argument("--deadline-s", type=float, default=450.0, help="skip parts that would start after this")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    tiny = args.tiny
    args.frames = args.frames or (5 if tiny else 29)
    args.size = args.size or (32 if tiny else 480)
    args.text_tokens = args.text_tokens or (32 if tiny else 256)
    args.real_tokens = args.real_tokens or args.text_tokens
    full = (args.layers or (TINY_DEPTH if tiny else FULL_DEPTH)[0],
            args.single_layers or (TINY_DEPTH if tiny else FULL_DEPTH)[1])
    all_parts = [s for s in args.parts.split(",") if s]
    args.variants = [s for s in args.variants.split(",") if s]
    args.learner_variants = [s for s in args.learner_variants.split(",") if s]
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    set_tf32(args.tf32)
    try:  # each block class compiles a few graphs (no LoRA, LoRA, merged, training): keep them all
        torch._dynamo.config.recompile_limit = max(int(torch._dynamo.config.recompile_limit), 64)
    except AttributeError:  # pragma: no cover - older torch
        pass
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        **environment(device, dtype), "command": " ".join(["python", "bench/speed.py", *(argv or sys.argv[1:])]),
        "shape": {"group": args.group, "frames": args.frames, "size": args.size, "text_tokens": args.text_tokens,
                  "real_tokens": args.real_tokens, "steps": args.steps},
        "tolerance": {"rel_l2": args.tolerance, "metric": "||ours - ref|| / ||ref|| over the whole output, fp32",
                      "why": TOLERANCE_WHY},
        "timing": "torch.cuda.synchronize before and after each timed region; medians of --reps after --warmup",
        "depths": {}, "all_within_tolerance": None,
    }
    started = time.monotonic()

    def save() -> None:
        checks = [e["within_tolerance"] for d in report["depths"].values() for e in d["forward"].values()
                  if "within_tolerance" in e]
        checks += [d["lora"]["after_sync_within_tolerance"] for d in report["depths"].values() if "lora" in d]
        report["all_within_tolerance"] = all(checks) if checks else None  # None: nothing was compared
        report["elapsed_s"] = time.monotonic() - started
        (out / "speed.json").write_text(json.dumps(report, indent=2))

    ceiling = matmul_ceiling(device, dtype, args.matmul_n or (256 if tiny else 8192))
    report["matmul_ceiling"] = ceiling
    Run.report_ceiling = ceiling["tflops"]
    save()
    for name in [s for s in args.depths.split(",") if s]:
        depth = full if name == "full" else (max(full[0] // 2, 1), max(full[1] // 2, 1))
        args.parts = all_parts if name == "full" else [s for s in all_parts if s in args.half_parts.split(",")]
        run = Run(args, name, depth, device, dtype, report, save, started)
        if "guidance" in args.parts:
            run.build_prm()  # from the policy's own blocks, before LoRA wraps them
        run.part("forward", run.forward_base)
        run.part("sampling", run.sampling)
        run.part("guidance", run.guidance)
        run.part("lora", run.lora)
        run.part("learner", run.learner)
        if device.type == "cuda":
            run.out["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        del run
        if device.type == "cuda":
            torch.cuda.empty_cache()
        save()
    report["plot"] = plot(report, out / "speed.png") or str(out / "speed.png")
    save()
    print(table(report))
    errors = {f"{n}.{part}": e for n, d in report["depths"].items() for part, e in d.get("errors", {}).items()}
    for where, e in errors.items():
        print(f"ERROR {where}: {e.splitlines()[-1] if e else ''}")
    return 0 if report["all_within_tolerance"] is not False and not errors else 1


if __name__ == "__main__":
    raise SystemExit(main())
