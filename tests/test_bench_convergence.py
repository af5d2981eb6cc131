"""The convergence benchmark: its arithmetic on hand-made curves, its configs, and its pipeline end to end.

The pipeline tests run ``--quick`` on a randomly initialised toy-layout world (real diffusers transformer, real
tiny text encoders and preprocessing, real latent PRM class, the toy ORM): they check that the benchmark runs and
that its numbers are well-formed and consistent with independent recomputation, not who wins.
"""

from __future__ import annotations

import json
import math
import shutil
import statistics
import struct
from pathlib import Path

import pytest
import torch
import yaml

from euphonium_ray.bench.analysis import RunLog, analyse, censored_median, first_crossing, moving_average
from euphonium_ray.bench.convergence import DEFAULT_CONFIGS, ConvergenceOptions, main, resolve_plan, run_benchmark
from euphonium_ray.bench.settings import SHARED_KEYS, load_method_config, load_settings, method_file, task_overrides
from euphonium_ray.config import ConfigError, load_config

# ---------------------------------------------------------------------------------------- hand-made curves


def _log(method: str, seed: int, rewards: list[float], step_seconds: float, evals: list[float], every: int,
         task: str = "caption") -> RunLog:
    steps = [{"step": t, "train_reward": r, "seconds": step_seconds, "cum_seconds": step_seconds * (t + 1),
              "cpu_seconds": step_seconds / 2, "cum_cpu_seconds": step_seconds / 2 * (t + 1)}
             for t, r in enumerate(rewards)]
    ev = [{"step": i * every, "heldout_reward": v, "cum_seconds": step_seconds * i * every} for i, v in enumerate(evals)]
    return RunLog(method, seed, steps, ev, task)


def test_moving_average_is_the_trailing_mean_over_the_window():
    values = [1.0, 3.0, 5.0, 7.0, 9.0]
    expect = [1.0, 2.0, 3.0, 5.0, 7.0]  # window 3: mean of the last ≤3 values, by hand
    assert moving_average(values, 3) == pytest.approx(expect)
    assert moving_average(values, 1) == values
    with pytest.raises(ValueError, match="window"):
        moving_average(values, 0)


def test_censored_median_ranks_runs_that_never_reached_above_every_number():
    assert censored_median([3.0, None, 5.0]) == 5.0  # ranked 3, 5, never -> middle is 5
    assert censored_median([None, None, 2.0]) is None  # the middle run never reached
    assert censored_median([2.0, 4.0]) == 3.0
    assert censored_median([]) is None
    assert first_crossing([0.1, 0.3, 0.2, 0.5], 0.3) == 1 and first_crossing([0.1], 0.5) is None


