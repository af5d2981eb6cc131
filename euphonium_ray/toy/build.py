"""``euphonium-ray toy build DIR``: assemble the toy world's model folder, in the layouts the real pipeline reads.

DIR gets what a diffusers HunyuanVideo folder has — ``transformer/`` (diffusers config.json + safetensors),
``vae/`` (here the exact pixel-unshuffle codec's config.json), ``text_encoder/`` (tiny Llama), ``text_encoder_2/``
(tiny CLIP), ``tokenizer/``, ``tokenizer_2/``, ``model_index.json`` — plus ``prompts.txt`` (the world's captions)
and ``embeddings/`` written by the same ``euphonium-ray preprocess`` code real prompts go through.

Committed artefacts (``euphonium_ray/toy/assets/toy-model``) are copied when they match the config (their
``toy_config.json`` is compared with the config's ``toy`` section), so building takes seconds; ``--retrain``
pretrains a new transformer instead. A mismatch is reported by field rather than silently retrained.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable

from euphonium_ray.checkpoint import atomic_write_dir
from euphonium_ray.config import RunConfig, ToyConfig
from euphonium_ray.data import heldout_split, write_subset_index
from euphonium_ray.toy.codec import PixelUnshuffleCodec
from euphonium_ray.toy.data import ShapesWorld
from euphonium_ray.toy.vocab import vocabulary
from euphonium_ray.errors import EuphoniumError

ASSETS_DIR = Path(__file__).resolve().parent / "assets" / "toy-model"
TEXT_PARTS = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
TOY_CONFIG_FILE = "toy_config.json"
PROMPTS_FILE = "prompts.txt"
EMBEDDINGS_DIR = "embeddings"
# ToyConfig fields each committed part depends on (a change in any of them means the part must be rebuilt).
TEXT_FIELDS = ("shapes", "colors", "directions", "text_dim", "pooled_dim", "text_layers", "seed")
# The pretraining schedule (pretrain_*) is provenance, kept in transformer/pretrain_info.json, not a mismatch.
TRANSFORMER_FIELDS = tuple(f for f in ToyConfig.model_fields if not f.startswith("pretrain_"))


class ToyBuildError(EuphoniumError, ValueError):
    """The toy folder cannot be built as asked; the message says which file or config field is at fault."""


def codec_for(toy: ToyConfig) -> PixelUnshuffleCodec:
    return PixelUnshuffleCodec(factor=toy.latent_factor, shift=toy.latent_shift, scale=toy.latent_scale)


def stored_toy_config(folder: Path) -> dict[str, Any] | None:
    path = folder / TOY_CONFIG_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ToyBuildError(f"{path} is not valid JSON: {exc}") from None


def config_differences(stored: dict[str, Any] | None, toy: ToyConfig, fields: tuple[str, ...]) -> list[str]:
    """``field: stored → wanted`` for every field that differs (all of them when nothing is stored)."""
    if stored is None:
        return ["no toy_config.json"]
    wanted = toy.model_dump(mode="json")
    return [f"toy.{k}: {stored.get(k)!r} → {wanted[k]!r}" for k in fields if stored.get(k) != wanted[k]]


def verify_weights(folder: Path, parts: tuple[str, ...]) -> None:
    """Open every safetensors file under ``folder/part`` (header and all tensors); a corrupted one is named."""
    from safetensors import safe_open

    for part in parts:
        for path in sorted((folder / part).rglob("*.safetensors")):
            try:
                with safe_open(str(path), framework="pt") as f:
                    for key in f.keys():
                        f.get_tensor(key)
            except Exception as exc:  # safetensors raises its own error type for bad headers or short files
                raise ToyBuildError(f"corrupted weights file {path}: {exc}") from None


def _copy_parts(src: Path, dst: Path, parts: tuple[str, ...]) -> None:
    verify_weights(src, parts)
    for part in parts:
        if (dst / part).exists():
            shutil.rmtree(dst / part)
        shutil.copytree(src / part, dst / part)


def build_text_side(out: Path, toy: ToyConfig, assets: Path | None, log: Callable[[str], None]) -> None:
    """Copy the committed tokenizers/encoders when they match ``toy``, else build them with the real classes."""
    from euphonium_ray.models.tiny import build_tiny_text_side

    if assets is not None and all((assets / p).is_dir() for p in TEXT_PARTS):
        diff = config_differences(stored_toy_config(assets), toy, TEXT_FIELDS)
        if not diff:
            _copy_parts(assets, out, TEXT_PARTS)
            log(f"text side: copied from {assets}")
            return
        log(f"text side: committed one does not match the config ({'; '.join(diff)}); building a new one")
    build_tiny_text_side(
        out, vocabulary(toy.shapes, toy.colors, toy.directions), text_dim=toy.text_dim, pooled_dim=toy.pooled_dim,
        llm_layers=toy.text_layers, seed=toy.seed,
    )
    log("text side: built tiny Llama + CLIP text encoders and word-level tokenizers")


# the held-out split of the world's prompts: the demo evaluates on it, the convergence benchmark holds out the same
HELDOUT_PROMPTS, HELDOUT_SEED = 8, 7
TRAIN_INDEX, HELDOUT_INDEX = "train.json", "heldout.json"


def write_embeddings(out: Path, toy: ToyConfig, world: ShapesWorld, progress: bool = False) -> Path:
    """The world's prompts through ``euphonium-ray preprocess`` (upstream layout) into ``out/embeddings``."""
    from euphonium_ray.preprocess import preprocess_prompts

    (out / PROMPTS_FILE).write_text("\n".join(world.prompts) + "\n")
    return preprocess_prompts(
        out, out / PROMPTS_FILE, out / EMBEDDINGS_DIR, batch_size=16, dtype="fp32", device="cpu",
        save_dtype="fp32", max_tokens=toy.text_max_tokens, progress=progress,
    )


