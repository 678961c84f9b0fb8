import pytest

from flywheel.errors import RubricError
from flywheel.models.rewards.rubric import load_rubric
from flywheel.models.tasks import extract_answer


@pytest.mark.parametrize(
    "response, reference, expected",
    [
        ("The answer is 7.", "7", "7"),
        ("3 + 4 = 7", "7", "7"),
        ("It is -12, I think", "-12", "-12"),
        ("1,234 apples", "1234", "1234"),
        ("<answer> 42 </answer> and 7", "42", "42"),
        ("no digits here", "7", None),
        ("first line\nParis", "Paris", "Paris"),
        ("", "7", None),
    ],
)
def test_extract_answer(response, reference, expected):
    assert extract_answer(response, reference) == expected


def test_builtin_rubric_is_self_rewarding_additive():
    r = load_rubric()
    assert "additive 5-point" in r.user and "{question}" in r.user and "{response}" in r.user
    assert r.prefill == "Score: "  # trailing space kept: the next token is the digit
    user, _ = r.render("What is {x}?", response="It is {y}")
    assert "What is {x}?" in user and "It is {y}" in user  # braces in data survive


def test_rubric_hash_changes_with_text(tmp_path):
    a = tmp_path / "a.txt"
    a.write_text("Q: {question}\nA: {response}\n<|assistant|>\nScore: ")
    b = tmp_path / "b.txt"
    b.write_text("Question: {question}\nA: {response}\n<|assistant|>\nScore: ")
    assert load_rubric(a).hash != load_rubric(b).hash != load_rubric().hash


def test_rubric_without_placeholder_or_file(tmp_path):
    t = tmp_path / "t.txt"
    t.write_text("Rate this: {question}")
    with pytest.raises(RubricError, match=r"\{response\}"):
        load_rubric(t)
    with pytest.raises(RubricError, match="not found"):
        load_rubric(tmp_path / "missing.txt")


def test_placeholders_inside_inserted_text_are_kept_verbatim():
    """Each placeholder is replaced once: a question quoting a template field, or a response that
    names the other response's placeholder, reaches the judge as written."""
    question = "What does {response} mean in a template? And {question}?"
    user, _ = load_rubric().render(question, response="It is {response_b}, {question}")
    assert f"User: {question}\n<response>It is {{response_b}}, {{question}}</response>" in user
    pair, _ = load_rubric(kind="pairwise").render(
        "Q {response_a}", response_a="A says {response_b}", response_b="B says {response_a}"
    )
    assert (
        "User: Q {response_a}\n<response A>A says {response_b}</response A>\n"
        "<response B>B says {response_a}</response B>" in pair
    )
