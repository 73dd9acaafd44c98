"""The serving engine (lab 30): every policy gives each request its solo output; scheduling."""

import time

import pytest
import torch

from labsupport.model import ModelConfig, Transformer, generate
from labsupport.serving import Engine, Request, near_tie_gap

CFG = ModelConfig(vocab_size=256, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                  max_seq_len=64)


def decisive_model(seed: int = 0) -> Transformer:
    """A random model with large weights: its logits are far apart, as a trained model's are."""
    torch.manual_seed(seed)
    model = Transformer(CFG).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(5)
    return model


MODEL = decisive_model()


def mixed_requests(n: int = 12, seed: int = 1) -> list[Request]:
    """Prompts of 1-19 tokens and outputs of 1-29: lengths that differ within every batch."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        prompt_len = int(torch.randint(1, 20, (1,), generator=g))
        out.append(Request(prompt=torch.randint(0, 256, (prompt_len,), generator=g).tolist(),
                           max_tokens=int(torch.randint(1, 30, (1,), generator=g))))
    return out


def solo(request: Request) -> list[int]:
    prompt = torch.tensor([request.prompt])
    return generate(MODEL, prompt, request.max_tokens)[0, len(request.prompt):].tolist()


def assert_solo_or_near_tie(request: Request) -> None:
    """The output equals the solo greedy output, or differs first where the solo run had a tie."""
    gap = near_tie_gap(MODEL, request.prompt, request.output, solo(request))
    assert gap is None or gap < 1e-4, f"request {request.id} differs, top-two gap {gap}"


def test_near_tie_gap_is_none_when_equal_and_the_solo_gap_otherwise():
    request = Request(prompt=[1, 2, 3], max_tokens=5)
    alone = solo(request)
    assert near_tie_gap(MODEL, request.prompt, alone, alone) is None
    other = alone[:2] + [(alone[2] + 1) % 256] + alone[3:]
    with torch.no_grad():
        top2 = MODEL(torch.tensor([request.prompt + alone[:2]]))[0, -1].topk(2).values
    assert near_tie_gap(MODEL, request.prompt, other, alone) == pytest.approx(
        float(top2[0] - top2[1]))


@pytest.mark.parametrize("policy", ["static", "dynamic", "continuous"])
def test_every_policy_gives_each_request_its_solo_output(policy):
    requests = mixed_requests()
    engine = Engine(MODEL, max_batch=4, policy=policy)
    engine.run(requests)
    assert engine.idle() and engine.running == 0
    for r in requests:
        assert len(r.output) == r.max_tokens and r.done.is_set()
        assert r.arrived <= r.first_token <= r.finished
        assert_solo_or_near_tie(r)


def test_continuous_refills_slots_and_static_does_not():
    static, continuous = Engine(MODEL, 4, "static"), Engine(MODEL, 4, "continuous")
    static.run(mixed_requests())
    continuous.run(mixed_requests())
    # a static batch admits only into an empty engine; continuous admits beside running ones
    assert all(s.running == 0 for s in static.steps if s.prefilled)
    assert any(s.running > 0 for s in continuous.steps if s.prefilled)
    assert len(continuous.steps) < len(static.steps)
    for s in continuous.steps:
        assert s.held_tokens <= s.reserved_tokens


def test_static_waits_for_a_full_batch():
    engine = Engine(MODEL, max_batch=3, policy="static", static_timeout_s=60)
    for _ in range(2):
        engine.submit(Request(prompt=[1, 2], max_tokens=2))
    assert not engine.step() and engine.running == 0
    engine.submit(Request(prompt=[3], max_tokens=2))
    assert engine.step() and engine.running == 3


def test_dynamic_starts_a_partial_batch_when_its_window_closes():
    engine = Engine(MODEL, max_batch=4, policy="dynamic", window_s=0.2)
    engine.submit(Request(prompt=[1, 2, 3], max_tokens=3))
    assert not engine.step()
    time.sleep(0.25)
    assert engine.step() and engine.running == 1


def test_a_cancelled_request_frees_its_slot_at_the_next_step():
    engine = Engine(MODEL, max_batch=2, policy="continuous")
    long = engine.submit(Request(prompt=[5, 6], max_tokens=40))
    for _ in range(3):
        engine.step()
    engine.cancel(long)
    engine.step()
    assert engine.running == 0 and long.done.is_set() and len(long.output) == 3
    waiting = engine.submit(Request(prompt=[7], max_tokens=5))
    engine.cancel(waiting)  # cancelled before it started: never takes a slot
    assert not engine.step() and waiting.done.is_set() and waiting.output == []


def test_a_cancelled_request_behind_others_in_the_queue_is_never_run():
    engine = Engine(MODEL, max_batch=3, policy="continuous")
    first, middle, last = (engine.submit(Request(prompt=[i + 1] * 4, max_tokens=3))
                           for i in range(3))
    engine.cancel(middle)
    engine.step()
    assert middle.done.is_set() and middle.output == [] and middle not in engine.slots
    assert engine.running == 2 and engine.steps[0].prefilled == 2
    assert first.output and last.output


def test_steps_record_the_cache_positions_decode_reads():
    engine = Engine(MODEL, max_batch=2, policy="continuous")
    engine.run([Request(prompt=[1] * 3, max_tokens=4), Request(prompt=[2] * 7, max_tokens=4)])
    decode = [s for s in engine.steps if s.running]
    # the first decode step: both sequences, the longer at position 7, so 8 keys each
    assert decode[0].running == 2 and decode[0].keys_read == 2 * 8
    assert all(s.keys_read == 0 for s in engine.steps if not s.running)


def test_a_bfloat16_model_serves_batched_as_it_generates_alone():
    model = decisive_model().to(torch.bfloat16)
    requests = mixed_requests(8)
    Engine(model, max_batch=4, policy="continuous").run(requests)
    agree = []
    for r in requests:
        alone = generate(model, torch.tensor([r.prompt]), r.max_tokens)[0, len(r.prompt):]
        assert len(r.output) == r.max_tokens
        agree.append(r.output[:3] == alone[:3].tolist())
    # bf16 rounds each sum to 8 bits, so batch shape moves logits more; the start must agree
    assert sum(agree) >= 6, agree


def test_seeded_sampling_does_not_depend_on_the_batch():
    def sampled(companions: int) -> list[int]:
        engine = Engine(MODEL, max_batch=4, policy="continuous")
        mine = Request(prompt=[9, 8, 7], max_tokens=12, temperature=1.0, seed=3)
        others = [Request(prompt=[i + 1], max_tokens=12, temperature=1.0, seed=i)
                  for i in range(companions)]
        engine.run([mine, *others])
        return mine.output

    assert sampled(0) == sampled(3)


def test_callbacks_see_every_token_in_order():
    seen = []
    request = Request(prompt=[4, 4], max_tokens=6, on_token=lambda r, t: seen.append(t))
    Engine(MODEL, 2).run([request])
    assert seen == request.output == solo(request)


@pytest.mark.parametrize("kwargs, match", [
    ({"policy": "fifo"}, "policy must be one of"),
    ({"max_batch": 0}, "max_batch must be >= 1"),
    ({"window_s": -1}, "must be >= 0"),
])
def test_bad_engine_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Engine(MODEL, **kwargs)


@pytest.mark.parametrize("request_kwargs, match", [
    ({"prompt": [], "max_tokens": 4}, "prompt must hold"),
    ({"prompt": [1], "max_tokens": 0}, "max_tokens must be >= 1"),
    ({"prompt": [1] * 60, "max_tokens": 5}, "exceeds the context of 64"),
    ({"prompt": [256], "max_tokens": 5}, r"token ids must be in 0\.\.255"),
    ({"prompt": [1], "max_tokens": 5, "temperature": -1.0}, "temperature must be >= 0"),
])
def test_bad_requests_are_refused(request_kwargs, match):
    with pytest.raises(ValueError, match=match):
        Engine(MODEL).submit(Request(**request_kwargs))


def test_a_full_queue_refuses_more():
    engine = Engine(MODEL, max_queue=2)
    engine.submit(Request(prompt=[1], max_tokens=1))
    engine.submit(Request(prompt=[1], max_tokens=1))
    with pytest.raises(OverflowError, match="queue full"):
        engine.submit(Request(prompt=[1], max_tokens=1))
