"""Hand-computed checks of the diversity and accuracy metrics."""

from __future__ import annotations

import json
import math
import random
import warnings

import pytest
import torch

from sedsft.metrics import (
    AvgAtK,
    DistinctN,
    PassAtK,
    SelfBLEU,
    UndefinedMetricWarning,
    diversity_and_accuracy,
)
from sedsft.metrics.distinct import ngram_hashes
from sedsft.metrics.pass_at_k import pass_at_k
from sedsft.metrics.self_bleu import make_bleu, self_bleu_scores


def value(metric, *updates) -> float:
    for u in updates:
        metric.update(u)
    return float(metric.compute())


# ----------------------------------------------------------------------------- distinct-n


def test_distinct_corpus_and_prompt_pooling():
    groups = [["a b a b", "a b"], ["a b c"]]
    # bigrams: "a b a b" -> ab ba ab, "a b" -> ab, "a b c" -> ab bc
    # corpus: 6 bigrams, unique {ab, ba, bc} = 3 -> 3/6
    assert value(DistinctN(2), groups) == pytest.approx(0.5)
    # prompt 0: ab ba ab ab -> 2/4; prompt 1: ab bc -> 2/2; mean (0.5 + 1) / 2
    assert value(DistinctN(2, pooling="prompt"), groups) == pytest.approx(0.75)
    # unigrams: a b a b a b a b c = 9, unique 3 -> 1/3
    assert value(DistinctN(1), groups) == pytest.approx(1 / 3)


def test_distinct_corpus_counts_repeats_across_prompts():
    groups = [["a b"], ["a b"]]
    assert value(DistinctN(2), groups) == pytest.approx(0.5)  # {ab} / 2
    assert value(DistinctN(2, pooling="prompt"), groups) == pytest.approx(1.0)  # 1/1, 1/1


def test_distinct_short_and_empty_texts():
    # the empty generation adds nothing: "a a" -> 1 unique / 2
    assert value(DistinctN(1), [["", "a a"]]) == pytest.approx(0.5)
    # corpus pooling counts what there is: {abc} / 2
    assert value(DistinctN(3), [["a b"], ["a b c", "a b c"]]) == pytest.approx(0.5)


@pytest.mark.parametrize("pooling", ["corpus", "prompt"])
@pytest.mark.parametrize("groups", [[["a b", ""]], [], [[]]], ids=["too_short", "no_groups", "empty_group"])
def test_distinct_without_ngrams_is_nan_not_zero(pooling, groups):
    # n longer than every text (or no text): nothing to measure. 0.0 would read as
    # "every n-gram repeated", the least diverse value there is.
    with pytest.warns(UndefinedMetricWarning, match="distinct-3 is undefined: no generation has 3 or more tokens"):
        assert math.isnan(value(DistinctN(3, pooling=pooling), groups))


def test_distinct_per_prompt_mean_skips_prompts_without_ngrams_and_counts_them():
    # prompt 0 has no trigram: left out, so prompt 1 alone gives {abc} / 2 = 0.5 (not 0.25)
    metric = DistinctN(3, pooling="prompt")
    metric.update([["a b"], ["a b c", "a b c"]])
    with pytest.warns(UndefinedMetricWarning, match="1 of 2 prompts have no 3-gram"):
        assert float(metric.compute()) == pytest.approx(0.5)
    assert int(metric.skipped) == 1 and int(metric.groups) == 1
    # shards merge their counts (DDP sums the state)
    shard, other = DistinctN(3, pooling="prompt"), DistinctN(3, pooling="prompt")
    shard.update([["a b"], ["a b c", "a b c"]])
    other.update([["x"], ["y z"], ["a b c d"]])  # two more without a trigram; abc bcd -> 1.0
    shard.merge_state(other)
    assert int(shard.skipped) == 3
    with pytest.warns(UndefinedMetricWarning, match="3 of 5 prompts"):
        assert float(shard.compute()) == pytest.approx((0.5 + 1.0) / 2)
    # corpus pooling has no per-prompt mean and skips nothing
    corpus = DistinctN(3)
    corpus.update([["a b"], ["a b c"]])
    assert int(corpus.skipped) == 0


