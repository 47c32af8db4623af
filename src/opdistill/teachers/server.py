"""`opd serve-teacher`: a teacher on other machines, scoring token ids over HTTP (stdlib only).

The student's trainer sends token ids and gets back only the L0/L1 signal (math.md §1.3) — the
sampled token's log-prob, the teacher's top-K, log-probs at given ids, the entropy — never logits over
the vocabulary. Requests queued while a forward runs are merged into the next forward (up to
``max_batch_tokens`` padded tokens), so several trainers or micro-batches share the teacher's GPU.

Endpoints (JSON in and out; errors are ``{"error": "sentence"}`` with a 4xx/5xx status):

``GET /info`` -> ``{"api": "opd", "model", "tokenizer_fingerprint", "vocab_size" (logit width),
"tokenizer_size", "max_tokens_per_request", "max_topk", "dtype", "device"}``

``POST /score`` with ``{"sequences": [{"prompt_ids": [int], "completion_ids": [int]}, ...],
"topk": int (0 = none), "at_ids": null or one [n_completion][K] list of ids per sequence,
"entropy": bool}`` -> ``{"sequences": [{"token_logprobs": [n], "topk_ids": [n][K],
"topk_logprobs": [n][K], "at_logprobs": [n][K], "entropy": [n]}, ...]}``; a key is present only when
asked for, ``n`` is the sequence's completion length, and position ``t`` scores ``completion_ids[t]``
given the prompt and ``completion_ids[:t]``. An empty ``completion_ids`` is scored as empty lists.

Refusals are 4xx, each with its one-sentence ``error``: 400 for a malformed request (not JSON, not an
object, a field of the wrong type or out of range, an unknown field: a misspelt key would otherwise be
ignored), 404 for another path, 405 for another method, 408 for a body that stops arriving for
``timeout_s``, 411 for a body without a Content-Length, 413 for more than ``max_tokens_per_request``
prompt + completion tokens or a Content-Length over the bytes such a request can take (refused from the
header, before the body is read). A 5xx means scoring itself failed; the server keeps serving. It listens
on 127.0.0.1 unless given another host, and has no authentication.
"""

from __future__ import annotations

import contextlib
import json
import queue
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal

import torch

from opdistill.data.examples import rollout_of
from opdistill.errors import UserError
from opdistill.logits import CHUNK_TOKENS, CompletionLogits, reduce_chunks
from opdistill.models import tokenizer_fingerprint
from opdistill.teachers.local import scores
from opdistill.types import Rollout

MAX_TOKENS = 32768  # prompt + completion tokens of one request
MAX_BATCH_TOKENS = 65536  # padded tokens of one forward (one request that is larger still runs, alone)
MAX_TOPK = 256  # widest top-K / at_ids a request may ask for (bounds the response size)
TIMEOUT_S = 30.0  # seconds a client may leave its connection silent while sending a request
FIELDS = ("sequences", "topk", "at_ids", "entropy")  # of a /score body
SEQUENCE_FIELDS = ("prompt_ids", "completion_ids")
ROUTES = {"/info": "GET", "/score": "POST"}


