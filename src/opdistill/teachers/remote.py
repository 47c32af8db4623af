"""Remote teachers: ``opd serve-teacher`` (server.py) or a vLLM OpenAI-compatible server, over HTTP.

Token ids go out; only L0/L1 signal comes back. The tokenizer is checked against the student's once."""

from __future__ import annotations

import dataclasses
import http.client
import json
import math
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from opdistill.errors import UserError
from opdistill.models import tokenizer_fingerprint
from opdistill.types import Rollout, SignalRequest, TeacherSignal

NEEDS_FULL_LOGITS = (
    "objective.type full_rkl, full_fkl, jsd, minillm or sead, the exact vOPD baseline "
    "(objective.baseline=vopd with baseline_topk=0) and TIP (weighting.tip_ratio)"
)


class RemoteTeacher:
    """A teacher behind HTTP: token ids go out, only L0/L1 signal comes back (docs/remote_teacher.md).

    ``api="opd"`` talks to ``opd serve-teacher`` (server.py): ``GET /info`` once, where the tokenizer
    fingerprint must equal the student's; then ``POST /score`` with the rollout split into requests of at
    most the server's ``max_tokens_per_request``, sent concurrently so the server can batch them. It serves
    L0, L1 (top-K), L1s (log-probs at given ids) and the exact entropy, equal to ``LocalTeacher``'s.

    ``api="vllm"`` talks to vLLM's OpenAI-compatible server and serves L0 and L1 only; see
    ``parse_vllm_prompt_logprobs`` for exactly which fields are sent and read. vLLM exposes no tokenizer
    fingerprint: ``GET /v1/models`` must list the served model, and ``POST /tokenize`` of a probe text
    (built from the student's vocabulary and EOS token) must give the student's ids; a server without
    ``/tokenize`` gets a warning, not a check.

    Every HTTP request has a timeout (``timeout_s``) and is retried on connection errors, timeouts and
    5xx answers, ``retries`` times with exponential backoff (``backoff_s`` doubling up to
    ``max_backoff_s``), so a teacher restarted mid-run costs a pause, not the run. A 4xx answer or
    exhausted retries raise a ``UserError`` naming the URL. Positions after a sequence's last loss token
    are never sent; they get token log-prob and entropy 0 (as ``LocalTeacher``'s masked values) and
    top-K / given-id log-probs of a uniform distribution.
    """

    def __init__(
        self,
        url: str,
        student_tokenizer,
        api: str = "opd",
        served_model: str = "",
        timeout_s: float = 60.0,
        retries: int = 5,
        backoff_s: float = 0.5,
        max_backoff_s: float = 8.0,
        workers: int = 8,
    ):
        if not url.startswith(("http://", "https://")):
            raise UserError(
                f"teacher.url={url!r} is not an http:// or https:// URL, e.g. http://10.0.0.5:8000."
            )
        if api not in ("opd", "vllm"):
            raise UserError(f"teacher.api={api!r} is not one of opd, vllm.")
        self.url, self.api, self.served_model = url.rstrip("/"), api, served_model
        self.timeout_s, self.retries = timeout_s, max(int(retries), 0)
        self.width = len(student_tokenizer)  # the student's logit rows (models.fit_vocabulary)
        self.backoff_s, self.max_backoff_s, self.workers = backoff_s, max_backoff_s, max(workers, 1)
        if api == "opd":
            info = self._call("GET", "/info", hint="if it is a vLLM server, set teacher.api=vllm")
            if info.get("api") != "opd":
                raise UserError(
                    f"{self.url}/info is not an opd serve-teacher answer; for vLLM set teacher.api=vllm."
                )
            ours, theirs = tokenizer_fingerprint(student_tokenizer), info["tokenizer_fingerprint"]
            if ours != theirs:
                raise UserError(
                    f"the teacher at {self.url} has tokenizer fingerprint {theirs} and the student {ours}: "
                    "for a teacher with another tokenizer, set teacher.tokenizer to the directory of the "
                    "tokenizer it serves (the cross-tokenizer path, docs/cross_tokenizer.md)."
                )
            self.vocab_size = int(info["vocab_size"])
            self.max_tokens = int(info["max_tokens_per_request"])
        else:
            self._check_vllm(student_tokenizer)
            self.vocab_size = len(student_tokenizer)
            self.max_tokens = 0  # one request per sequence; vLLM's own max_model_len bounds it

    def require(self, request: SignalRequest) -> None:
        """Raise a ``UserError`` now if this teacher cannot send what ``request`` asks for."""
        if request.full:
            raise UserError(
                f"the objective needs the teacher's full logits (L2: {NEEDS_FULL_LOGITS}), which a remote "
                "teacher never sends; use objective.type=topk_rkl or sampled_rkl, or a local teacher.path."
            )
        if self.api == "vllm" and (request.at_ids or request.entropy):
            raise UserError(
                "a vLLM teacher (teacher.api=vllm) sends only L0 and its own top-K (L1), not log-probs at "
                "the student's ids (objective.topk_support=student/union, baseline_topk) or its entropy "
                "(sead, weighting.eopd_coef, diagnostics): use topk_support=teacher, set "
                "train.diagnostics_every=0, or serve the teacher with opd serve-teacher."
            )

    def score(
        self, rollout: Rollout, request: SignalRequest, ids_BTK: torch.Tensor | None = None
    ) -> TeacherSignal:
        """The same signal as ``LocalTeacher.score`` at every loss position, from the server."""
        self.require(request)
        if request.at_ids and ids_BTK is None:
            raise ValueError("the request asks for log-probs at given ids (L1s) but no ids were given")
        prompts, completions = rollout_sequences(rollout)
        topk = min(request.topk, self.vocab_size)
        at_rows = None
        if request.at_ids:
            assert ids_BTK is not None
            at_rows = [ids_BTK[b, : len(c)].tolist() for b, c in enumerate(completions)]
        rows = [b for b, c in enumerate(completions) if c]  # nothing to score in an empty completion
        if self.api == "opd":
            scored = self._score_opd(rows, prompts, completions, topk, at_rows, request.entropy)
        else:
            scored = self._score_vllm(rows, prompts, completions, topk)
        scored_B = dict(zip(rows, scored, strict=True))
        return self._assemble(rollout, scored_B, topk, ids_BTK if request.at_ids else None, request.entropy)

    def _score_opd(self, rows, prompts, completions, topk, at_rows, entropy) -> list[dict]:
        chunks, chunk, tokens = [], [], 0
        for b in rows:
            size = len(prompts[b]) + len(completions[b])
            if size > self.max_tokens:
                raise UserError(
                    f"a sequence of {size} tokens is more than the teacher server at {self.url} takes per "
                    f"request ({self.max_tokens}); restart it with a larger --max-tokens."
                )
            if chunk and tokens + size > self.max_tokens:
                chunks.append(chunk)
                chunk, tokens = [], 0
            chunk.append(b)
            tokens += size
        if chunk:
            chunks.append(chunk)

        def send(chunk: list[int]) -> list[dict]:
            body: dict[str, Any] = {
                "sequences": [{"prompt_ids": prompts[b], "completion_ids": completions[b]} for b in chunk],
                "topk": topk,
                "entropy": entropy,
            }
            if at_rows is not None:
                body["at_ids"] = [at_rows[b] for b in chunk]
            answer = self._call("POST", "/score", body).get("sequences")
            if not (isinstance(answer, list) and len(answer) == len(chunk)):
                raise UserError(f"the teacher at {self.url} answered /score without one result per sequence.")
            return answer

        return [seq for part in self._map(send, chunks) for seq in part]

    def _score_vllm(self, rows, prompts, completions, topk) -> list[dict]:
        def send(b: int) -> dict:
            body = vllm_request(self.served_model, prompts[b], completions[b], topk)
            choices = self._call("POST", "/v1/completions", body).get("choices") or [{}]
            return parse_vllm_prompt_logprobs(
                choices[0].get("prompt_logprobs"), len(prompts[b]), completions[b], topk, self.url
            )

        return self._map(send, rows)

    def _map(self, fn, items: list) -> list:
        """``fn`` over ``items``, concurrently (the server batches what arrives together), in order."""
        if len(items) <= 1:
            return [fn(item) for item in items]
        with ThreadPoolExecutor(max_workers=min(self.workers, len(items))) as pool:
            return list(pool.map(fn, items))

    def _assemble(
        self,
        rollout: Rollout,
        scored: dict[int, dict],
        topk: int,
        ids_BTK: torch.Tensor | None,
        entropy: bool,
    ) -> TeacherSignal:
        B, T = rollout.tokens_BT.shape
        uniform = -math.log(self.vocab_size)  # unsent positions: finite, masked by the loss anyway
        signal = TeacherSignal(token_logp_BT=torch.zeros(B, T))
        if topk:
            signal.topk_ids_BTK = torch.arange(topk).expand(B, T, topk).clone()
            signal.topk_logp_BTK = torch.full((B, T, topk), uniform)
        if ids_BTK is not None:
            signal.given_ids_BTK = ids_BTK
            signal.given_logp_BTK = torch.full(ids_BTK.shape, uniform)
        if entropy:
            signal.entropy_BT = torch.zeros(B, T)
        targets = {
            "token_logprobs": signal.token_logp_BT,
            "topk_ids": signal.topk_ids_BTK,
            "topk_logprobs": signal.topk_logp_BTK,
            "at_logprobs": signal.given_logp_BTK,
            "entropy": signal.entropy_BT,
        }
        asked = [name for name, target in targets.items() if target is not None]
        for b, seq in scored.items():
            if not isinstance(seq, dict):
                raise UserError(
                    f"the teacher at {self.url} sent {seq!r:.40} for sequence {b}, not an object."
                )
            missing = [name for name in asked if name not in seq]
            if missing:
                raise UserError(f"the teacher at {self.url} sent no {', '.join(missing)} for sequence {b}.")
            for name, values in seq.items():
                target = targets.get(name)
                if target is None or not values:
                    continue
                try:
                    target[b, : len(values)] = torch.tensor(values, dtype=target.dtype)
                except (TypeError, ValueError, RuntimeError):  # not numbers, ragged, or the wrong shape
                    row = "a number" if target.dim() == 2 else f"a row of {target.shape[2]} numbers"
                    raise UserError(
                        f"the teacher at {self.url} sent a malformed {name} for sequence {b}: expected {row} "
                        f"per completion token (at most {T})."
                    ) from None
        ids = signal.topk_ids_BTK
        if ids is not None and ids.numel() and not 0 <= int(ids.min()) <= int(ids.max()) < self.width:
            raise UserError(
                f"the teacher at {self.url} sent top-K ids outside the student's {self.width} tokens "
                f"({int(ids.min())}..{int(ids.max())}): is it serving another tokenizer's model?"
            )
        if rollout.observed_BT is not None:  # environment tokens are context, not scored tokens
            signal.token_logp_BT *= rollout.loss_mask_BT.cpu()
            if signal.entropy_BT is not None:
                signal.entropy_BT *= rollout.loss_mask_BT.cpu()
        device = rollout.tokens_BT.device
        return dataclasses.replace(
            signal, **{name: value.to(device) for name, value in vars(signal).items() if value is not None}
        )

    # --- HTTP with timeouts and retries ---

    def _call(self, method: str, path: str, body: dict | None = None, hint: str = "") -> dict:
        """One JSON request, retried with backoff on connection errors, timeouts and 5xx; 4xx -> UserError."""
        data = json.dumps(body).encode() if body is not None else None
        start, last = time.monotonic(), ""
        for attempt in range(self.retries + 1):
            request = urllib.request.Request(
                self.url + path, data=data, method=method, headers={"Content-Type": "application/json"}
            )
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    answer = json.loads(response.read())
                if isinstance(answer, dict):
                    return answer
                last = "an answer that is not a JSON object"
            except urllib.error.HTTPError as err:
                message = _error_message(err)
                if err.code < 500:
                    raise UserError(
                        f"the teacher at {self.url} refused {method} {path} with HTTP {err.code}: {message}"
                        + (f" ({hint})." if hint else "")
                    ) from None
                last = f"HTTP {err.code}: {message}"
            except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as err:
                last = _reason(err)  # refused, reset, timed out, cut off mid-answer
            if attempt < self.retries:
                delay = min(self.backoff_s * 2**attempt, self.max_backoff_s)
                print(
                    f"opd: teacher at {self.url}: {method} {path} failed ({last}); retry "
                    f"{attempt + 1}/{self.retries} in {delay:g} s",
                    file=sys.stderr,
                    flush=True,
                )
                time.sleep(delay)
        raise UserError(
            f"the teacher at {self.url} is unreachable: {self.retries + 1} attempts at {method} {path} over "
            f"{time.monotonic() - start:.1f} s (timeout {self.timeout_s:g} s each, backoff from "
            f"{self.backoff_s:g} s) failed, the last with {last}; start the server or fix teacher.url "
            "(teacher.retries and teacher.timeout_s allow more time)."
        )

    def _check_vllm(self, student_tokenizer) -> None:
        """The served model exists, and vLLM tokenizes a probe text to the student's ids."""
        listed = [m.get("id") for m in self._call("GET", "/v1/models").get("data", [])]
        if not self.served_model:
            if len(listed) != 1:
                raise UserError(
                    f"the vLLM server at {self.url} serves {listed}; set teacher.served_model to one of them."
                )
            self.served_model = listed[0]
        elif self.served_model not in listed:
            raise UserError(
                f"the vLLM server at {self.url} does not serve teacher.served_model={self.served_model!r}; "
                f"it serves {listed}."
            )
        probe = tokenizer_probe(student_tokenizer)
        body = {"model": self.served_model, "prompt": probe, "add_special_tokens": False}
        try:
            theirs = list(self._call("POST", "/tokenize", body).get("tokens") or [])
        except UserError as err:  # /tokenize is a vLLM extension; without it there is no check at all
            print(f"opd: warning: cannot compare tokenizers with the vLLM teacher ({err})", file=sys.stderr)
            return
        ours = student_tokenizer.encode(probe, add_special_tokens=False)
        if theirs != ours:
            at = next(
                (i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b),
                min(len(ours), len(theirs)),
            )
            raise UserError(
                f"the vLLM teacher at {self.url} tokenizes a probe text differently from the student (first "
                f"difference at token {at}: {theirs[at : at + 3]} vs {ours[at : at + 3]}); teacher and "
                "student must share one tokenizer."
            )