def test_distinct_identical_vs_all_different():
    same = [["x y z"] * 4]
    assert value(DistinctN(1), same) == pytest.approx(3 / 12)
    assert value(DistinctN(2), same) == pytest.approx(2 / 8)
    different = [["a b c", "d e f", "g h i"]]
    for n in (1, 2, 3):
        assert value(DistinctN(n), different) == pytest.approx(1.0)
        assert value(DistinctN(n, pooling="prompt"), different) == pytest.approx(1.0)


def test_distinct_tokenizers():
    # callable tokenizer: characters of "aab" -> {a, b} / 3
    assert value(DistinctN(1, tokenizer=list), [["aab"]]) == pytest.approx(2 / 3)

    class HFLike:  # Hugging Face style: .encode(text, add_special_tokens=...)
        def encode(self, text, add_special_tokens=True):
            return [1] * add_special_tokens + [ord(c) for c in text]

    # special tokens are left out: ids of "abab" -> {97, 98} / 4
    assert value(DistinctN(1, tokenizer=HFLike()), [["abab"]]) == pytest.approx(0.5)

    class Encoding:
        def __init__(self, ids):
            self.ids = ids

    class TokenizersLike:  # tokenizers.Tokenizer: .encode returns an object with .ids
        def encode(self, text, add_special_tokens=True):
            return Encoding([len(w) for w in text.split()])

    # word lengths 2 2 3 -> {2, 3} / 3
    assert value(DistinctN(1, tokenizer=TokenizersLike()), [["ab cd efg"]]) == pytest.approx(2 / 3)
    # the int 1 and the string "1" are different tokens
    assert value(DistinctN(1, tokenizer=lambda s: [1, "1"]), [["?"]]) == pytest.approx(1.0)


def test_ngram_hashes_are_order_sensitive_and_process_independent():
    assert ngram_hashes(["a", "b"], 2)[0] != ngram_hashes(["b", "a"], 2)[0]
    # fixed values: the ids do not depend on PYTHONHASHSEED, so ranks agree
    assert ngram_hashes(["a", "b", "c"], 2).tolist() == [6984337703482820180, 7554822562367998568]


def test_distinct_reset_and_merge():
    m = DistinctN(2)
    m.update([["a a a a"]])
    m.reset()
    assert value(m, [["a b c"]]) == pytest.approx(1.0)

    # corpus: shards {ab} and {ab, bc} overlap; merged must count ab once: 2 unique / 3
    for pooling, expected in (("corpus", 2 / 3), ("prompt", 1.0)):
        m1, m2 = DistinctN(2, pooling=pooling), DistinctN(2, pooling=pooling)
        m1.update([["a b"]])
        m2.update([["a b c"]])
        m1.merge_state(m2)
        assert float(m1.compute()) == pytest.approx(expected)
        assert value(DistinctN(2, pooling=pooling), [["a b"]], [["a b c"]]) == pytest.approx(
            expected
        )


@pytest.mark.filterwarnings("ignore:The ``compute`` method")
def test_distinct_sync_with_a_rank_that_saw_nothing():
    # rank 1 has data, rank 0 (this object) none; fake all_gather over the two ranks
    remote = DistinctN(2)
    remote.update([["a b a b"]])  # ab ba ab -> ids {ab, ba}, total 3
    remote_ids, remote_total = remote.ngram_ids[0], remote.total

    def gather(x, group=None):
        assert x.dtype == torch.long  # an empty float tensor would break NCCL all_gather
        return [x, remote_ids if x.dim() == 1 else remote_total]

    local = DistinctN(2)
    local._sync_dist(dist_sync_fn=gather)
    assert float(local.compute()) == pytest.approx(2 / 3)


def test_distinct_rejects_bad_arguments():
    with pytest.raises(ValueError, match="n >= 1"):
        DistinctN(0)
    with pytest.raises(ValueError, match="pooling"):
        DistinctN(1, pooling="sentence")


# ------------------------------------------------------------------------------ self-BLEU


def test_self_bleu_hand_computed():
    group = ["a b c d", "a b c e"]
    # each vs the other: 1-gram 3/4, 2-gram 2/3, equal lengths (BP 1)
    # n_gram=2: sqrt(3/4 * 2/3) = sqrt(1/2) -> 70.71
    assert value(SelfBLEU(n_gram=2), [group]) == pytest.approx(100 * math.sqrt(0.5), abs=1e-3)
    # n_gram=4: 3-gram 1/2, 4-gram 0/1 smoothed ("exp") to 1/(2*1); (3/4*2/3*1/2*1/2)^(1/4)
    assert value(SelfBLEU(), [group]) == pytest.approx(100 * 0.125**0.25, abs=1e-3)
    # three samples, unigrams: "a b" vs {"a c", "d e"} -> 1/2, "a c" -> 1/2, "d e" -> 0
    # mean over samples (50 + 50 + 0) / 3
    assert value(SelfBLEU(n_gram=1), [["a b", "a c", "d e"]]) == pytest.approx(100 / 3, abs=1e-3)


