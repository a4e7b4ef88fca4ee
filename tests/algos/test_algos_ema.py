"""EMA-balanced LoRA maths: the balance weight, the EMA step, I-LoRA's interpolation, the TF-IDF similarity, and
the invariants of ALGORITHMS.md (fallback range, retrain-or-expand, routing)."""

from __future__ import annotations

import math
import random

import pytest
import torch

from posttrain.algos.ema import (
    EMA_WEIGHTS,
    DynamicEMAArgs,
    FixedEMAArgs,
    dynamic_ema_weight,
    ema_update,
    ilora_interpolate,
    instruction_set_similarity,
    retrain_or_expand,
    route_instruction,
    tfidf_cosine,
    tfidf_tokens,
)

T = torch.tensor


def test_dynamic_weight_hand_computed_inside_the_range() -> None:
    # a = |[5, 5] - [0, 0]|_1 = 10, b = |[0.5, 0.5]|_1 = 1, c = |[0.5, 0.5] - 0|_1 = 1: w = 2 * 2 / 10 = 0.4
    w = dynamic_ema_weight(T([5.0, 5.0]), T([0.0, 0.0]), T([0.5, 0.5]), T([0.0, 0.0]))
    assert w == pytest.approx(0.4, abs=1e-12)
    # scale 1.5 on a 2 x 2 tensor: a = 4, b = 3, c = |[[2, 1], [0.5, -1]]|_1 = 4.5: w = 1.5 * 4 / 18 = 1/3
    theta, ema = T([[1.0, -1.0], [1.0, 1.0]]), T([[0.0, 0.0], [0.0, 0.0]])
    grad, prev = T([[1.0, 1.0], [0.5, -0.5]]), T([[-1.0, 0.0], [0.0, 0.5]])
    assert dynamic_ema_weight(theta, ema, grad, prev, scale=1.5) == pytest.approx(1 / 3, abs=1e-12)


@pytest.mark.parametrize("case", [
    # a = 1, b = 0.3, c = 0.6: w = 2 * 1.3 / 0.6 = 4.33 > 1
    (T([1.0, 2.0]), T([0.5, 1.5]), T([0.1, -0.2]), T([0.3, 0.2])),
    # w = 2 * (1 + 1) / (2 * 2) = 1 exactly: the interval is open
    (T([2.0]), T([0.0]), T([1.0]), T([-1.0])),
    # a = 0 (theta equals the EMA): w is infinite
    (T([1.0, 1.0]), T([1.0, 1.0]), T([0.1, 0.1]), T([0.0, 0.0])),
    # c = 0 (the gradient did not change)
    (T([3.0]), T([0.0]), T([0.2]), T([0.2])),
    # a NaN gradient: w is NaN
    (T([3.0]), T([0.0]), T([float("nan")]), T([0.2])),
], ids=["above-1", "exactly-1", "a-zero", "c-zero", "nan"])
def test_outside_the_open_interval_the_weight_is_the_fallback(case) -> None:
    assert dynamic_ema_weight(*case) == 0.01
    assert dynamic_ema_weight(*case, fallback=0.05) == 0.05


def test_fallback_weight_moves_the_ema_by_exactly_the_fallback() -> None:
    g = torch.Generator().manual_seed(0)
    ema, theta = torch.randn(8, 4, generator=g), torch.randn(8, 4, generator=g)
    w = dynamic_ema_weight(theta, theta.clone(), torch.ones(8, 4), torch.zeros(8, 4))  # a = 0
    assert w == 0.01
    out = ema_update(ema, theta, w)
    assert torch.equal(out, ema * 0.99 + theta * 0.01)
    torch.testing.assert_close(out - ema, 0.01 * (theta - ema))


def test_random_weights_are_in_range_or_the_fallback() -> None:
    rng = torch.Generator().manual_seed(1)
    for _ in range(200):
        shape = (int(torch.randint(1, 6, (1,), generator=rng)), 3)
        scale = float(torch.rand(1, generator=rng)) * 10 ** float(torch.randint(-3, 4, (1,), generator=rng))
        args = [torch.randn(shape, generator=rng) * scale for _ in range(4)]
        w = dynamic_ema_weight(*args)
        assert w == 0.01 or 0 < w < 1


