import math
import re

import pytest
import torch

from sparse_pretrain.core.distill import (
    DistillationWeights,
    kd_positions,
    pretraining_distillation_loss,
    soft_cross_entropy,
    token_kd_loss,
)


def test_soft_cross_entropy_equals_hand_computation():
    s = torch.tensor([[1.0, 2.0, 0.5]])
    t = torch.tensor([[0.2, 1.5, 3.0]])
    T = 2.0
    p_t = [math.exp(x / T) for x in t[0].tolist()]
    p_t = [x / sum(p_t) for x in p_t]
    log_z = math.log(sum(math.exp(x / T) for x in s[0].tolist()))
    log_p_s = [x / T - log_z for x in s[0].tolist()]
    expected = -sum(a * b for a, b in zip(p_t, log_p_s)) * T * T
    assert soft_cross_entropy(s, t, T).item() == pytest.approx(expected, rel=1e-6)


def test_gradient_matches_kl_and_passes_gradcheck():
    torch.manual_seed(0)
    s = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    t = torch.randn(5, 7, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: soft_cross_entropy(x, t, 2.0), (s,))
    # same gradient as KL(teacher || student) * T^2, the reference code's loss
    kl = torch.nn.functional.kl_div(torch.log_softmax(s / 2, -1), torch.softmax(t / 2, -1),
                                    reduction="batchmean") * 4
    g_kl, = torch.autograd.grad(kl, s)
    g_ce, = torch.autograd.grad(soft_cross_entropy(s, t, 2.0), s)
    assert torch.allclose(g_kl, g_ce)
    assert soft_cross_entropy(s, s.detach(), 2.0) > 0       # CE to itself is the entropy, not 0


def test_teacher_gets_no_gradient():
    s = torch.randn(3, 4, requires_grad=True)
    t = torch.randn(3, 4, requires_grad=True)
    soft_cross_entropy(s, t).backward()
    assert t.grad is None


def test_positions_all_vs_masked():
    attention = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    labels = torch.tensor([[-100, 5, -100, -100], [7, -100, -100, -100]])
    assert kd_positions(attention, labels, "all").sum() == 5
    assert kd_positions(attention, labels, "masked").tolist() == [[False, True, False, False],
                                                                   [True, False, False, False]]
    with pytest.raises(ValueError, match=re.escape("distillation.positions")):
        kd_positions(attention, labels, "some")
    torch.manual_seed(1)
    s, t = torch.randn(2, 4, 10), torch.randn(2, 4, 10)
    selected = kd_positions(attention, labels, "masked")
    rows = torch.stack([s[0, 1], s[1, 0]]), torch.stack([t[0, 1], t[1, 0]])
    assert token_kd_loss(s, t, selected).item() == pytest.approx(soft_cross_entropy(*rows).item())


def test_combined_loss_mlm_and_nsp():
    torch.manual_seed(2)
    attention = torch.ones(2, 3, dtype=torch.long)
    s_mlm, t_mlm = torch.randn(2, 3, 11), torch.randn(2, 3, 11)
    s_nsp, t_nsp = torch.randn(2, 2), torch.randn(2, 2)
    pt = torch.tensor(3.0)
    w = DistillationWeights(lambda_pt=0.5, lambda_kd=0.5, temperature=2.0)
    terms = pretraining_distillation_loss(w, pt, s_mlm, t_mlm, attention, None, s_nsp, t_nsp)
    kd = soft_cross_entropy(s_mlm.reshape(-1, 11), t_mlm.reshape(-1, 11)) + soft_cross_entropy(s_nsp, t_nsp)
    assert terms["kd"].item() == pytest.approx(kd.item())
    assert terms["loss"].item() == pytest.approx(0.5 * 3.0 + 0.5 * kd.item())
    mlm_only = pretraining_distillation_loss(w, pt, s_mlm, t_mlm, attention, None)
    assert "kd_nsp" not in mlm_only


def test_chunked_kd_is_the_same_loss_and_gradient():
    from sparse_pretrain.core.distill import chunked_soft_cross_entropy
    torch.manual_seed(0)
    s = torch.randn(37, 50, dtype=torch.float64, requires_grad=True)
    t = torch.randn(37, 50, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: chunked_soft_cross_entropy(x, t, 2.0, 8), (s,))
    for chunk in (1, 5, 37, 1000):
        whole, chunked = soft_cross_entropy(s, t, 2.0), chunked_soft_cross_entropy(s, t, 2.0, chunk)
        assert chunked.item() == pytest.approx(whole.item(), rel=1e-12)
        g_whole, = torch.autograd.grad(whole * 3, s)
        g_chunked, = torch.autograd.grad(chunked * 3, s)          # the incoming gradient is honoured
        torch.testing.assert_close(g_chunked, g_whole, rtol=1e-10, atol=1e-12)
    empty = torch.zeros(0, 50, requires_grad=True)
    assert chunked_soft_cross_entropy(empty, empty.detach(), 2.0, 4).item() == 0.0


def test_chunked_kd_of_bf16_logits_is_computed_in_fp32():
    from sparse_pretrain.core.distill import chunked_soft_cross_entropy
    torch.manual_seed(0)
    s32, t32 = torch.randn(64, 300) * 4, torch.randn(64, 300) * 4
    s, t = s32.bfloat16().requires_grad_(), t32.bfloat16()
    reference = soft_cross_entropy(s.detach().float(), t.float(), 2.0)    # fp32 math on the same bf16 values
    chunked = chunked_soft_cross_entropy(s, t, 2.0, 16)
    assert chunked.dtype == torch.float32
    assert chunked.item() == pytest.approx(reference.item(), rel=1e-6)
    chunked.backward()
    assert s.grad.dtype == torch.bfloat16


