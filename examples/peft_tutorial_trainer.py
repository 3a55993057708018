"""LoRA fine-tuning of a causal LM with transformers' Trainer, written as in PEFT's tutorials.

Only the import differs from PEFT: replace ``peftkit`` by ``peft`` and the script runs with
Hugging Face PEFT (tests/test_hf_trainers.py runs it both ways). It runs offline: the model is
a tiny random Llama and the tokenizer a byte-level BPE trained on the toy texts below, so it
downloads nothing; use ``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained``
for a real model.

    python examples/peft_tutorial_trainer.py --output-dir out/lora-tutorial
"""

from __future__ import annotations

import argparse

import torch
from datasets import Dataset
from tokenizers import ByteLevelBPETokenizer
from transformers import (
    DataCollatorForLanguageModeling,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Trainer,
    TrainingArguments,
)

from peftkit import LoraConfig, TaskType, get_peft_model

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Instruction: Translate to French. Input: hello world. Output: bonjour le monde.",
    "word good is positive. word bad is negative.",
    "abcdefghijklmnopqrstuvwxyz 0123456789",
]


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A tiny tokenizer, trained here (stands in for ``AutoTokenizer.from_pretrained``)."""
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(TEXTS * 4, vocab_size=300, min_frequency=1, special_tokens=["<|endoftext|>"])
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )


def build_model(tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    """A tiny random Llama (stands in for ``AutoModelForCausalLM.from_pretrained``)."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        initializer_range=0.2,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    return LlamaForCausalLM(config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", required=True, help="where the adapter is saved")
    parser.add_argument("--max-steps", type=int, default=10)
    args = parser.parse_args()

    tokenizer = build_tokenizer()
    model = build_model(tokenizer)

    peft_config = LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        inference_mode=False,
        r=8,
        lora_alpha=32,
        lora_dropout=0.1,
        target_modules=["q_proj", "v_proj"],
    )
    model = get_peft_model(model, peft_config)
    model.print_trainable_parameters()

    # The "text" column stays in the dataset: the Trainer keeps only the columns model.forward takes.
    dataset = Dataset.from_dict({"text": TEXTS * 4})
    dataset = dataset.map(
        lambda batch: tokenizer(batch["text"], truncation=True, max_length=48), batched=True
    )
    dataset = dataset.train_test_split(test_size=4, seed=0)
    data_collator = DataCollatorForLanguageModeling(tokenizer=tokenizer, mlm=False)

    training_args = TrainingArguments(
        output_dir=args.output_dir,
        learning_rate=1e-2,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        max_steps=args.max_steps,
        eval_strategy="steps",
        eval_steps=args.max_steps,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
    )
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=dataset["train"],
        eval_dataset=dataset["test"],
        data_collator=data_collator,
    )
    trainer.train()
    metrics = trainer.evaluate()
    print(f"eval_loss: {metrics['eval_loss']:.6f}")

    model.save_pretrained(args.output_dir)


if __name__ == "__main__":
    main()
