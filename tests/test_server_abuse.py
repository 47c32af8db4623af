"""The teacher server under abuse (docs/reliability.md): a real ``ScoringServer`` on loopback is sent
generated bad requests — malformed JSON, a wrong type or value in every field of /score, ids out of range,
too many tokens, a Content-Length that is missing, malformed, huge or more than the bytes sent, other paths
and methods, broken HTTP, clients that hang up, stall, trickle or crowd in. Each well-formed HTTP request
gets a 4xx with a one-sentence JSON reason (never a 5xx, never a dropped connection), nothing reaches
stderr, memory and threads stay bounded, and after each case the same good request gets the same numbers
as before any abuse. The defaults: loopback only, a bounded body."""

from __future__ import annotations

import contextlib
import copy
import json
import random
import re
import select
import signal
import socket
import struct
import threading
import time
import tracemalloc
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest

import opdistill.teachers.server as server_module
from opdistill.cli import app
from opdistill.cli.demo import asset_dir
from opdistill.config import ModelSpec
from opdistill.models import tiny_model
from opdistill.teachers.server import MAX_TOPK, ScoringServer

MAX_TOKENS = 40  # the test server's --max-tokens: small, so 413 is cheap to reach
GOOD = {  # every field of /score, two sequences of different lengths; ids 10 and 11 have two digits
    "sequences": [
        {"prompt_ids": [3, 4, 5], "completion_ids": [6, 7]},
        {"prompt_ids": [8], "completion_ids": [9, 10, 11]},
    ],
    "topk": 3,
    "at_ids": [[[1, 2], [3, 4]], [[5, 6], [7, 8], [9, 10]]],
    "entropy": True,
}
GOOD_BYTES = json.dumps(GOOD).encode()
DELETE = object()  # a mutation that leaves the field out

Case = tuple[str, bytes, int, str]  # name, the raw request, the status it must get, a word its reason holds


# --- talking to the server --------------------------------------------------------------------------------


def request(body: bytes, method: str = "POST", path: str = "/score", **headers: str | None) -> bytes:
    """One HTTP/1.1 request with a Content-Length for ``body``; a header given as None is left out."""
    fields: dict[str, str | None] = {"Host": "127.0.0.1", "Content-Length": str(len(body))}
    fields.update({name.replace("_", "-"): value for name, value in headers.items()})
    head = "".join(f"{name}: {value}\r\n" for name, value in fields.items() if value is not None)
    return f"{method} {path} HTTP/1.1\r\n{head}\r\n".encode("latin-1") + body


def read_all(sock: socket.socket) -> bytes:
    chunks = []
    # a server that closes with part of a request unread resets the connection after its answer (whose
    # Content-Length answer() checks)
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def exchange(port: int, data: bytes, done_sending: bool = False, timeout: float = 10.0) -> bytes:
    """Send ``data`` on a new connection (then half-close it if ``done_sending``) and read the answer to its
    end: the server closes after one."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        if done_sending:
            sock.shutdown(socket.SHUT_WR)
        return read_all(sock)


def answer(response: bytes, name: str = "") -> tuple[int, dict]:
    """Status and JSON body of a whole HTTP answer."""
    head, blank, body = response.partition(b"\r\n\r\n")
    assert blank and head.startswith(b"HTTP/1.0 "), f"{name}: not an HTTP answer: {response[:200]!r}"
    headers = head.decode("latin-1").lower().split("\r\n")
    assert "content-type: application/json" in headers, f"{name}: {headers}"
    assert f"content-length: {len(body)}" in headers, f"{name}: the body is cut short"
    return int(head.split()[1]), json.loads(body)


def reason(response: bytes, status: int, name: str) -> str:
    """The error sentence of an answer that must be a 4xx with ``status``."""
    got, payload = answer(response, name)
    assert got == status, f"{name}: {got} instead of {status}: {payload}"
    assert list(payload) == ["error"] and isinstance(payload["error"], str), f"{name}: {payload}"
    error = payload["error"]
    assert error.endswith(".") and "\n" not in error and 10 < len(error) < 300, f"{name}: {error!r}"
    return error


def reset(sock: socket.socket) -> None:
    """Close with a TCP reset, as a killed client does, instead of a clean FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