def test_steps_and_seconds_to_the_baselines_final_reward_match_a_hand_computation():
    # baseline: reward rises 0.1 per step over 10 steps (ends at 0.9 at step 9); two seeds with final 0.9 and 0.8.
    base0 = [0.1 * t for t in range(10)]
    base1 = [0.1 * t - 0.1 for t in range(10)]
    fast = [min(0.2 * t, 1.0) for t in range(10)]  # reaches 0.85 at step 5 (0.2*5=1.0 >= .85; 0.8 < .85)
    logs = [
        _log("dance-grpo", 0, base0, 2.0, [0.1, 0.3, 0.5], 5),
        _log("dance-grpo", 1, base1, 2.0, [0.1, 0.2, 0.4], 5),
        _log("euphonium", 0, fast, 3.0, [0.1, 0.5, 0.6], 5),
        _log("euphonium", 1, fast, 3.0, [0.1, 0.4, 0.6], 5),
    ]
    res = analyse(logs, "dance-grpo", "euphonium", smoothing=1)
    assert res["budget_steps"] == 10
    assert res["target_train_reward"] == pytest.approx((0.9 + 0.8) / 2)  # 0.85
    base, cand = res["methods"]["dance-grpo"], res["methods"]["euphonium"]
    # baseline seed 0 crosses 0.85 at step 9 (0.9), seed 1 never (max 0.8): median of [9, never] is censored
    assert base["steps_to_target_train"]["per_seed"] == [9.0, None]
    assert base["steps_to_target_train"]["median"] is None
    assert cand["steps_to_target_train"]["per_seed"] == [5.0, 5.0]
    # seconds before step 5 began: 5 steps of 3 s; CPU seconds: half of that
    assert cand["seconds_to_target_train"]["median"] == pytest.approx(15.0)
    assert cand["cpu_seconds_to_target_train"]["median"] == pytest.approx(7.5)
    assert cand["speedup_vs_baseline"]["steps_train"] is None  # baseline median not reached: no finite ratio
    # held-out: target = mean(0.5, 0.4) = 0.45; euphonium reaches at the eval of step 5 (0.5 and 0.4 -> no), step 10
    assert res["target_heldout_reward"] == pytest.approx(0.45)
    assert cand["steps_to_target_heldout"]["per_seed"] == [5.0, 10.0]
    assert cand["steps_to_target_heldout"]["median"] == pytest.approx(7.5)
    assert base["steps_to_target_heldout"]["per_seed"] == [10.0, None]
    assert cand["final_heldout_reward"]["mean"] == pytest.approx(0.6)
    assert cand["initial_heldout_reward"]["mean"] == pytest.approx(0.1)
    assert cand["seconds_per_step"]["mean"] == pytest.approx(3.0)
    # paired first-step difference: (0 - 0) and (0 - (-0.1)) -> mean 0.05
    assert cand["step0_reward_minus_baseline"]["mean"] == pytest.approx(0.05)
    assert base["step0_reward_minus_baseline"]["mean"] == 0.0
    # paired gain over the second half of the budget (steps 5..9), per seed then averaged
    by_hand = statistics.fmean(
        statistics.fmean(fast[t] - b[t] for t in range(5, 10)) for b in (base0, base1))
    assert cand["train_reward_minus_baseline_second_half"]["mean"] == pytest.approx(by_hand)


def test_speedup_is_the_ratio_of_median_steps_and_runs_are_cut_to_the_common_budget():
    base = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1]  # 12 steps, but the other run did 10
    cand = [0.0, 0.3, 0.6, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9]
    logs = [_log("dance-grpo", s, base, 1.0, [0.0, 0.5, 0.9], 5) for s in (0, 1, 2)]
    logs += [_log("euphonium", s, cand, 2.0, [0.0, 0.9, 0.9], 5) for s in (0, 1, 2)]
    res = analyse(logs, "dance-grpo", "euphonium", smoothing=2)
    assert res["budget_steps"] == 10
    # smoothed (window 2) baseline at step 9: (0.8 + 0.9)/2 = 0.85; candidate smoothed: 0, .15, .45, .75, .9 -> step 4
    assert res["target_train_reward"] == pytest.approx(0.85)
    assert res["methods"]["dance-grpo"]["steps_to_target_train"]["median"] == 9.0
    assert res["methods"]["euphonium"]["steps_to_target_train"]["median"] == 4.0
    assert res["candidate_vs_baseline"]["steps_train"] == pytest.approx(9 / 4)
    # seconds: baseline 9 steps x 1 s, candidate 4 steps x 2 s
    assert res["candidate_vs_baseline"]["seconds_train"] == pytest.approx(9 / 8)



