"""Stop token ids, EOS, max_tokens, and stop strings across streamed deltas."""

import random

import pytest

from ernie45.sampling import SamplingParams
from ernie45.stopping import StopChecker, check_stop_token


def stream(checker: StopChecker, deltas: list[str]) -> list[str]:
    return [checker.feed(d) for d in deltas]


# ----------------------------------------------------------------------------- tokens

def test_check_stop_token():
    p = SamplingParams(max_tokens=3, stop_token_ids=(7,))
    assert check_stop_token(p, 1, 1, eos_token_ids=(2,)) is None
    assert check_stop_token(p, 7, 1) == "stop"
    assert check_stop_token(p, 2, 1, eos_token_ids=(2,)) == "stop"
    assert check_stop_token(p, 1, 3) == "length"
    assert check_stop_token(p, 7, 3) == "stop"  # a stop token wins over the length limit
    ignore = SamplingParams(max_tokens=3, ignore_eos=True)
    assert check_stop_token(ignore, 2, 1, eos_token_ids=(2,)) is None


def test_checker_records_token_stop_reason():
    checker = StopChecker(SamplingParams(max_tokens=5), eos_token_ids=(2,))
    assert checker.check_token(9, 1) is None and not checker.finished
    assert checker.check_token(2, 2) == "stop"
    assert checker.finish_reason == "stop" and checker.stop_reason == 2
    length = StopChecker(SamplingParams(max_tokens=1))
    assert length.check_token(9, 1) == "length" and length.stop_reason is None


# ----------------------------------------------------------------------------- strings

def test_stop_string_spanning_deltas_is_never_streamed():
    checker = StopChecker(SamplingParams(stop=["###"]))
    assert stream(checker, ["Hello #", "#", "# world"]) == ["Hello ", "", ""]
    assert checker.finish_reason == "stop" and checker.stop_reason == "###"
    assert checker.feed("more") == "" and checker.flush() == ""


def test_held_text_is_released_when_it_is_not_a_stop():
    checker = StopChecker(SamplingParams(stop=["abc"]))
    assert stream(checker, ["xa", "b", "d"]) == ["x", "", "abd"]
    assert stream(checker, ["ab"]) == [""]
    assert checker.flush() == "ab" and not checker.finished


def test_stop_string_inside_one_delta_and_earliest_of_several():
    checker = StopChecker(SamplingParams(stop=["world", "lo w"]))
    assert checker.feed("hello world") == "hel"
    assert checker.stop_reason == "lo w"


def test_no_stop_strings_passes_text_through():
    checker = StopChecker(SamplingParams())
    assert stream(checker, ["a", "bc", ""]) == ["a", "bc", ""]


@pytest.mark.parametrize("seed", range(30))
def test_random_streams_match_whole_text_search(seed):
    rng = random.Random(seed)
    stops = ["".join(rng.choice("ab") for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 3))]
    text = "".join(rng.choice("abc") for _ in range(rng.randint(0, 30)))
    cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(0, 8))))
    deltas = [text[i:j] for i, j in zip([0] + cuts, cuts + [len(text)])]
    checker = StopChecker(SamplingParams(stop=stops))
    shown = "".join(stream(checker, deltas))
    hits = [i for s in stops if (i := text.find(s)) >= 0]
    if hits:
        assert shown == text[:min(hits)] and checker.finish_reason == "stop"
    else:
        assert shown + checker.flush() == text and not checker.finished
    assert not any(s in shown for s in stops)