def test_self_bleu_uses_every_other_sample_as_a_reference():
    x = "the cat sat on the mat today"
    group = [x, "a dog ran in the park", "some other words entirely here", x]
    scores = self_bleu_scores(group, make_bleu())
    # x matches one of its three references exactly -> 100 (a single-stream bug gives less)
    assert scores[0] == pytest.approx(100.0)
    assert scores[3] == pytest.approx(100.0)
    assert scores[1] < 100.0


def test_self_bleu_scores_match_sacrebleu_sentence_score():
    # the fast path must equal sacrebleu's multi-reference sentence BLEU exactly
    rng = random.Random(0)
    words = ["x", "y", "z", "+", "=", "1", "2", "(", ")", "the", "so"]
    for trial in range(30):
        m = rng.randint(2, 6)
        group = [" ".join(rng.choices(words, k=rng.randint(0, 25))) for _ in range(m)]
        if trial % 3 == 0:
            group[1] = group[0]  # ties in the max count
        for n_gram in (1, 2, 4):
            for tokenize in ("13a", "none"):
                bleu = make_bleu(n_gram, tokenize)
                reference = [
                    bleu.sentence_score(h, group[:i] + group[i + 1 :]).score
                    for i, h in enumerate(group)
                ]
                assert self_bleu_scores(group, bleu) == pytest.approx(reference, abs=1e-9)


def test_self_bleu_identical_different_short_groups_and_averaging():
    assert value(SelfBLEU(), [["one two three four"] * 3]) == pytest.approx(100.0)
    assert value(SelfBLEU(), [["a b c", "d e f", "g h i"]]) == pytest.approx(0.0)
    # the single-sample group is skipped, not counted as 0
    with pytest.warns(UndefinedMetricWarning, match="1 of 2 prompts"):
        assert value(SelfBLEU(n_gram=2), [["only"], ["a b c d", "a b c e"]]) == pytest.approx(
            100 * math.sqrt(0.5), abs=1e-3
        )
    # mean over prompts: (70.71 + 100) / 2
    groups = [["a b c d", "a b c e"], ["x y z", "x y z"]]
    assert value(SelfBLEU(n_gram=2), groups) == pytest.approx(
        (100 * math.sqrt(0.5) + 100) / 2, abs=1e-3
    )
    assert value(SelfBLEU(), [["", "a b"]]) == 0.0  # empty sample: no n-grams, score 0


@pytest.mark.parametrize("groups", [[["lonely"]], [["one"], ["two"]], [[]], []], ids=["one", "two_prompts", "empty", "none"])
def test_self_bleu_with_fewer_than_two_samples_is_nan_not_maximally_diverse(groups):
    # one sample has no sibling to be compared with: undefined, not 0.0 ("maximally diverse")
    with pytest.warns(UndefinedMetricWarning, match="self-BLEU is undefined: no prompt has two or more samples"):
        assert math.isnan(value(SelfBLEU(), groups))


def test_self_bleu_skips_single_sample_prompts_and_counts_them():
    metric = SelfBLEU(n_gram=2)
    metric.update([["only"], ["a b c d", "a b c e"], []])
    # the two undefined prompts are left out of the mean: 70.71 from the one scored prompt
    with pytest.warns(UndefinedMetricWarning, match="2 of 3 prompts have fewer than two samples"):
        assert float(metric.compute()) == pytest.approx(100 * math.sqrt(0.5), abs=1e-3)
    assert int(metric.skipped) == 2 and int(metric.groups) == 1
    shard, other = SelfBLEU(n_gram=2), SelfBLEU(n_gram=2)
    shard.update([["only"], ["a b c d", "a b c e"]])
    other.update([["x"], ["x y z", "x y z"]])
    shard.merge_state(other)
    assert (int(shard.skipped), int(shard.groups)) == (2, 2)
    with pytest.warns(UndefinedMetricWarning, match="2 of 4 prompts"):
        assert float(shard.compute()) == pytest.approx((100 * math.sqrt(0.5) + 100) / 2, abs=1e-3)


