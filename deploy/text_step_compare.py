#!/usr/bin/env python3
"""The PyTorch twin of `fedtune-client bench-step --bert DIR`: one local training step of a BERT
(architecture from DIR/config.json, random weights) with PEFT LoRA on query and value, mean
pooling and a 2-class linear head, Adam; batch B of S random token ids. Prints the mean step time.

    text_step_compare.py DIR [--batch 16] [--seq-len 64] [--lora-rank 8] [--steps 20]

Run with the libtorch venv's python (deploy/install-libtorch.sh; pip install transformers peft).
"""
import argparse
import time

import torch
from transformers import BertConfig, BertModel


def main():
    p = argparse.ArgumentParser()
    p.add_argument("dir")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--steps", type=int, default=20)
    a = p.parse_args()
    torch.manual_seed(0)
    config = BertConfig.from_pretrained(a.dir)
    encoder = BertModel(config, add_pooling_layer=False)
    if a.lora_rank > 0:
        from peft import LoraConfig, get_peft_model

        encoder = get_peft_model(
            encoder,
            LoraConfig(r=a.lora_rank, lora_alpha=2 * a.lora_rank, target_modules=["query", "value"]),
        )
    head = torch.nn.Linear(config.hidden_size, 2)
    params = [p for p in list(encoder.parameters()) + list(head.parameters()) if p.requires_grad]
    optim = torch.optim.Adam(params, lr=2e-3)
    ids = torch.randint(0, config.vocab_size, (a.batch, a.seq_len))
    mask = torch.ones_like(ids)
    labels = torch.randint(0, 2, (a.batch,))
    encoder.train()

    def step():
        states = encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).float()
        pooled = (states * m).sum(1) / m.sum(1)
        loss = torch.nn.functional.cross_entropy(head(pooled), labels)
        optim.zero_grad()
        loss.backward()
        optim.step()
        return loss.item()

    for _ in range(5):
        step()
    start = time.perf_counter()
    for _ in range(a.steps):
        step()
    ms = (time.perf_counter() - start) * 1e3 / a.steps
    print(f"pytorch-eager lora{a.lora_rank} seq{a.seq_len} batch={a.batch} threads={torch.get_num_threads()} mean_ms={ms:.1f}")


if __name__ == "__main__":
    main()