class Target:
    """A running server, the answer to GOOD it gave before any abuse, and the campaign's counts."""

    def __init__(self, server: ScoringServer, tally: Counter[str]):
        self.server, self.tally = server, tally
        self.port = server.httpd.server_address[1]
        self.baseline = self.score()

    def score(self, body: bytes = GOOD_BYTES) -> dict:
        status, payload = answer(exchange(self.port, request(body)), "the good request")
        assert status == 200, payload
        return payload

    def refuses(self, name: str, data: bytes, status: int, mentions: str = "") -> None:
        """``data`` gets ``status`` with a reason that holds ``mentions``; the good request after it, the
        numbers it got before any abuse."""
        self.tally["server_abuse_requests"] += 1
        error = reason(exchange(self.port, data), status, name)
        assert mentions in error, f"{name}: {error!r} does not mention {mentions!r}"
        self.survived(name)

    def survived(self, name: str) -> None:
        assert self.score() == self.baseline, f"after {name} the good request is answered differently"
        self.tally["server_faults_survived"] += 1


def settle(threads: int, deadline_s: float = 10.0) -> None:
    """Wait until handler threads have ended, back to ``threads`` threads."""
    end = time.monotonic() + deadline_s
    while threading.active_count() > threads and time.monotonic() < end:
        time.sleep(0.01)
    assert threading.active_count() <= threads, f"{threading.active_count() - threads} threads left running"


@pytest.fixture(scope="module")
def teacher_model(tokenizer):
    return tiny_model(ModelSpec(preset="d16l1"), tokenizer, seed=1).eval()


@pytest.fixture(scope="module")
def target(teacher_model, tokenizer, tally) -> Iterator[Target]:
    with ScoringServer(teacher_model, tokenizer, port=0, max_tokens=MAX_TOKENS) as server:
        yield Target(server, tally)


@pytest.fixture(autouse=True)
def nothing_on_stderr(capfd):
    """Whatever a test sends, no handler thread prints (a traceback is what an escaped exception leaves),
    and every handler thread ends."""
    threads = threading.active_count()
    yield
    settle(threads)
    assert capfd.readouterr().err == ""


# --- generated cases --------------------------------------------------------------------------------------


def mutated(path: tuple, value) -> dict:
    """GOOD with the field at ``path`` set to ``value`` (or left out: DELETE)."""
    body = copy.deepcopy(GOOD)
    *parents, last = path
    parent = body
    for key in parents:
        parent = parent[key]
    if value is DELETE:
        del parent[last]
    else:
        parent[last] = value
    return body


def field_cases(vocab_size: int) -> list[Case]:
    """Each field of GOOD with a wrong type or value, left out where it is required, and unknown fields; the
    reason must name the field."""
    not_a_list = [None, "3,4", 3, 3.5, True, {}, {"0": 3}]
    not_an_id = [3.0, "3", True, None, [3], {}, vocab_size, vocab_size + 1, -1, 10**30, -(10**30), 2**63]
    not_an_id += [1e300, float("nan"), float("inf")]
    seq, ats = GOOD["sequences"], GOOD["at_ids"]
    table: list[tuple[tuple, list, str]] = [
        (("sequences",), [None, "x", 3, 3.5, True, {}, [], seq[0], DELETE], "'sequences'"),
        (("sequences", 0), [None, "x", 3, True, [], [3, 4], [[3], [6]]], "sequences[0]"),
        (("sequences", 0, "prompt_ids"), [*not_a_list, [], DELETE], "sequences[0].prompt_ids"),
        (("sequences", 0, "prompt_ids", 1), not_an_id, "sequences[0].prompt_ids"),
        (("sequences", 1, "completion_ids"), [*not_a_list, DELETE], "sequences[1].completion_ids"),
        (("sequences", 1, "completion_ids", 2), not_an_id, "sequences[1].completion_ids"),
        (("topk",), ["3", 3.0, -1, MAX_TOPK + 1, 10**30, True, False, None, [3], {}, float("nan")], "'topk'"),
        (("at_ids",), ["x", 3, True, {}, [], ats[:1], [*ats, []]], "'at_ids'"),
        (("at_ids", 1), [None, "x", 3, {}, [], ats[1][:2], [*ats[1], [1, 2]]], "at_ids[1]"),
        (("at_ids", 1, 0), [None, "x", 3, {}, {"0": 5}], "at_ids[1]"),
        (("at_ids", 1, 0), [[], [5], [5, 6, 7]], "every at_ids row"),  # no ids, or rows of unequal width
        (("at_ids", 1, 0, 1), not_an_id, "at_ids[1]"),
        (("at_ids",), [[[[1] * (MAX_TOPK + 1)] * len(s["completion_ids"]) for s in seq]], "1 to 256"),
        (("entropy",), ["yes", "true", 1, 0, None, [], {}, 1.0], "'entropy'"),
        (("top_k",), [3], "unknown field 'top_k'"),  # a misspelt field is refused, not ignored
        (("Sequences",), [seq], "unknown field"),
        (("",), [None], "unknown field"),
        (("sequences", 1, "completion_ids "), [[9]], "unknown field 'completion_ids ' in sequences[1]"),
        (("sequences", 0, "weights"), [[1.0]], "unknown field 'weights' in sequences[0]"),
    ]
    cases = []
    for path, values, mentions in table:
        for value in values:
            name = f"{'.'.join(map(str, path))} = {'(left out)' if value is DELETE else repr(value)[:40]}"
            cases.append((name, request(json.dumps(mutated(path, value)).encode()), 400, mentions))
    return cases