def rollout_sequences(rollout: Rollout) -> tuple[list[list[int]], list[list[int]]]:
    """Each row's real prompt ids (left padding dropped) and completion ids up to its last real token (an
    episode's environment tokens included: the teacher scores the student's turns in their context)."""
    prompt_ids_BP, prompt_mask_BP = rollout.prompt_ids_BP.cpu(), rollout.prompt_mask_BP.cpu()
    tokens_BT, real_BT = rollout.tokens_BT.cpu(), rollout.real_BT.cpu()
    lengths_B = real_BT.sum(1)
    if not torch.equal(real_BT, torch.arange(tokens_BT.shape[1]) < lengths_B[:, None]):
        raise ValueError("a remote teacher scores completions whose tokens are a prefix (tokens up to EOS)")
    prompts = [prompt_ids_BP[b][prompt_mask_BP[b]].tolist() for b in range(len(tokens_BT))]
    completions = [tokens_BT[b, : int(n)].tolist() for b, n in enumerate(lengths_B)]
    return prompts, completions


def vllm_request(served_model: str, prompt_ids: list[int], completion_ids: list[int], topk: int) -> dict:
    """The body of ``POST {url}/v1/completions`` that scores one sequence with vLLM.

    ``prompt`` is prompt ⊕ completion as token ids (vLLM takes a list of ints as a pre-tokenised prompt
    and adds no BOS to it); ``prompt_logprobs`` = max(K, 1) asks for every prompt position's top-K plus
    the actual token (vLLM caps it at the server's ``--max-logprobs``, default 20); ``max_tokens`` = 1
    because a completion must generate something, and that one token is ignored. ``temperature`` is 1, not
    0: prompt log-probs come from the raw logits by default (``--logprobs-mode raw_logprobs``), and some
    vLLM versions scale them by the request's temperature, so 1 is the value that is right in all of them.
    """
    return {
        "model": served_model,
        "prompt": prompt_ids + completion_ids,
        "max_tokens": 1,
        "temperature": 1.0,
        "prompt_logprobs": max(topk, 1),
    }


