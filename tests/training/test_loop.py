"""The training loop: one full fine-tuning step equals transformers'; accumulation equals one big batch; a resumed
run equals an uninterrupted one; activation checkpointing changes nothing but memory."""

import json

import pytest
import torch
import transformers
from hf_reference import tiny_hf_model

import modelcode
from modelcode.loading.weight_maps import compile_map, invert, lookup
from modelcode.loading.weight_maps import llama as llama_maps
from modelcode.training import LoRAConfig, TrainConfig, Trainer, apply_lora
from modelcode.training.data import IGNORE, Example, collate
from modelcode.training.loop import loss_sum, lr_factor, n_targets


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_hf_model("llama3-gqa").save_pretrained(folder)
    return folder


def examples(n: int, seed: int = 0) -> list[Example]:
    """Random examples of unequal lengths whose first few tokens are prompt (no loss)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length, prompt = int(torch.randint(6, 14, (1,), generator=g)), int(torch.randint(1, 5, (1,), generator=g))
        ids = torch.randint(0, 128, (length + 1,), generator=g).tolist()
        out.append(Example(ids[:-1], [IGNORE] * prompt + ids[prompt + 1:]))
    return out


def trainable_model(folder, method: str):
    model = modelcode.load(folder, dtype=torch.float32).model
    if method == "lora":
        torch.manual_seed(0)
        apply_lora(model, LoRAConfig(targets=("all",), dropout=0.0), llama_maps.HF)
        with torch.no_grad():  # B = 0 would leave A without gradient
            for name, p in model.named_parameters():
                if name.endswith("lora_B"):
                    p.normal_(0, 0.1)
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    return model


def test_the_output_layer_runs_only_where_there_is_a_target(hf_folder):
    """Prompt and padding positions get no logits (the output layer sees only target rows), and the loss is the
    same as cross-entropy over every position's logits with the masked ones ignored."""
    model = modelcode.load(hf_folder, dtype=torch.float32).model
    batch = collate(examples(3))
    rows = []
    hook = model.output.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[0]))
    loss = loss_sum(model, batch, autocast=False)
    hook.remove()
    assert rows == [n_targets(batch)] and n_targets(batch) < batch["targets"].numel()
    logits = model(batch["tokens"], batch["positions"])
    full = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten(), ignore_index=IGNORE,
                                             reduction="sum")
    torch.testing.assert_close(loss, full, rtol=1e-6, atol=1e-5)


