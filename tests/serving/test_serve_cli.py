"""`modelcode serve` as a process: it loads the embedded model, answers, and on SIGTERM lets a running stream
finish before it exits cleanly."""

import json
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import requests
import transformers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_drains_a_running_stream_then_exits():
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "modelcode.cli", "serve", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 180  # a cold start on a busy 2-core machine
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, "the server did not come up"
            try:
                if requests.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(0.1)
        events, first = [], threading.Event()

        def stream():
            body = {"prompt": "Once upon a time", "max_tokens": 300, "ignore_eos": True, "temperature": 0,
                    "stream": True}
            with requests.post(f"{url}/v1/completions", json=body, stream=True, timeout=60) as r:
                for line in r.iter_lines():
                    if line:
                        events.append(line.decode())
                        first.set()

        reader = threading.Thread(target=stream)
        reader.start()
        assert first.wait(30)
        proc.send_signal(signal.SIGTERM)
        reader.join(60)
        assert proc.wait(60) == 0
    finally:
        proc.kill()
    assert events[-1] == "data: [DONE]"
    last = json.loads(events[-2].removeprefix("data: "))
    assert last["choices"][0]["finish_reason"] == "length"
    output = proc.stdout.read()
    assert "Waiting for connections to close" in output or "Shutting down" in output, output


@pytest.mark.parametrize("folder, message", [
    ("/no/such/folder", "checkpoint folder not found"),
    ("vit", "holds a ViT, not a causal language model: it is an image classifier, for modelcode classify"),
])
def test_a_model_that_does_not_load_is_one_line_and_status_2(folder, message, tmp_path):
    if folder == "vit":
        folder = tmp_path
        transformers.ViTConfig().save_pretrained(folder)  # the kind is known before any weight is read
    r = subprocess.run([sys.executable, "-m", "modelcode.cli", "serve", "--model", str(folder), "--port",
                        str(free_port())], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("modelcode serve: error: "), r.stderr
    assert message in r.stderr.strip().splitlines()[-1]