class RequestError(Exception):
    """A request the server refuses: ``status`` and a sentence for the client."""

    def __init__(self, status: HTTPStatus, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class _Job:
    """One /score request waiting for the worker: its sequences, what it asks for, and where the answer
    goes."""

    prompts: list[list[int]]
    completions: list[list[int]]
    topk: int
    at_ids: list[list[list[int]]] | None
    entropy: bool
    done: threading.Event = field(default_factory=threading.Event)
    result: dict[str, Any] | None = None
    error: str = ""


class ScoringServer:
    """A frozen causal LM behind ``GET /info`` and ``POST /score``; ``start()`` serves in background threads.

    One worker thread runs every forward (``torch.inference_mode``, left-padded prompts as in a
    ``Rollout``, chunk by chunk through ``teachers.local.scores``, so scores equal ``LocalTeacher``'s); HTTP
    handler threads only parse, validate and wait.
    """

    def __init__(
        self,
        model,
        tokenizer,
        host: str = "127.0.0.1",
        port: int = 8000,
        max_tokens: int = MAX_TOKENS,
        max_batch_tokens: int = MAX_BATCH_TOKENS,
        max_topk: int = MAX_TOPK,
        batch_wait_s: float = 0.0,
        name: str = "",
        chunk_tokens: int = CHUNK_TOKENS,
        timeout_s: float = TIMEOUT_S,
    ):
        self.model = model.eval().requires_grad_(False)
        self.device = next(model.parameters()).device
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.max_tokens, self.max_batch_tokens, self.max_topk = max_tokens, max_batch_tokens, max_topk
        self.batch_wait_s = batch_wait_s  # after the first request, wait this long for more to batch
        self.chunk_tokens = chunk_tokens  # positions of logits that exist at once (logits.py)
        self.timeout_s = timeout_s  # a silent client's connection is dropped (408) after this long
        self.info = {
            "api": "opd",
            "model": name,
            "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
            "vocab_size": self.vocab_size,
            "tokenizer_size": len(tokenizer),
            "max_tokens_per_request": max_tokens,
            "max_topk": max_topk,
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "device": str(self.device),
        }
        self.requests = 0  # /score requests answered
        self.forwards = 0  # model forwards run (fewer than requests when requests were batched)
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        try:
            self.httpd = _HTTPServer((host, port), _handler(self))
        except (OSError, OverflowError, TypeError, UnicodeError) as err:  # taken, out of range, no such host
            reason = getattr(err, "strerror", None) or str(err)
            raise UserError(f"cannot listen on {host}:{port} ({reason}); check --host and --port.") from None
        self._threads: list[threading.Thread] = []

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> ScoringServer:
        for target in (self._work, self.httpd.serve_forever):
            thread = threading.Thread(target=target, daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def close(self) -> None:
        if self._threads:  # shutdown() waits for serve_forever, which runs only once started
            self.httpd.shutdown()
        self.httpd.server_close()
        self._queue.put(None)
        for thread in self._threads:
            thread.join(timeout=10)

    def __enter__(self) -> ScoringServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # --- request side (handler threads) ---

    def submit(self, body: dict[str, Any]) -> dict[str, Any]:
        """Validate a /score body, queue it for the worker and wait for its answer."""
        job = self._parse(body)
        self._queue.put(job)
        job.done.wait()
        if job.error:
            raise RequestError(HTTPStatus.INTERNAL_SERVER_ERROR, job.error)
        assert job.result is not None
        return job.result

    def _parse(self, body: dict[str, Any]) -> _Job:
        def bad(message: str) -> RequestError:
            return RequestError(HTTPStatus.BAD_REQUEST, message)

        if unknown := body.keys() - FIELDS:
            raise bad(
                f"unknown field {min(unknown)[:40]!r}; /score takes sequences, topk, at_ids and entropy."
            )
        sequences = body.get("sequences")
        if not isinstance(sequences, list) or not sequences:
            raise bad("'sequences' must be a non-empty list of {prompt_ids, completion_ids}.")
        prompts, completions = [], []
        for i, seq in enumerate(sequences):
            if not isinstance(seq, dict):
                raise bad(f"sequences[{i}] must be an object with prompt_ids and completion_ids.")
            if unknown := seq.keys() - SEQUENCE_FIELDS:
                raise bad(
                    f"unknown field {min(unknown)[:40]!r} in sequences[{i}]; it takes prompt_ids and "
                    "completion_ids."
                )
            prompt, completion = seq.get("prompt_ids"), seq.get("completion_ids")
            if not self._ids_ok(prompt) or not prompt:
                raise bad(
                    f"sequences[{i}].prompt_ids must be a non-empty list of ids in [0, {self.vocab_size})."
                )
            if not self._ids_ok(completion):
                raise bad(f"sequences[{i}].completion_ids must be a list of ids in [0, {self.vocab_size}).")
            prompts.append(prompt)
            completions.append(completion)
        tokens = sum(len(p) + len(c) for p, c in zip(prompts, completions, strict=True))
        if tokens > self.max_tokens:
            raise RequestError(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                f"the request holds {tokens} tokens, more than this server's --max-tokens {self.max_tokens}; "
                "split it into smaller requests.",
            )
        topk = body.get("topk", 0)
        if not isinstance(topk, int) or isinstance(topk, bool) or not 0 <= topk <= self.max_topk:
            raise bad(f"'topk' must be an integer in [0, {self.max_topk}] (this server's --max-topk).")
        at_ids = body.get("at_ids")
        if at_ids is not None:
            if not isinstance(at_ids, list) or len(at_ids) != len(sequences):
                raise bad("'at_ids' must hold one list per sequence.")
            widths = set()
            for i, (rows, completion) in enumerate(zip(at_ids, completions, strict=True)):
                if not isinstance(rows, list) or len(rows) != len(completion):
                    raise bad(f"at_ids[{i}] must hold one list of ids per completion token.")
                for row in rows:
                    if not self._ids_ok(row):
                        raise bad(f"at_ids[{i}] must hold lists of ids in [0, {self.vocab_size}).")
                    widths.add(len(row))
            if len(widths) > 1 or not 0 < next(iter(widths), 1) <= self.max_topk:
                raise bad(f"every at_ids row must hold the same number of ids, 1 to {self.max_topk}.")
        entropy = body.get("entropy", False)
        if not isinstance(entropy, bool):
            raise bad("'entropy' must be true or false.")
        return _Job(prompts, completions, topk, at_ids, entropy)

    def _ids_ok(self, ids) -> bool:
        return (
            isinstance(ids, list)
            and all(type(i) is int for i in ids)
            and (not ids or (min(ids) >= 0 and max(ids) < self.vocab_size))
        )

    # --- model side (the one worker thread) ---

    def _work(self) -> None:
        held: _Job | None = None  # a request that did not fit into the previous forward
        while True:
            first = held or self._queue.get()
            held = None
            if first is None:
                return
            jobs = [first]
            deadline = time.monotonic() + self.batch_wait_s
            while True:  # merge whatever else is waiting, up to max_batch_tokens padded tokens
                remaining = deadline - time.monotonic()
                try:
                    job = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    self._queue.put(None)
                    break
                if self._padded_tokens([*jobs, job]) > self.max_batch_tokens:
                    held = job
                    break
                jobs.append(job)
            self._run(jobs)

    @staticmethod
    def _padded_tokens(jobs: list[_Job]) -> int:
        prompts = [p for job in jobs for p in job.prompts]
        completions = [c for job in jobs for c in job.completions]
        return len(prompts) * (max(map(len, prompts)) + max(map(len, completions)))

    def _run(self, jobs: list[_Job]) -> None:
        try:
            rollout = self._rollout(
                [p for j in jobs for p in j.prompts], [c for j in jobs for c in j.completions]
            )
            scored = self._scores(jobs, rollout)
            start = 0
            for job in jobs:
                rows = slice(start, start + len(job.prompts))
                start = rows.stop
                job.result = self._answer(job, {name: value[rows] for name, value in scored.items()})
            self.forwards += 1
        except Exception as err:  # the client gets a 500 and retries; the server keeps serving
            for job in jobs:
                job.error = f"scoring failed on the teacher server: {type(err).__name__}: {err}"
        for job in jobs:
            self.requests += 1
            job.done.set()

    def _rollout(self, prompts: list[list[int]], completions: list[list[int]]) -> Rollout:
        """Left-padded prompts, right-padded completions, as the sampler lays them out."""
        return rollout_of(prompts, completions, self.pad_id).to(self.device)

    def _scores(self, jobs: list[_Job], rollout: Rollout) -> dict[str, torch.Tensor]:
        """Every job's scores from one forward over the merged batch, ``chunk_tokens`` positions of logits at
        a time: the widest top-K asked (each job keeps its first K: they are sorted), entropy if any job asks,
        and each job's at-ids (padded to the widest)."""
        B, T = rollout.tokens_BT.shape
        topk = min(max(job.topk for job in jobs), self.vocab_size)
        widths = [len(row) for job in jobs for rows in job.at_ids or [] for row in rows]
        ids_BTK = None
        if any(job.at_ids is not None for job in jobs):  # (no widths when every completion is empty)
            ids_BTK = torch.zeros(B, T, max(widths, default=1), dtype=torch.long)
            b = 0
            for job in jobs:
                for rows in job.at_ids or [[]] * len(job.prompts):
                    for t, row in enumerate(rows):
                        ids_BTK[b, t, : len(row)] = torch.tensor(row, dtype=torch.long)
                    b += 1
            ids_BTK = ids_BTK.to(self.device)
        entropy = any(job.entropy for job in jobs)

        def reduce(rows: slice, positions: slice, logits_btV: torch.Tensor) -> dict[str, torch.Tensor]:
            at_btK = None if ids_BTK is None else ids_BTK[rows, positions]
            return scores(logits_btV, rollout.tokens_BT[rows, positions], topk, at_btK, entropy)

        with torch.inference_mode():
            logits = CompletionLogits(self.model, rollout)
            out = reduce_chunks(logits.chunks(self.chunk_tokens), (B, T), reduce)
        out["token_logp"] = out["token_logp"] * rollout.loss_mask_BT
        if entropy:
            out["entropy"] = out["entropy"] * rollout.loss_mask_BT
        return out

    def _answer(self, job: _Job, scored: dict[str, torch.Tensor]) -> dict[str, Any]:
        """The job's answer from its rows of the merged scores, each list cut to the sequence's length."""
        fields: dict[str, torch.Tensor] = {"token_logprobs": scored["token_logp"]}
        if job.topk:
            fields["topk_ids"] = scored["topk_ids"][..., : job.topk]
            fields["topk_logprobs"] = scored["topk_logp"][..., : job.topk]
        if job.at_ids is not None:
            width = next((len(row) for rows in job.at_ids for row in rows), 1)
            fields["at_logprobs"] = scored["given_logp"][..., :width]
        if job.entropy:
            fields["entropy"] = scored["entropy"]
        lists = {name: value.cpu().tolist() for name, value in fields.items()}
        return {
            "sequences": [
                {name: rows[b][: len(completion)] for name, rows in lists.items()}
                for b, completion in enumerate(job.completions)
            ]
        }


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # connections not yet accepted; the stdlib's 5 reset a burst of 32 clients


def _handler(server: ScoringServer) -> type[BaseHTTPRequestHandler]:
    # the largest body a valid request can have: every id as up to 12 bytes of JSON, at_ids included
    max_body = 65536 + server.max_tokens * (1 + server.max_topk) * 12

    class Handler(BaseHTTPRequestHandler):
        server_version = "opd-serve-teacher/1"
        timeout = server.timeout_s  # of each read and write: a client that goes silent loses its thread

        def handle(self):
            with contextlib.suppress(ConnectionError):  # the client hung up mid-request: nobody to answer
                super().handle()

        def do_GET(self):
            if self._routed():
                self._reply(HTTPStatus.OK, server.info)

        def do_POST(self):
            if not self._routed():
                return
            try:
                body = self._read_json()
                if not isinstance(body, dict):
                    raise RequestError(HTTPStatus.BAD_REQUEST, "the body must be a JSON object.")
                self._reply(HTTPStatus.OK, server.submit(body))
            except RequestError as err:
                self._reply(err.status, {"error": str(err)})

        def _routed(self) -> bool:
            """Whether this is GET /info or POST /score; if not, it has been answered 404 or 405."""
            path = self.path.rstrip("/")
            if ROUTES.get(path) == self.command:
                return True
            if path in ROUTES:
                self._reply(
                    HTTPStatus.METHOD_NOT_ALLOWED,
                    {"error": f"{path} takes {ROUTES[path]} only, not {self.command}."},
                )
            else:
                self._reply(
                    HTTPStatus.NOT_FOUND,
                    {"error": f"no {self.path[:80]} here; use GET /info or POST /score."},
                )
            return False

        def _read_json(self) -> Any:
            """The body, parsed; its size is checked from the header before a byte of it is read."""
            self.close_connection = True  # on a refusal, what is left of the body is not read
            lengths = self.headers.get_all("Content-Length") or []
            if not lengths:
                raise RequestError(
                    HTTPStatus.LENGTH_REQUIRED,
                    "POST /score needs a Content-Length header (no chunked bodies).",
                )
            if len(lengths) > 1 or not (lengths[0].isascii() and lengths[0].strip().isdigit()):
                raise RequestError(
                    HTTPStatus.BAD_REQUEST, "Content-Length must be one whole number of bytes."
                )
            length = int(lengths[0])
            if length > max_body:
                raise RequestError(
                    HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                    f"a {length}-byte body is larger than this server accepts ({max_body} bytes).",
                )
            try:
                data = self.rfile.read(length)
            except TimeoutError:
                raise RequestError(
                    HTTPStatus.REQUEST_TIMEOUT, f"the body stopped arriving for {self.timeout} s."
                ) from None
            if len(data) < length:
                raise RequestError(
                    HTTPStatus.BAD_REQUEST, f"the body ended after {len(data)} of its {length} bytes."
                )
            try:
                return json.loads(data)
            except RecursionError:
                raise RequestError(
                    HTTPStatus.BAD_REQUEST, "the body is not valid JSON (nested too deeply to read)."
                ) from None
            except ValueError as err:
                raise RequestError(HTTPStatus.BAD_REQUEST, f"the body is not valid JSON ({err}).") from None

        def send_error(self, code, message=None, explain=None):
            """The stdlib's refusals of malformed HTTP (request line, headers), as JSON like ours; an unknown
            method is 405 and an unsupported HTTP version 400, the client's mistakes rather than 5xx."""
            self.close_connection = True
            if code == HTTPStatus.NOT_IMPLEMENTED:  # no do_<method>
                self._routed()
                return
            status = HTTPStatus.BAD_REQUEST if code >= 500 else HTTPStatus(code)
            self._reply(status, {"error": f"{message or status.phrase}."})

        def _reply(self, status: HTTPStatus, payload: dict[str, Any]) -> None:
            data = json.dumps(payload).encode()
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the client gave up; it retries
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

        def log_message(self, format, *args):  # quiet: one line per request would flood a training run's log
            pass

    return Handler


def serve(
    model_dir: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_tokens: int = MAX_TOKENS,
    max_batch_tokens: int = MAX_BATCH_TOKENS,
    max_topk: int = MAX_TOPK,
    dtype: Literal["float32", "bfloat16"] = "float32",
    device: str = "",
    chunk_tokens: int = CHUNK_TOKENS,
) -> None:
    """Load ``model_dir`` and serve it until Ctrl-C or SIGTERM (what ``opd serve-teacher`` runs)."""
    from opdistill.config import ModelSpec
    from opdistill.models import load_model

    try:
        where = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise UserError(f"--device {device!r} is not a torch device, e.g. cpu, cuda or cuda:1.") from None
    model, tokenizer = load_model(ModelSpec(path=model_dir, dtype=dtype))
    torch.nn.Module.to(model, where)
    server = ScoringServer(
        model,
        tokenizer,
        host,
        port,
        max_tokens,
        max_batch_tokens,
        max_topk,
        name=model_dir,
        chunk_tokens=chunk_tokens,
    )
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)  # a scheduler's SIGTERM stops the server as Ctrl-C does
    server.start()
    print(
        f"opd serve-teacher: {model_dir} on {server.info['device']} at {server.url} (at most {max_tokens} "
        "tokens per request); Ctrl-C stops.",
        flush=True,
    )
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(
            "opd serve-teacher: warning: listening beyond loopback with no authentication; anyone who "
            "reaches this port can use the teacher.",
            file=sys.stderr,
            flush=True,
        )
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
        print("opd serve-teacher: stopped.", file=sys.stderr, flush=True)


def _interrupt(*_) -> None:
    raise KeyboardInterrupt
