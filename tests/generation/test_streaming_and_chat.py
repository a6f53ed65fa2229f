"""Streaming text, stop strings, and a chat that reuses its KV cache between turns."""

import subprocess
import sys
from pathlib import Path

import pytest
from cli_helpers import cli_error

import modelcode
from modelcode.cli.__main__ import main as cli
from modelcode.generation import IncrementalDetokenizer
from modelcode.generation.session import ChatSession, common_prefix
from modelcode.tokenization import load_tokenizer

TOKENIZERS = Path(__file__).parents[1] / "assets" / "tokenizers"


@pytest.fixture(scope="module")
def lm():
    return modelcode.load("tinystories-656k")


@pytest.mark.parametrize("name", ["qwen2-tokenizer", "llama2-tokenizer", "llama3-tokenizer"])
def test_streaming_never_splits_a_character(name):
    tok = load_tokenizer(TOKENIZERS / name)
    text = " Hello 🌍 世界! 👩‍👩‍👧 ünïcödé\n  code: x = {'a': 1}"
    prompt = tok.encode("Say:", bos=True)
    ids = tok.encode(text)
    detok = IncrementalDetokenizer(tok, prompt)
    deltas = [detok.add(i) for i in ids] + [detok.flush()]
    assert all("\ufffd" not in d for d in deltas)
    assert sum(1 for d in deltas if d) > 5  # it really streams
    assert "".join(deltas) == tok.decode(prompt + ids)[len(tok.decode(prompt)):]


def test_stream_equals_text_completion(lm):
    stream = lm.stream("Once upon a time", max_new_tokens=40)
    deltas = list(stream)
    done = lm.text_completion(["Once upon a time"], max_new_tokens=40)[0]
    assert "".join(deltas) == stream.text == done["generation"]
    assert stream.tokens == done["tokens"] and stream.finish_reason == "length"
    assert done["generation"].startswith(", a little girl named Lily")  # reference_outputs.json


def test_stop_string_ends_generation_and_never_leaks(lm):
    stream = lm.stream("Once upon a time", max_new_tokens=40, stop=["Lily"])
    deltas = list(stream)
    assert "".join(deltas) == ", a little girl named " and stream.finish_reason == "stop"
    assert all("L" not in d for d in deltas)
    done = lm.text_completion(["Once upon a time"], max_new_tokens=40, stop=["Lily"])[0]
    assert done["generation"] == ", a little girl named "
    assert lm.tokenizer.decode(done["tokens"]).endswith("Lily ")  # the token that completed it is kept


def test_stop_id_ends_generation(lm):
    tokens, _ = lm.generate([lm.tokenizer.encode("Once upon a time", bos=True)], max_new_tokens=300)
    assert 0 < len(tokens[0]) < 300 and lm.tokenizer.eos_id not in tokens[0]


@pytest.mark.parametrize("opening", ["Tell me a story about a cat.", "What is a dog?", "Who is Lily?"])
def test_chat_prefills_only_the_new_turn_and_equals_a_fresh_run(lm, opening):
    session = ChatSession(lm, max_new_tokens=60)
    first = "".join(session.send(opening))
    said = session.history  # the first prompt and the reply, as the model read and wrote them
    second = "".join(session.send("What happened next?"))
    full = lm.chat_format.encode_dialog_prompt(session.messages[:-1], add_generation_prompt=True)
    decode = lm.tokenizer.decode
    assert decode(session.prompt) == decode(full)  # the same conversation ...
    kept = common_prefix(session.prompt, said)  # ... in the model's own tokens, all but a spelled-out stop token
    assert len(said) - kept <= 4  # so only the new turn is prefilled
    assert session.prefilled == len(session.prompt) - min(kept, len(said) - 1)  # (the last token was never fed)
    assert first and second == "".join(lm.stream(session.prompt, max_new_tokens=60))  # as a fresh run


def test_chat_says_when_the_conversation_outgrows_the_context(lm):
    session = ChatSession(lm, max_new_tokens=4)
    with pytest.raises(ValueError, match="no longer fits the model's context of 512 tokens: /reset"):
        "".join(session.send("word " * 600))


def test_generate_command_streams_text(capsys):
    cli(["generate", "Once upon a time", "--max-new-tokens", "12"])
    out = capsys.readouterr()
    assert out.out.startswith("Once upon a time, a little girl named Lily")
    assert "tokens/s" in out.err


def test_generate_command_batch_and_bad_model(capsys, tmp_path):
    cli(["generate", "Tom and Lily", "The sun", "--max_new_tokens", "5", "--temperature", "0.7", "--seed", "3"])
    assert capsys.readouterr().out.count("\n\n") == 2
    cli_error(["generate", "hi", "--model", str(tmp_path / "missing")], capsys, "checkpoint folder not found")


def test_chat_command_session():
    script = "Tell me a story.\nAnd then?\n/reset\nHello\n/exit\n"
    run = subprocess.run([sys.executable, "-m", "modelcode.cli", "chat", "--max-new-tokens", "8"], input=script,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stderr.count("[prefilled") == 3 and "[new conversation]" in run.stderr
    assert run.stdout.count("> ") >= 4
