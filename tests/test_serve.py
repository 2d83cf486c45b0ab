"""`gptlib serve` as a real process: uvicorn on a free port, answered over HTTP, compared with gptlib in process."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from gptlib import GPTModel, SamplingSettings, generate, load_model, save_checkpoint, train_bpe
from gptlib.instructions import format_prompt

from conftest import ROOT, tiny_config

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve")
    text = (ROOT / "dataset" / "sarcasm" / "sarcasm_instruction_pairs.jsonl").read_text(encoding="utf-8")[:20000]
    tokenizer = train_bpe([text], 400)
    torch.manual_seed(0)
    save_checkpoint(d / "model.pth", GPTModel(tiny_config(vocab_size=tokenizer.vocab_size, context_length=256),
                                              tokenizer))
    return d / "model.pth"


@pytest.fixture(scope="module")
def server(checkpoint):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "gptlib.cli", "serve", "--checkpoint", str(checkpoint),
                             "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    url = f"http://127.0.0.1:{port}"
    start = time.time()
    while True:  # wait until it answers; the time limit only guards against a hang
        assert proc.poll() is None, proc.communicate()[0]
        try:
            urllib.request.urlopen(url + "/health", timeout=1800)
            break
        except OSError:
            assert time.time() - start < 1800
            time.sleep(0.1)
    yield url
    proc.terminate()
    proc.communicate(timeout=1800)


@pytest.fixture(scope="module")
def model(checkpoint):
    return load_model(checkpoint)[0].eval()


def post(url, body, raw: bytes | None = None):
    """(status, decoded body or text) of a POST to /generate."""
    data = raw if raw is not None else json.dumps(body).encode()
    request = urllib.request.Request(url + "/generate", data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=1800) as response:
            text = response.read().decode()
            return response.status, json.loads(text) if "json" in response.headers["Content-Type"] else text
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read().decode())


def test_health_names_the_model_and_tokenizer(server, model):
    health = json.loads(urllib.request.urlopen(server + "/health", timeout=1800).read())
    assert health["status"] == "ok" and health["tokenizer"]["name"] == model.tokenizer.name
    assert health["tokenizer"]["vocab_size"] == model.tokenizer.vocab_size
    assert health["parameters"] == model.num_parameters()


def test_generate_equals_gptlib_in_process(server, model):
    tok = model.tokenizer
    status, body = post(server, {"prompt": "Sure, because", "max_new_tokens": 12})
    expected = generate(model, tok.encode("Sure, because"), 12)
    assert status == 200 and body["text"] == tok.decode(expected)
    assert body["completion_tokens"] == len(expected) and body["prompt_tokens"] == len(tok.encode("Sure, because"))

    status, body = post(server, {"instruction": "Explain the fridge.", "input": "It hums.", "max_new_tokens": 8,
                                 "temperature": 0.9, "top_k": 20, "seed": 3})
    ids = generate(model, tok.encode(format_prompt("Explain the fridge.", "It hums.")), 8,
                   SamplingSettings(0.9, top_k=20), seed=3)
    assert status == 200 and body["text"] == tok.decode(ids)


def test_streaming_sends_the_same_text_as_events(server):
    request = {"prompt": "Oh great,", "max_new_tokens": 15, "temperature": 0.8, "seed": 7}
    _, whole = post(server, request)
    status, events = post(server, {**request, "stream": True})
    payloads = [json.loads(line[len("data: "):]) for line in events.splitlines() if line.startswith("data: ")]
    assert status == 200 and payloads[-1]["done"] is True
    assert "".join(p["text"] for p in payloads[:-1]) == whole["text"]
    assert payloads[-1]["completion_tokens"] == whole["completion_tokens"]


def test_fifty_concurrent_requests_are_all_answered_correctly(server, model):
    tok = model.tokenizer
    prompts = [f"Request {i}: why is the printer {'slow' if i % 2 else 'jammed'}" + " again" * (i % 5)
               for i in range(50)]
    with ThreadPoolExecutor(50) as pool:
        results = list(pool.map(lambda p: post(server, {"prompt": p, "max_new_tokens": 10}), prompts))
    for prompt, (status, body) in zip(prompts, results):
        assert status == 200
        assert body["text"] == tok.decode(generate(model, tok.encode(prompt), 10)), prompt
    health = json.loads(urllib.request.urlopen(server + "/health", timeout=1800).read())
    assert health["largest_batch"] > 1  # requests that arrived together shared a batch


@pytest.mark.parametrize("body, raw, status, message", [
    (None, b"{not json", 422, "not valid JSON"),
    ({"prompt": "hi", "colour": "blue"}, None, 422, "colour: Extra inputs are not permitted"),
    ({"prompt": "hi", "temperature": -1}, None, 422, "temperature"),
    ({"prompt": "hi", "max_new_tokens": 0}, None, 422, "max_new_tokens"),
    ({"prompt": "hi", "max_new_tokens": 100000}, None, 422, "max_new_tokens"),
    ({"prompt": "hi", "top_p": 1.5}, None, 422, "top_p"),
    ({"prompt": "hi", "seed": -3}, None, 422, "seed"),
    ({"prompt": "hi", "instruction": "and this"}, None, 422, "exactly one of"),
    ({}, None, 422, "exactly one of"),
    ({"prompt": "   "}, None, 422, "empty"),
    ({"prompt": "hi", "input": "x"}, None, 422, "'input' goes with 'instruction'"),
    ({"prompt": "word " * 400}, None, 413, "reads at most 256"),
    ([1, 2, 3], None, 422, "request body"),
])
def test_bad_requests_get_a_4xx_with_a_message(server, body, raw, status, message):
    got, answer = post(server, body, raw)
    assert got == status and message in answer["error"], answer


def test_serve_refuses_a_bad_checkpoint_cleanly(tmp_path):
    (tmp_path / "broken.pth").write_bytes(b"not a checkpoint")
    done = subprocess.run([sys.executable, "-m", "gptlib.cli", "serve", "--checkpoint", str(tmp_path / "broken.pth"),
                           "--port", str(free_port())], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 2 and done.stderr.startswith("error:") and "Traceback" not in done.stderr
