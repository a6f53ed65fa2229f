"""What a new user meets: every bad input gets one line that says what was wrong and what to do (exit
status 2, no traceback), on the command line and in the Python API."""

import importlib
import json
import re

import pytest
import torch
import transformers
from cli_helpers import cli_error
from hf_reference import save_bin, tiny_hf_model

import modelcode
from modelcode.cli.__main__ import main as cli


@pytest.fixture(scope="module")
def lm():
    return modelcode.load("tinystories-656k")


def test_unknown_command_version_and_list(capsys):
    cli_error(["foo"], capsys, r"^modelcode: error: unknown command 'foo': use one of generate, chat, .*list")
    cli(["--version"])
    assert capsys.readouterr().out == f"modelcode {modelcode.__version__}\n"
    cli(["list"])
    out = capsys.readouterr().out
    assert "tinystories-656k" in out and "llama-3-8b" in out and "gpt_neox" in out and "marian" in out


def test_bad_flags_get_one_line(capsys):
    cli_error(["generate", "--bogus"], capsys, r"unrecognized arguments: --bogus \(see modelcode generate --help\)")
    cli_error(["generate", "--top-p", "2"], capsys, r"^modelcode generate: error: --top-p must be more than 0")
    cli_error(["generate", "--temperature", "-1"], capsys, "--temperature must be 0 .greedy. or more")
    cli_error(["generate", "--max-new-tokens", "-5"], capsys, "--max-new-tokens must be a whole number, 0 or more")
    cli_error(["generate", "--max-new-tokens", "lots"], capsys, "invalid int value: 'lots'")
    cli_error(["bench", "--batch-sizes", "0", "--no-hf"], capsys, "--batch-sizes must each be 1 or more, got 0")


def test_max_new_tokens_zero_generates_nothing(lm, capsys):
    cli(["generate", "Once upon a time", "--max-new-tokens", "0"])
    out = capsys.readouterr()
    assert out.out == "Once upon a time\n" and out.err.startswith("[0 tokens")
    assert lm.text_completion(["Once upon a time"], max_new_tokens=0)[0]["tokens"] == []


def test_stop_takes_one_string_and_leaves_the_prompts(capsys):
    cli(["generate", "--stop", ".", "Lily", "Tom", "--max-new-tokens", "40"])
    stories = capsys.readouterr().out.strip().split("\n\n")
    assert [s.split()[0] for s in stories] == ["Lily", "Tom"] and not any("." in s for s in stories)


def test_stories_end_without_the_spelled_out_end_token(lm):
    (story,) = lm.text_completion(["Once upon a time"])
    assert story["generation"].endswith(".") and "<|" not in story["generation"]
    streamed = lm.stream("Once upon a time")
    assert "".join(streamed) == story["generation"]


def test_python_api_type_slips(lm):
    with pytest.raises(TypeError, match=r"list of prompt strings, e.g. \['Once upon a time'\]"):
        lm.text_completion("Once upon a time")
    with pytest.raises(TypeError, match="one list per prompt"):
        lm.generate([1, 2, 3])
    with pytest.raises(ValueError, match="max_new_tokens must be a whole number, 0 or more, got -1"):
        lm.generate([[1, 2]], max_new_tokens=-1)
    with pytest.raises(TypeError, match="stop takes a list of strings"):
        lm.text_completion(["Once"], stop=".")
    with pytest.raises(ValueError, match=r"prompt 0 has token id 5000, outside this model's vocabulary \(0 to 2047\)"):
        lm.generate([[1, 5000]])


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("command", ["generate", "info", "quantize", "bench", "chat"])
def test_device_this_machine_lacks(command, capsys, tmp_path):
    extra = {"quantize": ["tinystories-656k", "--mode", "int8", "--out", str(tmp_path / "q")]}.get(command, [])
    cli_error([command, *extra, "--device", "cuda"], capsys, "--device is cuda, but this machine .* has no CUDA "
              "device: use cpu")
    with pytest.raises(ValueError, match="device is cuda:1, but"):
        modelcode.load(device="cuda:1")


def test_hub_id_and_empty_folder(capsys, tmp_path):
    cli_error(["generate", "--model", "meta-llama/Llama-3.2-1B"], capsys, "modelcode never downloads: fetch it first "
              r"\(`hf download meta-llama/Llama-3.2-1B --local-dir Llama-3.2-1B`\)")
    (tmp_path / "notes.txt").write_text("x")
    cli_error(["info", str(tmp_path)], capsys, r"no config.json .* \(it holds: notes.txt\): give the folder the "
              "checkpoint was downloaded to")


