"""The loss of a pre-training micro-batch with the MLM heads applied only at the rows a loss reads
(``vocab_rows="needed"``) is the models' own loss over every position (``"all"``): same value, same
gradient, for BERT (MLM + NSP), DistilBERT and RoBERTa, teacher preparation and both KD positions."""
import pytest
import torch
from transformers import (
    BertConfig,
    BertForMaskedLM,
    BertForPreTraining,
    BertModel,
    DistilBertConfig,
    DistilBertForMaskedLM,
    RobertaConfig,
    RobertaForMaskedLM,
)

from sparse_pretrain.core.distill import DistillationWeights
from sparse_pretrain.pretraining_loss import head_entry, heads_at, pretraining_losses

V = 97


def bert():
    return BertForPreTraining(BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                         intermediate_size=64))


def distilbert():
    return DistilBertForMaskedLM(DistilBertConfig(vocab_size=V, dim=32, n_layers=2, n_heads=2, hidden_dim=64))


def roberta():
    return RobertaForMaskedLM(RobertaConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                            intermediate_size=64))


def make_batch(nsp: bool, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, V, (3, 16), generator=g)
    attention = torch.ones(3, 16, dtype=torch.long)
    attention[1, 10:] = 0                                    # padding in one row
    masked = (torch.rand(3, 16, generator=g) < 0.3) & attention.bool()
    labels = torch.where(masked, ids, torch.full_like(ids, -100))
    batch = {"input_ids": ids, "attention_mask": attention, "labels": labels}
    if nsp:
        batch.update(token_type_ids=torch.zeros_like(ids), next_sentence_label=torch.tensor([0, 1, 0]))
    return batch


def loss_and_grads(student, teacher, batch, weights, nsp, vocab_rows):
    student.zero_grad(set_to_none=True)
    terms = pretraining_losses(student, teacher, batch, weights, nsp, vocab_rows=vocab_rows)
    terms["loss"].backward()
    return terms, {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("build, nsp", [(bert, True), (distilbert, False), (roberta, False)])
@pytest.mark.parametrize("distill", [None, "all", "masked"])
@pytest.mark.parametrize("chunk_rows", [0, 5])
def test_needed_rows_give_the_full_forwards_loss_and_gradient(build, nsp, distill, chunk_rows):
    torch.manual_seed(0)
    student, teacher = build().eval(), (build().eval() if distill else None)   # eval: no dropout
    weights = DistillationWeights(positions=distill, chunk_rows=chunk_rows) if distill else None
    batch = make_batch(nsp)
    full, full_grads = loss_and_grads(student, teacher, batch, weights, nsp, "all")
    rows, rows_grads = loss_and_grads(student, teacher, batch, weights, nsp, "needed")
    for key in ("loss", "pretraining", "kd", "kd_kl"):
        assert rows[key].item() == pytest.approx(full[key].item(), rel=1e-5, abs=1e-6), key
    assert rows_grads.keys() == full_grads.keys()
    for name, grad in full_grads.items():
        torch.testing.assert_close(rows_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    masked = int((batch["labels"] != -100).sum())
    tokens = int(batch["attention_mask"].sum())
    assert int(full["rows"]) == batch["input_ids"].numel()
    assert int(rows["rows"]) == (tokens if distill == "all" else masked)
    if distill:
        assert rows["kd"] > 0


def test_the_vocabulary_projection_sees_only_the_selected_rows():
    torch.manual_seed(0)
    batch = make_batch(nsp=False)
    selected = batch["labels"] != -100
    for model in (bert(), distilbert(), roberta()):
        seen = []
        model.get_output_embeddings().register_forward_hook(
            lambda m, args, out, seen=seen: seen.append(tuple(args[0].shape)))
        with heads_at(model, selected):
            output = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        logits = getattr(output, "prediction_logits", None)
        logits = output.logits if logits is None else logits
        assert seen == [(int(selected.sum()), 32)], type(model).__name__
        assert logits.shape == (int(selected.sum()), V)
        model(input_ids=batch["input_ids"])                   # the hook is gone after the block
        assert seen[-1] == (3, 16, 32)


def test_head_entry_starts_where_the_hidden_states_enter_the_head():
    assert isinstance(head_entry(bert()), type(bert().cls))
    assert head_entry(BertForMaskedLM(bert().config)).__class__.__name__ == "BertOnlyMLMHead"
    distil = distilbert()
    assert head_entry(distil) is distil.vocab_transform         # the transform runs on the rows too
    rob = roberta()
    assert head_entry(rob) is rob.lm_head
    with pytest.raises(ValueError, match=r"no output embeddings.*vocab_rows=all"):
        head_entry(BertModel(bert().config))


def test_a_head_input_of_another_shape_fails_clearly_and_the_hook_is_removed():
    model = bert()
    batch = make_batch(nsp=False)
    wrong = torch.ones(3, 15, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"not \[batch, seq, hidden\].*vocab_rows=all"):
        with heads_at(model, wrong):
            model(input_ids=batch["input_ids"])
    assert model(input_ids=batch["input_ids"]).prediction_logits.shape == (3, 16, V)


def test_compiled_encoders_keep_parameter_names_and_the_loss():
    from sparse_pretrain.trainer import compile_encoders
    torch.manual_seed(0)
    student, teacher = bert().eval(), bert().eval()
    batch = make_batch(nsp=True)
    weights = DistillationWeights(positions="all", chunk_rows=8)
    names = [n for n, _ in student.named_parameters()]
    eager = pretraining_losses(student, teacher, batch, weights, True)["loss"].item()
    compile_encoders(student, teacher, backend="eager")     # dynamo's tracing; inductor codegen is slow on CPU
    assert student.base_model._compiled_call_impl is not None and teacher.base_model._compiled_call_impl is not None
    assert [n for n, _ in student.named_parameters()] == names and set(names) <= set(student.state_dict())
    assert pretraining_losses(student, teacher, batch, weights, True)["loss"].item() == pytest.approx(eager, rel=1e-6)