def json_cases(seed: int = 0) -> list[Case]:
    """Bodies that are not a JSON object: cut short, random bytes, invalid UTF-8, other JSON values, nested
    past what the parser reads, followed by more."""
    rng = random.Random(seed)
    cuts = sorted({round(len(GOOD_BYTES) * i / 16) for i in range(16)})
    bodies = [(f"GOOD cut at byte {n}", GOOD_BYTES[:n], "JSON") for n in cuts]
    for i in range(12):
        junk = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200)))
        bodies.append((f"random bytes #{i}", junk, "JSON"))
    for junk in (b'{"sequences": "\xff"}', b'{"\xc3\x28": 1}', b"\xed\xa0\x80", b'{"topk": "\xf8\x88\x80"}'):
        bodies.append((f"invalid UTF-8 {junk[:12]!r}", junk, "JSON"))
    for value in (b"[]", b"[" + GOOD_BYTES + b"]", b"3", b"-1.5", b'"GOOD"', b"null", b"true", b"NaN"):
        bodies.append((f"the JSON value {value[:12]!r}", value, "must be a JSON object"))
    depth = 100_000
    bodies += [
        (f"[ nested {depth} deep", b"[" * depth, "nested too deeply"),
        ("[] nested 5000 deep", b"[" * 5000 + b"]" * 5000, "nested too deeply"),
        ("{} nested 5000 deep", b'{"a": ' * 5000 + b"1" + b"}" * 5000, "nested too deeply"),
        ("sequences nested 5000 deep", b'{"sequences": ' + b"[" * 5000 + b"]" * 5000 + b"}", "nested too"),
        ("[] nested 900 deep", b"[" * 900 + b"]" * 900, "must be a JSON object"),
        ("whitespace", b" \n\t ", "JSON"),
        ("GOOD then junk", GOOD_BYTES + b" x", "JSON"),
        ("GOOD twice", GOOD_BYTES * 2, "JSON"),
        ("a 5000-digit topk", b'{"topk": 1' + b"0" * 5000 + b"}", "JSON"),
        ("a 5000-digit id", GOOD_BYTES.replace(b"[3, 4, 5]", b"[3, 4" + b"5" * 5000 + b"]"), "JSON"),
    ]
    return [(name, request(body), 400, mentions) for name, body, mentions in bodies]


def size_cases() -> list[Case]:
    """More prompt + completion tokens than --max-tokens, in one sequence or many."""
    too_many = [
        [{"prompt_ids": [1] * (MAX_TOKENS + 1), "completion_ids": []}],
        [{"prompt_ids": [1] * 20, "completion_ids": [2] * 21}],
        [{"prompt_ids": [1], "completion_ids": []}] * (MAX_TOKENS + 1),
        [{"prompt_ids": [1] * 20, "completion_ids": [2]}] * 2,
        [{"prompt_ids": [1] * 10**4, "completion_ids": [2] * 10**4}],
    ]
    cases = []
    for seqs in too_many:
        tokens = sum(len(s["prompt_ids"]) + len(s["completion_ids"]) for s in seqs)
        cases.append(
            (
                f"{tokens} tokens",
                request(json.dumps({"sequences": seqs}).encode()),
                413,
                f"--max-tokens {MAX_TOKENS}",
            )
        )
    return cases


