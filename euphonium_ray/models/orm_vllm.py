"""vLLM judge ORM: a vision-language model served by vLLM scores a video by log p("good") − log p("bad").

The judge sees the same frames (``frames.py``: segment centres, square resize, 8-bit) and the same judging prompt
as the SoliReward scorer (``orm_solireward.DEFAULT_PROMPTS``), as an OpenAI-style chat: the system prompt, then the
user instruction followed by "Frame1: <image>\\n…" with each frame a lossless PNG. One request per video asks for a
single next token with ``logprob_token_ids=[good, bad]`` (vLLM ≥ 0.11 returns full-vocabulary log-probabilities for
exactly those ids), so the score is exact whatever the two tokens' ranks and costs one prefill; a batch is sent
as concurrent requests, which vLLM batches itself.

vLLM lives in its own environment (``.venv-vllm``, built by ``scripts/vllm_env.sh``: it pins another torch and
transformers), so the ORM talks to it over HTTP: either a server you run (``rewards.orm.path: http://host:port``,
what a GPU pool would do) or one it starts itself from a model folder, as a subprocess of ``.venv-vllm`` bound to
127.0.0.1 on a free port, with the hub and usage reporting switched off. A self-started server's knobs are
``rewards.orm.vllm``: ``venv`` (default ``.venv-vllm``), ``args`` (extra ``vllm serve`` flags, e.g.
``[--tensor-parallel-size, "2"]``), ``startup_timeout_s`` (default 900) and ``request_timeout_s``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from euphonium_ray.config import ORMConfig, VLLMJudgeConfig
from euphonium_ray.models.frames import check_videos, judge_frames, png_data_url
from euphonium_ray.models.orm_solireward import DEFAULT_PROMPTS, PromptTemplate
from euphonium_ray.errors import EuphoniumError

DEFAULT_STARTUP_TIMEOUT_S = VLLMJudgeConfig().startup_timeout_s
DEFAULT_VENV = VLLMJudgeConfig().venv
SERVER_MODULE = "vllm.entrypoints.launchers.api_server.entry"  # `vllm serve` without the CLI's version lookup
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}


class VLLMJudgeError(EuphoniumError, RuntimeError):
    """The judge server could not be started or answered wrongly; the message names the path, URL or token."""


def _signal_group(group: int, sig: int) -> bool:
    """Send ``sig`` to a process group we started; False when the group no longer exists."""
    try:
        os.killpg(group, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def _terminate_group(group: int) -> None:
    """Last resort at garbage collection or interpreter exit: SIGTERM a server group we started and left running."""
    _signal_group(group, signal.SIGTERM)


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --------------------------------------------------------------------------------------------------- server
class VLLMServer:
    """vLLM's OpenAI-compatible server for one model folder, run from the vLLM environment on 127.0.0.1."""

    def __init__(
        self,
        model: str | Path,
        *,
        venv: str | Path | None = None,
        port: int | None = None,
        served_model_name: str = "judge",
        dtype: str = "auto",
        max_model_len: int | None = None,
        max_images: int = 8,
        extra_args: list[str] | None = None,
        startup_timeout: float | None = None,
        log_path: str | Path | None = None,
    ) -> None:
        self.model = Path(model)
        if not (self.model / "config.json").is_file():
            raise VLLMJudgeError(f"judge model folder not found or without config.json: {self.model}")
        self.venv = Path(venv or DEFAULT_VENV)
        self.python = self.venv / "bin" / "python"
        if not self.python.is_file():
            raise VLLMJudgeError(f"vLLM environment not found: {self.python} (build it: bash scripts/vllm_env.sh)")
        self.port = port or free_loopback_port()
        self.served_model_name = served_model_name
        self.args = ["--model", str(self.model), "--host", "127.0.0.1", "--port", str(self.port),
                     "--served-model-name", served_model_name, "--dtype", dtype,
                     "--limit-mm-per-prompt", json.dumps({"image": max_images})]
        if max_model_len:
            self.args += ["--max-model-len", str(max_model_len)]
        self.args += list(extra_args or [])
        self.startup_timeout = float(startup_timeout or DEFAULT_STARTUP_TIMEOUT_S)
        self._own_log = log_path is None  # a log we made is removed after a clean stop, kept after a failure
        if log_path is None:
            fd, log_path = tempfile.mkstemp(prefix="vllm-judge-", suffix=".log")
            os.close(fd)
        self.log_path = Path(log_path)
        self.process: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def environment(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
        env.update(OFFLINE_ENV)
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache when vLLM runs on CPU
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")  # do not pin cores of a shared machine
        return env

    def start(self) -> str:
        """Launch and wait until ``/health`` answers; a server that dies or hangs is reported with its log's tail."""
        if self.process is not None:
            return self.base_url
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen([str(self.python), "-m", SERVER_MODULE, *self.args], env=self.environment(),
                                        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        start_new_session=True)
        log.close()
        self._finalizer = weakref.finalize(self, _terminate_group, self.process.pid)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                code, group, self.process = self.process.returncode, self.process.pid, None
                self._finalizer.detach()
                _signal_group(group, signal.SIGTERM)  # an engine process the dead server may have left behind
                raise VLLMJudgeError(f"vLLM server for {self.model} exited with code {code} (log: {self.log_path}):\n"
                                     f"{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.base_url + "/health", timeout=2) as resp:
                    if resp.status == 200:
                        return self.base_url
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(1.0)
        tail = self.log_tail()
        self.stop(keep_log=True)
        raise VLLMJudgeError(f"vLLM server for {self.model} not healthy after {self.startup_timeout:.0f} s "
                             f"(log: {self.log_path}):\n{tail}")

    def stop(self, keep_log: bool = False) -> None:
        """SIGTERM the server's process group (API server and engine core); SIGKILL what is left after 30 s."""
        proc, self.process = self.process, None
        if getattr(self, "_finalizer", None) is not None:
            self._finalizer.detach()
        if proc is not None:
            group = proc.pid  # start_new_session: the server leads its own group
            _signal_group(group, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
            deadline = time.monotonic() + 10
            while _signal_group(group, 0) and time.monotonic() < deadline:  # children finishing their shutdown
                time.sleep(0.2)
            _signal_group(group, signal.SIGKILL)
            proc.wait()
        if self._own_log and not keep_log:
            self.log_path.unlink(missing_ok=True)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def __enter__(self) -> "VLLMServer":
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


# --------------------------------------------------------------------------------------------------- client
class VLLMJudgeClient:
    """The few calls of vLLM's HTTP API the judge needs: model name, tokenize, one-token chat with label logprobs."""

    def __init__(self, base_url: str, *, model: str | None = None, timeout: float = 600.0) -> None:
        self.base_url, self.timeout = base_url.rstrip("/"), timeout
        self.model = model or self._request("/v1/models")["data"][0]["id"]

    def _request(self, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base_url + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as err:
            detail = err.read().decode(errors="replace")[:2000]
            raise VLLMJudgeError(f"{self.base_url}{path} answered HTTP {err.code}: {detail}") from None
        except (urllib.error.URLError, OSError) as err:
            raise VLLMJudgeError(f"cannot reach the vLLM judge at {self.base_url}{path}: {err}") from None

    def single_token_id(self, word: str) -> int:
        """The id of ``word`` as the judge's tokenizer writes it at the start of an answer; one token or an error."""
        ids = self._request("/tokenize", {"model": self.model, "prompt": word, "add_special_tokens": False})["tokens"]
        if len(ids) != 1:
            raise VLLMJudgeError(f"the judge's tokenizer writes the answer {word!r} as {len(ids)} tokens {ids}; "
                                 "pick answer words that are single tokens")
        return int(ids[0])

    def next_token_logprobs(self, messages: list[dict[str, Any]], token_ids: list[int]) -> dict[int, float]:
        """Full-vocabulary log-probabilities of ``token_ids`` as the assistant's first token."""
        reply = self._request("/v1/chat/completions", {
            "model": self.model, "messages": messages, "max_tokens": 1, "temperature": 0.0,
            "logprobs": True, "top_logprobs": 0, "logprob_token_ids": token_ids,
            "return_tokens_as_token_ids": True, "add_generation_prompt": True,
        })
        try:
            entries = reply["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
            found = {int(e["token"].split(":", 1)[1]): float(e["logprob"]) for e in entries}
        except (KeyError, IndexError, TypeError, ValueError) as err:
            raise VLLMJudgeError(f"unexpected reply from {self.base_url}: {err!r}: {str(reply)[:500]}") from None
        missing = [t for t in token_ids if t not in found]
        if missing:
            raise VLLMJudgeError(f"{self.base_url} returned no log-probability for token ids {missing}")
        return {t: found[t] for t in token_ids}


# ------------------------------------------------------------------------------------------------------ ORM
class VLLMJudgeORM:
    """OutcomeRewardModel: ``score(videos (B,3,F,H,W) in [-1,1], captions) -> (B,)`` = log p(good) − log p(bad)."""

    def __init__(
        self,
        client: VLLMJudgeClient,
        *,
        prompt: PromptTemplate = DEFAULT_PROMPTS["deformity_physics"],
        num_frames: int = 8,
        image_size: int = 448,
        answers: tuple[str, str] = ("good", "bad"),
        max_concurrency: int = 8,
        server: VLLMServer | None = None,
    ) -> None:
        self.client, self.prompt, self.server = client, prompt, server
        self.num_frames, self.image_size, self.max_concurrency = num_frames, image_size, max(1, max_concurrency)
        self.answers = answers
        self._answer_ids: tuple[int, int] | None = None

    def answer_ids(self) -> tuple[int, int]:
        """Token ids of the good and bad answers in the judge's vocabulary (asked of the server once)."""
        if self._answer_ids is None:
            good, bad = (self.client.single_token_id(word) for word in self.answers)
            if good == bad:
                raise VLLMJudgeError(f"answers {self.answers} map to the same token id {good}")
            self._answer_ids = (good, bad)
        return self._answer_ids

    def messages(self, frames: Tensor, caption: str) -> list[dict[str, Any]]:
        """The chat for one video: frames (n, 3, S, S) in [0, 1] as "FrameK: <image>\\n" after the instruction."""
        content: list[dict[str, Any]] = [{"type": "text", "text": self.prompt.user_text(caption)}]
        for k, frame in enumerate(frames):
            content += [{"type": "text", "text": f"Frame{k + 1}: "},
                        {"type": "image_url", "image_url": {"url": png_data_url(frame)}},
                        {"type": "text", "text": "\n"}]
        return [{"role": "system", "content": self.prompt.system}, {"role": "user", "content": content}]

    def _score_one(self, frames: Tensor, caption: str) -> float:
        good, bad = self.answer_ids()
        logp = self.client.next_token_logprobs(self.messages(frames, caption), [good, bad])
        return logp[good] - logp[bad]

    def score(self, videos: Tensor, captions: list[str]) -> Tensor:
        check_videos(videos, captions)
        frames = judge_frames(videos.detach().cpu(), self.num_frames, self.image_size)
        self.answer_ids()
        with ThreadPoolExecutor(max_workers=min(len(captions), self.max_concurrency)) as pool:
            scores = list(pool.map(self._score_one, frames, list(captions)))
        return torch.tensor(scores, dtype=torch.float32)

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()

    @classmethod
    def from_run_config(cls, cfg: Any, device: Any = "cpu") -> "VLLMJudgeORM":
        """The ``registry.ORMS`` factory for ``rewards.orm.backend: vllm`` (the judge runs in its own server)."""
        return cls.from_config(cfg.rewards.orm)

    @classmethod
    def from_config(cls, cfg: ORMConfig, *, max_model_len: int | None = None) -> "VLLMJudgeORM":
        """``rewards.orm`` with backend ``vllm``: ``path`` is a server URL or a model folder to serve."""
        server = None
        if cfg.path.startswith(("http://", "https://")):
            base_url = cfg.path
        else:
            if not cfg.path:
                raise VLLMJudgeError("rewards.orm.path is empty: give the judge's model folder or its server URL")
            server = VLLMServer(cfg.path, venv=cfg.vllm.venv, dtype="bfloat16" if cfg.dtype == "bf16" else "float32",
                                max_model_len=max_model_len, max_images=cfg.num_frames, extra_args=cfg.vllm.args,
                                startup_timeout=cfg.vllm.startup_timeout_s)
            base_url = server.start()
        try:
            return cls(VLLMJudgeClient(base_url, timeout=cfg.vllm.request_timeout_s), prompt=DEFAULT_PROMPTS[cfg.prompt_variant],
                       num_frames=cfg.num_frames, image_size=cfg.image_size, server=server)
        except BaseException:
            if server is not None:
                server.stop()
            raise


__all__ = ["VLLMJudgeClient", "VLLMJudgeError", "VLLMJudgeORM", "VLLMServer", "free_loopback_port"]