def parse_vllm_prompt_logprobs(
    prompt_logprobs, prompt_len: int, completion_ids: list[int], topk: int, url: str = "the vLLM server"
) -> dict:
    """One sequence's L0 and L1 signal from vLLM's ``choices[0].prompt_logprobs``.

    The field (vLLM ``CompletionResponseChoice.prompt_logprobs: list[dict[int, Logprob] | None]``; in JSON
    the keys are token ids as strings and ``Logprob`` is ``{"logprob": float, "rank": int,
    "decoded_token": str}``; https://docs.vllm.ai/en/v0.10.2/api/vllm/logprobs.html and
    ``vllm/entrypoints/openai/completion/protocol.py``) holds one entry per
    prompt position: ``None`` for position 0, then the ``prompt_logprobs`` most likely ids of the
    distribution that predicts that position, plus the actual token when it is not among them. Completion
    token ``t`` is at position ``prompt_len + t``. Used: ``entry[str(token)]["logprob"]`` (L0) and the
    ``topk`` entries of highest ``logprob`` (L1, most likely first). Not used: ``rank``, ``decoded_token``,
    ``text``, ``logprobs``. Returns the opd server's per-sequence schema: ``token_logprobs`` and, when
    ``topk``, ``topk_ids`` and ``topk_logprobs``.
    """
    n = len(completion_ids)
    if not isinstance(prompt_logprobs, list) or len(prompt_logprobs) != prompt_len + n:
        got = len(prompt_logprobs) if isinstance(prompt_logprobs, list) else prompt_logprobs
        raise UserError(
            f"{url} answered without prompt_logprobs for all {prompt_len + n} positions (got {got!r}); the "
            "teacher needs a vLLM server with prompt_logprobs support."
        )
    token_logprobs, topk_ids, topk_logprobs = [], [], []
    for t, token in enumerate(completion_ids):
        entry = prompt_logprobs[prompt_len + t] or {}
        if str(token) not in entry:
            raise UserError(f"{url} sent no log-prob for token {token} at position {prompt_len + t}.")
        token_logprobs.append(float(entry[str(token)]["logprob"]))
        if topk:
            ranked = sorted(entry.items(), key=lambda item: -float(item[1]["logprob"]))[:topk]
            if len(ranked) < topk:
                raise UserError(
                    f"{url} sent {len(ranked)} log-probs per position, fewer than top-K = {topk}; start vLLM "
                    "with --max-logprobs of at least K."
                )
            topk_ids.append([int(token_id) for token_id, _ in ranked])
            topk_logprobs.append([float(value["logprob"]) for _, value in ranked])
    out: dict[str, list] = {"token_logprobs": token_logprobs}
    if topk:
        out["topk_ids"], out["topk_logprobs"] = topk_ids, topk_logprobs
    return out


def tokenizer_probe(tokenizer) -> str:
    """A text that exercises the tokenizer: a fixed sentence, 64 evenly spaced vocabulary entries, EOS."""
    special = set(tokenizer.all_special_ids)
    ids = [i for i in range(len(tokenizer)) if i not in special]
    spread = ids[:: max(len(ids) // 64, 1)][:64]
    return f"The quick brown fox, 12 + 30 = 42. {tokenizer.decode(spread)}{tokenizer.eos_token or ''}"


def _error_message(err: urllib.error.HTTPError) -> str:
    try:
        body = err.read().decode(errors="replace")
    except OSError:
        return err.reason or ""
    try:
        answer = json.loads(body)
    except ValueError:
        return body.strip()[:300] or str(err.reason)
    error = answer.get("error", answer) if isinstance(answer, dict) else answer  # opd: str; vLLM: {message}
    return str(error.get("message", error) if isinstance(error, dict) else error)


def _reason(err: Exception) -> str:
    reason = getattr(err, "reason", None) or err
    return f"{type(reason).__name__}: {reason}" if str(reason) else type(reason).__name__