def http_cases() -> list[Case]:
    """Well-formed HTTP that /score must refuse: its Content-Length missing, malformed, doubled, huge or
    short of the body; other paths and methods; a path, header or headers too long."""
    cases: list[Case] = [
        ("no Content-Length", request(GOOD_BYTES, Content_Length=None), 411, "Content-Length"),
        (
            "a chunked body",
            request(b"2\r\n{}\r\n0\r\n\r\n", Content_Length=None, Transfer_Encoding="chunked"),
            411,
            "Content-Length",
        ),
        (
            "Content-Length twice",
            request(GOOD_BYTES).replace(
                b"\r\n\r\n", f"\r\nContent-Length: {len(GOOD_BYTES)}\r\n\r\n".encode(), 1
            ),
            400,
            "Content-Length",
        ),
        ("Content-Length 0", request(GOOD_BYTES, Content_Length="0"), 400, "JSON"),
        ("Content-Length short of the body", request(GOOD_BYTES, Content_Length="10"), 400, "JSON"),
    ]
    for value in ("abc", "-5", "+5", "1e3", "0x10", "", "5, 5", "3.0", "\xb2", "1_000"):
        cases.append((f"Content-Length {value!r}", request(GOOD_BYTES, Content_Length=value), 400, "Content"))
    for value in (10**9, 2**63, 10**30):  # refused from the header: the body is never sent
        cases.append((f"Content-Length {value}", request(b"", Content_Length=str(value)), 413, "byte"))
    for method, path in (("GET", "/score"), ("POST", "/info"), ("PUT", "/score"), ("DELETE", "/score")):
        cases.append((f"{method} {path}", request(GOOD_BYTES, method, path), 405, "only"))
    for method in ("PATCH", "OPTIONS", "TRACE", "FOO", "post", "CONNECT"):
        cases.append((f"{method} /score", request(GOOD_BYTES, method), 405, f"not {method}"))
    for method, path in (
        ("GET", "/"),
        ("GET", "/nope"),
        ("POST", "/nope"),
        ("POST", "/score/more"),
        ("POST", "/score?topk=3"),
        ("GET", "/info?x=1"),
        ("GET", "/../../etc/passwd"),
        ("GET", "/info/more"),
        ("GET", "/%00"),
        ("PUT", "/nope"),
        ("GET", "/" + "a" * 5000),
    ):
        cases.append((f"{method} {path[:20]}", request(GOOD_BYTES, method, path), 404, "GET /info or POST"))
    headers = b"".join(b"\r\nX-%d: 1" % i for i in range(120))
    many = request(GOOD_BYTES).replace(b"\r\n\r\n", headers + b"\r\n\r\n", 1)
    cases += [
        ("a 70000-byte path", request(GOOD_BYTES, "GET", "/" + "a" * 70_000), 414, "Too Long"),
        ("120 headers", many, 431, "headers"),
        ("a 70000-byte header", request(GOOD_BYTES, X_Big="a" * 70_000), 431, "Line too long"),
    ]
    return cases


def broken_http() -> list[tuple[str, bytes]]:
    """What is not an HTTP/1.x request: answered with a bare JSON error (HTTP/0.9's way) or not at all."""
    return [
        ("one word", b"GARBAGE\r\n\r\n"),
        ("a method alone", b"POST\r\n\r\n"),
        ("HTTP/2.0", b"POST /score HTTP/2.0\r\n\r\n"),
        ("FTP/1.0", b"POST /score FTP/1.0\r\n\r\n"),
        ("four words", b"POST /score HTTP/1.1 extra\r\n\r\n"),
        ("HTTP/1.x", b"POST /score HTTP/1.x\r\n\r\n"),
        ("a blank line", b"\r\n"),
        ("binary", bytes(range(256)) + b"\r\n\r\n"),
        ("a TLS hello", bytes.fromhex("16030100a5010000a10303") + b"\x00" * 40),
    ]


# --- the tests --------------------------------------------------------------------------------------------


def test_the_good_request_is_answered_in_full(target):
    """The reference every case is compared with: one list per completion token of each asked-for field."""
    sequences = target.baseline["sequences"]
    assert [len(s["token_logprobs"]) for s in sequences] == [2, 3]
    assert all(len(s["topk_ids"][0]) == 3 and len(s["at_logprobs"][0]) == 2 for s in sequences)
    assert all(
        set(s) == {"token_logprobs", "topk_ids", "topk_logprobs", "at_logprobs", "entropy"} for s in sequences
    )