def test_dynamic_weight_is_computed_in_float64_for_low_precision_tensors() -> None:
    theta = torch.full((4096,), 0.001, dtype=torch.bfloat16)
    zero = torch.zeros(4096, dtype=torch.bfloat16)
    g = torch.full((4096,), 0.01, dtype=torch.bfloat16)
    exact = 2 * (1 + float(g.double().sum())) / (float(theta.double().sum()) * float(g.double().sum()))
    w = dynamic_ema_weight(theta, zero, g, zero, scale=2.0)
    assert w == 0.01 if not 0 < exact < 1 else w == pytest.approx(exact, rel=1e-9)
    with pytest.raises(ValueError, match="shapes differ"):
        dynamic_ema_weight(theta, zero[:3], g, zero)


def test_ema_update_new_and_old_readings() -> None:
    ema, theta = T([1.0, 2.0]), T([3.0, 6.0])
    assert torch.equal(ema_update(ema, theta, 0.25), T([1.5, 3.0]))  # 0.75 * ema + 0.25 * theta
    assert torch.equal(ema_update(ema, theta, 0.25, apply_to="old"), T([2.5, 5.0]))  # 0.25 * ema + 0.75 * theta
    assert torch.equal(ema_update(ema, theta, 0.0), ema) and torch.equal(ema_update(ema, theta, 1.0), theta)
    assert torch.equal(ema, T([1.0, 2.0])) and torch.equal(theta, T([3.0, 6.0]))  # inputs untouched
    with pytest.raises(ValueError):
        ema_update(ema, theta, 1.5)
    with pytest.raises(ValueError):
        ema_update(ema, theta, 0.5, apply_to="both")  # type: ignore[arg-type]


def test_ilora_interpolation_is_the_fixed_ema_with_one_minus_lambda() -> None:
    g = torch.Generator().manual_seed(2)
    slow, fast = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    out = ilora_interpolate(slow, fast, 0.25)
    torch.testing.assert_close(out, 0.25 * slow + 0.75 * fast)
    w = EMA_WEIGHTS.get("fixed")(fast, slow, fast, fast, FixedEMAArgs(weight=0.75))
    assert torch.equal(ema_update(slow, fast, w), out)


def test_registry_entries_share_one_signature() -> None:
    assert set(EMA_WEIGHTS.names()) == {"dynamic", "fixed"}
    theta, ema, grad, prev = T([5.0, 5.0]), T([0.0, 0.0]), T([0.5, 0.5]), T([0.0, 0.0])
    for name in EMA_WEIGHTS.names():
        args = EMA_WEIGHTS.args_class(name)()
        w = EMA_WEIGHTS.get(name)(theta, ema, grad, prev, args)
        assert isinstance(w, float) and 0 < w <= 1
    assert EMA_WEIGHTS.get("dynamic")(theta, ema, grad, prev, DynamicEMAArgs()) == pytest.approx(0.4)
    assert DynamicEMAArgs.needs_grad and not FixedEMAArgs.needs_grad
    with pytest.raises(ValueError):
        DynamicEMAArgs(fallback=0.0)
    with pytest.raises(ValueError):
        FixedEMAArgs(weight=1.5)


# --------------------------------------------------------------------------------------------- TF-IDF
def test_tfidf_cosine_hand_computed() -> None:
    # idf(apple) = ln(3/3) + 1 = 1, idf(banana) = idf(cherry) = ln(3/2) + 1; cos = 1 / (1 + (ln 1.5 + 1)^2)
    expected = 1.0 / (1.0 + (math.log(1.5) + 1.0) ** 2)
    assert tfidf_cosine("Apple banana", "the apple, and a cherry") == pytest.approx(expected, abs=1e-12)
    assert tfidf_tokens("What is the topic of the following paragraph?") == ["topic", "following", "paragraph"]
    assert tfidf_cosine("What is it?", "the topic") == 0.0  # only stop words on one side
    assert tfidf_cosine("topic words", "topic words") == pytest.approx(1.0)


