"""`modelcode finetune`: LoRA or full supervised fine-tuning on a JSON/JSONL file."""

from typing import Literal


def main(*, data: str, out: str, model: str = "tinystories-656k", method: Literal["lora", "full"] = "lora",
         epochs: int = 1, max_steps: int | None = None, batch_size: int = 4, grad_accum: int = 1,
         lr: float | None = None, warmup_steps: int = 10, weight_decay: float = 0.0, clip: float = 1.0,
         max_len: int | None = None, too_long: Literal["truncate", "skip"] = "truncate", pack: bool = False,
         val_fraction: float = 0.05, eval_every: int = 50, save_every: int | None = None,
         lora_r: int = 8, lora_alpha: float = 16.0, lora_dropout: float = 0.05, lora_targets: list[str] | None = None,
         quantize: Literal["int8", "int4"] | None = None, bf16: bool = False, checkpoint_activations: bool = False,
         seed: int = 0, dtype: str | None = None, device: str = "cpu", resume: bool = False,
         sample: str | None = None, max_new_tokens: int = 64) -> None:
    """Fine-tune a model (LoRA or full) and write it as a Hugging Face folder.

    Data: instruction records {"instruction", "input" (optional), "output"} (Alpaca's prompt template) or chat
    records {"messages": [{"role", "content"}, ...]} (the checkpoint's chat format), as a JSON list or JSONL.
    The loss is on the responses only. OUT receives the fine-tuned model (LoRA: merged) in the checkpoint's
    layout, which modelcode and transformers load, plus log.jsonl, loss.png, training/state.pt (for --resume)
    and, for LoRA, adapter/ in peft's format.

    Args:
        data: the JSON or JSONL file of records.
        out: the output folder (new, or the folder of a run to --resume).
        model: checkpoint folder, or an embedded model's name.
        method: lora (adapters on frozen weights) or full (every weight trains).
        epochs: passes over the training examples (unless --max-steps says when to stop).
        max_steps: optimizer steps to take.
        batch_size: examples (or packed rows) per micro-batch.
        grad_accum: micro-batches per optimizer step.
        lr: peak learning rate (default: 3e-4 for LoRA, 2e-5 for full fine-tuning).
        warmup_steps: steps of linear warmup before the cosine decay (to a tenth of the peak).
        weight_decay: AdamW's decoupled weight decay.
        clip: maximum gradient norm.
        max_len: tokens per example (default: the model's context, at most 1024).
        too_long: what to do with longer examples: cut them to --max-len, or skip them (counted either way).
        pack: concatenate short examples into rows of --max-len tokens (they do not attend to each other).
        val_fraction: share of the records held out for validation loss and perplexity.
        eval_every: optimizer steps between validations (there is always one at the end).
        save_every: optimizer steps between training-state checkpoints (there is always one at the end).
        lora_r: LoRA rank.
        lora_alpha: LoRA scale numerator (the update is scaled by alpha / r).
        lora_dropout: dropout on the adapters' input.
        lora_targets: layers to adapt, by the checkpoint's or modelcode's names (q_proj v_proj, or wq wv), or
            all (every projection and the MLP); default q_proj v_proj.
        quantize: LoRA over an int8 or int4 quantized base (QLoRA); the base loads in bfloat16.
        bf16: bfloat16 autocast of the forward pass.
        checkpoint_activations: recompute each block's activations in the backward pass (less memory).
        seed: the seed of the data order, the split, the adapters' initialisation and dropout.
        dtype: the weights' dtype while training (default float32; bfloat16 with --quantize).
        device: cpu, cuda, ...
        resume: continue the run saved in OUT/training/state.pt, with the same settings.
        sample: a request to answer greedily before and after training, asked as the data asks (a user message
            for chat records, an instruction through Alpaca's template for instruction records).
        max_new_tokens: length of the sample's answers.
    """
    import modelcode
    from modelcode.training.data import read_records
    from modelcode.training.finetune import FinetuneConfig, finetune
    from modelcode.training.loop import TrainConfig
    from modelcode.training.lora import LoRAConfig

    lora = LoRAConfig(lora_r, lora_alpha, lora_dropout, tuple(lora_targets or LoRAConfig.targets))
    train = TrainConfig(epochs, max_steps, batch_size, grad_accum, lr or (3e-4 if method == "lora" else 2e-5),
                        warmup_steps=warmup_steps, weight_decay=weight_decay, clip=clip, eval_every=eval_every,
                        save_every=save_every, seed=seed, autocast=bf16, checkpoint_activations=checkpoint_activations)
    cfg = FinetuneConfig(method, lora, train, quantize, max_len, too_long, pack, val_fraction, dtype, device)
    as_chat = sample is not None and "messages" in read_records(data)[0]  # ask the way the data does
    if sample:
        print(f"before: {_answer(modelcode.load(model, device=device), sample, as_chat, max_new_tokens)!r}")
    result = finetune(model, data, out, cfg, resume)
    d = result.data
    n_train, n_all = result.trained
    print(f"{len(d.train)} training and {len(d.val)} validation examples; {d.truncated} cut to the context, "
          f"{d.skipped} skipped; {n_train:,} of {n_all:,} parameters trained")
    last = result.log[-1]
    print(f"{last['step']} steps, last train loss {last['loss']:.4f}"
          + (f", validation loss {last['val_loss']:.4f} (perplexity {last['val_ppl']:.2f})" if "val_loss" in last
             else ""))
    if sample:
        print(f"after:  {_answer(result.lm, sample, as_chat, max_new_tokens)!r}")
    print(f"wrote {result.out} (Hugging Face layout" + (", adapter/ in peft's format" if method == "lora" else "")
          + ", log.jsonl, loss.png)")


def _answer(lm, sample: str, as_chat: bool, max_new_tokens: int) -> str:
    """The greedy answer to `sample`: as a user message through the chat format, or as an instruction through
    Alpaca's template."""
    from modelcode.training.data import instruction_prompt

    if as_chat:
        dialog = [{"role": "user", "content": sample}]
        return lm.chat_completion([dialog], max_new_tokens=max_new_tokens, temperature=0.0)[0]["generation"]["content"]
    return lm.text_completion([instruction_prompt(sample)], max_new_tokens=max_new_tokens,
                              temperature=0.0)[0]["generation"]
