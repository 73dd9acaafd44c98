"""Distillation (lab 20): the KD loss against hand computation, training on it, teacher text."""

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_ZOO, tiny_model

from labsupport import distill
from labsupport.measure import flops_per_token, generation_flops
from labsupport.model import ModelConfig, generate
from labsupport.train import TrainConfig

GEN = torch.Generator().manual_seed(0)
STUDENT = torch.randn(3, 5, 11, generator=GEN)
TEACHER = torch.randn(3, 5, 11, generator=GEN) * 2
TARGETS = torch.randint(0, 11, (3, 5), generator=GEN)


def test_alpha_zero_is_cross_entropy():
    loss = distill.kd_loss(STUDENT, TEACHER, TARGETS, temperature=3.0, alpha=0.0)
    torch.testing.assert_close(loss, F.cross_entropy(STUDENT.flatten(0, 1), TARGETS.flatten()))


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_alpha_one_is_t_squared_kl_by_hand(temperature):
    p_t = torch.softmax(TEACHER / temperature, -1)
    p_s = torch.softmax(STUDENT / temperature, -1)
    by_hand = temperature ** 2 * (p_t * (p_t.log() - p_s.log())).sum(-1).mean()
    loss = distill.kd_loss(STUDENT, TEACHER, TARGETS, temperature=temperature, alpha=1.0)
    torch.testing.assert_close(loss, by_hand, rtol=1e-5, atol=1e-6)


def test_alpha_mixes_the_two_terms():
    soft = distill.kd_loss(STUDENT, TEACHER, TARGETS, temperature=2.0, alpha=1.0)
    hard = distill.kd_loss(STUDENT, TEACHER, TARGETS, temperature=2.0, alpha=0.0)
    mixed = distill.kd_loss(STUDENT, TEACHER, TARGETS, temperature=2.0, alpha=0.3)
    torch.testing.assert_close(mixed, 0.3 * soft + 0.7 * hard)


def test_gradient_vanishes_when_the_student_equals_the_teacher():
    student = TEACHER.clone().requires_grad_(True)
    distill.kd_loss(student, TEACHER, TARGETS, temperature=2.0, alpha=1.0).backward()
    assert student.grad.abs().max() < 1e-6


def test_reverse_kl_differs_from_forward_on_asymmetric_inputs():
    forward = distill.kd_loss(STUDENT, TEACHER, TARGETS, alpha=1.0)
    reverse = distill.kd_loss(STUDENT, TEACHER, TARGETS, alpha=1.0, reverse=True)
    p_s, p_t = torch.softmax(STUDENT, -1), torch.softmax(TEACHER, -1)
    by_hand = (p_s * (p_s.log() - p_t.log())).sum(-1).mean()
    torch.testing.assert_close(reverse, by_hand, rtol=1e-5, atol=1e-6)
    assert abs(forward.item() - reverse.item()) > 0.01


def _mean_kl(student, teacher, x):
    with torch.no_grad():
        return distill.kd_loss(student(x), teacher(x), x, alpha=1.0).item()


def test_distillation_brings_the_student_towards_the_teacher():
    teacher, student = tiny_model(seed=1), tiny_model(seed=2)
    stream = torch.randint(0, 256, (4000,), generator=torch.Generator().manual_seed(3))
    x = stream[:256].view(4, 64)
    before = _mean_kl(student, teacher, x)
    teacher.train()  # a slip the function corrects: the teacher goes to eval mode
    cfg = TrainConfig(steps=40, batch_size=8, seq_len=64, lr=3e-3, warmup_steps=2,
                      eval_every=40, eval_batches=1)
    student, history = distill.distill(student, teacher, stream, stream, cfg, temperature=2.0,
                                       alpha=1.0, progress=False)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert _mean_kl(student, teacher, x) < 0.5 * before
    assert history[-1]["val_loss"] > 0  # validation still reports cross-entropy on real data


@pytest.mark.parametrize("kwargs, match", [
    ({"temperature": 0.0}, "temperature must be > 0"),
    ({"alpha": 1.5}, "alpha must be in"),
    ({"alpha": -0.1}, "alpha must be in"),
])
def test_bad_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        distill.kd_loss(STUDENT, TEACHER, TARGETS, **kwargs)


def test_different_vocabularies_are_refused():
    with pytest.raises(ValueError, match="same shape"):
        distill.kd_loss(STUDENT, TEACHER[..., :7], TARGETS)
    cfg = TrainConfig(steps=1, batch_size=2, seq_len=16, eval_every=1, eval_batches=1)
    with pytest.raises(ValueError, match="share a vocabulary"):
        distill.distill(tiny_model(), tiny_model(vocab_size=128), torch.arange(100) % 128,
                        None, cfg, progress=False)


