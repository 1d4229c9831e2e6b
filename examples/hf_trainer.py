"""Example: a transformed Hugging Face model under `transformers.Trainer` (docs/integrations.md).

A tiny BERT classifier or GPT-2 language model, built from a config (random weights, offline),
is transformed with keyword example inputs, `labels` included, so the transformed module computes
its own loss, as the Trainer expects (`model(**batch).loss`). `SALTrainer` is the Trainer plus
tied-weight-safe checkpoints and routing statistics in the logs. Halfway, a checkpoint is saved;
`--resume` then rebuilds the transformed module and resumes from it.

    python examples/hf_trainer.py --model gpt2 --steps 6 [--feedback fa|dfa|bp] [--areas 4]
    python examples/hf_trainer.py --model bert --steps 6 --resume
"""
from __future__ import annotations

import argparse
import os
import tempfile
import warnings

import torch
from transformers import TrainingArguments

import salcompile
from salcompile.integrations.hf import SALTrainer

VOCAB = 64


def build(kind: str, seq: int = 16, width: int = 32, seed: int = 0):
    """(model, dataset): a tiny model from its config, and an in-memory dataset (a list of dicts,
    which the Trainer's default collator stacks)."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 1)
    if kind == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel
        cfg = GPT2Config(vocab_size=VOCAB, n_positions=seq, n_embd=width, n_layer=2, n_head=2,
                         n_inner=2 * width, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                         use_cache=False, bos_token_id=0, eos_token_id=0,
                         attn_implementation="eager")
        model = GPT2LMHeadModel(cfg)            # lm_head.weight is tied to transformer.wte.weight
        # a learnable language: each next token is the previous one plus 1 (mod VOCAB)
        start = torch.randint(0, VOCAB, (64, 1), generator=g)
        ids = (start + torch.arange(seq)) % VOCAB
        data = [{"input_ids": r, "labels": r} for r in ids]
    elif kind == "bert":
        from transformers import BertConfig, BertForSequenceClassification
        cfg = BertConfig(vocab_size=VOCAB, hidden_size=width, num_hidden_layers=1,
                         num_attention_heads=2, intermediate_size=2 * width,
                         max_position_embeddings=seq, num_labels=2, hidden_dropout_prob=0.0,
                         attention_probs_dropout_prob=0.0, attn_implementation="eager")
        model = BertForSequenceClassification(cfg)
        ids = torch.randint(0, VOCAB, (64, seq), generator=g)
        labels = (ids[:, 0] < VOCAB // 2).long()   # the class is told by the first token
        mask = torch.ones_like(ids)
        data = [{"input_ids": i, "attention_mask": m, "labels": y}
                for i, m, y in zip(ids, mask, labels)]
    else:
        raise ValueError(f"unknown model {kind!r}: bert or gpt2")
    return model, data


def transform(kind: str, feedback: str = "fa", areas: int = 4, **build_kw):
    model, data = build(kind, **build_kw)
    example = torch.utils.data.default_collate(data[:4])   # a batch of the dataset's own keywords
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sal = salcompile.transform(model, example_inputs=example, feedback=feedback, areas=areas)
    return sal, data


def trainer(sal, data, out_dir: str, steps: int, lr: float = 3e-3, save_steps=None):
    args = TrainingArguments(
        output_dir=out_dir, max_steps=steps, per_device_train_batch_size=8, learning_rate=lr,
        lr_scheduler_type="constant", logging_steps=1, save_strategy="steps",
        save_steps=save_steps or max(1, steps // 2), use_cpu=True, report_to=[],
        disable_tqdm=True, dataloader_num_workers=0, seed=0)
    return SALTrainer(model=sal, args=args, train_dataset=data)


def losses(tr) -> list:
    return [h["loss"] for h in tr.state.log_history if "loss" in h]


def run(kind="gpt2", steps=6, feedback="fa", areas=4, out_dir=None, resume=False, lr=3e-3):
    """Train for `steps` (a checkpoint halfway); with `resume`, train again from the halfway
    checkpoint with a freshly transformed module. Returns (trainer, resumed trainer or None)."""
    out_dir = out_dir or tempfile.mkdtemp(prefix=f"sal-hf-{kind}-")
    sal, data = transform(kind, feedback, areas)
    tr = trainer(sal, data, out_dir, steps, lr)
    tr.train()
    print(f"{kind} {feedback} areas={areas}: losses {[round(l, 3) for l in losses(tr)]}")
    stats = {k: v for k, v in tr.state.log_history[-2].items() if k.startswith("routing/")}
    if stats:
        print("  routing:", {k: round(v, 3) for k, v in stats.items()})
    resumed = None
    if resume:
        half = max(1, steps // 2)
        ckpt = os.path.join(out_dir, f"checkpoint-{half}")
        sal2, data2 = transform(kind, feedback, areas)
        resumed = trainer(sal2, data2, tempfile.mkdtemp(prefix="sal-hf-resume-"), steps, lr)
        resumed.train(resume_from_checkpoint=ckpt)
        print(f"  resumed from {os.path.basename(ckpt)}: losses "
              f"{[round(l, 3) for l in losses(resumed)]}")
    return tr, resumed


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", choices=["bert", "gpt2"], default="gpt2")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--feedback", default="fa")
    ap.add_argument("--areas", type=int, default=4)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--out", default=None)
    ap.add_argument("--resume", action="store_true")
    a = ap.parse_args(argv)
    run(a.model, a.steps, a.feedback, a.areas, a.out, a.resume, a.lr)


if __name__ == "__main__":
    main()
