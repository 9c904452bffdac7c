"""Vote, best_of and early stopping on scripted samples: which sample wins, how ties break (mean token logprob),
and early stop exactly when the leader is safe, not a sample before. Plus ComputeParams' refusals."""

from __future__ import annotations

import subprocess
import sys

import pytest

from ownllm.compute import ComputeParams, ComputeSession
from ownllm.compute.strategies import leader_win_probability


def test_imports_no_torch():
    code = "import sys, ownllm.compute.offline, ownllm.evals.run, ownllm.evals.tasks; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


def finish(session: ComputeSession, index: int, text: str, num_tokens: int = 3, logprob: float = -1.0) -> list[int]:
    """Finishes one sample -> the samples the session then says to stop."""
    session.finish(index, text, num_tokens, logprob, "stop")
    return session.samples_to_stop()


def finish_all(session: ComputeSession, scripts: list[tuple[str, int, float]]) -> list[list[int]]:
    """Finishes samples one at a time with (text, num_tokens, cumulative_logprob) -> what each said to stop."""
    return [finish(session, i, *script) for i, script in enumerate(scripts) if session.samples[i].finish_reason is None]


def test_vote_picks_the_majority_answer_and_its_most_likely_sample():
    session = ComputeSession(ComputeParams("vote", 5, "number"))
    finish_all(session, [("it is 42", 4, -2.0), ("so 41", 2, -0.2), ("42.0", 3, -0.3), ("forty", 2, -1.0),
                         ("answer: 42", 5, -5.0)])
    summary = session.result()
    assert (summary.answer, summary.chosen_index) == ("42", 2)  # mean -0.1 beats -0.5 and -1.0
    assert [(a.answer, a.count) for a in summary.answers] == [("42", 3), ("41", 1), (None, 1)]
    assert (summary.samples_run, summary.samples_saved, summary.agreement) == (5, 0, 0.6)
    assert summary.completion_tokens == 16


def test_vote_ties_break_by_mean_token_logprob():
    session = ComputeSession(ComputeParams("vote", 4, "number"))
    finish_all(session, [("7", 2, -4.0), ("8", 4, -2.0), ("7", 1, -3.0), ("8", 10, -9.0)])
    summary = session.result()  # 7's best mean is -2.0, 8's is -0.5
    assert (summary.answer, summary.chosen_index, summary.agreement) == ("8", 1, 0.5)


def test_vote_without_any_answer_returns_the_most_likely_sample():
    session = ComputeSession(ComputeParams("vote", 2, "number"))
    finish_all(session, [("none", 2, -4.0), ("nothing", 2, -1.0)])
    summary = session.result()
    assert (summary.answer, summary.chosen_index, summary.agreement) == (None, 1, 0.0)


def test_best_of_logprob_picks_the_highest_mean_and_breaks_ties_by_index():
    session = ComputeSession(ComputeParams("best_of", 3, "text"))
    finish_all(session, [("a", 2, -2.0), ("b", 4, -8.0), ("c", 1, -0.9)])
    summary = session.result()
    assert (summary.answer, summary.chosen_index, summary.score) == ("c", 2, -0.9)
    session = ComputeSession(ComputeParams("best_of", 3, "text"))
    finish_all(session, [("a", 2, -1.0), ("b", 4, -2.0), ("c", 1, -0.5)])
    assert session.result().chosen_index == 0  # -0.5 each: the first wins


def test_best_of_verifier_uses_the_scores_set_on_samples():
    session = ComputeSession(ComputeParams("best_of", 3, "number", scorer="verifier"))
    finish_all(session, [("1", 1, -0.1), ("2", 1, -3.0), ("3", 1, -0.2)])
    for sample, score in zip(session.samples, (0.2, 0.9, 0.5)):
        sample.score = score
    summary = session.result()
    assert (summary.answer, summary.score) == ("2", 0.9)


def test_early_stop_exactly_when_the_leader_cannot_be_overtaken():
    session = ComputeSession(ComputeParams("vote", 7, "number", early_stop=True))
    said = [finish(session, 0, "5"), finish(session, 1, "5"), finish(session, 2, "6"), finish(session, 3, "5")]
    assert said == [[], [], [], []]  # 3 vs 1 with 3 running: 1 + 3 = 4 could still overtake
    assert session.progress().leader == "5" and session.progress().leader_count == 3
    session.update(5, 2, -0.5)
    assert finish(session, 4, "5") == [5, 6]  # 4 vs 1 with 2 running: decided
    session.finish(5, "partial 9", 4, -1.0, "abort")  # the stopped sample's last output brings its tokens
    assert session.samples_to_stop() == [] and session.samples[5].answer is None
    summary = session.result()
    assert (summary.answer, summary.samples_run, summary.samples_saved) == ("5", 5, 2)
    assert summary.agreement == 0.8 and summary.completion_tokens == 19  # 5 x 3 + the stopped one's 4


def test_early_stop_waits_while_a_tie_is_still_possible():
    session = ComputeSession(ComputeParams("vote", 3, "text", early_stop=True))
    assert finish(session, 0, "yes") == []  # 1 vs 0 with 2 running
    assert finish(session, 1, "yes") == [2]  # 2 vs 0 with 1 running: a tie is out of reach
    session = ComputeSession(ComputeParams("vote", 4, "text", early_stop=True))
    finish_all(session, [("yes", 1, 0.0), ("no", 1, 0.0), ("yes", 1, 0.0)])
    assert session.samples[3].finish_reason is None  # 2 vs 1 with 1 running: "no" could tie


def test_samples_finishing_together_all_count_before_the_stop():
    session = ComputeSession(ComputeParams("vote", 4, "number", early_stop=True))
    for i in range(3):
        session.finish(i, "9", 2, -1.0, "stop")
    assert session.samples_to_stop() == [3]
    assert (session.result().samples_run, session.result().samples_saved) == (3, 1)