def write_model_index(out: Path, toy: ToyConfig) -> None:
    index = {
        "_class_name": "HunyuanVideoPipeline",
        "_toy_world": "euphonium_ray.toy",
        "transformer": ["diffusers", "HunyuanVideoTransformer3DModel"],
        "vae": ["euphonium_ray.toy.codec", "PixelUnshuffleCodec"],
        "text_encoder": ["transformers", "LlamaModel"],
        "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
        "text_encoder_2": ["transformers", "CLIPTextModel"],
        "tokenizer_2": ["transformers", "PreTrainedTokenizerFast"],
    }
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    (out / TOY_CONFIG_FILE).write_text(json.dumps(toy.model_dump(mode="json"), indent=2) + "\n")


def _readable(folder: Path) -> None:
    """Folders 755 and files 644 (a temp folder is created private; the result is meant to be shared)."""
    folder.chmod(0o755)
    for path in folder.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)


def save_transformer(transformer, target: Path, info: dict[str, Any] | None = None) -> Path:
    """Write a diffusers transformer folder atomically (temp folder + rename), with optional provenance."""

    def fill(tmp: Path) -> None:
        transformer.save_pretrained(tmp, safe_serialization=True)
        if info is not None:
            (tmp / "pretrain_info.json").write_text(json.dumps(info, indent=2) + "\n")
        _readable(tmp)

    return atomic_write_dir(target, fill)