def test_a_wrong_type_or_value_in_any_field_is_a_400_naming_the_field(target):
    cases = field_cases(target.server.vocab_size)
    assert len(cases) > 100
    for name, data, status, mentions in cases:
        target.refuses(name, data, status, mentions)


def test_a_body_that_is_not_a_json_object_is_a_400(target):
    for name, data, status, mentions in json_cases():
        target.refuses(name, data, status, mentions)


def test_too_many_tokens_is_a_413_and_empty_completions_are_empty_lists(target):
    for name, data, status, mentions in size_cases():
        target.refuses(name, data, status, mentions)
    # exactly --max-tokens is scored; an empty completion, asked for everything, is answered with empty lists
    at_limit = {"sequences": [{"prompt_ids": [1] * 30, "completion_ids": [2] * 10}]}
    assert len(target.score(json.dumps(at_limit).encode())["sequences"][0]["token_logprobs"]) == 10
    empty = {
        "sequences": [{"prompt_ids": [3], "completion_ids": []}],
        "topk": 3,
        "at_ids": [[]],
        "entropy": True,
    }
    keys = ("token_logprobs", "topk_ids", "topk_logprobs", "at_logprobs", "entropy")
    assert target.score(json.dumps(empty).encode()) == {"sequences": [dict.fromkeys(keys, [])]}
    both = copy.deepcopy(GOOD)  # and beside a sequence that has a completion, that one's numbers are as alone
    both["sequences"].insert(1, empty["sequences"][0])
    both["at_ids"].insert(1, [])
    got = target.score(json.dumps(both).encode())["sequences"]
    assert got[1] == dict.fromkeys(keys, []) and [got[0], got[2]] == target.baseline["sequences"]


def test_malformed_http_and_other_paths_and_methods_are_refused(target):
    for name, data, status, mentions in http_cases():
        target.refuses(name, data, status, mentions)
    target.tally["server_abuse_requests"] += 1  # HEAD: a 405 with no body
    head = exchange(target.port, request(b"", "HEAD", "/score"))
    assert head.startswith(b"HTTP/1.0 405 ") and head.endswith(b"\r\n\r\n"), head
    target.survived("HEAD /score")
    for name, data in broken_http():
        target.tally["server_abuse_requests"] += 1
        got = exchange(target.port, data, done_sending=True)
        assert got == b"" or list(json.loads(got)) == ["error"], f"{name}: {got[:200]!r}"
        target.survived(name)


def test_the_body_is_bounded_before_it_is_read(target):
    """A Content-Length over the cap gets its 413 while the client still holds the body back; a body of
    exactly the cap (GOOD padded with spaces) is read and scored."""
    with socket.create_connection(("127.0.0.1", target.port), timeout=10) as sock:
        sock.sendall(request(b"", Content_Length=str(10**12)))
        error = reason(read_all(sock), 413, "Content-Length 10**12")
    stated = re.search(r"accepts \((\d+) bytes\)", error)
    assert stated, error
    cap = int(stated[1])
    assert len(GOOD_BYTES) < cap < 1 << 20  # a little more than the largest request of 40 tokens
    target.refuses("a body one byte over the cap", request(b" " * (cap + 1)), 413, f"({cap} bytes)")
    assert target.score(GOOD_BYTES.ljust(cap)) == target.baseline


