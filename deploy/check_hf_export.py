#!/usr/bin/env python3
"""Loads what fedtune exported with `--export-pytorch` into Hugging Face `transformers` (and
PEFT) and prints sentence embeddings as JSON, so a test can compare them with fedtune's own.

    check_hf_export.py MODEL_DIR [--adapter ADAPTER_DIR] SENTENCE...

MODEL_DIR: <out>/hf-model (BertModel.from_pretrained). With --adapter, the PEFT adapters in
<out>/hf-adapter are also applied to their base model (adapter_config.json names it) and merged.
Embeddings: mean pooling over real tokens, L2-normalised (sentence-transformers).
"""
import argparse
import json

import torch
from transformers import BertModel, PreTrainedTokenizerFast


def embed(model, tokenizer, sentences):
    batch = tokenizer(sentences, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        states = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled = (states * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, dim=1).tolist()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir")
    parser.add_argument("--adapter")
    parser.add_argument("sentences", nargs="+")
    args = parser.parse_args()
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=f"{args.model_dir}/tokenizer.json", pad_token="[PAD]")
    model = BertModel.from_pretrained(args.model_dir, add_pooling_layer=False).eval()
    out = {"embeddings": embed(model, tokenizer, args.sentences)}
    if args.adapter:
        from peft import PeftModel

        with open(f"{args.adapter}/adapter_config.json") as f:
            base_dir = json.load(f)["base_model_name_or_path"]
        base = BertModel.from_pretrained(base_dir, add_pooling_layer=False)
        merged = PeftModel.from_pretrained(base, args.adapter).merge_and_unload().eval()
        out["adapter_embeddings"] = embed(merged, tokenizer, args.sentences)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
