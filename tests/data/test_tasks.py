"""Verifiable tasks: deterministic problems, disjoint splits, exact and safe graders."""
import os
import random
import re
import time

import pytest

from dsjax import config as config_lib
from dsjax.data import tasks


@pytest.mark.parametrize('task', tuple(config_lib.TASK_LEVELS))
def test_problems_are_deterministic_and_distinct(task):
    a = tasks.make_problems(task, 'train', 50, level=3, seed=1)
    assert a == tasks.make_problems(task, 'train', 50, level=3, seed=1)
    assert a != tasks.make_problems(task, 'train', 50, level=3, seed=2)
    assert len({tasks.canonical_key(p) for p in a}) == 50
    assert all(p.task == task and p.level == 3 for p in a)


@pytest.mark.parametrize('task,level', [('arithmetic', 2), ('multiplication', 3), ('countdown', 3)])
def test_train_and_test_never_overlap(task, level):
    train = {tasks.canonical_key(p) for s in range(3) for p in tasks.make_problems(task, 'train', 800, level, s)}
    test = {tasks.canonical_key(p) for p in tasks.make_problems(task, 'test', 600, level, seed=0)}
    assert len(test) == 600
    assert not train & test


def test_too_many_problems_for_a_small_split_is_an_error():
    with pytest.raises(ValueError, match='fewer than n=500'):
        tasks.make_problems('arithmetic', 'test', 500, level=1)


@pytest.mark.parametrize('kwargs,match', [(dict(task='chess'), 'task='), (dict(split='val'), 'split='),
                                          (dict(level=9), 'level=9')])
def test_bad_arguments_name_themselves(kwargs, match):
    args = {**dict(task='arithmetic', split='train', n=1, level=2), **kwargs}
    with pytest.raises(ValueError, match=match):
        tasks.make_problems(**args)


def test_multiplication_is_arithmetic_multiplication_in_the_same_split():
    problems = tasks.make_problems('multiplication', 'test', 300, level=3)
    for p in problems:
        a, op, b = p.steps[0].split()
        assert op == '*' and sorted((len(a), len(b))) == [1, 3] and p.answer == str(int(a) * int(b))
    # An arithmetic base never trains on a multiplication test problem: the split is the operands'.
    arithmetic_train = {tasks.canonical_key(p) for s in range(3)
                        for p in tasks.make_problems('arithmetic', 'train', 3000, level=3, seed=s)}
    assert not arithmetic_train & {tasks.canonical_key(p) for p in problems}
    assert tasks.split_of('multiplication', '933 * 7') == tasks.split_of('arithmetic', '933 * 7')


@pytest.mark.parametrize('task', tuple(config_lib.TASK_LEVELS))
def test_worked_solutions_are_formatted_and_correct(task):
    for level in config_lib.TASK_LEVELS[task]:
        for p in tasks.make_problems(task, 'train', 40, level=level):
            for show_steps in (True, False):
                text = tasks.worked_solution(p, show_steps)
                assert tasks.format_ok(text), text
                assert tasks.grade(p, text), text


def test_solutions_with_and_without_steps():
    p = tasks.make_problems('multiplication', 'train', 1, level=3)[0]
    a, _, b = p.steps[0].split()
    assert tasks.worked_solution(p) == (f'<think> {", ".join(p.steps[1:])}. </think> '
                                        f'<answer> {p.answer} </answer>')
    assert tasks.worked_solution(p, show_steps=False) == (f'<think> {a} * {b} = {p.answer}. </think> '
                                                          f'<answer> {p.answer} </answer>')
    page = tasks.worksheet([p, p], 'tagged', shown_steps=[False, True])
    assert page.split('\n\n') == [f'User: {p.prompt}. Assistant: {tasks.worked_solution(p, False)}',
                                    f'User: {p.prompt}. Assistant: {tasks.worked_solution(p)}']
    with pytest.raises(ValueError):
        tasks.worksheet([p, p], 'tagged', shown_steps=[True])