def test_undefined_metric_warns_once_per_message():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")  # Python's filter outside pytest
        for _ in range(3):  # e.g. three validations with one sample per prompt
            assert math.isnan(value(SelfBLEU(), [["lonely"]]))
            assert math.isnan(value(DistinctN(4), [["a b"]]))
    messages = [str(w.message) for w in caught if issubclass(w.category, UndefinedMetricWarning)]
    assert len(messages) == 2
    assert messages[0].startswith("self-BLEU is undefined") and messages[1].startswith("distinct-4 is undefined")


def test_self_bleu_tokenisation():
    # default: sacrebleu "13a" splits operators, so these two agree exactly
    assert value(SelfBLEU(), [["x+1=2", "x + 1 = 2"]]) == pytest.approx(100.0)
    # whitespace tokenizer: "x+1=2" is a single token sharing nothing with the other
    assert value(SelfBLEU(tokenizer=str.split), [["x+1=2", "x + 1 = 2"]]) == 0.0


def test_self_bleu_reset_and_merge():
    m = SelfBLEU(n_gram=2)
    m.update([["a b", "c d"]])
    m.reset()
    assert value(m, [["x y z", "x y z"]]) == pytest.approx(100.0)
    m1, m2 = SelfBLEU(n_gram=2), SelfBLEU(n_gram=2)
    m1.update([["a b c d", "a b c e"]])
    m2.update([["x y z", "x y z"]])
    m1.merge_state(m2)
    assert float(m1.score_sum) == pytest.approx(100 * math.sqrt(0.5) + 100, abs=1e-3)
    assert int(m1.groups) == 2
    one = value(SelfBLEU(n_gram=2), [["a b c d", "a b c e"], ["x y z", "x y z"]])
    assert float(m1.compute()) == pytest.approx(one)


# --------------------------------------------------------------------------- pass@k, avg@k


def test_pass_at_k_estimator():
    # n=5, c=2, k=2: 1 - C(3,2)/C(5,2) = 1 - 3/10 = 0.7; product 1 - (1-2/4)(1-2/5) = 0.7
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)
    assert pass_at_k(4, 3, 2) == 1.0  # n - c < k: every 2-subset has a correct one
    assert pass_at_k(4, 0, 2) == 0.0
    assert pass_at_k(8, 3, 1) == pytest.approx(3 / 8)  # pass@1 = c / n
    for n in range(1, 11):
        for c in range(n + 1):
            for k in range(1, n + 1):
                exact = 1 - math.comb(n - c, k) / math.comb(n, k)
                assert pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12)
    assert 0.0 < pass_at_k(1000, 1, 10) < 1.0  # large n: no overflow


def test_pass_at_k_and_avg_at_k_metrics():
    correct = [[True, False, False, True, False], [False] * 5, [True] * 5]
    # pass@2 per prompt: 0.7, 0, 1 -> mean 1.7 / 3
    assert value(PassAtK(2), correct) == pytest.approx(1.7 / 3)
    # avg per prompt: 2/5, 0, 1 -> mean 1.4 / 3
    assert value(AvgAtK(), correct) == pytest.approx(1.4 / 3)
    assert value(PassAtK(1), correct) == pytest.approx(1.4 / 3)
    # ints work as booleans; prompts weigh the same whatever their n: (1/2 + 1/4) / 2
    assert value(AvgAtK(), [[1, 0], [0, 0, 0, 1]]) == pytest.approx(0.375)


def test_pass_at_k_rejects_too_few_samples():
    m = PassAtK(3)
    with pytest.raises(ValueError, match=r"pass@3 .*k=3.*prompt 1 .*n=2"):
        m.update([[True, True, False], [True, False]])
    assert int(m.prompts) == 0  # the bad batch left no partial state
    with pytest.raises(ValueError, match="k >= 1"):
        PassAtK(0)
    with pytest.raises(ValueError, match="prompt 0"):
        AvgAtK().update([[]])


def test_pass_at_k_reset_and_merge():
    m = PassAtK(2)
    m.update([[False, False]])
    m.reset()
    assert value(m, [[True, False]]) == pytest.approx(1.0)
    for make in (lambda: PassAtK(2), AvgAtK):
        a, b = make(), make()
        a.update([[True, False, False, True, False]])
        b.update([[False] * 5, [True] * 5])
        a.merge_state(b)
        one = make()
        one.update([[True, False, False, True, False], [False] * 5, [True] * 5])
        assert float(a.compute()) == pytest.approx(float(one.compute()))