@pytest.mark.parametrize("config_class, command, message", [
    ("ViTConfig", "generate", "holds a ViT, not a causal language model: it is an image classifier, for modelcode "
                              "classify"),
    ("MarianConfig", "generate", "holds a Transformer, not a causal language model: it is a translation model"),
    ("BertConfig", "chat", "holds a Bert, not a causal language model: it is a text encoder, for modelcode embed"),
    ("LlamaConfig", "translate", "holds a Llama, not a translation model: it is a causal language model"),
])
def test_wrong_kind_of_model(config_class, command, message, capsys, tmp_path):
    getattr(transformers, config_class)().save_pretrained(tmp_path)  # the kind is known before any weight is read
    cli_error([command, *(["x"] if command == "translate" else []), "--model", str(tmp_path)], capsys, message)


def test_broken_files(capsys, tmp_path):
    folder = save_bin(tiny_hf_model("llama3-gqa"), tmp_path / "bin")
    data = (folder / "pytorch_model.bin").read_bytes()
    (folder / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
    cli_error(["info", str(folder)], capsys, r"cannot read .*pytorch_model\.bin: .*fetch the file again")
    (folder / "config.json").write_text('{"model_type": "llama", ')
    cli_error(["info", str(folder)], capsys, r"config\.json is not valid JSON .*: fetch the file again")
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    cli_error(["info", str(folder)], capsys, r"config\.json has no '\w+', which a Llama needs: fetch the file again")


def test_quantized_folders(capsys, tmp_path):
    cli(["quantize", "tinystories-656k", "--mode", "int4", "--out", str(tmp_path / "q4"), "--no-report"])
    cli_error(["quantize", str(tmp_path / "q4"), "--mode", "int8", "--out", str(tmp_path / "again")], capsys,
              r"already quantized \(int4, group size 32\): .*quantize the original checkpoint instead")
    assert not (tmp_path / "again").exists()
    cli(["info", str(tmp_path / "q4")])
    assert "Llama: 656,000 parameters, quantized int4, group size 32," in capsys.readouterr().out


def test_chat_template_that_refuses_the_conversation(capsys, tmp_path, monkeypatch):
    folder = tmp_path / "chat"
    folder.mkdir()
    for f in modelcode.api.EMBEDDED["tinystories-656k"].iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    (folder / "chat_template.jinja").write_text(
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('Conversation roles must "
        "alternate user/assistant/user/assistant/...') }}{% endif %}{{ m['content'] }}{% endfor %}")
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO("Hello\n"))
    cli_error(["chat", "--model", str(folder), "--system", "Be brief."], capsys,
              r"chat template rejects this conversation \(roles \['system', 'user'\]\): Conversation roles must")


def test_interrupted_command_says_so(capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(modelcode, "load", interrupted)
    with pytest.raises(SystemExit) as e:
        cli(["info"])
    assert e.value.code == 130 and capsys.readouterr().err.strip() == "modelcode info: interrupted"


def test_interrupted_quantize_leaves_nothing_half_written(capsys, tmp_path, monkeypatch):
    module = importlib.import_module("modelcode.quantization.quantize")  # the package's `quantize` is a function

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(module, "save_file", interrupted)
    with pytest.raises(SystemExit) as e:
        cli(["quantize", "tinystories-656k", "--mode", "int8", "--out", str(tmp_path / "q"), "--no-report"])
    assert e.value.code == 130 and capsys.readouterr().err.strip().endswith("modelcode quantize: interrupted")
    assert list(tmp_path.iterdir()) == []  # neither the folder nor its partial copy
    monkeypatch.undo()
    cli(["quantize", "tinystories-656k", "--mode", "int8", "--out", str(tmp_path / "q"), "--no-report"])
    assert modelcode.load(tmp_path / "q").text_completion(["Once"], max_new_tokens=3)[0]["tokens"]


def test_chat_compile_compiles_before_the_first_turn_with_the_turns_sampling(capsys, monkeypatch):
    from modelcode.generation import session

    compiled, sessions = [], []
    monkeypatch.setattr(modelcode.lm.LM, "compile", lambda self, *a, **k: compiled.append(self) or self)

    class Recorded(session.ChatSession):  # each graph is compiled per sampling setting: the warm-up must share it
        def __init__(self, lm, system=None, **settings):
            sessions.append(settings)
            super().__init__(lm, system, **settings)

    monkeypatch.setattr(session, "ChatSession", Recorded)
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO("Hello\n"))
    cli(["chat", "--compile", "--max-new-tokens", "3", "--temperature", "0.7", "--top-k", "5", "--seed", "1"])
    err = capsys.readouterr().err
    assert len(compiled) == 1
    assert re.search(r"^\[--compile: compiling the decode step .* done in \d+ s; it pays off on long outputs\]\n"
                     r"Chatting with ", err, re.M), err
    warm_up, turns = sessions
    assert warm_up["max_new_tokens"] == 2 and turns["max_new_tokens"] == 3
    assert {k: v for k, v in warm_up.items() if k != "max_new_tokens"} == \
        {k: v for k, v in turns.items() if k != "max_new_tokens"} == dict(temperature=0.7, top_k=5, top_p=None, seed=1)