def test_chunked_kd_holds_no_fp32_tensor_larger_than_a_chunk():
    """Every fp32 tensor the forward and backward create has at most chunk_rows x V elements (the
    whole-micro-batch loss creates several of rows x V); the gradient is in the logits' dtype."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from sparse_pretrain.core.distill import chunked_soft_cross_entropy

    class LargestFp32(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for tensor in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(tensor, torch.Tensor) and tensor.dtype == torch.float32:
                    self.largest = max(self.largest, tensor.numel())
            return out

    rows, vocab, chunk = 256, 512, 32
    s = torch.randn(rows, vocab, dtype=torch.bfloat16, requires_grad=True)
    t = torch.randn(rows, vocab, dtype=torch.bfloat16)
    with LargestFp32() as chunked_mode:
        chunked_soft_cross_entropy(s, t, 2.0, chunk).backward()
    assert chunked_mode.largest <= chunk * vocab
    with LargestFp32() as whole_mode:
        soft_cross_entropy(s.float(), t.float(), 2.0).backward()
    assert whole_mode.largest == rows * vocab                      # the test can tell the two apart


# -- the KL divergence logged beside the soft cross-entropy ------------------------------------------

@pytest.mark.parametrize("chunk_rows", [0, 3])
def test_the_logged_kl_is_zero_for_the_teachers_own_logits(chunk_rows):
    """The soft cross-entropy of a student equal to its teacher is the teacher's entropy (> 0, about
    T^2 log V for flat logits), the KL term logged beside it is 0."""
    from sparse_pretrain.core.distill import distillation_terms
    torch.manual_seed(3)
    t = torch.randn(7, 50)
    terms = distillation_terms(t.clone().requires_grad_(True), t, 2.0, chunk_rows)
    assert terms.loss.item() > 10.0
    assert abs(terms.kl.item()) < 1e-6


@pytest.mark.parametrize("chunk_rows", [0, 1, 3, 64])
def test_the_logged_kl_is_the_analytic_kl_and_the_loss_and_gradient_are_unchanged(chunk_rows):
    """T^2 x KL(softmax(t/T) || softmax(s/T)) (torch's kl_div, fp64), chunked or not; loss - kl is the
    teacher's entropy x T^2; the loss and its gradient are soft_cross_entropy's, bit for bit unchunked."""
    from sparse_pretrain.core.distill import chunked_soft_cross_entropy, distillation_terms
    torch.manual_seed(4)
    s = torch.randn(2, 5, 11, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 5, 11, dtype=torch.float64) * 3
    T = 2.0
    terms = distillation_terms(s, t, T, chunk_rows)
    log_q, log_p = torch.log_softmax(s.detach() / T, -1), torch.log_softmax(t / T, -1)
    kl = torch.nn.functional.kl_div(log_q.reshape(-1, 11), log_p.reshape(-1, 11), log_target=True,
                                    reduction="batchmean") * T**2
    entropy = -(log_p.exp() * log_p).sum(-1).mean() * T**2
    assert terms.kl.item() == pytest.approx(kl.item(), rel=1e-9)
    assert kl.item() > 0.1
    assert (terms.loss - terms.kl).item() == pytest.approx(entropy.item(), rel=1e-12)
    assert not terms.kl.requires_grad
    reference = chunked_soft_cross_entropy(s, t, T, chunk_rows) if chunk_rows else soft_cross_entropy(s, t, T)
    assert terms.loss.item() == reference.item()
    g_terms, = torch.autograd.grad(terms.loss, s)
    g_reference, = torch.autograd.grad(reference, s)
    assert torch.equal(g_terms, g_reference)


def test_chunked_and_whole_kl_agree_on_fp32_logits():
    from sparse_pretrain.core.distill import distillation_terms
    torch.manual_seed(5)
    s, t = torch.randn(40, 300), torch.randn(40, 300) * 2
    whole, chunked = distillation_terms(s, t, 2.0, 0), distillation_terms(s, t, 2.0, 7)
    assert chunked.kl.item() == pytest.approx(whole.kl.item(), rel=1e-4)
    assert chunked.loss.item() == pytest.approx(whole.loss.item(), rel=1e-6)


def test_pretraining_terms_carry_the_kl_of_mlm_and_nsp():
    from sparse_pretrain.core.distill import distillation_terms
    torch.manual_seed(6)
    attention = torch.ones(2, 3, dtype=torch.long)
    s_mlm, t_mlm = torch.randn(2, 3, 11), torch.randn(2, 3, 11)
    s_nsp, t_nsp = torch.randn(2, 2), torch.randn(2, 2)
    w = DistillationWeights(lambda_pt=0.5, lambda_kd=0.5, temperature=2.0)
    terms = pretraining_distillation_loss(w, torch.tensor(3.0), s_mlm, t_mlm, attention, None, s_nsp, t_nsp)
    expected = distillation_terms(s_mlm, t_mlm).kl + distillation_terms(s_nsp, t_nsp).kl
    assert terms["kd_kl"].item() == pytest.approx(expected.item(), rel=1e-6)
    same = pretraining_distillation_loss(w, torch.tensor(3.0), t_mlm, t_mlm, attention, None, t_nsp, t_nsp)
    assert abs(same["kd_kl"].item()) < 1e-6 and same["kd"].item() > 1.0
