"""Our model beside transformers on the same checkpoint folder (`modelcode check`): the parity a user can
check on their own download. transformers reads the folder its own way (`from_pretrained`), so a wrong
weight map, config field or tokenizer rule on our side shows as a difference here.

Causal LMs: the largest logit difference over sample texts, greedy agreement over N new tokens, a batch
equal to each of its prompts alone, tokenizer ids and decoded text equal to transformers' tokenizer on
texts that trip tokenizers up (Chinese, emoji, code, leading spaces), the chat template's prompt with
exactly one BOS, and the stop ids. Encoders, image classifiers and translation models: the logits (or
hidden states) on a sample batch, and the tokenizer where the folder has one.
"""

from dataclasses import dataclass
from pathlib import Path

import torch

SAMPLE_TEXTS = [
    "Once upon a time, there was a little girl named Lily.",
    "   three leading spaces, and a\ttab",
    "中文的句子：你好，世界！",
    "emoji 🙂 👩‍👩‍👧 🌍!",
    "def f(x):\n    return {'a': x ** 2}  # code",
]
DIALOG = [{"role": "user", "content": "Hello! Who are you?"}]


@dataclass
class Check:
    name: str
    ok: bool | None  # None: does not apply to this checkpoint (the detail says why)
    detail: str


def run_checks(folder: str | Path, new_tokens: int = 16, atol: float = 1e-4) -> list[Check]:
    """Every check that applies to the checkpoint in `folder` (float32 on CPU, ours and transformers')."""
    import modelcode
    from modelcode.api import resolve_path
    from modelcode.loading.build import read_config
    from modelcode.quantization import read_quantized

    transformers = _transformers()
    ours = modelcode.load(folder, dtype=torch.float32)
    folder = resolve_path(folder)
    if read_quantized(folder):
        raise ValueError(f"{folder} was written by `modelcode quantize`, which transformers cannot read: check the "
                         "folder it was quantized from (`modelcode quantize` reports the quality of the quantization)")
    task = read_config(folder)[0].task
    if task == "causal-lm":
        hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        return causal_lm_checks(ours, hf, transformers, new_tokens, atol)
    auto = {"embedding": "AutoModel", "image-classification": "AutoModelForImageClassification",
            "translation": "AutoModelForSeq2SeqLM"}[task]
    hf = getattr(transformers, auto).from_pretrained(folder, dtype=torch.float32).eval()
    checks = [_logits_check(*_task_outputs(task, ours, hf), atol, "sample batch")]
    if task == "embedding" and (folder / "tokenizer.json").exists():
        checks.append(tokenizer_check(ours.tokenizer, hf_tokenizer(folder, transformers)))
    return checks


def _transformers():
    try:
        import transformers
    except ImportError as e:
        raise ImportError("modelcode check compares with transformers, which is not installed here: "
                          "pip install transformers") from e
    return transformers


@torch.inference_mode()
def causal_lm_checks(lm, hf, transformers, new_tokens: int, atol: float) -> list[Check]:
    tok = lm.tokenizer
    vocab = lm.config.vocab_size
    if tok is not None and all(i < vocab for t in SAMPLE_TEXTS for i in tok.encode(t, bos=tok.add_bos)):
        prompts, source = [tok.encode(t, bos=tok.add_bos) for t in SAMPLE_TEXTS], f"{len(SAMPLE_TEXTS)} sample texts"
    else:  # no tokenizer, or one larger than a tiny random model's vocabulary
        g = torch.Generator().manual_seed(0)
        prompts = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (12, 7, 3, 9)]
        source = f"{len(prompts)} random prompts"
    diffs = [(lm.model(torch.tensor([p])) - hf(torch.tensor([p])).logits).abs().max().item() for p in prompts]
    checks = [Check("logits, max |ours - transformers|", max(diffs) <= atol,
                    f"{max(diffs):.1e} over {source} (limit {atol:.0e})")]
    ours = lm.generate(prompts[:1], new_tokens, temperature=0.0, stop_ids=frozenset())[0][0]
    theirs = hf_greedy(hf, prompts[0], new_tokens)
    agree = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), new_tokens)
    checks.append(Check(f"greedy, {new_tokens} new tokens", agree == new_tokens,
                        f"{agree}/{new_tokens} tokens equal transformers' (no stop id)"))
    batch = lm.generate(prompts, new_tokens, temperature=0.0, stop_ids=frozenset())[0]
    alone = [lm.generate([p], new_tokens, temperature=0.0, stop_ids=frozenset())[0][0] for p in prompts]
    same = sum(b == a for b, a in zip(batch, alone))
    checks.append(Check("batched = unbatched", same == len(prompts),
                        f"{same}/{len(prompts)} prompts of unequal lengths decode as when alone"))
    if tok is None:
        reason = "no tokenizer files in the folder"
        return checks + [Check(name, None, reason) for name in ("tokenizer ids", "chat prompt, one BOS", "stop ids")]
    hf_tok = hf_tokenizer(lm.path, transformers)
    return checks + [tokenizer_check(tok, hf_tok), chat_check(lm, hf_tok), stop_check(lm, hf, hf_tok)]


