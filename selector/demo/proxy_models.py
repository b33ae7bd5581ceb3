"""Small real models built offline: a byte-level BPE tokenizer and tiny HF transformers.

Nothing here downloads. Tokenizers are trained with ``tokenizers`` on text we pass in and
wrapped as ``PreTrainedTokenizerFast``; models are built from small configs with random
weights (seeded) and saved with ``save_pretrained`` next to their tokenizer, so every
consumer loads them with ``AutoTokenizer`` / ``AutoModel*.from_pretrained(path)`` exactly as
it would load a production checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Literal

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"


def train_bpe_tokenizer(texts: Iterable[str], out_dir: str | Path, vocab_size: int = 1024,
                        model_max_length: int = 1024):
    """Train a byte-level BPE on ``texts`` and save it as a fast HF tokenizer in ``out_dir``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, BOS, EOS, UNK],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=EOS,
                                   unk_token=UNK, model_max_length=model_max_length)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out)
    return fast


def build_causal_lm(tokenizer_dir: str | Path, out_dir: str | Path, arch: Literal["llama", "gpt2"] = "llama",
                    hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4,
                    max_positions: int = 256, seed: int = 0):
    """A tiny causal LM with random (seeded) weights, saved with its tokenizer in ``out_dir``."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    torch.manual_seed(seed)
    common = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    if arch == "llama":
        config = LlamaConfig(hidden_size=hidden_size, intermediate_size=hidden_size * 2,
                             num_hidden_layers=num_layers, num_attention_heads=num_heads,
                             num_key_value_heads=num_heads, max_position_embeddings=max_positions,
                             tie_word_embeddings=False, **common)
        model = LlamaForCausalLM(config)
    elif arch == "gpt2":
        config = GPT2Config(n_embd=hidden_size, n_layer=num_layers, n_head=num_heads, n_positions=max_positions,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **common)
        model = GPT2LMHeadModel(config)
    else:
        raise ValueError(f"unknown arch {arch!r}; expected 'llama' or 'gpt2'")
    out = Path(out_dir)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return model


def build_encoder(tokenizer_dir: str | Path, out_dir: str | Path, hidden_size: int = 32, num_layers: int = 2,
                  num_heads: int = 2, max_positions: int = 512, seed: int = 0):
    """A tiny BERT encoder with random (seeded) weights, saved with its tokenizer in ``out_dir``."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, num_hidden_layers=num_layers,
                        num_attention_heads=num_heads, intermediate_size=hidden_size * 2,
                        max_position_embeddings=max_positions, pad_token_id=tokenizer.pad_token_id)
    model = BertModel(config)
    out = Path(out_dir)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return model