def test_tfidf_cosine_equals_scikit_learn_on_random_texts() -> None:
    sklearn = pytest.importorskip("sklearn")
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS, TfidfVectorizer
    from sklearn.metrics.pairwise import cosine_similarity

    from posttrain.algos.ema import ENGLISH_STOP_WORDS as OURS

    assert OURS == frozenset(ENGLISH_STOP_WORDS), sklearn.__version__
    words = "sentiment topic paragraph sentence option choose logical relationship passage question true false " \
            "the of a is what word sense same meaning first second x 1 2 according given".split()
    rng = random.Random(0)
    for _ in range(100):
        a = " ".join(rng.choice(words) for _ in range(rng.randint(1, 12)))
        b = " ".join(rng.choice(words) for _ in range(rng.randint(1, 12)))
        try:
            m = TfidfVectorizer(stop_words="english").fit_transform([a, b])
        except ValueError:  # empty vocabulary: both texts are stop words only
            assert tfidf_cosine(a, b) == 0.0
            continue
        assert tfidf_cosine(a, b) == pytest.approx(float(cosine_similarity(m[0:1], m[1:2])[0][0]), abs=1e-12)


SC = "What is the sentiment of the following paragraph? Choose one from the option."
TC = "What is the topic of the following paragraph? Choose one from the option."
NLI = 'What is the logical relationship between the "sentence 1" and the "sentence 2"? Choose one from the option.'
QQP = 'Whether the "first sentence" and the "second sentence" have the same meaning? Choose one from the option.'


def test_set_similarity_mean_over_pairs_and_best_match() -> None:
    assert instruction_set_similarity([SC], [SC]) == pytest.approx(1.0)
    pairs = (tfidf_cosine(SC, SC) + tfidf_cosine(SC, TC) + tfidf_cosine(TC, SC) + tfidf_cosine(TC, TC)) / 4
    assert instruction_set_similarity([SC, TC], [SC, TC]) == pytest.approx(pairs)
    assert pairs < 0.9  # identical but mutually dissimilar sets: every cross pair counts
    assert instruction_set_similarity([SC, TC], [SC, TC], reduce="best_match") == pytest.approx(1.0)
    assert instruction_set_similarity([SC], [SC, TC, NLI], reduce="best_match") == pytest.approx(1.0)
    with pytest.raises(ValueError):
        instruction_set_similarity([], [SC])


def test_identical_instructions_reuse_the_group_disjoint_ones_open_one() -> None:
    groups = [[NLI], [SC]]
    assert retrain_or_expand([SC], groups)[0] == 1
    assert retrain_or_expand([SC, SC], groups)[0] == 1
    index, sims = retrain_or_expand(["Translate this poem into French verse."], groups)
    assert index is None and sims == [0.0, 0.0]  # disjoint vocabulary
    assert retrain_or_expand([TC], groups)[0] is None  # similar (0.67) but below tau = 0.9
    assert retrain_or_expand([TC], groups, threshold=0.5)[0] == 1
    assert retrain_or_expand([SC], [])[0] is None


def test_groups_never_exceed_tasks_over_a_random_sequence() -> None:
    pool = [SC, TC, NLI, QQP, "Summarise the article in one sentence.", "Answer the question using a single word."]
    rng = random.Random(3)
    for _ in range(20):
        groups: list[list[str]] = []
        n_tasks = rng.randint(1, 12)
        for _ in range(n_tasks):
            new = rng.sample(pool, rng.randint(1, 2))
            index, sims = retrain_or_expand(new, groups)
            if index is None:
                groups.append(list(new))
            else:
                assert sims[index] >= 0.9
                groups[index] += [x for x in new if x not in groups[index]]
        assert 1 <= len(groups) <= n_tasks


def test_routing_picks_the_matching_group_else_the_newest() -> None:
    groups = [[NLI], [SC], [QQP]]
    prompt_lines = ["sentence 1: A man is sleeping.", NLI, "Option: entailment, neutral, contradiction"]
    assert route_instruction(prompt_lines, groups) == (0, pytest.approx(1.0))
    assert route_instruction(["Text: a fine film", SC], groups)[0] == 1
    k, sim = route_instruction(["Describe this picture."], groups)
    assert k == 2 and sim < 0.9  # no match -> newest adapter
    assert route_instruction([TC], groups)[0] == 2  # 0.67 to SC is below tau
    assert route_instruction([TC], groups, threshold=0.5)[0] == 1
    with pytest.raises(ValueError):
        route_instruction([SC], [])
