"""``euphonium-ray preprocess``: encode a prompts file into upstream's embedding layout.

Writes ``OUT/prompt_embed/{i}.pt`` (1+L, D), ``OUT/prompt_attention_mask/{i}.pt`` (L,) and ``OUT/videos2caption.json``
(a list of ``{prompt_embed_path, prompt_attention_mask, caption}`` with absolute paths, in file order); ``i`` is the
prompt's index among the file's non-blank lines. Every file is written atomically, and a manifest records which
prompt text each index was encoded from, so a rerun skips finished prompts and redoes any whose text changed.
With ``--ray-workers N`` the batches are spread over N Ray actors, each holding its own encoders; the actors
return tensors through the object store and only this process writes files, so workers need no shared filesystem.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from euphonium_ray.files import write_atomic
from euphonium_ray.data import CAPTION_KEY, EMBED_KEY, MASK_KEY, DataError, read_prompts_file

EMBED_DIR = "prompt_embed"
MASK_DIR = "prompt_attention_mask"
INDEX_FILE = "videos2caption.json"
MANIFEST_FILE = "preprocess_manifest.json"
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def save_tensor(path: Path, tensor: torch.Tensor) -> None:
    write_atomic(path, lambda fh: torch.save(tensor.contiguous().clone(), fh))


def write_json(path: Path, data: Any) -> None:
    write_atomic(path, json.dumps(data, indent=2, ensure_ascii=False))


def prompt_digest(prompt: str, settings: dict[str, Any]) -> str:
    """What an index was encoded from: the prompt and the encoder settings (model, template, dtype, length)."""
    blob = json.dumps({"prompt": prompt, **settings}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


def batched(items: list[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class PromptEncoderWorker:
    """Loads the encoders once and encodes one batch of prompts at a time (in-process, or as a Ray actor)."""

    def __init__(self, model_dir: str, dtype: str, device: str, template: str | None, max_tokens: int,
                 save_dtype: str) -> None:
        from euphonium_ray.models.text import VIDEO_PROMPT_TEMPLATE, HunyuanTextEncoder

        self.encoder = HunyuanTextEncoder.from_pretrained(
            model_dir, dtype=_DTYPES[dtype], device=device, template=template or VIDEO_PROMPT_TEMPLATE,
            max_tokens=max_tokens,
        )
        self.save_dtype = _DTYPES[save_dtype]

    def encode(self, indices: list[int], prompts: list[str]) -> tuple[list[int], torch.Tensor, torch.Tensor]:
        encoded = self.encoder.encode(prompts, out_dtype=self.save_dtype)
        return indices, encoded.prompt_embed, encoded.attention_mask


def write_batch(out: Path, indices: list[int], embeds: torch.Tensor, masks: torch.Tensor) -> list[int]:
    """One ``prompt_embed/{i}.pt`` and ``prompt_attention_mask/{i}.pt`` per index, each written atomically."""
    for row, idx in enumerate(indices):
        save_tensor(out / EMBED_DIR / f"{idx}.pt", embeds[row])
        save_tensor(out / MASK_DIR / f"{idx}.pt", masks[row])
    return indices


def _load_manifest(out: Path) -> dict[str, str]:
    path = out / MANIFEST_FILE
    if not path.is_file():
        return {}
    try:
        done = json.loads(path.read_text()).get("done", {})
    except (json.JSONDecodeError, AttributeError):
        return {}  # an unreadable manifest only costs a re-encode
    return {str(k): str(v) for k, v in done.items()}


def _already_done(out: Path, idx: int, digest: str, manifest: dict[str, str]) -> bool:
    return (
        manifest.get(str(idx)) == digest
        and (out / EMBED_DIR / f"{idx}.pt").is_file()
        and (out / MASK_DIR / f"{idx}.pt").is_file()
    )


def preprocess_prompts(
    model_dir: str | Path,
    prompts_path: str | Path,
    out_dir: str | Path,
    *,
    batch_size: int = 8,
    ray_workers: int = 0,
    dtype: str = "fp32",
    device: str = "cpu",
    save_dtype: str = "fp16",
    template: str | None = None,
    max_tokens: int = 256,
    progress: bool = True,
    ray_init: dict[str, Any] | None = None,
    warn: Callable[[str], None] | None = None,
) -> Path:
    """Encode every prompt not yet written and (re)write the index; returns the path of ``videos2caption.json``.

    A prompt longer than the LLM's ``max_tokens`` window is encoded cut; ``warn`` (default: stderr) gets one line
    per such prompt, and the index keeps the caption that was encoded, not the whole line."""
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for name, value in (("dtype", dtype), ("save_dtype", save_dtype)):
        if value not in _DTYPES:
            raise ValueError(f"{name} must be one of {sorted(_DTYPES)}, got {value!r}")
    prompts = read_prompts_file(prompts_path)
    model_dir, out = Path(model_dir).resolve(), Path(out_dir).resolve()
    if not model_dir.is_dir():
        raise DataError(f"model folder not found: {model_dir}")
    (out / EMBED_DIR).mkdir(parents=True, exist_ok=True)
    (out / MASK_DIR).mkdir(parents=True, exist_ok=True)
    from euphonium_ray.models.text import VIDEO_PROMPT_TEMPLATE, load_tokenizers, prompt_windows

    windows = prompt_windows(*load_tokenizers(model_dir), prompts, template=template or VIDEO_PROMPT_TEMPLATE,
                             max_tokens=max_tokens)
    for i, (prompt, window) in enumerate(zip(prompts, windows)):
        if window.dropped or window.clip_dropped:
            (warn or _warn_stderr)(truncation_note(i, prompt, window, max_tokens))
    settings = {"model": str(model_dir), "template": template or VIDEO_PROMPT_TEMPLATE, "dtype": dtype, "save_dtype": save_dtype,
                "max_tokens": max_tokens}
    digests = [prompt_digest(p, settings) for p in prompts]
    manifest = _load_manifest(out)
    todo = [i for i in range(len(prompts)) if not _already_done(out, i, digests[i], manifest)]
    batches = list(batched(todo, batch_size))
    args = (str(model_dir), dtype, device, template, max_tokens, save_dtype)

    def record(result: tuple[list[int], torch.Tensor, torch.Tensor]) -> None:
        done = write_batch(out, *result)
        for idx in done:
            manifest[str(idx)] = digests[idx]
        write_json(out / MANIFEST_FILE, {"settings": settings, "done": manifest})

    bar = tqdm(total=len(prompts), initial=len(prompts) - len(todo), desc="preprocess", unit="prompt",
               disable=not progress)
    if batches and ray_workers > 0:
        from euphonium_ray.actors.prompt_encoders import encode_on_ray  # the one way from here into the Ray glue

        encode_on_ray(batches, prompts, args, ray_workers, ray_init, lambda res: (record(res), bar.update(len(res[0]))))
    elif batches:
        worker = PromptEncoderWorker(*args)
        for batch in batches:
            record(worker.encode(batch, [prompts[i] for i in batch]))
            bar.update(len(batch))
    bar.close()
    entries = [
        {EMBED_KEY: str(out / EMBED_DIR / f"{i}.pt"), MASK_KEY: str(out / MASK_DIR / f"{i}.pt"),
         CAPTION_KEY: windows[i].caption}
        for i in range(len(prompts))
    ]
    index = out / INDEX_FILE
    write_json(index, entries)
    return index


def truncation_note(index: int, prompt: str, window, max_tokens: int) -> str:
    """One line: which prompt lost how many tokens to which window, and what the index keeps."""
    head = prompt if len(prompt) <= 48 else prompt[:45] + "..."
    parts = []
    if window.dropped:
        parts.append(f"the text encoder's {max_tokens}-token window dropped {window.dropped} of its {window.tokens} "
                     f"tokens (videos2caption.json keeps the encoded part, {len(window.caption)} of "
                     f"{len(prompt)} characters)")
    if window.clip_dropped:
        parts.append(f"CLIP's window dropped {window.clip_dropped} of {window.clip_tokens} tokens")
    return f"prompt {index} ({head!r}): " + "; ".join(parts)


def _warn_stderr(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="euphonium-ray preprocess", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="model folder with text_encoder/, tokenizer/, text_encoder_2/, tokenizer_2/")
    parser.add_argument("--prompts", required=True, help="text file, one prompt per line")
    parser.add_argument("--out", required=True, help="output folder (upstream layout)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--ray-workers", type=int, default=0, help="spread batches over N Ray actors (0: in process)")
    parser.add_argument("--ray-address", default=None, help="Ray cluster address (default: start a local Ray)")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default=None,
                        help="encoder weights dtype (default fp16 on CUDA as upstream, fp32 on CPU)")
    parser.add_argument("--save-dtype", choices=sorted(_DTYPES), default="fp16", help="stored embedding dtype (upstream: fp16)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    parser.add_argument("--template-file", default=None,
                        help="file holding the prompt template with one '{}' (e.g. upstream's exact wording)")
    parser.add_argument("--max-tokens", type=int, default=256, help="LLM rows kept after the template crop (upstream 256)")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("fp16" if device.startswith("cuda") else "fp32")
    template = None
    if args.template_file:
        tfile = Path(args.template_file)
        if not tfile.is_file():
            print(f"error: template file not found: {tfile}", file=sys.stderr)
            return 2
        template = tfile.read_text(encoding="utf-8").rstrip("\n")
    ray_init = {"address": args.ray_address} if args.ray_address else None
    try:
        index = preprocess_prompts(
            args.model, args.prompts, args.out, batch_size=args.batch_size, ray_workers=args.ray_workers,
            dtype=dtype, device=device, save_dtype=args.save_dtype, template=template, max_tokens=args.max_tokens,
            progress=not args.no_progress, ray_init=ray_init,
        )
    except (DataError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {index}")
    return 0
