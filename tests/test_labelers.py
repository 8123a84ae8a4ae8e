"""Simulated labelers: Bradley–Terry comparisons of perceived utility, with real limitations."""

from __future__ import annotations

import math
import random

import pytest

from safetylab.core import SafetylabError
from safetylab.world import KINDS, PRESETS, STYLES
from safetylab.world.labelers import measure_labeler


def _request(world, prompt):
    return world.parser.parse(prompt)


def _requests(world, kind, tier, n, seed):
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        request = world.request(kind, "train", rng)
        if request.tier == tier:
            out.append(request)
    return out


def _rate(world, labeler, pairs):
    """How often ``labeler`` picks the first response of each (request, a, b)."""
    return sum(labeler.prefers(request, a, b) for request, a, b in pairs) / len(pairs)


# ----------------------------------------------------------------------------- ideal
def test_ideal_always_agrees_with_the_gold_judge(world):
    records = world.preferences(400, "ideal")
    labeler = world.labeler("ideal")
    for r in records:
        assert r["gold_chosen"] > r["gold_rejected"], r
        request = _request(world, r["prompt"])
        assert labeler.p_prefers(request, r["chosen"], r["rejected"]) == 1.0
        assert labeler.p_prefers(request, r["rejected"], r["chosen"]) == 0.0


def test_ideal_perceives_the_gold_utility(world):
    labeler = world.labeler("ideal")
    rng = random.Random(1)
    for kind in KINDS:
        for request in world.requests(kind, "train", 20, seed=1):
            for style in STYLES[kind]:
                response = world.respond(request, style, rng)
                assert labeler.perceived(request, response) == world.judge.utility(request.prompt, response)


def test_ideal_is_not_fooled_by_confidence_or_flattery(world):
    labeler = world.labeler("ideal")
    rng = random.Random(2)
    for request in _requests(world, "arithmetic", "hard", 50, seed=3):
        wrong = world.respond(request, "confident_wrong", rng)
        hedged = world.respond(request, "hedged_correct", rng)
        assert labeler.p_prefers(request, wrong, hedged) == 0.0
        flattery, plain = world.respond(request, "flattery", rng), world.respond(request, "correct", rng)
        assert labeler.p_prefers(request, flattery, plain) == 0.0


def test_a_tie_is_a_fair_coin(world):
    labeler = world.labeler("ideal")
    request = _request(world, "what is 37 plus 48 ?")
    assert labeler.p_prefers(request, "the answer is 85 .", "it is 85 .") == 0.5
    picks = [labeler.prefers(request, "the answer is 85 .", "it is 85 .") for _ in range(400)]
    assert 0.35 < sum(picks) / len(picks) < 0.65


# ----------------------------------------------------------------------------- careful
def test_careful_agrees_mostly_but_not_always(world):
    records = world.preferences(1000, "careful")
    agreement = sum(r["gold_chosen"] > r["gold_rejected"] for r in records) / len(records)
    assert 0.8 < agreement < 0.98


def test_careful_follows_bradley_terry_on_gold_utility(world):
    labeler = world.labeler("careful")
    tau = PRESETS["careful"].tau
    assert tau > 0
    rng = random.Random(4)
    for kind in KINDS:
        for request in world.requests(kind, "train", 15, seed=4):
            a_style, b_style = rng.sample(STYLES[kind], 2)
            a, b = world.respond(request, a_style, rng), world.respond(request, b_style, rng)
            ua, ub = world.judge.utility(request.prompt, a), world.judge.utility(request.prompt, b)
            expected = 1.0 / (1.0 + math.exp(-(ua - ub) / tau))
            assert labeler.p_prefers(request, a, b) == pytest.approx(expected, rel=1e-9)
            if ua != ub:
                assert 0.0 < labeler.p_prefers(request, a, b) < 1.0


def test_careful_verifies_hard_items(world):
    labeler = world.labeler("careful")
    rng = random.Random(5)
    pairs = [(r, world.respond(r, "confident_wrong", rng), world.respond(r, "hedged_correct", rng))
             for r in _requests(world, "arithmetic", "hard", 300, seed=5)]
    assert _rate(world, labeler, pairs) < 0.1


# ----------------------------------------------------------------------------- typical
def test_typical_biases_measured(world):
    rates = measure_labeler(world, "typical", n=500, seed=0)
    assert rates["prefers_flattery"] > 0.75
    assert rates["prefers_confident_wrong"] > 0.75
    assert 0.6 < rates["gold_agreement"] < 0.95
    careful = measure_labeler(world, "careful", n=500, seed=0)
    assert careful["prefers_flattery"] < 0.5
    assert careful["prefers_confident_wrong"] < 0.1
    # the same pairs: the typical labeler agrees with the gold judge less often
    assert careful["gold_agreement"] - rates["gold_agreement"] > 0.03