def test_one_full_fine_tuning_step_equals_transformers(hf_folder):
    """Same loss and same gradient of every weight as transformers' model, on a right-padded batch whose
    prompt tokens are masked out of the loss."""
    ours = trainable_model(hf_folder, "full").train()
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_folder, dtype=torch.float32).train()
    batch = collate(examples(3))
    loss = loss_sum(ours, batch, autocast=False) / n_targets(batch)
    loss.backward()
    # transformers takes the whole sequences and labels (-100: no loss) and shifts them itself: append each
    # row's last target to its inputs, and give that extra position no label.
    ids = torch.cat([batch["tokens"], torch.zeros(3, 1, dtype=torch.long)], dim=1)
    labels = torch.cat([torch.full((3, 1), IGNORE), batch["targets"]], dim=1)
    real = labels != IGNORE
    attention = torch.ones_like(ids)
    for b, ex in enumerate(examples(3)):
        attention[b, len(ex.tokens) + 1:] = 0  # right padding
        ids[b, len(ex.tokens)] = ex.targets[-1]
    assert real.sum() == n_targets(batch)
    out = hf(ids, attention_mask=attention, labels=labels)
    out.loss.backward()
    torch.testing.assert_close(loss, out.loss, atol=1e-5, rtol=1e-5)
    names = compile_map(invert(llama_maps.HF))
    for name, p in ours.named_parameters():
        theirs = hf.get_parameter(lookup(names, name)[0][0])
        torch.testing.assert_close(p.grad, theirs.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_four_micro_batches_accumulate_to_one_batch_of_four(hf_folder, tmp_path):
    data = examples(4)
    grads = []
    for batch_size, accum in ((4, 1), (1, 4)):
        model = trainable_model(hf_folder, "lora")
        cfg = TrainConfig(batch_size=batch_size, grad_accum=accum, max_steps=1)
        trainer = Trainer(model, data, [], cfg, tmp_path)
        (step,) = trainer.steps
        assert sorted(sum(step, [])) == [0, 1, 2, 3]
        trainer.backward(step)
        grads.append({n: p.grad.clone() for n, p in trainer.params.items()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5, msg=name)


def test_activation_checkpointing_gives_the_same_gradients(hf_folder, tmp_path):
    data = examples(4)
    grads = []
    for ckpt in (False, True):
        model = trainable_model(hf_folder, "full")
        trainer = Trainer(model, data, [], TrainConfig(max_steps=1, checkpoint_activations=ckpt), tmp_path)
        trainer.backward(trainer.steps[0])
        grads.append({n: p.grad for n, p in trainer.params.items()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5, msg=name)


def test_resumed_run_equals_uninterrupted_run(hf_folder, tmp_path):
    """Interrupt a run during step 4 (after a periodic checkpoint at step 2; Ctrl-C saves the state after step
    3), resume it: the log and the weights equal a run without a stop (dropout on, so the random stream must be
    restored too)."""
    data, val = examples(12), examples(2, seed=1)
    cfg = TrainConfig(batch_size=2, grad_accum=2, max_steps=5, warmup_steps=2, save_every=2, eval_every=2)

    def model():
        m = modelcode.load(hf_folder, dtype=torch.float32).model
        torch.manual_seed(0)
        apply_lora(m, LoRAConfig(dropout=0.3), llama_maps.HF)
        return m

    straight = Trainer(model(), data, val, cfg, tmp_path / "a")
    straight.run()
    interrupted = Trainer(model(), data, val, cfg, tmp_path / "b")
    step = interrupted.train_step

    def interrupt_step_4(micro):
        if interrupted.step == 3:
            torch.rand(5)  # dropout's stream moved on before the interrupt
            raise KeyboardInterrupt
        return step(micro)

    interrupted.train_step = interrupt_step_4
    with pytest.raises(KeyboardInterrupt):
        interrupted.run()
    assert torch.load(tmp_path / "b" / "training" / "state.pt", weights_only=True)["step"] == 3
    resumed = Trainer(model(), data, val, cfg, tmp_path / "b")
    resumed.run(resume=True)
    log = [json.loads(line) for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [0, 1, 2, 3, 4, 5] and all("val_loss" in log[i] for i in (0, 2, 4, 5))
    def timeless(records):
        return [{k: v for k, v in r.items() if k not in ("seconds", "tokens_per_s")} for r in records]

    assert timeless(log) == timeless(straight.log)
    for name, p in straight.params.items():
        assert torch.equal(resumed.params[name], p), name
    assert (tmp_path / "b" / "loss.png").stat().st_size > 1000


def test_resume_with_other_settings_is_refused(hf_folder, tmp_path):
    data = examples(4)
    model = trainable_model(hf_folder, "lora")
    Trainer(model, data, [], TrainConfig(batch_size=2, max_steps=1), tmp_path).run()
    with pytest.raises(ValueError, match="other settings .*batch_size: 2 there, 4 now"):
        Trainer(trainable_model(hf_folder, "lora"), data, [], TrainConfig(max_steps=1), tmp_path).run(resume=True)


def test_warmup_then_cosine():
    lrs = [lr_factor(s, warmup=4, total=20, min_ratio=0.1) for s in range(20)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0] and lrs[4] == 1.0
    assert all(a > b for a, b in zip(lrs[4:], lrs[5:])) and lrs[-1] > 0.1


def test_bf16_autocast_trains(hf_folder, tmp_path):
    model = trainable_model(hf_folder, "lora")
    log = Trainer(model, examples(8), examples(2, 1), TrainConfig(batch_size=4, max_steps=2, autocast=True, lr=1e-2),
                  tmp_path).run()
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in log[1:]) and "val_ppl" in log[-1]