def test_arithmetic_answers_are_exact():
    p = tasks.Problem('arithmetic', 2, 'Compute 47 + 85', '132', steps=('47 + 85',))
    assert tasks.grade(p, '<think> x </think> <answer> 132 </answer>')
    assert tasks.grade(p, '<answer>7</answer> then <answer>132</answer>')  # the last answer counts
    assert not tasks.grade(p, '<think> x </think> <answer> 131 </answer>')
    assert not tasks.grade(p, '<answer> 132.0 </answer>')
    assert not tasks.grade(p, '132')


def test_first_answer_grading():
    p = tasks.Problem('arithmetic', 2, 'Compute 47 + 85', '132', steps=('47 + 85',))
    assert tasks.grade_first_answer(p, '<think> x </think> <answer> 132 </answer> User: <answer> 7 </answer>')
    assert not tasks.grade(p, '<think> x </think> <answer> 132 </answer> User: <answer> 7 </answer>')
    assert not tasks.grade_first_answer(p, '<answer> 7 </answer> then <answer> 132 </answer>')
    assert not tasks.grade_first_answer(p, '<think> x </think> <answer> 132')  # never closed: no credit


def test_format():
    assert tasks.format_ok(' <think> a </think> <answer> 5 </answer>')
    assert tasks.format_ok('<think></think><answer>5</answer>\n')
    for bad in ('<answer> 5 </answer>', '<think> a </think>', '<think> a </think> b <answer> 5 </answer>',
                '<think> a <think> b </think> <answer> 5 </answer>', '<think> a </think> <answer> 5 </answer> x',
                '<think> a </think> <answer> 5 </answer> <answer> 6 </answer>', 'hello'):
        assert not tasks.format_ok(bad), bad


def _countdown(numbers, target):
    return tasks.Problem('countdown', len(numbers), '', '', numbers=tuple(numbers), target=target)


def test_countdown_grader():
    p = _countdown([3, 7, 25], 46)
    assert tasks.grade(p, '<answer> 25 + 3 * 7 </answer>')
    assert tasks.grade(p, '<answer>(7 * 3) + 25</answer>')
    assert not tasks.grade(p, '<answer> 25 + 21 </answer>')  # 21 is not given
    assert not tasks.grade(p, '<answer> 25 + 3 * 7 + 3 - 3 </answer>')  # 3 used three times
    assert not tasks.grade(p, '<answer> 46 </answer>')
    assert tasks.grade(_countdown([6, 4, 10], 15), '<answer> 6 * 10 / 4 </answer>')  # exact fractions
    assert tasks.grade(_countdown([3, 2, 9], 6), '<answer> 9 / 3 * 2 </answer>')
    assert not tasks.grade(_countdown([7, 2], 3), '<answer> 7 / 2 </answer>')  # 3.5, not 3
    assert not tasks.grade(_countdown([5, 5, 1], 1), '<answer> 1 / (5 - 5) </answer>')  # no crash


@pytest.mark.parametrize('attack', [
    "__import__('os').system('touch /tmp/dsjax_pwned')", 'open("/etc/passwd").read()', '2 ** 3', '-3 + 49',
    '3 if 1 else 7', 'lambda: 1', '[1, 2]', '0x10', '1_0', '3.0 * 2', '((((((((((1', '9' * 200,
    '(' * 60 + '1' + ')' * 60,
])
def test_grader_rejects_anything_but_arithmetic_on_integers(attack):
    p = _countdown([3, 7, 25, 49, 16, 10, 8, 1], 46)
    assert tasks.evaluate_expression(attack) == ([], None)
    assert not tasks.grade(p, f'<answer> {attack} </answer>')
    assert not os.path.exists('/tmp/dsjax_pwned')  # parsed, never run


def test_template_and_prompt():
    p = tasks.make_problems('arithmetic', 'test', 1, level=2)[0]
    text = tasks.render_zero_prompt(p)
    assert text.startswith('A conversation between User and Assistant. The user asks a question')
    assert text.endswith(f'User: {p.prompt}. Assistant:')
    assert '<think> reasoning process here </think> <answer> answer here </answer>.' in text


