"""Tiny Hugging Face models with random weights, built offline (never from_pretrained).

Each builder returns `(model, example_inputs, loss_fn, has_mlp)`:
- `model`: the Hugging Face model itself (no wrapper: transform() captures it with its positional
  tensor inputs and the captured module returns the same ModelOutput), in float64, train mode,
  dropout 0, use_cache=False;
- `example_inputs`: a tuple of tensors, batch 2, passed positionally (`model(*example_inputs)`);
- `loss_fn(output)`: a scalar from the model's output (a ModelOutput; `.logits`), cross-entropy
  against fixed random targets, in the output's dtype;
- `has_mlp`: whether the model has an MLP/FFN block (SAL areas then give at least one region).

`to_dtype(model, inputs, dtype)` casts a built model and its floating-point inputs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

D = torch.float64
VOCAB, SEQ, BATCH = 50, 8, 2


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _tokens(seed: int, shape=(BATCH, SEQ), vocab=VOCAB) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=_gen(seed))


def _lm_loss(targets: torch.Tensor):
    def loss_fn(out):
        logits = out.logits if hasattr(out, "logits") else out
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    return loss_fn


def _finish(model, inputs, loss_fn, has_mlp, dtype=D):
    torch.manual_seed(0)
    model = model.to(dtype).train()
    inputs = tuple(t.to(dtype) if t.is_floating_point() else t for t in inputs)
    return model, inputs, loss_fn, has_mlp


def to_dtype(model, inputs, dtype):
    model = model.to(dtype)
    return model, tuple(t.to(dtype) if t.is_floating_point() else t for t in inputs)


def _init(seed):
    torch.manual_seed(seed)


# ------------------------------------------------------------------ decoder-only language models
def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel
    _init(1)
    cfg = GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=16, n_layer=2, n_head=2, n_inner=32,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False,
                     bos_token_id=1, eos_token_id=2,
                     attn_implementation="eager")
    model = GPT2LMHeadModel(cfg)   # lm_head.weight is tied to transformer.wte.weight
    ids = _tokens(11)
    return _finish(model, (ids,), _lm_loss(_tokens(12)), True)


def _llama_like(config_cls, model_cls, seed, **extra):
    _init(seed)
    cfg = config_cls(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16,
                     use_cache=False, tie_word_embeddings=False, attention_dropout=0.0,
                     attn_implementation=extra.pop("attn_implementation", "sdpa"), **extra)
    model = model_cls(cfg)
    ids = _tokens(seed + 10)
    return _finish(model, (ids,), _lm_loss(_tokens(seed + 20)), True)


def llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    return _llama_like(LlamaConfig, LlamaForCausalLM, 2)   # GQA: 4 query heads, 2 kv heads


def qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM
    return _llama_like(Qwen2Config, Qwen2ForCausalLM, 3)   # q/k/v projections carry biases


def mistral():
    from transformers import MistralConfig, MistralForCausalLM
    return _llama_like(MistralConfig, MistralForCausalLM, 4, sliding_window=4)


def _mixtral(experts_implementation, dtype):
    from transformers import MixtralConfig, MixtralForCausalLM
    model, inputs, loss_fn, has_mlp = _llama_like(
        MixtralConfig, MixtralForCausalLM, 5, num_local_experts=4, num_experts_per_tok=2,
        router_jitter_noise=0.0, output_router_logits=False, sliding_window=None,
        experts_implementation=experts_implementation)
    assert model.config._experts_implementation == experts_implementation
    # has_mlp False: the experts (grouped/batched matmuls) train with FA but have no SAL area
    # form; the model's own router already sends each token to its experts.
    return _finish(model, inputs, loss_fn, False, dtype)


def mixtral_eager():
    """The per-expert Python loop (`experts_implementation="eager"`): data-dependent (nonzero)."""
    return _mixtral("eager", D)


def mixtral_batched_mm():
    """`experts_implementation="batched_mm"`: each token-expert pair gathers its expert's weights
    (`gate_up_proj[expert_ids]`, an index by routing) and runs one bmm."""
    return _mixtral("batched_mm", D)


def mixtral_grouped_mm():
    """`experts_implementation="grouped_mm"`, transformers 5.x's default where it can dispatch:
    F.grouped_mm over the 3-D expert weights. grouped_mm has no float64 kernel: float32."""
    return _mixtral("grouped_mm", torch.float32)


# ------------------------------------------------------------------ encoders, encoder-decoders
def bert():
    from transformers import BertConfig, BertForSequenceClassification
    _init(6)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=16, type_vocab_size=2,
                     num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                     classifier_dropout=0.0, attn_implementation="eager")
    model = BertForSequenceClassification(cfg)
    ids = _tokens(16)
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    mask[1, -2:] = 0   # padding in the second row
    return _finish(model, (ids, mask), _lm_loss(torch.tensor([0, 2])), True)


def t5():
    from transformers import T5Config, T5ForConditionalGeneration
    _init(7)
    cfg = T5Config(vocab_size=VOCAB, d_model=16, d_kv=8, d_ff=32, num_layers=1,
                   num_decoder_layers=1, num_heads=2, relative_attention_num_buckets=8,
                   relative_attention_max_distance=16, dropout_rate=0.0,
                   feed_forward_proj="relu", decoder_start_token_id=0, pad_token_id=0,
                   use_cache=False, attn_implementation="eager")
    model = T5ForConditionalGeneration(cfg)   # lm_head tied to shared (T5 default)
    ids, dec = _tokens(17), _tokens(18, (BATCH, 6))
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    return _finish(model, (ids, mask, dec), _lm_loss(_tokens(19, (BATCH, 6))), True)


def whisper():
    from transformers import WhisperConfig, WhisperForConditionalGeneration
    _init(8)
    cfg = WhisperConfig(vocab_size=VOCAB, num_mel_bins=8, d_model=16, encoder_layers=1,
                        decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
                        encoder_ffn_dim=32, decoder_ffn_dim=32, max_source_positions=8,
                        max_target_positions=16, dropout=0.0, attention_dropout=0.0,
                        activation_dropout=0.0, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                        decoder_start_token_id=1, use_cache=False, attn_implementation="eager")
    model = WhisperForConditionalGeneration(cfg)   # proj_out tied to embed_tokens
    feats = torch.randn(BATCH, 8, 16, generator=_gen(28))   # 2 * max_source_positions frames
    dec = _tokens(29, (BATCH, 6))
    # forward(input_features, attention_mask, decoder_input_ids): attention_mask is unused by the
    # encoder; pass an all-ones one so decoder_input_ids can go positionally.
    mask = torch.ones(BATCH, 16, dtype=torch.long)
    return _finish(model, (feats, mask, dec), _lm_loss(_tokens(30, (BATCH, 6))), True)


# ------------------------------------------------------------------ vision
def vit():
    from transformers import ViTConfig, ViTForImageClassification
    _init(9)
    cfg = ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=16,
                    num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                    num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                    attn_implementation="eager")
    model = ViTForImageClassification(cfg)
    x = torch.randn(BATCH, 3, 16, 16, generator=_gen(39))
    return _finish(model, (x,), _lm_loss(torch.tensor([1, 2])), True)


def resnet():
    from transformers import ResNetConfig, ResNetForImageClassification
    _init(10)
    cfg = ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                       layer_type="basic", num_labels=3)
    model = ResNetForImageClassification(cfg)
    x = torch.randn(BATCH, 3, 32, 32, generator=_gen(49))
    return _finish(model, (x,), _lm_loss(torch.tensor([0, 1])), False)


def convnext():
    from transformers import ConvNextConfig, ConvNextForImageClassification
    _init(11)
    cfg = ConvNextConfig(num_channels=3, patch_size=4, num_stages=2, hidden_sizes=[8, 16],
                         depths=[1, 1], num_labels=3, drop_path_rate=0.0,
                         layer_scale_init_value=0.5)
    model = ConvNextForImageClassification(cfg)   # pointwise MLP: nn.Linear over [B, H, W, C]
    x = torch.randn(BATCH, 3, 32, 32, generator=_gen(59))
    return _finish(model, (x,), _lm_loss(torch.tensor([2, 0])), True)


# ------------------------------------------------------------------ speech
def wav2vec2():
    from transformers import Wav2Vec2Config, Wav2Vec2ForCTC
    _init(12)
    cfg = Wav2Vec2Config(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1,
                         num_attention_heads=2, intermediate_size=32, conv_dim=(16, 16),
                         conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=8,
                         num_conv_pos_embedding_groups=4, hidden_dropout=0.0,
                         activation_dropout=0.0, attention_dropout=0.0, feat_proj_dropout=0.0,
                         final_dropout=0.0, layerdrop=0.0, mask_time_prob=0.0,
                         mask_feature_prob=0.0, apply_spec_augment=False,
                         attn_implementation="eager")
    model = Wav2Vec2ForCTC(cfg)   # pos_conv_embed.conv is weight-normed (parametrizations)
    audio = torch.randn(BATCH, 400, generator=_gen(69))   # 400 samples -> 39 frames
    frames = 39
    return _finish(model, (audio,), _lm_loss(_tokens(70, (BATCH, frames))), True)


BUILDERS = {
    "gpt2": gpt2, "bert": bert, "llama": llama, "qwen2": qwen2, "mistral": mistral,
    "mixtral_eager": mixtral_eager, "mixtral_batched_mm": mixtral_batched_mm,
    "mixtral_grouped_mm": mixtral_grouped_mm, "t5": t5,
    "vit": vit, "resnet": resnet, "convnext": convnext, "whisper": whisper,
    "wav2vec2": wav2vec2,
}
# Models whose built dtype is float32 (no float64 kernel on their path).
FLOAT32_ONLY = {"mixtral_grouped_mm"}