def test_a_baseline_that_ends_below_its_start_makes_the_to_target_cells_vacuous_not_zero():
    """Every run "reaches" a target below its own start at step 0; the table must not read that as a result."""
    from euphonium_ray.bench.analysis import markdown_table

    falling = [0.7 - 0.01 * t for t in range(10)]
    logs = [_log("dance-grpo", s, falling, 1.0, [0.65, 0.64, 0.63], 5) for s in (0, 1)]
    logs += [_log("euphonium", s, falling, 1.0, [0.65, 0.60, 0.62], 5) for s in (0, 1)]
    res = analyse(logs, "dance-grpo", "euphonium", smoothing=1)
    assert res["baseline_improved_train"] is False and res["baseline_improved_heldout"] is False
    assert res["methods"]["euphonium"]["steps_to_target_train"]["median"] == 0.0  # the raw number stays in JSON
    row = next(line for line in markdown_table(res).splitlines() if line.startswith("| euphonium |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == cells[3] == cells[5] == cells[6] == "vacuous"
    assert cells[7].startswith("0.6200 ± 0.0000")


# ------------------------------------------------------------------------------------------------ configs


def test_every_method_config_shares_the_budget_and_sets_its_own_sampler_and_advantages():
    settings = load_settings(DEFAULT_CONFIGS)
    methods = settings.methods + ["euph-credit", "euph-credit-half05", "euph-credit-half20", "euph-credit-half20-glp",
                                  "euph-credit-half20-distill", "oracle-credit", "oracle-credit-half20"]
    assert {"flow-grpo", "dance-grpo", "euphonium"} <= set(settings.methods)
    assert {"caption", "centered", "motion"} <= set(settings.tasks)
    assert len(settings.seeds) >= 3
    for task in settings.tasks.values():
        cfgs = {m: load_method_config(method_file(DEFAULT_CONFIGS, m), task_overrides(task)) for m in methods}
        dumps = {m: c.model_dump(mode="json") for m, c in cfgs.items()}
        for key in SHARED_KEYS:
            values = set()
            for d in dumps.values():
                node = d
                for part in key.split("."):
                    node = node[part]
                values.add(json.dumps(node, sort_keys=True))
            assert len(values) == 1, key
        assert all(c.rewards.orm.backend == task.orm for c in cfgs.values())
    cfgs = {m: load_method_config(method_file(DEFAULT_CONFIGS, m)) for m in methods}
    flow, dance, eup = cfgs["flow-grpo"], cfgs["dance-grpo"], cfgs["euphonium"]
    assert flow.sampler.noise_type == "flow" and not flow.rgg.enabled and flow.advantage.mode == "none"
    assert dance.sampler.noise_type == "dance" and dance.sampler.eta == 0.25 and not dance.rgg.enabled
    assert dance.advantage.mode == "none" and not dance.spsa.enabled
    n = eup.sampler.num_steps
    assert eup.rgg.enabled and eup.rgg.delta_t_scaling and eup.rgg.start == n - n // 4  # the last quarter
    assert eup.guidance_scale == pytest.approx(eup.sampler.eta**2 / (2 * 3.125)) == pytest.approx(0.01)  # KL mode
    assert eup.advantage.mode == "both" and eup.advantage.combine == "upstream"
    assert eup.advantage.process_credit == "input" and eup.rgg.guided_fraction == 1.0
    credit = cfgs["euph-credit"]
    assert credit.advantage.process_credit == "difference" and credit.rgg.start == 0 and not credit.rgg.shifts_anything
    half = cfgs["euph-credit-half20"]
    assert half.rgg.scale_mode == "target_ratio" and half.rgg.target_ratio == 0.2 and half.rgg.guided_fraction == 0.5
    assert cfgs["euph-credit-half05"].rgg.target_ratio == 0.05
    assert cfgs["euph-credit-half20-glp"].optim.logprob_mean_training == "guided"
    assert cfgs["euph-credit-half20-distill"].optim.distill_coef == 1.0 == cfgs["euph-credit-half20-distill"].optim.kl_coef
    assert cfgs["oracle-credit"].rewards.prm.kind == "oracle" == cfgs["oracle-credit-half20"].rewards.prm.kind


def _copy_configs(tmp_path: Path) -> Path:
    """The benchmark configs in a temp folder, with base.yaml's ``extends`` made absolute."""
    dst = tmp_path / "configs"
    shutil.copytree(DEFAULT_CONFIGS, dst)
    base = yaml.safe_load((dst / "base.yaml").read_text())
    base["extends"] = str((DEFAULT_CONFIGS / base["extends"]).resolve())
    (dst / "base.yaml").write_text(yaml.safe_dump(base))
    return dst


def test_a_method_that_changes_the_shared_budget_is_rejected_naming_the_key(tmp_path):
    configs = _copy_configs(tmp_path)
    (configs / "euphonium.yaml").write_text((configs / "euphonium.yaml").read_text() + "\noptim:\n  lr: 1.0e-3\n")
    with pytest.raises(ConfigError, match=r"euphonium.*optim\.lr"):
        resolve_plan(ConvergenceOptions(configs_dir=configs, methods=["dance-grpo", "euphonium"]))


def test_bad_benchmark_inputs_fail_with_the_file_or_name_at_fault(tmp_path, capsys):
    configs = _copy_configs(tmp_path)
    with pytest.raises(ConfigError, match="unknown method 'dance'.*dance-grpo"):
        resolve_plan(ConvergenceOptions(configs_dir=configs, methods=["dance"]))
    with pytest.raises(ConfigError, match="must include the baseline 'dance-grpo'"):
        resolve_plan(ConvergenceOptions(configs_dir=configs, methods=["euphonium"]))
    (configs / "loop.yaml").write_text("extends: loop2.yaml\n")
    (configs / "loop2.yaml").write_text("extends: loop.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_method_config(configs / "loop.yaml")
    (configs / "typo.yaml").write_text("extends: base.yaml\nsampler:\n  noise_typ: flow\n")
    with pytest.raises(ConfigError, match="typo.yaml.*sampler.noise_typ.*noise_type"):
        load_method_config(configs / "typo.yaml")
    (configs / "benchmark.yaml").write_text("methods: [dance-grpo]\nseeds: [1, 1]\n")
    assert main(["--configs", str(configs), "--out", str(tmp_path / "o")]) == 2
    assert "benchmark.yaml" in capsys.readouterr().err
    from euphonium_ray.bench.cli import main as bench_main

    assert bench_main(["speed"]) == 2 and "unknown benchmark 'speed'" in capsys.readouterr().err


def test_guidance_to_noise_is_the_shift_length_over_the_noise_length_computed_by_hand():
    from test_sampling import LATENT_SHAPE, QuadraticPRM, make_cond, tiny_policy

    from euphonium_ray.bench.runner import guidance_to_noise
    from euphonium_ray.config import RunConfig
    from euphonium_ray.sampling import make_generators, sample_trajectories
    from euphonium_ray.sde import sigma_schedule

    cfg = RunConfig()
    cfg.sampler.num_steps, cfg.rgg.start, cfg.rgg.scale = 6, 3, 0.5
    prm = QuadraticPRM()
    traj = sample_trajectories(tiny_policy(0), make_cond(2, 2), sampler=cfg.sampler, rgg=cfg.rgg, spsa=cfg.spsa,
                               prm=prm, latent_shape=LATENT_SHAPE, group_size=2, generator=make_generators(range(4)))
    sig = sigma_schedule(6, cfg.sampler.shift)
    dim = math.prod(LATENT_SHAPE)
    by_hand = []
    for b in range(4):
        for k in (3, 4, 5):
            dt = float(sig[k] - sig[k + 1])
            grad = prm.grad(traj.latents[b, k])
            shift_len = 0.5 * dt * float(grad.norm())  # c·Δt·‖∇r‖ (no normalisation)
            by_hand.append(shift_len / (0.25 * math.sqrt(dt) * math.sqrt(dim)))  # over η·√Δt·√D
    assert guidance_to_noise(traj, cfg) == pytest.approx(statistics.fmean(by_hand), rel=1e-4)
    cfg.rgg.enabled = False
    plain = sample_trajectories(tiny_policy(0), make_cond(2, 2), sampler=cfg.sampler, rgg=cfg.rgg, spsa=cfg.spsa,
                                prm=None, latent_shape=LATENT_SHAPE, group_size=2, generator=make_generators(range(4)))
    assert guidance_to_noise(plain, cfg) == 0.0


# ----------------------------------------------------------------------------------------------- pipeline


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def _finite_numbers(tree, where: str = "") -> None:
    if isinstance(tree, dict):
        for k, v in tree.items():
            _finite_numbers(v, f"{where}.{k}")
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            _finite_numbers(v, f"{where}[{i}]")
    elif isinstance(tree, float):
        assert math.isfinite(tree), where


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "quick"
    # two worker processes: the runs are dealt over them (the path the full run takes on 2 cores)
    report = run_benchmark(ConvergenceOptions(out_dir=out, quick=True, world="random", workers=2),
                           log=lambda _msg: None)
    _finite_numbers({k: v for k, v in report["tasks"]["caption"].items() if k != "claim"})
    return out, report


@pytest.mark.slow  # the module's quick benchmark run (the suite's slowest fixture outside slow tests)
def test_quick_in_process_run_writes_a_well_formed_report_table_and_plots(quick_run):
    out, report = quick_run
    settings = load_settings(DEFAULT_CONFIGS)
    q = settings.quick
    on_disk = json.loads((out / "convergence.json").read_text())
    assert set(on_disk["tasks"]) == set(report["tasks"]) == set(settings.tasks)
    assert on_disk["mode"] == "in-process" and on_disk["quick"]
    assert len(on_disk["git"]["commit"]) == 40 or on_disk["git"]["commit"] == "unknown"
    for task, result in on_disk["tasks"].items():
        assert set(result["methods"]) == set(settings.methods) and result["budget_steps"] == q.steps
        hashes = on_disk["config_hash"][task]["per_method"]
        assert len(set(hashes.values())) == len(settings.methods)  # methods differ
        claim = result["claim"]
        assert claim["paired_seeds"] == q.seeds and set(claim["methods"]) == set(settings.methods)
        for m in result["methods"].values():
            assert m["seeds"] == q.seeds
            assert 0 <= m["final_heldout_reward"]["mean"] <= 1 and m["seconds_per_step"]["mean"] > 0
        for name in ("reward_vs_step.png", "reward_vs_seconds.png"):
            w, h = _png_size(out / f"{task}_{name}")
            assert w > 400 and h > 200
    table = (out / "convergence.md").read_text()
    assert all(f"| {m} |" in table for m in settings.methods) and all(f"task {t}" in table for t in settings.tasks)
    for task in settings.tasks:
        for m in settings.methods:  # each resolved config is loadable by `euphonium-ray train --config`
            assert load_config(out / "configs" / task / f"{m}.yaml", use_env=False).steps == q.steps
            for seed in q.seeds:
                folder = out / "runs" / task / m / f"seed-{seed}"
                steps = [json.loads(x) for x in (folder / "steps.jsonl").read_text().splitlines()]
                evals = [json.loads(x) for x in (folder / "evals.jsonl").read_text().splitlines()]
                assert [s["step"] for s in steps] == list(range(q.steps))
                assert [e["step"] for e in evals] == list(range(0, q.steps + 1, q.eval_every))
                assert all(0 <= s["train_reward"] <= 1 and s["seconds"] > 0 for s in steps)
                assert steps[-1]["cum_seconds"] == pytest.approx(sum(s["seconds"] for s in steps))


@pytest.mark.slow  # the module's quick benchmark run (the suite's slowest fixture outside slow tests)
def test_logged_rewards_equal_an_independent_rollout_and_ode_evaluation(quick_run):
    """Step 0's logged training reward and held-out reward, recomputed from the model folder with library calls
    and the driver's own prompt/seed functions (the policy at step 0 is the base model)."""
    from euphonium_ray.sampling import prompts_for_step, seeds_for
    from euphonium_ray.data import PromptEmbeddingDataset
    from euphonium_ray.models.hunyuan import HunyuanVideoPolicy
    from euphonium_ray.sampling import make_generators, sample_latents, sample_trajectories
    from euphonium_ray.registry import ORMS

    out, _ = quick_run
    info = json.loads((out / "run_info.json").read_text())
    settings = load_settings(DEFAULT_CONFIGS).quick
    model_dir = Path(info["world"]["model_dir"])
    policy = HunyuanVideoPolicy.from_pretrained(model_dir, trainable="none")
    dataset = PromptEmbeddingDataset(model_dir / "embeddings" / "videos2caption.json",
                                     pooled_dim=policy.pooled_dim)
    heldout = info["world"]["heldout_prompts"]
    train = [i for i, c in enumerate(dataset.captions) if c not in heldout]
    for task, method in (("caption", "dance-grpo"), ("centered", "flow-grpo"), ("motion", "dance-grpo")):
        cfg = load_config(out / "configs" / task / f"{method}.yaml", use_env=False)
        cfg.seed = seed = info["seeds"][0]
        g = cfg.sampler.group_size
        local = prompts_for_step(0, len(train), cfg.data.prompts_per_step, cfg.data.shuffle_seed)
        cond, captions = dataset.conditioning([train[i] for i in local])
        shape = policy.codec.latent_shape(cfg.data.num_frames, cfg.data.height, cfg.data.width)
        traj = sample_trajectories(policy, cond.repeat_interleave(g), sampler=cfg.sampler, rgg=cfg.rgg, spsa=cfg.spsa,
                                   prm=None, latent_shape=shape, group_size=g,
                                   generator=make_generators(seeds_for(seed, 0, local, g, len(train))),
                                   same_initial_noise=cfg.sampler.same_initial_noise)
        orm = ORMS.build(cfg.rewards.orm.backend, cfg, "cpu")
        reward = orm.score(policy.codec.decode(traj.x0_hat_final), [c for c in captions for _ in range(g)])
        logged = json.loads((out / "runs" / task / method / f"seed-{seed}" / "steps.jsonl").read_text().splitlines()[0])
        assert logged["train_reward"] == pytest.approx(float(reward.mean()), abs=1e-6)
        # held-out: ODE from the fixed noise (one generator seeded with eval_seed), all prompts x samples
        k = settings.eval_samples_per_prompt
        hcond, hcaps = dataset.conditioning([dataset.captions.index(c) for c in heldout])
        noise = torch.randn((len(heldout) * k, *shape), generator=torch.Generator().manual_seed(
            info["settings"]["eval_seed"]))
        x = sample_latents(policy, hcond.repeat_interleave(k), latent_shape=shape, num_steps=cfg.sampler.num_steps,
                           shift=cfg.sampler.shift, noise_type="ode", initial_noise=noise)
        held = orm.score(policy.codec.decode(x), [c for c in hcaps for _ in range(k)])
        first_eval = json.loads((out / "runs" / task / method / f"seed-{seed}" / "evals.jsonl").read_text().splitlines()[0])
        assert first_eval["step"] == 0
        assert first_eval["heldout_reward"] == pytest.approx(float(held.mean()), abs=1e-6)


@pytest.mark.slow  # the module's quick benchmark run (the suite's slowest fixture outside slow tests)
def test_report_only_reanalyses_the_logs_to_the_same_numbers(quick_run):
    out, report = quick_run
    again = run_benchmark(ConvergenceOptions(out_dir=out, report_only=True), log=lambda _msg: None)
    assert again["tasks"].keys() == report["tasks"].keys()
    for task in report["tasks"]:
        for key in ("budget_steps", "target_train_reward", "target_heldout_reward", "methods", "claim"):
            assert again["tasks"][task][key] == report["tasks"][task][key]


@pytest.mark.slow
@pytest.mark.ray
def test_ray_mode_through_the_driver_logs_the_same_rewards_as_in_process(quick_run, tmp_path):
    """--ray runs each method through driver.train on a local Ray; with the same world, prompts and seeds its
    training and held-out rewards equal the in-process runner's (same library maths, same noise)."""
    out_local, _ = quick_run
    out = tmp_path / "ray"
    report = run_benchmark(ConvergenceOptions(out_dir=out, quick=True, ray=True, world="random", tasks=["centered"],
                                              methods=["dance-grpo", "euphonium"], seeds=1), log=lambda _msg: None)
    assert report["mode"] == "ray" and set(report["tasks"]["centered"]["methods"]) == {"dance-grpo", "euphonium"}
    for method in ("dance-grpo", "euphonium"):
        for name, key in (("steps.jsonl", "train_reward"), ("evals.jsonl", "heldout_reward")):
            folder = Path("runs") / "centered" / method / "seed-0"
            ray_vals = [json.loads(x)[key] for x in (out / folder / name).read_text().splitlines()]
            local = [json.loads(x)[key] for x in (out_local / folder / name).read_text().splitlines()]
            assert ray_vals == pytest.approx(local, abs=1e-6), (method, name)
        steps = [json.loads(x) for x in (out / "runs" / "centered" / method / "seed-0" / "steps.jsonl").read_text().splitlines()]
        assert all(s["seconds"] > 0 and "cpu_seconds" not in s for s in steps)  # the driver's step time


# -------------------------------------------------------------------------------------- the claim statistic
def test_interpolated_crossing_is_linear_between_evaluations_and_none_when_never_reached():
    from euphonium_ray.bench.analysis import interpolated_crossing

    pts = [(0, 0.5), (5, 0.6), (10, 0.8)]
    assert interpolated_crossing(pts, 0.7) == pytest.approx(7.5)  # halfway from 0.6 to 0.8 between steps 5 and 10
    assert interpolated_crossing(pts, 0.4) == 0.0
    assert interpolated_crossing(pts, 0.6) == 5.0
    assert interpolated_crossing(pts, 0.81) is None


def test_claim_statistic_on_hand_made_curves_gives_the_ratio_of_median_steps_and_a_paired_interval():
    from euphonium_ray.bench.analysis import claim_statistics

    def curve(method: str, seed: int, slope: float) -> RunLog:  # reward 0.5 + slope·step over 20 steps
        return _log(method, seed, [0.5] * 20, 1.0, [0.5 + slope * s for s in range(0, 21, 5)], 5, "centered")

    base = [curve("dance-grpo", s, 0.01) for s in range(4)]  # gain 0.2, target 0.5 + 0.16 → step 16
    fast = [curve("euph", s, 0.02) for s in range(4)]  # reaches 0.66 at step 8
    never = [curve("slow", s, 0.0) for s in range(4)]
    c = claim_statistics(base + fast + never, "dance-grpo", 0.8, 500, 0.95, seed=1)
    assert c["start"] == pytest.approx(0.5) and c["baseline_gain"] == pytest.approx(0.2)
    assert c["target"] == pytest.approx(0.66)
    m = c["methods"]
    assert m["dance-grpo"]["median_steps"] == pytest.approx(16.0) and m["dance-grpo"]["ratio_vs_baseline"] == 1.0
    assert m["euph"]["median_steps"] == pytest.approx(8.0) and m["euph"]["ratio_vs_baseline"] == pytest.approx(2.0)
    assert m["euph"]["ratio_ci"] == pytest.approx((2.0, 2.0))  # identical seeds: no spread to resample
    assert m["slow"]["reached"] == 0 and m["slow"]["ratio_vs_baseline"] == 0.0
    # AUC: mean gain over 20 steps; the trapezoid of a straight line is exact
    assert m["euph"]["auc"]["mean"] == pytest.approx(0.02 * 20 / 2)
    assert m["euph"]["auc_minus_baseline"] == pytest.approx((0.02 - 0.01) * 20 / 2)


def test_runs_cut_by_a_time_limit_are_compared_at_the_last_evaluation_every_run_reached():
    from euphonium_ray.bench.analysis import claim_statistics

    base = [_log("dance-grpo", s, [0.5] * 20, 1.0, [0.5 + 0.01 * t for t in range(0, 21, 5)], 5) for s in range(3)]
    # cut after 13 steps: evaluated at 0, 5, 10 only, so every method is compared up to step 10
    cut = [_log("euph", s, [0.5] * 13, 1.0, [0.5 + 0.02 * t for t in range(0, 11, 5)], 5) for s in range(3)]
    c = claim_statistics(base + cut, "dance-grpo", 0.8, 200, 0.95, seed=0)
    assert c["budget_steps"] == 10
    assert c["baseline_gain"] == pytest.approx(0.1)  # the baseline's reward at step 10, not at its step 20
    assert c["methods"]["euph"]["auc_minus_baseline"] == pytest.approx((0.02 - 0.01) * 10 / 2)
    failed = [_log("euph", s, [0.5], 1.0, [0.5], 5) for s in range(3)]  # crashed after its step-0 evaluation
    with pytest.raises(ValueError, match="no held-out evaluation after step 0"):
        claim_statistics(base + failed, "dance-grpo", 0.8, 200, 0.95, seed=0)


def test_claim_interval_widens_with_seed_to_seed_spread_and_stays_paired():
    from euphonium_ray.bench.analysis import claim_statistics

    def curve(method: str, seed: int, slope: float) -> RunLog:
        return _log(method, seed, [0.5] * 20, 1.0, [0.5 + slope * s for s in range(0, 21, 5)], 5)

    base = [curve("dance-grpo", s, 0.01) for s in range(6)]
    mixed = [curve("m", s, sl) for s, sl in enumerate([0.02, 0.012, 0.03, 0.011, 0.025, 0.015])]
    c = claim_statistics(base + mixed, "dance-grpo", 0.8, 2000, 0.95, seed=3)
    lo, hi = c["methods"]["m"]["ratio_ci"]
    assert lo < c["methods"]["m"]["ratio_vs_baseline"] < hi and lo >= 1.0