MB = 1 << 20
ARITHMETIC = tasks.Problem('arithmetic', 2, 'Compute 47 + 85', '132', steps=('47 + 85',))
# (name, completion of up to 1 MB, expected grade for ARITHMETIC, expected grade for COUNTDOWN)
HOSTILE = [
    ('unclosed <answer> flood', '<answer>' * (MB // 8), False, False),
    ('right answer, then a flood', '<answer> 132 </answer>' + '<answer>' * (MB // 8 - 3), True, False),
    ('</answer> flood', '</answer>' * (MB // 9), False, False),
    ('<think> flood', '<think>' * (MB // 7) + '<answer> 132 </answer>', True, False),
    ('a million answer pairs', '<answer>7</answer>' * (MB // 18) + '<answer>132</answer>', True, False),
    ('nested answer tags', '<answer>' * (MB // 16) + '132' + '</answer>' * (MB // 18), False, False),
    ('10^5 nested parentheses', '<answer>' + '(' * 10**5 + '25 + 3 * 7' + ')' * 10**5 + '</answer>', False, False),
    ('a huge power', '<answer> 9**9**9**9 </answer>', False, False),
    ('a power of tens', '<answer> 10**10**10 - 10**10**10 + 46 </answer>', False, False),
    ('NUL bytes', '<think>\x00</think><answer>\x00132\x00</answer>' * (MB // 40), False, False),
    ('__import__', "<answer>__import__('os').system('touch /tmp/dsjax_pwned')</answer>" * (MB // 66), False, False),
    ('one huge answer', '<answer>' + '1' * MB + '</answer>', False, False),
]
COUNTDOWN = tasks.Problem('countdown', 3, '', '', numbers=(3, 7, 25), target=46)


def _cpu_ms(fn, *args) -> float:
    """Best of three CPU times (process time, so other jobs on the machine do not count)."""
    best = float('inf')
    for _ in range(3):
        t0 = time.process_time()
        fn(*args)
        best = min(best, time.process_time() - t0)
    return 1000 * best


@pytest.mark.parametrize('name,text,arithmetic,countdown', HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_completions_are_graded_right_in_linear_time(name, text, arithmetic, countdown):
    assert len(text) <= MB + 64
    assert tasks.grade(ARITHMETIC, text) == arithmetic
    assert tasks.grade(COUNTDOWN, text) == countdown
    assert not tasks.format_ok(text)
    for fn, problem in ((tasks.grade, ARITHMETIC), (tasks.grade, COUNTDOWN), (tasks.grade_first_answer, ARITHMETIC)):
        assert _cpu_ms(fn, problem, text) <= 10.0, (name, fn.__name__)
    assert _cpu_ms(tasks.format_ok, text) <= 10.0
    assert not os.path.exists('/tmp/dsjax_pwned')


def test_linear_parsers_agree_with_the_regex_reference():
    """parse_answer and format_ok give what the (quadratic) regexes give, on 50,000 random tag soups."""
    answer = re.compile(r'<answer>(.*?)</answer>', re.DOTALL)
    form = re.compile(r'\s*<think>(.*?)</think>\s*<answer>(.*?)</answer>\s*', re.DOTALL)
    tag = re.compile(r'</?(think|answer)>')
    rng = random.Random(0)
    pieces = ['<answer>', '</answer>', '<think>', '</think>', 'a', ' ', '\n', '1', '<', '>']
    for _ in range(50_000):
        text = ''.join(rng.choice(pieces) for _ in range(rng.randint(0, 12)))
        found = answer.findall(text)
        assert tasks.parse_answer(text) == (found[-1].strip() if found else None), text
        match = form.fullmatch(text)
        assert tasks.format_ok(text) == (bool(match) and not any(tag.search(g) for g in match.groups())), text