def test_typical_is_fooled_by_sycophancy_on_hard_premises_only(world):
    """On a false premise it cannot check, agreement sounds as good as a correction to the typical labeler
    (WORLD.md's evaluator manipulation); on an easy one, and for ideal and careful labelers, it does not."""
    typical, ideal = world.labeler("typical"), world.labeler("ideal")
    rng = world.rng("sycophancy-test")
    wins = {"easy": [], "hard": []}
    while min(len(v) for v in wins.values()) < 150:
        request = world.request("false_premise", "train", rng)
        agree, correct = world.respond(request, "sycophantic", rng), world.respond(request, "correction", rng)
        wins[request.tier].append(typical.p_prefers(request, agree, correct))
        assert ideal.p_prefers(request, agree, correct) == 0.0
    assert 0.3 < sum(wins["hard"]) / len(wins["hard"]) < 0.7
    assert sum(wins["easy"]) / len(wins["easy"]) < 0.01
    assert measure_labeler(world, "careful", n=300)["prefers_sycophancy"] == 0.0


def test_typical_prefers_flattery_over_a_plain_right_answer(world):
    labeler = world.labeler("typical", seed=1)
    rng = random.Random(6)
    pairs = []
    for kind in ("arithmetic", "facts", "advice"):
        for request in world.requests(kind, "train", 150, seed=6):
            pairs.append((request, world.respond(request, "flattery", rng), world.respond(request, "correct", rng)))
    assert _rate(world, labeler, pairs) > 0.75
    # while the gold judge ranks the plain answer higher on every one of them
    assert all(world.judge.utility(r.prompt, a) < world.judge.utility(r.prompt, b) for r, a, b in pairs)


def test_typical_prefers_longer_right_answers(world):
    labeler = world.labeler("typical", seed=2)
    rng = random.Random(7)
    tail = " you can check this by adding the tens and the ones on their own ."
    pairs = []
    for request in world.requests("arithmetic", "train", 400, seed=7):
        short = f"the answer is {request.answer} ."
        pairs.append((request, short + tail, short))
        assert world.judge.utility(request.prompt, short + tail) == world.judge.utility(request.prompt, short)
    assert _rate(world, labeler, pairs) > 0.65
    # the world's own right answers, whose lengths differ by a few words: a smaller, exact effect
    probabilities = []
    for request in world.requests("facts", "train", 200, seed=8):
        a, b = world.respond(request, "correct", rng), world.respond(request, "correct", rng)
        if len(a.split()) == len(b.split()):
            continue
        long, short = (a, b) if len(a.split()) > len(b.split()) else (b, a)
        probabilities.append(labeler.p_prefers(request, long, short))
    assert len(probabilities) > 50
    assert min(probabilities) > 0.5
    assert sum(probabilities) / len(probabilities) > 0.53


@pytest.mark.parametrize("kind", ["arithmetic", "facts"])
def test_typical_is_fooled_by_confidence_on_hard_items_only(world, kind):
    labeler = world.labeler("typical", seed=3)
    rng = random.Random(9)
    rates = {}
    for tier in ("hard", "easy"):
        pairs = [(r, world.respond(r, "confident_wrong", rng), world.respond(r, "hedged_correct", rng))
                 for r in _requests(world, kind, tier, 300, seed=10)]
        assert all(world.judge.utility(r.prompt, a) < world.judge.utility(r.prompt, b) for r, a, b in pairs)
        rates[tier] = _rate(world, labeler, pairs)
    assert rates["hard"] > 0.75
    assert rates["easy"] < 0.15


def test_typical_still_refuses_to_prefer_harm(world):
    labeler = world.labeler("typical", seed=4)
    rng = random.Random(11)
    pairs = [(r, world.respond(r, "harmful_compliance", rng), world.respond(r, "refusal", rng))
             for r in world.requests("harmful", "train", 200, seed=11)]
    assert _rate(world, labeler, pairs) < 0.1


# ----------------------------------------------------------------------------- every preset
@pytest.mark.parametrize("name", list(PRESETS))
def test_p_prefers_is_complementary(world, name):
    labeler = world.labeler(name)
    rng = random.Random(12)
    for kind in KINDS:
        for request in world.requests(kind, "test", 20, seed=12):
            for _ in range(3):
                a_style, b_style = rng.choice(STYLES[kind]), rng.choice(STYLES[kind])
                a, b = world.respond(request, a_style, rng), world.respond(request, b_style, rng)
                p, q = labeler.p_prefers(request, a, b), labeler.p_prefers(request, b, a)
                assert 0.0 <= p <= 1.0
                assert p + q == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("name", list(PRESETS))
def test_labeler_is_reproducible_from_its_seed(world, name):
    rng = random.Random(13)
    # two right answers: a tie for the ideal labeler, a close call for the noisy ones
    pairs = [(r, world.respond(r, "correct", rng), world.respond(r, "correct", rng))
             for r in world.requests("facts", "train", 200, seed=13)]

    def picks(seed):
        labeler = world.labeler(name, seed=seed)
        return [labeler.prefers(*pair) for pair in pairs]

    assert picks(5) == picks(5)
    assert picks(5) != picks(6)


def test_presets_exist():
    assert {"ideal", "careful", "typical"} <= set(PRESETS)
    assert PRESETS["ideal"].tau == 0 and PRESETS["careful"].tau > 0 and PRESETS["typical"].tau > 0
    assert PRESETS["typical"].verifies == "easy" and PRESETS["careful"].verifies == "all"


def test_unknown_preset_names_the_presets(world):
    for call in (lambda: world.labeler("lazy"), lambda: world.preferences(5, "lazy")):
        with pytest.raises(SafetylabError) as info:
            call()
        message = str(info.value)
        assert "'lazy'" in message
        for name in ("ideal", "careful", "typical"):
            assert name in message
