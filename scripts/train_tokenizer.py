"""Train the tiny MoE's byte-level BPE tokenizer on the training split (deterministic).

Writes tokenizer.json + tokenizer_config.json (PreTrainedTokenizerFast, loads offline) with a
minimal chat template so vLLM's chat endpoint works.

    python scripts/train_tokenizer.py --corpus build/corpus --out build/tokenizer
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SPECIAL = ["<unk>", "<s>", "</s>", "<pad>"]
SAMPLE_CHARS = 1_500_000  # per domain: the tokenizer sees every domain about equally
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def domain_samples(corpus: Path):
    for path in sorted((corpus / "train").glob("*.jsonl")):
        size = 0
        with path.open(encoding="utf-8") as f:
            for line in f:
                text = json.loads(line)["text"]
                size += len(text)
                yield text
                if size >= SAMPLE_CHARS:
                    break


def train(corpus: Path, vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(domain_samples(corpus), trainer=trainer)
    return tok


def save(tok: Tokenizer, out: Path, max_length: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
        "model_max_length": max_length, "add_bos_token": False, "add_eos_token": False,
        "clean_up_tokenization_spaces": False, "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--corpus", type=Path, default=Path("build/corpus"))
    ap.add_argument("--out", type=Path, default=Path("build/tokenizer"))
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--max-length", type=int, default=1024)
    args = ap.parse_args()
    save(train(args.corpus, args.vocab_size), args.out, args.max_length)
    print(f"tokenizer written to {args.out}")


if __name__ == "__main__":
    main()