# -------------------------------------------------------------------------- one-call helper


@pytest.mark.filterwarnings("ignore::sedsft.metrics.UndefinedMetricWarning")
def test_diversity_and_accuracy():
    groups = [
        ["so \\boxed{4}", "so \\boxed{5}", "thus \\boxed{4}"],
        ["\\boxed{1,000}", "\\boxed{7}", "\\boxed{7}"],
    ]
    out = diversity_and_accuracy(groups, ["4", "1000"], k=2)
    expected_keys = {f"distinct_{n}{s}" for n in range(1, 5) for s in ("", "_prompt")}
    expected_keys |= {"self_bleu", "pass@1", "pass@2", "avg@2"}
    # texts of one or two words: prompt 1 has no bigram, no text has a trigram
    expected_keys |= {f"distinct_{n}_prompt_skipped" for n in (2, 3, 4)}
    assert set(out) == expected_keys
    assert all(isinstance(v, float) for v in out.values())
    assert (out["distinct_2"], out["distinct_2_prompt"], out["distinct_2_prompt_skipped"]) == (1.0, 1.0, 1.0)
    for n in (3, 4):
        assert math.isnan(out[f"distinct_{n}"]) and math.isnan(out[f"distinct_{n}_prompt"])
        assert out[f"distinct_{n}_prompt_skipped"] == 2.0
    # correct: [1, 0, 1], [1, 0, 0]; avg = (2/3 + 1/3) / 2; pass@2 = (1 + (1 - C(2,2)/C(3,2))) / 2
    assert out["avg@2"] == pytest.approx(0.5)
    assert out["pass@1"] == pytest.approx(0.5)
    assert out["pass@2"] == pytest.approx((1 + 2 / 3) / 2)
    # unigrams: so \boxed{4} so \boxed{5} thus \boxed{4} + 3 single tokens = 9;
    # unique: so, thus, \boxed{4}, \boxed{5}, \boxed{1,000}, \boxed{7} = 6
    assert out["distinct_1"] == pytest.approx(6 / 9)
    no_gold = diversity_and_accuracy(groups, None, k=2)
    assert "pass@2" not in no_gold and no_gold["self_bleu"] == out["self_bleu"]
    with pytest.raises(ValueError, match="gold"):
        diversity_and_accuracy(groups, ["4"], k=2)


@pytest.mark.filterwarnings("ignore::sedsft.metrics.UndefinedMetricWarning")
def test_diversity_and_accuracy_with_one_sample_per_prompt():
    out = diversity_and_accuracy([["a b"], ["a b c"]], ["1", "2"], k=1)
    # unigrams a b a b c: 3 unique / 5; per prompt 2/2 and 3/3
    assert out["distinct_1"] == pytest.approx(3 / 5)
    assert out["distinct_1_prompt"] == pytest.approx(1.0)
    # bigrams ab ab bc: 2 / 3; per prompt 1/1 and 2/2
    assert out["distinct_2"] == pytest.approx(2 / 3)
    assert out["distinct_2_prompt"] == pytest.approx(1.0)
    # one trigram (abc): prompt 0 has none and is left out of the per-prompt mean
    assert out["distinct_3"] == pytest.approx(1.0)
    assert out["distinct_3_prompt"] == pytest.approx(1.0)
    assert out["distinct_3_prompt_skipped"] == 1.0
    # no 4-gram at all, and no prompt with two samples for self-BLEU: undefined
    assert math.isnan(out["distinct_4"]) and math.isnan(out["distinct_4_prompt"])
    assert out["distinct_4_prompt_skipped"] == 2.0
    assert math.isnan(out["self_bleu"]) and out["self_bleu_skipped"] == 2.0
    assert out["pass@1"] == 0.0 and out["avg@1"] == 0.0
    skipped = {key for key in out if key.endswith("_skipped")}
    assert skipped == {"distinct_3_prompt_skipped", "distinct_4_prompt_skipped", "self_bleu_skipped"}
    # metrics.json is written with json.dumps: NaN survives the round trip
    back = json.loads(json.dumps(out, sort_keys=True))
    assert math.isnan(back["self_bleu"]) and back["distinct_2"] == out["distinct_2"]