def test_teacher_corpus_is_teacher_text_in_files():
    teacher = tiny_model(seed=4)  # context 64
    source = torch.randint(1, 256, (2000,), generator=torch.Generator().manual_seed(5))
    text = distill.teacher_corpus(teacher, 500, prompt_len=16, temperature=1.0,
                                  source_tokens=source, batch_size=4, seed=1)
    assert text.numel() == 500 and text.dtype == torch.long
    per_sample = 64 - 16 + 1  # the written tokens and the <|endoftext|> that closes them
    assert (text[per_sample - 1::per_sample] == 0).all()
    again = distill.teacher_corpus(teacher, 500, prompt_len=16, temperature=1.0,
                                   source_tokens=source, batch_size=4, seed=1)
    assert torch.equal(text, again)
    with pytest.raises(ValueError, match="prompt_len"):
        distill.teacher_corpus(teacher, 10, prompt_len=64, source_tokens=source)


STUDENT_CFG = ModelConfig(vocab_size=512, d_model=16, n_layers=1, n_heads=2, d_ff=32,
                          max_seq_len=32)
STUDENT_TRAIN = TrainConfig(steps=5, batch_size=4, seq_len=32, lr=3e-3, warmup_steps=1,
                            eval_every=5, eval_batches=1)


def test_students_of_each_method_train_and_are_cached():
    text = distill.TeacherText(n_tokens=5 * 4 * 33, prompt_len=8)
    specs = [distill.StudentRun(STUDENT_CFG, STUDENT_TRAIN, "hard", teacher=TINY_ZOO,
                                eval_batches=2),
             distill.StudentRun(STUDENT_CFG, STUDENT_TRAIN, "soft", temperature=2.0, alpha=0.5,
                                teacher=TINY_ZOO, eval_batches=2),
             distill.StudentRun(STUDENT_CFG, STUDENT_TRAIN, "sequence", text=text,
                                teacher=TINY_ZOO, eval_batches=2)]
    results = distill.run_all(specs, workers=1, progress=False)
    assert [r["method"] for r in results] == ["hard", "soft", "sequence"]
    for r in results:
        assert 0 <= r["top1"] <= 1 and r["kl"] >= 0 and r["val_loss"] > 0
    assert len({r["val_loss"] for r in results}) == 3  # three different trainings
    assert distill.run(specs[1]) == results[1]  # read back from the cache
    written = distill.teacher_text(TINY_ZOO, text)
    assert written.numel() == text.n_tokens


@pytest.mark.parametrize("kwargs, match", [
    ({"method": "logits"}, "method must be one of"),
    ({"method": "sequence"}, "text .* is needed"),
    ({"method": "hard", "text": distill.TeacherText(100)}, "text .* is needed"),
    ({"method": "soft", "temperature": -1.0}, "temperature must be > 0"),
])
def test_bad_student_runs_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        distill.StudentRun(STUDENT_CFG, STUDENT_TRAIN, teacher=TINY_ZOO, **kwargs)


def test_text_samples_counts_what_teacher_corpus_writes(monkeypatch):
    teacher = tiny_model(seed=4)  # context 64
    source = torch.randint(1, 256, (2000,), generator=torch.Generator().manual_seed(5))
    written = []

    def counting_generate(model, prompt, *args, **kwargs):
        written.append(prompt.shape[0])
        return generate(model, prompt, *args, **kwargs)

    monkeypatch.setattr(distill, "generate", counting_generate)
    for n_tokens in (1, 49, 50, 500):
        written.clear()
        distill.teacher_corpus(teacher, n_tokens, prompt_len=16, source_tokens=source,
                               batch_size=4)
        text = distill.TeacherText(n_tokens, prompt_len=16, batch_size=4)
        assert distill.text_samples(text, teacher_context=64) == sum(written)


def test_train_flops_charge_the_teacher_by_method():
    text = distill.TeacherText(n_tokens=STUDENT_TRAIN.steps * STUDENT_TRAIN.tokens_per_step,
                               prompt_len=8)
    hard, soft, seq = (distill.train_flops(distill.StudentRun(
        STUDENT_CFG, STUDENT_TRAIN, method, text=text if method == "sequence" else None,
        teacher=TINY_ZOO)) for method in ("hard", "soft", "sequence"))
    tokens = STUDENT_TRAIN.steps * STUDENT_TRAIN.tokens_per_step
    context = (STUDENT_TRAIN.seq_len + 1) / 2
    assert hard["teacher"] == 0
    assert hard["student"] == soft["student"] == seq["student"] == pytest.approx(
        3 * flops_per_token(STUDENT_CFG, context) * tokens)
    assert soft["teacher"] == pytest.approx(flops_per_token(TINY_ZOO.model, context) * tokens)
    # writing is a forward pass per token too, plus each sample's prompt and whole batches
    assert seq["teacher"] > soft["teacher"]
    samples = distill.text_samples(text, TINY_ZOO.model.max_seq_len)
    assert seq["teacher"] == pytest.approx(
        samples * generation_flops(TINY_ZOO.model, 8, TINY_ZOO.model.max_seq_len - 8))