def hf_greedy(hf, prompt: list[int], new_tokens: int) -> list[int]:
    """transformers' model decoding greedily, each step a full pass over the whole sequence (the plainest
    reference, the same in every transformers version), stop ids left out as on our side."""
    ids = list(prompt)
    for _ in range(new_tokens):
        ids.append(hf(torch.tensor([ids])).logits[0, -1].argmax().item())
    return ids[len(prompt):]


def hf_tokenizer(folder: Path, transformers):
    """transformers' tokenizer of the folder: over its tokenizer.json as written where it has one (transformers
    5's AutoTokenizer rebuilds some pipelines, e.g. LlamaTokenizer's, rather than reading the file)."""
    if (folder / "tokenizer.json").exists():
        return transformers.PreTrainedTokenizerFast.from_pretrained(folder)
    return transformers.AutoTokenizer.from_pretrained(folder)


def tokenizer_check(tok, hf_tok) -> Check:
    """Ids (with the special tokens each side adds) and decoded text equal transformers' on every sample."""
    wrong = []
    for text in SAMPLE_TEXTS:
        ids = tok.encode(text, bos=tok.add_bos, eos=tok.add_eos)
        if ids != hf_tok(text).input_ids or tok.decode(ids) != hf_tok.decode(ids):
            wrong.append(text)
    return Check("tokenizer ids and text", not wrong, f"{len(SAMPLE_TEXTS) - len(wrong)}/{len(SAMPLE_TEXTS)} "
                 "texts (Chinese, emoji, code, leading spaces)" + (f"; differs on {wrong[0]!r}" if wrong else ""))


def chat_check(lm, hf_tok) -> Check:
    """Our chat prompt starts with exactly one BOS where the tokenizer wants one, and equals the
    checkpoint's template as transformers renders it (its BOS put in front when the template writes none)."""
    tok = lm.tokenizer
    ids = lm.chat_format.encode_dialog_prompt(DIALOG, add_generation_prompt=True)
    wanted = 1 if tok.add_bos and tok.bos_id is not None else 0
    bos = ids.count(tok.bos_id) if tok.bos_id is not None else 0
    detail = f"{bos} BOS (wanted {wanted})"
    ok = bos == wanted and (not wanted or ids[0] == tok.bos_id)
    if getattr(hf_tok, "chat_template", None):
        text = hf_tok.apply_chat_template(DIALOG, tokenize=False, add_generation_prompt=True)
        theirs = hf_tok(text, add_special_tokens=False).input_ids
        theirs = [tok.bos_id] + theirs if wanted and theirs[:1] != [tok.bos_id] else theirs
        ok = ok and ids == theirs
        detail += ", prompt " + ("equals" if ids == theirs else "differs from") + " transformers' template"
    else:
        detail += f", no chat template: {type(lm.chat_format).__name__}"
    return Check("chat prompt, one BOS", ok, detail)


def stop_check(lm, hf, hf_tok) -> Check:
    """Every id transformers stops at (generation_config and tokenizer EOS) ends our generation too."""
    eos = hf.generation_config.eos_token_id
    theirs = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    theirs |= {hf_tok.eos_token_id} - {None}
    ours = set(lm.stop_ids)
    return Check("stop ids", theirs <= ours, f"ours {sorted(ours)}, transformers' {sorted(theirs)}")


def _task_outputs(task: str, ours, hf) -> tuple[torch.Tensor, torch.Tensor]:
    """(ours, transformers') outputs of a model that is not a causal LM, on a sample batch."""
    g = torch.Generator().manual_seed(0)
    c = hf.config
    with torch.inference_mode():
        if task == "image-classification":
            pixels = torch.randn(2, c.num_channels, c.image_size, c.image_size, generator=g)
            return ours.model(pixels), hf(pixels).logits
        if task == "embedding":
            ids = torch.randint(0, c.vocab_size, (2, 9), generator=g)
            mask, types = torch.ones_like(ids), torch.zeros_like(ids)
            return ours.model(ids, mask, types), hf(ids, attention_mask=mask, token_type_ids=types).last_hidden_state
        src = torch.randint(0, c.vocab_size - 1, (2, 9), generator=g)
        tgt = torch.randint(0, c.decoder_vocab_size - 1, (2, 7), generator=g)
        tgt[:, 0] = c.decoder_start_token_id
        mask = torch.ones_like(src)
        return ours.model(src, tgt, mask), hf(input_ids=src, attention_mask=mask, decoder_input_ids=tgt).logits


def _logits_check(ours: torch.Tensor, theirs: torch.Tensor, atol: float, source: str) -> Check:
    diff = (ours - theirs).abs().max().item()
    return Check("outputs, max |ours - transformers|", diff <= atol, f"{diff:.1e} over a {source} (limit {atol:.0e})")


def table(checks: list[Check]) -> str:
    """The verdict table: one row per check, then the verdict."""
    rows = [("check", "result", "detail")] + [(c.name, {True: "ok", False: "FAIL", None: "n/a"}[c.ok], c.detail)
                                               for c in checks]
    widths = [max(len(r[i]) for r in rows) for i in range(2)]
    lines = [f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]}" for r in rows]
    failed = [c.name for c in checks if c.ok is False]
    return "\n".join(lines + ["verdict: " + (f"FAIL ({', '.join(failed)})" if failed else "all checks hold")])
