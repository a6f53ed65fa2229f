"""A tiny random Marian (opus-mt layout) checkpoint folder, built offline: two sentencepiece models
trained here on a few sentences, a joint vocab.json whose ids differ from the sentencepiece ids, and
a random `MarianMTModel` saved with save_pretrained."""

import io
import json
import random
from contextlib import contextmanager
from pathlib import Path

import sentencepiece as spm
import torch
import transformers

EN = """the quick brown fox jumps over the lazy dog
a small frog sat on a green leaf near the pond
tom asked his teacher for advice about the test
studies have shown that owning a dog is good for you
the weather today is sunny with a light breeze
where is the bus stop and when does the next bus leave
i would like a cup of coffee with milk please
my sister reads a book every evening before bed
the children played football in the park all afternoon
we are going to visit our grandparents next weekend""".splitlines()

DE = """der schnelle braune fuchs springt über den faulen hund
ein kleiner frosch saß auf einem grünen blatt am teich
tom bat seinen lehrer um rat für den test
studien haben gezeigt dass ein hund gut für dich ist
das wetter ist heute sonnig mit einer leichten brise
wo ist die bushaltestelle und wann fährt der nächste bus
ich hätte gerne eine tasse kaffee mit milch bitte
meine schwester liest jeden abend vor dem schlafen ein buch
die kinder spielten den ganzen nachmittag fußball im park
wir besuchen nächstes wochenende unsere großeltern""".splitlines()

# Variants of config.json: the opus-mt default, separate vocabularies, an untied output layer, and
# the 2017 paper's ReLU without embedding scaling.
VARIANTS = {
    "opus-mt": {},
    "separate-vocabs": dict(share_encoder_decoder_embeddings=False),
    "untied": dict(tie_word_embeddings=False),
    "relu-unscaled": dict(activation_function="relu", scale_embedding=False),
}


def train_spm(lines: list[str], vocab_size: int) -> bytes:
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines * 3), model_writer=model, vocab_size=vocab_size,
                                   model_type="unigram", unk_id=1, eos_id=0, bos_id=-1, pad_id=-1, minloglevel=2)
    return model.getvalue()


def write_tokenizer(folder: Path, separate: bool = False) -> tuple[int, int]:
    """source.spm, target.spm, vocab.json (+ target_vocab.json): (source vocab size, target vocab size)."""
    folder.mkdir(parents=True, exist_ok=True)
    models = {"source.spm": train_spm(EN, 90), "target.spm": train_spm(DE, 90)}
    pieces = {}
    for name, proto in models.items():
        (folder / name).write_bytes(proto)
        sp = spm.SentencePieceProcessor(model_proto=proto)
        pieces[name] = [sp.id_to_piece(i) for i in range(sp.vocab_size()) if not (sp.is_control(i) or sp.is_unknown(i))]

    def vocab(words):  # Marian's order: EOS, UNK, the pieces in its own (here: shuffled) order, PAD last;
        # a language tag as multilingual models have.
        words = sorted(set(words))
        random.Random(0).shuffle(words)
        return {w: i for i, w in enumerate(["</s>", "<unk>", ">>deu<<", *words, "<pad>"])}

    if separate:
        source, target = vocab(pieces["source.spm"]), vocab(pieces["target.spm"])
        (folder / "target_vocab.json").write_text(json.dumps(target, ensure_ascii=False))
    else:
        source = target = vocab(pieces["source.spm"] + pieces["target.spm"])
    (folder / "vocab.json").write_text(json.dumps(source, ensure_ascii=False))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "source_lang": "en", "target_lang": "de", "unk_token": "<unk>", "eos_token": "</s>", "pad_token": "<pad>",
        "model_max_length": 512, "separate_vocabs": separate, "tokenizer_class": "MarianTokenizer"}))
    return len(source), len(target)


def hf_tokenizer(folder: Path) -> transformers.MarianTokenizer:
    return transformers.MarianTokenizer.from_pretrained(folder)


def train(model: transformers.MarianMTModel, tokenizer, steps: int) -> None:
    """A few Adam steps on the ten sentence pairs. A random post-LN decoder with tied embeddings tends
    to repeat one token forever; a briefly trained one writes varied text of varied length (EOS where
    the sentences end), which is what greedy and beam search must be checked on."""
    batch = tokenizer(EN, text_target=DE, return_tensors="pt", padding=True)
    labels = batch["labels"].masked_fill(batch["labels"] == model.config.pad_token_id, -100)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


@contextmanager
def one_thread():
    """Tiny models run fastest on one thread, the more so on a machine shared with other jobs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def marian_folder(folder: Path, variant: str = "opus-mt", seed: int = 0,
                  train_steps: int = 0) -> transformers.MarianMTModel:
    """Write a complete Marian checkpoint folder; return the transformers model it holds."""
    overrides = VARIANTS[variant]
    separate = not overrides.get("share_encoder_decoder_embeddings", True)
    n_source, n_target = write_tokenizer(folder, separate)
    # The target vocabulary's PAD (last) is the decoder start; with shared vocabularies it is the source's too.
    pad = n_target - 1
    config = transformers.MarianConfig(**{
        **dict(vocab_size=n_source, decoder_vocab_size=n_target, d_model=64, encoder_layers=2, decoder_layers=2,
               encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=96,
               max_position_embeddings=48, pad_token_id=pad, decoder_start_token_id=pad, eos_token_id=0,
               forced_eos_token_id=0, activation_function="swish", scale_embedding=True, dropout=0.0),
        **overrides})
    torch.manual_seed(seed)
    model = transformers.MarianMTModel(config).eval()
    with torch.no_grad():  # every weight drawn, biases, norms and final_logits_bias too
        for name, p in [*model.named_parameters(), ("final_logits_bias", model.final_logits_bias)]:
            if "embed_positions" in name:  # the fixed sinusoids (not saved)
                continue
            if name.endswith("layer_norm.weight"):
                p.normal_(1.0, 0.2)
            else:
                p.normal_(0, 0.2 if p.dim() == 1 else 0.15)
    if train_steps:
        with one_thread():
            train(model, hf_tokenizer(folder), train_steps)
    g = model.generation_config
    g.bad_words_ids, g.forced_eos_token_id, g.num_beams, g.max_length = [[pad]], 0, 4, 48
    g.decoder_start_token_id, g.pad_token_id, g.eos_token_id = pad, pad, 0
    model.save_pretrained(folder)
    return model