def test_clients_that_hang_up_mid_request_or_mid_answer(target):
    half = request(GOOD_BYTES)[: -len(GOOD_BYTES) // 2]

    def send(data: bytes, then: Callable[[socket.socket], None], read: int = 0) -> None:
        sock = socket.create_connection(("127.0.0.1", target.port), timeout=10)
        sock.sendall(data)
        if read:
            sock.recv(read)
        then(sock)

    hang_ups = [
        ("connect, then close", b"", socket.socket.close, 0),
        ("half a request line, then close", b"POST /sc", socket.socket.close, 0),
        ("half the headers, then reset", half[:30], reset, 0),
        ("half the body, then close", half, socket.socket.close, 0),
        ("half the body, then reset", half, reset, 0),
        ("the request, then reset before the answer", request(GOOD_BYTES), reset, 0),
        ("the request, then reset after 10 bytes of the answer", request(GOOD_BYTES), reset, 10),
        ("a refused request, then reset", request(b"[]"), reset, 0),
    ]
    for name, data, then, read in hang_ups:
        target.tally["server_abuse_requests"] += 1
        send(data, then, read)
        target.survived(name)
    with socket.create_connection(("127.0.0.1", target.port), timeout=10) as sock:
        sock.sendall(half)
        sock.shutdown(socket.SHUT_WR)  # the client is done sending but waits for the answer
        target.tally["server_abuse_requests"] += 1
        assert "the body ended after" in reason(read_all(sock), 400, "half the body, then EOF")
    target.survived("half the body, then EOF")


def test_32_clients_at_once_mixing_good_and_bad_requests(target):
    bad = field_cases(target.server.vocab_size) + json_cases()
    chosen = random.Random(1).sample(bad, 32 * 2)

    def client(i: int) -> int:
        survived = 0
        for name, data, status, mentions in chosen[2 * i : 2 * i + 2]:
            assert mentions in reason(exchange(target.port, data), status, name)
            assert target.score() == target.baseline, f"after {name}"
            survived += 1
        return survived

    with ThreadPoolExecutor(32) as pool:
        survived = sum(pool.map(client, range(32)))
    assert survived == len(chosen)
    target.tally["server_abuse_requests"] += len(chosen)
    target.tally["server_faults_survived"] += survived


def test_stalled_and_trickling_senders_do_not_hold_up_others(teacher_model, tokenizer, tally):
    """With a 1 s timeout: 8 clients that stop halfway through the body get a 408 after it, one that stops
    inside its headers is let go, and one that sends a byte every 5 ms is answered; meanwhile others are
    answered at once."""
    with ScoringServer(teacher_model, tokenizer, port=0, max_tokens=MAX_TOKENS, timeout_s=1.0) as server:
        target = Target(server, tally)
        start = time.monotonic()
        stalled = [socket.create_connection(("127.0.0.1", target.port), timeout=10) for _ in range(8)]
        for sock in stalled:
            sock.sendall(request(GOOD_BYTES)[: -len(GOOD_BYTES) // 2])
        in_headers = socket.create_connection(("127.0.0.1", target.port), timeout=10)
        in_headers.sendall(b"POST /score HTTP/1.1\r\nContent-Le")
        small = json.dumps({"sequences": [{"prompt_ids": [3], "completion_ids": [4, 5]}], "topk": 2}).encode()
        trickled: list[bytes] = []

        def trickle() -> None:
            with socket.create_connection(("127.0.0.1", target.port), timeout=10) as sock:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                for byte in request(small):
                    sock.send(bytes([byte]))
                    time.sleep(0.005)
                trickled.append(read_all(sock))

        slow = threading.Thread(target=trickle)
        slow.start()
        for _ in range(5):
            assert target.score() == target.baseline
        assert not select.select([*stalled, in_headers], [], [], 0)[0], "the stalled were answered first"
        assert slow.is_alive(), "the trickling client finished first"
        for sock in stalled:
            with sock:
                assert "stopped arriving for 1.0 s" in reason(read_all(sock), 408, "a stalled body")
        with in_headers:
            assert read_all(in_headers) == b""
        assert time.monotonic() - start >= 1.0
        slow.join()
        assert answer(trickled[0]) == (200, target.score(small))
        target.survived("stalled and trickling senders")
        tally["server_abuse_requests"] += len(stalled) + 2


def test_memory_stays_bounded(target):
    """A body the server refuses from its header is never held, however much of it the client pushes: the
    server's Python allocations peak far below the 16 MiB sent, and handler threads end."""
    chunk = memoryview(b" " * (1 << 16))
    tracemalloc.start()
    try:
        for _ in range(8):
            with socket.create_connection(("127.0.0.1", target.port), timeout=10) as sock:
                sock.sendall(request(b"", Content_Length=str(1 << 30)))
                try:
                    for _ in range(256):  # 16 MiB, until the server's close stops it
                        sock.sendall(chunk)
                except OSError:
                    pass
            target.tally["server_abuse_requests"] += 1
            target.survived("a 1 GiB body pushed anyway")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, f"{peak} bytes allocated at the peak"


def test_the_server_listens_on_loopback_and_bounds_requests_by_default(
    teacher_model, tokenizer, monkeypatch, capfd
):
    with ScoringServer(teacher_model, tokenizer, port=0) as server:
        assert server.httpd.server_address[0] == "127.0.0.1" and server.url.startswith("http://127.0.0.1:")
        error = reason(
            exchange(server.httpd.server_address[1], request(b"", Content_Length=str(10**9))), 413, ""
        )
        assert re.fullmatch(
            r"a 1000000000-byte body is larger than this server accepts \(\d+ bytes\)\.", error
        )
    # `opd serve-teacher` (stopped at once: its wait raises Ctrl-C) on loopback unless told, else a warning
    monkeypatch.setattr(server_module, "time", SimpleNamespace(sleep=stop, monotonic=time.monotonic))
    previous = signal.getsignal(signal.SIGTERM)
    try:
        teacher = ["serve-teacher", "--model", str(asset_dir("addition-teacher")), "--port", "0"]
        assert app.main(teacher) == 0
        out, err = capfd.readouterr()
        assert "at http://127.0.0.1:" in out and "warning" not in err
        assert app.main([*teacher, "--host", "0.0.0.0"]) == 0
        out, err = capfd.readouterr()
        assert "at http://0.0.0.0:" in out and "warning: listening beyond loopback" in err
    finally:
        signal.signal(signal.SIGTERM, previous)


def stop(_seconds: float) -> None:
    raise KeyboardInterrupt


# --- the long campaign ------------------------------------------------------------------------------------


def junk(rng: random.Random, depth: int = 0):
    """A random JSON value that no field of /score accepts in place of another: never an int or a bool."""
    kind = rng.randrange(5 if depth < 3 else 3)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([rng.uniform(-1e6, 1e6), float("nan"), float("-inf"), 0.0, 1e308])
    if kind == 2:
        return "".join(chr(rng.randrange(1, 0x3000)) for _ in range(rng.randrange(8)))
    if kind == 3:
        return [junk(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {junk(rng, 3) or "k": junk(rng, depth + 1) for _ in range(rng.randrange(3))}


def random_case(rng: random.Random, fixed: list[Case], vocab_size: int) -> Case:
    """A bad request: a fixed case, or GOOD with a random node replaced by junk or an id out of range, a
    required field dropped, a structural byte inserted, or a random cut."""
    kind = rng.randrange(5)
    if kind == 0:
        return rng.choice(fixed)
    if kind == 1:  # any node of GOOD but the at_ids list itself (null there means none), replaced by junk
        paths = [p for p in node_paths(GOOD) if p != ("at_ids",)]
        path = rng.choice(paths)
        return (
            f"{path} = junk",
            request(json.dumps(mutated(path, junk(rng)), allow_nan=True).encode()),
            400,
            "",
        )
    if kind == 2:
        path = rng.choice([p for p in node_paths(GOOD) if len(p) >= 3 and isinstance(p[-1], int)])
        value = rng.choice([vocab_size + rng.randrange(10**6), -1 - rng.randrange(10**6)])
        return f"{path} = {value}", request(json.dumps(mutated(path, value)).encode()), 400, ""
    if kind == 3:
        path = rng.choice(
            [("sequences",), ("sequences", 0, "prompt_ids"), ("sequences", 1, "completion_ids")]
        )
        return f"{path} left out", request(json.dumps(mutated(path, DELETE)).encode()), 400, ""
    at = rng.randrange(len(GOOD_BYTES))
    body = GOOD_BYTES[:at] + bytes([rng.choice(b'{}[],:"\x00\xff')]) + GOOD_BYTES[at:]
    return f"a byte inserted at {at}", request(rng.choice([body, GOOD_BYTES[:at]])), 400, ""


def node_paths(value, path: tuple = ()) -> Iterator[tuple]:
    """The path of every node under ``value``, below the root."""
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in items:
        yield (*path, key)
        yield from node_paths(child, (*path, key))


@pytest.mark.slow
def test_a_long_campaign_of_random_bad_requests_from_8_clients(target):
    fixed = field_cases(target.server.vocab_size) + json_cases() + size_cases() + http_cases()
    rng = random.Random(2024)
    cases = [random_case(rng, fixed, target.server.vocab_size) for _ in range(2000)]

    def client(part: list[Case]) -> int:
        for name, data, status, mentions in part:
            assert mentions in reason(exchange(target.port, data), status, name)
            assert target.score() == target.baseline, f"after {name}"
        return len(part)

    with ThreadPoolExecutor(8) as pool:
        survived = sum(pool.map(client, [cases[i::8] for i in range(8)]))
    assert survived == len(cases)
    target.tally["server_abuse_requests"] += len(cases)
    target.tally["server_faults_survived"] += survived
