"""The remote teacher: a real `opd serve-teacher` on loopback scores as the local teacher does, batches
concurrent requests, refuses what it must, and a client survives the server being killed and restarted."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from safetensors.torch import load_file

from opdistill.cli import app
from opdistill.cli.demo import asset_dir
from opdistill.config import ModelSpec
from opdistill.data.examples import left_pad, right_pad
from opdistill.data.rendering import encode_completion
from opdistill.errors import UserError
from opdistill.models import char_tokenizer, load_model, load_tokenizer, tiny_model
from opdistill.teachers.base import make_teacher
from opdistill.teachers.cross import CrossTokenizerTeacher
from opdistill.teachers.local import LocalTeacher
from opdistill.teachers.remote import (
    RemoteTeacher,
    parse_vllm_prompt_logprobs,
    rollout_sequences,
    vllm_request,
)
from opdistill.teachers.server import ScoringServer
from opdistill.training import loop
from opdistill.types import Rollout, SignalRequest, TeacherSignal

EVERYTHING = SignalRequest(topk=4, at_ids=True, entropy=True)
TEACHER_DIR = str(asset_dir("addition-teacher"))


@pytest.fixture(scope="module")
def teacher_model(tokenizer):
    return tiny_model(ModelSpec(preset="d32l2"), tokenizer, seed=1).eval()


@pytest.fixture(scope="module")
def server(teacher_model, tokenizer):
    with ScoringServer(teacher_model, tokenizer, port=0, max_tokens=40) as running:
        yield running


def make_rollout(tokenizer, prompts=("12+34=", "5=", "999+1=", "7+7="), completions=("46", "5", "1000", "")):
    """Prompts of different lengths (left padding) and completions ending in EOS (right padding)."""
    ids_BP, mask_BP = left_pad([tokenizer.encode(p, add_special_tokens=False) for p in prompts], 0)
    tokens_BT, loss_mask_BT = right_pad([encode_completion(tokenizer, c) for c in completions], 0)
    B, T = tokens_BT.shape
    return Rollout(
        ids_BP, mask_BP, tokens_BT, loss_mask_BT, torch.zeros(B, T), torch.zeros(B, dtype=torch.bool)
    )


def student_topk_ids(rollout: Rollout, k: int = 3) -> torch.Tensor:
    return torch.randint(0, 18, (*rollout.tokens_BT.shape, k), generator=torch.Generator().manual_seed(0))


def assert_same_signal(remote: TeacherSignal, local: TeacherSignal, mask_BT: torch.Tensor) -> None:
    """Equal wherever a loss can read them: every position for the masked L0 / entropy, loss positions
    else."""
    torch.testing.assert_close(remote.token_logp_BT, local.token_logp_BT, atol=1e-5, rtol=1e-5)
    for name in ("topk_ids_BTK", "topk_logp_BTK", "given_ids_BTK", "given_logp_BTK"):
        got, want = getattr(remote, name), getattr(local, name)
        assert (got is None) == (want is None), name
        if want is not None:
            assert got.shape == want.shape and got.dtype == want.dtype, name
            torch.testing.assert_close(got[mask_BT], want[mask_BT], atol=1e-5, rtol=1e-5)
    if local.entropy_BT is not None:
        assert remote.entropy_BT is not None
        torch.testing.assert_close(remote.entropy_BT, local.entropy_BT, atol=1e-5, rtol=1e-5)
    assert remote.full_logits is None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_remote_scores_equal_the_local_teacher(server, teacher_model, tokenizer):
    rollout = make_rollout(tokenizer)
    ids_BTK = student_topk_ids(rollout)
    remote, local = RemoteTeacher(server.url, tokenizer), LocalTeacher(teacher_model)
    assert (
        rollout.prompt_mask_BP[:, 0].logical_not().any() and rollout.loss_mask_BT[:, -1].logical_not().any()
    )
    for request in (SignalRequest(), SignalRequest(topk=4), SignalRequest(at_ids=True), EVERYTHING):
        ids = ids_BTK if request.at_ids else None
        assert_same_signal(
            remote.score(rollout, request, ids), local.score(rollout, request, ids), rollout.loss_mask_BT
        )
    # 29 tokens against the server's 40 per request: a doubled rollout goes out as two requests, scored the
    # same
    doubled = make_rollout(tokenizer, *[("12+34=", "5=", "999+1=", "7+7=") * 2, ("46", "5", "1000", "") * 2])
    ids = student_topk_ids(doubled)
    assert_same_signal(
        remote.score(doubled, EVERYTHING, ids), local.score(doubled, EVERYTHING, ids), doubled.loss_mask_BT
    )


def test_concurrent_requests_are_batched_into_one_forward(teacher_model, tokenizer):
    local = LocalTeacher(teacher_model)
    rollouts = [
        make_rollout(tokenizer, (p,), (c,)) for p, c in (("1+2=", "3"), ("45+55=", "100"), ("8=", ""))
    ]
    with ScoringServer(teacher_model, tokenizer, port=0, batch_wait_s=1.0) as server:
        remote = RemoteTeacher(server.url, tokenizer)
        results: dict[int, TeacherSignal] = {}
        threads = [
            threading.Thread(
                target=lambda i=i: results.__setitem__(
                    i, remote.score(rollouts[i], EVERYTHING, student_topk_ids(rollouts[i]))
                )
            )
            for i in range(len(rollouts))
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert (server.requests, server.forwards) == (3, 1)
    for i, rollout in enumerate(rollouts):
        want = local.score(rollout, EVERYTHING, student_topk_ids(rollout))
        assert_same_signal(results[i], want, rollout.loss_mask_BT)


def test_oversized_and_malformed_requests_get_a_clear_refusal(server, tokenizer):
    def post(body) -> tuple[int, str]:
        request = urllib.request.Request(server.url + "/score", json.dumps(body).encode(), method="POST")
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, ""
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())["error"]

    status, error = post({"sequences": [{"prompt_ids": [5] * 60, "completion_ids": [6] * 10}]})
    assert status == 413 and "70 tokens" in error and "--max-tokens 40" in error
    status, error = post({"sequences": [{"prompt_ids": [5], "completion_ids": [99]}]})
    assert status == 400 and "completion_ids" in error
    status, error = post({"sequences": [{"prompt_ids": [5], "completion_ids": [6]}], "topk": 10_000})
    assert status == 400 and "--max-topk" in error
    long = make_rollout(tokenizer, ("1+2=" * 10,), ("3",))  # one sequence of 40 + 2 tokens
    with pytest.raises(UserError, match="larger --max-tokens"):
        RemoteTeacher(server.url, tokenizer).score(long, SignalRequest())


def test_remote_teacher_refuses_full_logits_and_foreign_tokenizers(server, tokenizer):
    with pytest.raises(UserError, match="full logits.*full_rkl.*topk_rkl or sampled_rkl"):
        RemoteTeacher(server.url, tokenizer).score(make_rollout(tokenizer), SignalRequest(full=True))
    with pytest.raises(UserError, match="full logits"):
        make_teacher(ModelSpec(url=server.url), tokenizer, requests=[SignalRequest(full=True)])
    other = char_tokenizer(["abc"])
    with pytest.raises(UserError, match="fingerprint .* and the student .*set teacher.tokenizer") as err:
        RemoteTeacher(server.url, other)
    assert server.info["tokenizer_fingerprint"] in str(err.value)


def test_make_teacher_picks_the_backend(server, tokenizer):
    assert isinstance(make_teacher(ModelSpec(url=server.url), tokenizer), RemoteTeacher)
    asset_tokenizer = load_tokenizer(TEACHER_DIR)
    assert isinstance(make_teacher(ModelSpec(path=TEACHER_DIR), asset_tokenizer), LocalTeacher)
    assert isinstance(
        make_teacher(ModelSpec(path=TEACHER_DIR), char_tokenizer(["1+2=3"])), CrossTokenizerTeacher
    )
    with pytest.raises(UserError, match="cannot write 3 of the student's tokens"):
        make_teacher(ModelSpec(path=TEACHER_DIR), char_tokenizer(["abc"]))
    with pytest.raises(UserError, match="teacher.path .* or teacher.url"):
        make_teacher(ModelSpec(), tokenizer)


def test_unreachable_teacher_is_a_user_error_after_retries(tokenizer):
    url = f"http://127.0.0.1:{free_port()}"
    start = time.monotonic()
    with pytest.raises(UserError, match=r"teacher at .* is unreachable: 3 attempts at GET /info") as err:
        RemoteTeacher(url, tokenizer, retries=2, backoff_s=0.05, timeout_s=1)
    assert url in str(err.value) and "Connection" in str(err.value)
    assert 0.15 <= time.monotonic() - start < 5  # backoff 0.05 + 0.1 s
    with pytest.raises(UserError, match="not an http"):
        RemoteTeacher("localhost:8000", tokenizer)


def _start_server(port: int) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "opdistill.cli", "serve-teacher", "--model", TEACHER_DIR, "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_client_survives_the_server_killed_and_restarted():
    """Killed while it holds a request (stopped, then SIGKILL), and stopped between two calls: each time a
    new server on the same port answers the retries, with the same scores. SIGTERM stops one cleanly."""
    port, tokenizer = free_port(), load_tokenizer(TEACHER_DIR)  # the shipped teacher's
    rollout = make_rollout(tokenizer)
    request, ids_BTK = EVERYTHING, student_topk_ids(rollout)
    servers = [_start_server(port)]
    try:
        remote = RemoteTeacher(
            f"http://127.0.0.1:{port}",
            tokenizer,
            timeout_s=1.0,
            retries=80,
            backoff_s=0.05,
            max_backoff_s=0.25,
        )
        first = remote.score(rollout, request, ids_BTK)

        os.kill(servers[0].pid, signal.SIGSTOP)  # the server accepts the connection but never answers
        during: list[TeacherSignal] = []
        call = threading.Thread(target=lambda: during.append(remote.score(rollout, request, ids_BTK)))
        call.start()
        time.sleep(0.5)
        servers[0].kill()
        servers[0].wait()
        servers.append(_start_server(port))
        call.join(timeout=60)
        assert during, "the call did not complete after the restart"
        assert_same_signal(during[0], first, rollout.loss_mask_BT)

        servers[1].send_signal(signal.SIGTERM)  # a clean stop, then a call that finds nothing listening
        assert servers[1].wait(timeout=10) == 0
        out, err = servers[1].communicate()
        assert f"at http://127.0.0.1:{port}" in out and "stopped" in err
        after: list[TeacherSignal] = []
        call = threading.Thread(target=lambda: after.append(remote.score(rollout, request, ids_BTK)))
        call.start()
        time.sleep(0.5)
        model, _ = load_model(ModelSpec(path=TEACHER_DIR))  # the restarted server, in this process for speed
        with ScoringServer(model, tokenizer, port=port):
            call.join(timeout=30)
        assert after, "the call did not complete after the restart"
        assert_same_signal(after[0], first, rollout.loss_mask_BT)
    finally:
        for process in servers:
            if process.poll() is None:
                process.kill()
                process.wait()


def test_a_run_through_a_restarted_remote_teacher_completes_as_with_the_local_teacher(tiny_run, tmp_path):
    """A distillation run whose teacher server is stopped after step 2 and back a second later finishes, and
    trains the same student as the same run with the teacher in-process."""
    model, tokenizer = load_model(ModelSpec(path=TEACHER_DIR))
    port = free_port()
    settings = (
        "objective.type=sampled_rkl",
        "train.steps=5",
        "rollout.max_new_tokens=24",
        "train.diagnostics_every=2",
    )
    loop.run(tiny_run(*settings, out="local"), show_progress=False)
    remote = tiny_run(*settings, f"teacher.url=http://127.0.0.1:{port}", "teacher.retries=30", out="remote")
    servers = [ScoringServer(model, tokenizer, port=port).start()]

    def restart_after_step_2() -> None:
        metrics = tmp_path / "remote" / "metrics.jsonl"
        while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):
            time.sleep(0.01)
        servers[0].close()
        time.sleep(1.0)
        servers.append(ScoringServer(model, tokenizer, port=port).start())

    thread = threading.Thread(target=restart_after_step_2)
    thread.start()
    try:
        result = loop.run(remote, show_progress=False)
    finally:
        thread.join()
        for running in servers:
            running.close()
    assert result["complete"] and len(servers) == 2 and servers[1].requests > 0
    local_weights = load_file(tmp_path / "local" / "final" / "model.safetensors")
    remote_weights = load_file(tmp_path / "remote" / "final" / "model.safetensors")
    for name, weight in local_weights.items():
        torch.testing.assert_close(remote_weights[name], weight, atol=1e-5, rtol=1e-4, msg=name)


def test_serve_teacher_with_a_bad_model_dir_is_one_sentence(tmp_path, capsys):
    assert app.main(["serve-teacher", "--model", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("opd serve-teacher: error:") and "nope" in err and len(err.splitlines()) == 1


# --- vLLM: its server cannot run here, so these test our side of its documented format -------------------


def vllm_prompt_logprobs(model, tokenizer, ids: list[int], n: int) -> list:
    """``choices[0].prompt_logprobs`` as vLLM documents it for prompt ``ids``, built from ``model``:
    position 0 None, then per position the ``n`` most likely ids plus the actual token, keyed by str(id),
    through JSON."""
    with torch.inference_mode():
        logp_LV = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    out: list = [None]
    for j in range(1, len(ids)):
        dist = logp_LV[j - 1]
        chosen = [*dist.topk(n).indices.tolist(), ids[j]]
        out.append(
            {
                str(i): {
                    "logprob": float(dist[i]),
                    "rank": int((dist > dist[i]).sum()) + 1,
                    "decoded_token": tokenizer.decode([i]),
                }
                for i in chosen
            }
        )
    return json.loads(json.dumps(out))


def test_vllm_format_prompt_logprobs_parse_into_the_local_signal(teacher_model, tokenizer):
    rollout = make_rollout(tokenizer)
    local = LocalTeacher(teacher_model).score(rollout, SignalRequest(topk=4), None)
    for b, (prompt, completion) in enumerate(zip(*rollout_sequences(rollout), strict=True)):
        body = vllm_request("teacher", prompt, completion, 4)
        assert body == {
            "model": "teacher",
            "prompt": prompt + completion,
            "max_tokens": 1,
            "temperature": 1.0,
            "prompt_logprobs": 4,
        }
        if not completion:
            continue
        parsed = parse_vllm_prompt_logprobs(
            vllm_prompt_logprobs(teacher_model, tokenizer, body["prompt"], 4), len(prompt), completion, 4
        )
        n = len(completion)
        torch.testing.assert_close(
            torch.tensor(parsed["token_logprobs"]), local.token_logp_BT[b, :n], atol=1e-5, rtol=0
        )
        assert parsed["topk_ids"] == local.topk_ids_BTK[b, :n].tolist()
        torch.testing.assert_close(
            torch.tensor(parsed["topk_logprobs"]), local.topk_logp_BTK[b, :n], atol=1e-5, rtol=0
        )
    with pytest.raises(UserError, match="--max-logprobs"):
        parse_vllm_prompt_logprobs(vllm_prompt_logprobs(teacher_model, tokenizer, [1, 5, 6], 1), 2, [6], 4)


def test_vllm_format_client_against_a_fake_endpoint(teacher_model, tokenizer):
    """The client's whole vLLM path over HTTP against a stand-in that answers in the documented format (not a
    test of vLLM itself): models listing, the tokenizer probe, one completions request per sequence."""
    bodies: list[dict] = []
    beyond: list[int] = []  # an id past the student's vocabulary, sent as every position's most likely

    class FakeVLLM(BaseHTTPRequestHandler):
        def do_GET(self):
            self._send(
                {"object": "list", "data": [{"id": "teacher", "object": "model", "max_model_len": 512}]}
            )

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if self.path == "/tokenize":
                ids = tokenizer.encode(body["prompt"], add_special_tokens=False)
                self._send({"count": len(ids), "max_model_len": 512, "tokens": ids})
                return
            bodies.append(body)
            logprobs = vllm_prompt_logprobs(teacher_model, tokenizer, body["prompt"], body["prompt_logprobs"])
            for entry in logprobs[1:] if beyond else ():
                entry[str(beyond[0])] = {"logprob": -1e-3, "rank": 1, "decoded_token": "?"}
            self._send(
                {
                    "object": "text_completion",
                    "model": "teacher",
                    "choices": [
                        {"index": 0, "text": "1", "prompt_logprobs": logprobs, "finish_reason": "length"}
                    ],
                }
            )

        def _send(self, payload):
            data = json.dumps(payload).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), FakeVLLM)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}"
        remote = make_teacher(ModelSpec(url=url, api="vllm"), tokenizer, requests=[SignalRequest(topk=4)])
        rollout = make_rollout(tokenizer)
        request = SignalRequest(topk=4)
        got = remote.score(rollout, request)
        assert_same_signal(got, LocalTeacher(teacher_model).score(rollout, request), rollout.loss_mask_BT)
        assert len(bodies) == 4 and all(b["model"] == "teacher" for b in bodies)
        with pytest.raises(UserError, match="diagnostics_every=0"):
            remote.score(rollout, SignalRequest(topk=4, entropy=True))
        with pytest.raises(UserError, match="tokenizes a probe text differently"):
            RemoteTeacher(url, char_tokenizer(["0123456789+=,>ab"]), api="vllm")
        with pytest.raises(UserError, match="does not serve teacher.served_model='other'"):
            RemoteTeacher(url, tokenizer, api="vllm", served_model="other")
        beyond.append(
            len(tokenizer) + 7
        )  # a padded logit row the student does not have: refused, not gathered
        with pytest.raises(UserError, match=f"top-K ids outside the student's {len(tokenizer)} tokens"):
            remote.score(rollout, request)
    finally:
        httpd.shutdown()
        httpd.server_close()
