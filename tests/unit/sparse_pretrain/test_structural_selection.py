"""The default selection comes from the model's structure: every Linear inside the repeated blocks, and the
backbone's pooler; never embeddings, LM/MLM heads or task heads. Checked on meta-device skeletons of tiny
configs of every family the project names (nothing is allocated), against the exact expected sets."""
from __future__ import annotations

import re

import pytest
import torch
import transformers as T

from sparse_pretrain.core.masks import describe_selection, find_prunable, repeated_blocks

SMALL = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64, vocab_size=100)
DECODER = dict(SMALL, num_key_value_heads=1)
#: the selection before it was derived from the structure: BERT and DistilBERT layouts by name
OLD_BERT_PATTERN = r"(.*\.)?((encoder|transformer)\.layer\.\d+\..+|pooler\.dense)"


def skeleton(model_class, config):
    with torch.device("meta"):
        return model_class(config)


def selected(model, **kwargs):
    return [name[:-len(".weight")] for name, _ in find_prunable(model, **kwargs)]


def linears_under(model, prefix):
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith(prefix)]


@pytest.mark.parametrize("model_class, config", [
    (T.BertForPreTraining, T.BertConfig(**SMALL)),
    (T.BertForSequenceClassification, T.BertConfig(**SMALL)),
    (T.BertForQuestionAnswering, T.BertConfig(**SMALL)),
    (T.DistilBertForMaskedLM, T.DistilBertConfig(dim=32, n_layers=3, n_heads=2, hidden_dim=64, vocab_size=100)),
    (T.DistilBertForSequenceClassification, T.DistilBertConfig(dim=32, n_layers=3, n_heads=2, hidden_dim=64,
                                                               vocab_size=100)),
])
def test_bert_and_distilbert_keep_exactly_the_selection_they_had_by_name(model_class, config):
    model = skeleton(model_class, config)
    by_name = [n for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and re.fullmatch(OLD_BERT_PATTERN, n)]
    assert selected(model) == by_name and len(by_name) >= 3 * 6


ENCODERS = {
    "roberta": (T.RobertaForMaskedLM, T.RobertaConfig(**SMALL), "roberta.encoder.layer", 6, "roberta.pooler"),
    "xlm-roberta": (T.XLMRobertaForSequenceClassification, T.XLMRobertaConfig(**SMALL), "roberta.encoder.layer", 6,
                    None),
    "electra": (T.ElectraForMaskedLM, T.ElectraConfig(**SMALL, embedding_size=16), "electra.encoder.layer", 6, None),
    "deberta-v2": (T.DebertaV2ForSequenceClassification, T.DebertaV2Config(**SMALL), "deberta.encoder.layer", 6,
                   None),
    "modernbert": (T.ModernBertForMaskedLM, T.ModernBertConfig(**SMALL, global_attn_every_n_layers=1, pad_token_id=0,
                                                               eos_token_id=1, bos_token_id=2, cls_token_id=2,
                                                               sep_token_id=1), "model.layers", 4, None),
    "llama": (T.LlamaForCausalLM, T.LlamaConfig(**DECODER), "model.layers", 7, None),
    "qwen2": (T.Qwen2ForCausalLM, T.Qwen2Config(**DECODER), "model.layers", 7, None),
    "mistral": (T.MistralForCausalLM, T.MistralConfig(**DECODER), "model.layers", 7, None),
    "llama-classifier": (T.LlamaForSequenceClassification, T.LlamaConfig(**DECODER, pad_token_id=0), "model.layers",
                         7, None),
}


@pytest.mark.parametrize("family", sorted(ENCODERS))
def test_every_family_prunes_the_linears_of_its_blocks_and_nothing_else(family):
    model_class, config, stack, per_layer, pooler = ENCODERS[family]
    model = skeleton(model_class, config)
    assert repeated_blocks(model) == [stack]
    expected = linears_under(model, stack + ".") + (linears_under(model, pooler + ".") if pooler else [])
    names = selected(model)
    assert names == expected and len(linears_under(model, stack + ".")) == 3 * per_layer
    heads = ("lm_head", "cls.", "classifier", "score", "pooler.dense", "generator", "embeddings_project", "head.",
             "decoder")
    assert not [n for n in names if n.startswith(heads)]      # heads and embedding projections stay dense


def test_gpt2_blocks_hold_conv1d_projections_which_the_linear_default_does_not_select():
    model = skeleton(T.GPT2LMHeadModel, T.GPT2Config(n_embd=32, n_layer=3, n_head=2, vocab_size=100))
    assert repeated_blocks(model) == ["transformer.h"]
    assert selected(model, module_types=("Conv1D",)) == [
        f"transformer.h.{i}.{p}" for i in range(3) for p in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    with pytest.raises(ValueError, match="select no weight"):
        selected(model)


def test_albert_layers_that_share_weights_are_refused_with_the_reason_and_the_way_out():
    model = skeleton(T.AlbertForMaskedLM, T.AlbertConfig(**SMALL, embedding_size=16))
    with pytest.raises(ValueError, match=r"runs 3 layers .* share weights .* pruning\.include"):
        find_prunable(model)
    explicit = selected(model, include=[r"albert\.encoder\.albert_layer_groups\.0\.albert_layers\.0\..*"])
    assert len(explicit) == 6                      # named explicitly, the shared layer's Linears are prunable


def test_albert_with_one_group_per_layer_shares_nothing_and_is_selected_by_structure():
    model = skeleton(T.AlbertForMaskedLM, T.AlbertConfig(**SMALL, embedding_size=16, num_hidden_groups=3))
    assert repeated_blocks(model) == ["albert.encoder.albert_layer_groups"]
    assert len(selected(model)) == 3 * 6          # (AlbertForMaskedLM has no pooler)


def test_a_one_layer_model_is_a_stack_of_one():
    model = skeleton(T.BertForMaskedLM, T.BertConfig(**dict(SMALL, num_hidden_layers=1)))
    assert repeated_blocks(model) == ["bert.encoder.layer"] and len(selected(model)) == 6


def test_include_and_exclude_still_override_the_structure():
    model = skeleton(T.BertForPreTraining, T.BertConfig(**SMALL))
    assert selected(model, include=[r"cls\.predictions\.transform\.dense"]) == ["cls.predictions.transform.dense"]
    assert "bert.pooler.dense" not in selected(model, exclude=[r".*pooler.*"])
    with pytest.raises(ValueError, match=r"pruning\.exclude\[0\].*matches no"):
        selected(model, exclude=["nothing"])


def test_the_selection_is_described_per_stack_in_a_few_lines():
    model = skeleton(T.BertForPreTraining, T.BertConfig(**SMALL))
    text = describe_selection([n + ".weight" for n in selected(model)])
    assert text.splitlines() == [
        "19 weights",
        "  bert.encoder.layer.{0..2}: attention.self.query, attention.self.key, attention.self.value, "
        "attention.output.dense, intermediate.dense, output.dense",
        "  and bert.pooler.dense"]