def test_early_stop_draws_samples_in_waves_only_while_the_vote_is_open():
    session = ComputeSession(ComputeParams("vote", 8, "number", early_stop=True))
    assert session.num_started == 5  # 5 agreeing of 8 decide it
    assert [finish(session, i, "3") for i in range(4)] == [[]] * 4 and session.samples_to_start() == 0
    assert finish(session, 4, "3") == [5, 6, 7]  # 5 vs 0 with 3 to come: the last three never start
    assert session.result().samples_saved == 3
    session = ComputeSession(ComputeParams("vote", 8, "number", early_stop=True))
    started = []
    for i, answer in enumerate(["3", "3", "4", "4"]):
        finish(session, i, answer)
        started.append(session.samples_to_start())
    # 1-0 and 2-0 with 4 and 3 in flight: enough; 2-1 with 5 to come needs 3 in flight (2 are); 2-2 with 4 to come
    # needs 3 (2 are)
    assert started == [0, 0, 1, 1] and session.num_started == 7
    assert ComputeSession(ComputeParams("vote", 8, "number")).num_started == 8  # no early stop: all at once


def urn_win_probability(votes: list[int], unvoted: int, to_come: int) -> float:
    """The leader's exact chance of ending strictly ahead under the Polya urn (every new answer distinct),
    by enumerating every sequence of answers."""
    if to_come == 0:
        return float(all(votes[0] > v for v in votes[1:]))
    total = sum(votes) + unvoted + 1
    p = sum(v / total * urn_win_probability([*votes[:i], v + 1, *votes[i + 1:]], unvoted, to_come - 1)
            for i, v in enumerate(votes))
    p += unvoted / total * urn_win_probability(votes, unvoted + 1, to_come - 1)
    return p + 1 / total * urn_win_probability([*votes, 1], unvoted, to_come - 1)


@pytest.mark.parametrize("votes, unvoted, to_come", [
    ([3], 0, 4), ([3, 1], 0, 4), ([3, 1, 1], 1, 3), ([2, 1], 0, 5), ([4, 2, 1], 2, 5), ([1], 0, 3), ([5, 1], 0, 2),
    ([4], 0, 4), ([4, 1], 0, 3), ([6, 1], 0, 8)])
def test_leader_win_probability_bounds_the_urn_from_below(votes, unvoted, to_come):
    """Never above the exact chance; within 0.02 of it where a vote would stop (exact >= 0.9), where one rival
    at most is in reach; looser (the union bound) where several are."""
    exact = urn_win_probability(votes, unvoted, to_come)
    bound = leader_win_probability(votes, unvoted, to_come)
    assert bound <= exact + 1e-12 and (exact < 0.9 or exact - bound < 0.02)


def test_leader_win_probability_is_certain_exactly_when_no_rival_can_reach():
    assert leader_win_probability([5, 1], 0, 3) == 1.0 and leader_win_probability([5, 1], 0, 4) < 1.0


def test_confidence_stops_once_the_leader_likely_wins_the_whole_vote():
    session = ComputeSession(ComputeParams("vote", 8, "number", early_stop=True, confidence=0.95))
    assert session.num_started == 4  # 4 agreeing with 4 to come win with P >= 0.986; 3 with 5 to come: 0.93
    assert [finish(session, i, "7") for i in range(3)] == [[], [], []]
    assert finish(session, 3, "7") == [4, 5, 6, 7]  # likely enough, though 4 to come could still tie it
    session = ComputeSession(ComputeParams("vote", 8, "number", early_stop=True, confidence=0.95))
    finish_all(session, [("7", 1, 0.0), ("7", 1, 0.0), ("7", 1, 0.0), ("8", 1, 0.0)])
    # 3 vs 1 with 4 to come (P = 0.89): one more 7 makes it likely enough (4 vs 1 with 3 to come: 0.98), where
    # certainty would need two
    assert session.samples_to_start() == 1


def test_unanswered_samples_do_not_vote():
    session = ComputeSession(ComputeParams("vote", 4, "number", early_stop=True))
    assert finish_all(session, [("no idea", 1, 0.0), ("7", 1, 0.0), ("hmm", 1, 0.0), ("8", 1, 0.0)]) == [[]] * 4


@pytest.mark.parametrize("values, message", [
    (dict(strategy="majority"), "compute.strategy must be vote or best_of, got 'majority'"),
    (dict(samples=0), "compute.samples must be at least 1, got 0"),
    (dict(samples=True), "compute.samples must be at least 1, got True"),
    (dict(scorer="reward"), "compute.scorer must be logprob or verifier, got 'reward'"),
    (dict(scorer="verifier"), "compute.scorer verifier needs strategy best_of (a vote breaks ties by mean logprob)"),
    (dict(strategy="best_of", early_stop=True),
     "compute.early_stop needs strategy vote (a best_of score is known only at the end)"),
    (dict(answer="letter"),
     "compute.answer must be number, boxed, choice, json:FIELD, regex:PATTERN or text, got 'letter'"),
    (dict(budget=3), "compute.budget is not a compute option (strategy, samples, answer, scorer, early_stop, "
                     "confidence)"),
])
def test_bad_params_are_refused_naming_the_field(values, message):
    with pytest.raises(ValueError) as error:
        ComputeParams.of(values)
    assert str(error.value) == message


def test_the_limit_names_the_server_option():
    with pytest.raises(ValueError, match=r"^compute.samples must be at most 64 \(the server's "
                                         r"--max-compute-samples\), got 65$"):
        ComputeParams(samples=65).check_limit(64)