def build_toy_model(
    out_dir: str | Path,
    cfg: RunConfig,
    *,
    retrain: bool = False,
    assets: Path | None = ASSETS_DIR,
    device: str | None = None,
    steps: int | None = None,
    batch: int | None = None,
    save_every: int = 0,
    log: Callable[[str], None] = print,
) -> Path:
    """Build (or refresh) the toy model folder at ``out_dir``; returns its path."""
    toy = cfg.toy
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    world = ShapesWorld(toy)
    assets = assets if assets is not None and assets.is_dir() else None
    build_text_side(out, toy, assets, log)
    codec = codec_for(toy)
    codec.save_pretrained(out / "vae")
    write_model_index(out, toy)
    index = write_embeddings(out, toy, world)
    n = len(world.prompts)
    if n >= 2:  # 8 of the committed world's 48 prompts; a smaller world holds out a sixth (at least one)
        heldout, train = heldout_split(n, min(HELDOUT_PROMPTS, max(1, n // 6)), HELDOUT_SEED)
        write_subset_index(index, index.parent / TRAIN_INDEX, train)
        write_subset_index(index, index.parent / HELDOUT_INDEX, heldout)
        log(f"embeddings: {n} prompts -> {index} ({len(train)} for training in {TRAIN_INDEX}, "
            f"{len(heldout)} held out in {HELDOUT_INDEX})")
    else:
        log(f"embeddings: {n} prompt -> {index}")

    reusable = assets is not None and (assets / "transformer" / "config.json").is_file()
    diff = config_differences(stored_toy_config(assets), toy, TRANSFORMER_FIELDS) if reusable else ["none committed"]
    if not retrain and not diff:
        _copy_parts(assets, out, ("transformer",))
        log(f"transformer: copied the committed pretrained one from {assets}")
        return out
    if not retrain:
        raise ToyBuildError(
            f"the committed toy transformer does not match this config ({'; '.join(diff)}); "
            "pass --retrain to pretrain a new one (minutes), or use the committed config"
        )
    pretrain_into(out, cfg, device=device, steps=steps, batch=batch, save_every=save_every, log=log)
    return out


def pretrain_into(
    out: Path,
    cfg: RunConfig,
    *,
    device: str | None = None,
    steps: int | None = None,
    batch: int | None = None,
    save_every: int = 0,
    log: Callable[[str], None] = print,
) -> Path:
    """Pretrain a transformer on ``out``'s embeddings and write ``out/transformer`` (+ intermediate checkpoints
    under ``out/pretrain_checkpoints/step-N`` when ``save_every``)."""
    from euphonium_ray.toy.pretrain import pretrain

    index = out / EMBEDDINGS_DIR / "videos2caption.json"
    if not index.is_file():
        raise ToyBuildError(f"no embeddings at {index}; run `euphonium-ray toy build {out}` first")

    def save_step(transformer, step: int) -> str:
        return str(save_transformer(transformer, out / "pretrain_checkpoints" / f"step-{step}", {"step": step}))

    transformer, report = pretrain(
        cfg, index, codec_for(cfg.toy), device=device, steps=steps, batch=batch, save_every=save_every,
        save_fn=save_step, log=log,
    )
    toy = cfg.toy.model_dump(mode="json") | {"pretrain_steps": report.steps, "pretrain_batch": report.batch}
    info = json.loads(report.to_json()) | {"toy": toy, "sampler_shift": cfg.sampler.shift}
    save_transformer(transformer.to("cpu"), out / "transformer", info)
    log(f"transformer: pretrained in {report.seconds:.0f}s, final loss {report.final_loss:.4f} -> {out / 'transformer'}")
    return out / "transformer"


def export_assets(model_dir: str | Path, assets: Path = ASSETS_DIR) -> Path:
    """Copy a built folder's committed parts (everything but embeddings and checkpoints) into ``assets``."""
    src = Path(model_dir)
    parts = ("transformer", "vae", *TEXT_PARTS)

    def fill(tmp: Path) -> None:
        for part in parts:
            shutil.copytree(src / part, tmp / part)
        for name in ("model_index.json", TOY_CONFIG_FILE, PROMPTS_FILE):
            shutil.copy2(src / name, tmp / name)
        _readable(tmp)

    return atomic_write_dir(assets, fill)


def ensure_toy_model(cfg: RunConfig, log: Callable[[str], None] = print) -> Path:
    """The toy model folder at ``cfg.model.path``, built from the committed artefacts if it is not there yet
    (what ``make demo`` needs before training); an existing complete folder is left as it is."""
    if not cfg.model.path:
        raise ToyBuildError("model.path is empty; set it to the toy model folder (e.g. outputs/toy-model)")
    out = Path(cfg.model.path)
    complete = (out / "transformer" / "config.json").is_file() and (out / EMBEDDINGS_DIR / "videos2caption.json").is_file()
    return out.resolve() if complete else build_toy_model(out, cfg, log=log)
