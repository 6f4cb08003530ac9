"""Verifiable reasoning tasks that need no download: multi-digit arithmetic and countdown puzzles.

'multiplication' is arithmetic's multiplications alone (an L-digit by a one-digit factor), the
operation a small model finds hardest to answer at once.

Problems are generated from a seed, so every call with the same arguments returns the same list.
Each problem belongs to 'train' or 'test' by a hash of its canonical form (the operands, not the
wording), so a test problem never appears in training data, whatever the seeds or levels.

Graders are exact and never run model output: an answer is the text of the last <answer>...</answer>;
a countdown expression is parsed with `ast` into a tree of + - * / over integer literals and
evaluated by walking that tree with exact fractions.
"""
import ast
import dataclasses
import fractions
import hashlib
import random
import re

from dsjax import config as config_lib

SPLITS = ('train', 'test')
TEST_FRACTION = 0.2
# Tasks and their levels: config_lib.TASK_LEVELS (with the other fields' valid values).
COUNTDOWN_MAX_NUMBER = 20
COUNTDOWN_MAX_TARGET = 1000
# Longer answers are rejected unparsed: an expression over <= 5 numbers is far shorter.
MAX_EXPRESSION_CHARS = 100

R1_ZERO_TEMPLATE = (
    'A conversation between User and Assistant. The user asks a question, and the Assistant solves it. '
    'The assistant first thinks about the reasoning process in the mind and then provides the user with '
    'the answer. The reasoning process and answer are enclosed within <think> </think> and <answer> '
    '</answer> tags, respectively, i.e., <think> reasoning process here </think> <answer> answer here '
    '</answer>. User: {prompt}. Assistant:')

_TAGS = ('<think>', '</think>', '<answer>', '</answer>')
_EXPRESSION_CHARS = re.compile(r'[0-9+\-*/() ]+')


@dataclasses.dataclass(frozen=True)
class Problem:
    """One verifiable problem.

    `answer` is the exact expected answer (arithmetic), or one valid expression (countdown, where any
    expression reaching `target` with `numbers` is correct). `steps` are the intermediate
    computations a worked solution shows.
    """
    task: str
    level: int
    prompt: str
    answer: str
    numbers: tuple[int, ...] = ()
    target: int = 0
    steps: tuple[str, ...] = ()


def split_of(task: str, key: str) -> str:
    """'test' for a fixed TEST_FRACTION of canonical problems (by sha256 of `key`), else 'train'.

    A multiplication problem is the arithmetic problem with the same operands, in the same split.
    """
    family = 'arithmetic' if task == 'multiplication' else task
    digest = hashlib.sha256(f'{family}|{key}'.encode()).digest()
    return 'test' if int.from_bytes(digest[:8], 'big') / 2.0**64 < TEST_FRACTION else 'train'


def canonical_key(problem: Problem) -> str:
    """What makes two problems the same problem: operands and operation, never the wording."""
    if problem.task == 'countdown':
        return f'{sorted(problem.numbers)}->{problem.target}'
    return problem.steps[0]


def _check_args(task: str, split: str, n: int, level: int) -> None:
    if task not in config_lib.TASK_LEVELS:
        raise ValueError(f'task={task!r} is invalid: must be one of {tuple(config_lib.TASK_LEVELS)}')
    if split not in SPLITS:
        raise ValueError(f'split={split!r} is invalid: must be one of {SPLITS}')
    if level not in config_lib.TASK_LEVELS[task]:
        raise ValueError(f'level={level!r} is invalid for task {task!r}: must be one of '
                         f'{config_lib.TASK_LEVELS[task]}')
    if not (isinstance(n, int) and n >= 0):
        raise ValueError(f'n={n!r} is invalid: must be an integer >= 0')


def make_problems(task: str, split: str, n: int, level: int = 2, seed: int = 0) -> list[Problem]:
    """`n` distinct problems of `task` at `level` from `split` ('train' or 'test'), deterministic in seed.

    Raises ValueError when the split holds fewer than `n` distinct problems at this level.
    """
    _check_args(task, split, n, level)
    rng = random.Random(f'{task}:{split}:{level}:{seed}')
    make = {'arithmetic': _arithmetic, 'multiplication': _multiplication, 'countdown': _countdown}[task]
    problems, seen, tries = [], set(), 0
    while len(problems) < n:
        tries += 1
        if tries > 50 * n + 1000:
            raise ValueError(f'the {split} split of {task} level {level} holds fewer than n={n} distinct '
                             f'problems (found {len(problems)}); lower n or raise the level')
        problem = make(rng, level)
        key = canonical_key(problem)
        if key in seen or split_of(task, key) != split:
            continue
        seen.add(key)
        problems.append(problem)
    return problems


def task_problems(entries, split: str, n_each: int, seed: int, field: str) -> list[Problem]:
    """`n_each` problems of `split` for every task:level entry of the config `field`, in entry order."""
    problems = []
    for task, level in config_lib.parse_task_entries(entries, field):
        problems += make_problems(task, split, n_each, level=level, seed=seed)
    return problems


def _digits(rng: random.Random, digits: int) -> int:
    return rng.randrange(10 ** (digits - 1) if digits > 1 else 0, 10**digits)


def _arithmetic(rng: random.Random, level: int, task: str = 'arithmetic', ops: str = '+-*') -> Problem:
    """a + b, a - b (a >= b) or a * c: an L-digit and an (L-1)-digit operand (at least one digit) in
    either order, or an L-digit a and a one-digit c in either order."""
    op = rng.choice(ops)
    a = _digits(rng, level)
    b = _digits(rng, max(level - 1, 1)) if op != '*' else rng.randrange(2, 10)
    if op == '-' and a < b or op != '-' and rng.random() < 0.5:
        a, b = b, a
    value = {'+': a + b, '-': a - b, '*': a * b}[op]
    expression = f'{a} {op} {b}'
    return Problem(task, level, f'Compute {expression}', str(value),
                   steps=(expression,) + _place_value_steps(a, b, op, value))


def _multiplication(rng: random.Random, level: int) -> Problem:
    return _arithmetic(rng, level, 'multiplication', '*')


def _place_value_steps(a: int, b: int, op: str, value: int) -> tuple[str, ...]:
    """Column arithmetic by place value: '40 + 80 = 120', '7 + 5 = 12', '120 + 12 = 132'."""
    if a < 10 and b < 10:
        return (f'{a} {op} {b} = {value}',)
    if op == '*':
        many, one = (a, b) if a >= b else (b, a)  # split the longer factor by place value
        parts = [(int(d) * 10**k, one) for k, d in enumerate(reversed(str(many))) if d != '0']
        lines = [f'{p} * {q} = {p * q}' for p, q in parts]
        total = ' + '.join(str(p * q) for p, q in parts)
        return tuple(lines) + ((f'{total} = {value}',) if len(parts) > 1 else ())
    width = len(str(max(a, b)))
    cols = [(a // 10**k % 10 * 10**k, b // 10**k % 10 * 10**k) for k in reversed(range(width))]
    lines = [f'{p} {op} {q} = {p + q if op == "+" else p - q}' for p, q in cols]
    total = ' + '.join(str(p + q if op == '+' else p - q) for p, q in cols).replace('+ -', '- ')
    return tuple(lines) + (f'{total} = {value}',)


def _countdown(rng: random.Random, level: int) -> Problem:
    """`level` numbers in [1, COUNTDOWN_MAX_NUMBER] and a target reachable using each exactly once."""
    while True:
        numbers = [rng.randint(1, COUNTDOWN_MAX_NUMBER) for _ in range(level)]
        value, expression, steps, additive = numbers[0], str(numbers[0]), [], False
        for x in numbers[1:]:
            ops = ['+', '*'] + (['-'] if value > x else []) + (['/'] if x > 1 and value % x == 0 else [])
            op = rng.choice(ops)
            new = {'+': value + x, '-': value - x, '*': value * x, '/': value // x}[op]
            steps.append(f'{value} {op} {x} = {new}')
            if op in '*/' and additive:
                expression = f'({expression})'
            expression, value, additive = f'{expression} {op} {x}', new, op in '+-'
        if 0 < value <= COUNTDOWN_MAX_TARGET and value not in numbers:
            break
    shown = ', '.join(map(str, sorted(numbers)))
    prompt = (f'Using the numbers {shown}, each at most once, with + - * / and parentheses, '
              f'write an expression equal to {value}')
    return Problem('countdown', level, prompt, expression, numbers=tuple(sorted(numbers)), target=value,
                   steps=tuple(steps))


def render_zero_prompt(problem: Problem) -> str:
    """The R1-Zero template around the problem's prompt."""
    return R1_ZERO_TEMPLATE.format(prompt=problem.prompt)


def worked_solution(problem: Problem, show_steps: bool = True) -> str:
    """A `<think> ... </think> <answer> ... </answer>` completion that shows the reasoning, or with
    `show_steps=False` only the result ('476 * 8 = 3808.'), as an answer written at once."""
    if problem.task == 'countdown':
        steps = ', '.join(problem.steps) + '. ' if show_steps else ''
        thought = f'{steps}So {problem.answer} = {problem.target}.'
    else:
        thought = ', '.join(problem.steps[1:] if show_steps else [f'{problem.steps[0]} = {problem.answer}']) + '.'
    return f'<think> {thought} </think> <answer> {problem.answer} </answer>'


WORKSHEET_STYLES = ('qa', 'equation', 'tagged')
# Instructions a page may open with, as exercise sheets do.
WORKSHEET_HEADERS = {
    'qa': ('Worksheet. Answer each question.', 'Practice problems with answers.',
           'Solve each problem, then check the answer.', 'Exercises: think about each question first, then answer.'),
    'equation': ('Facts to remember.', 'Check these results.', 'Answers to the exercises above.'),
    'tagged': ('Tutoring log: the reasoning is enclosed within <think> </think> tags and the final answer within '
               '<answer> </answer> tags.', 'Chat log: the reasoning first, then the answer.',
               'In each reply the assistant shows the reasoning process, then provides the answer.'),
}


def worksheet(problems, style: str, header: str = '', shown_steps=None) -> str:
    """A page of solved problems as plain text, the way exercise sheets appear on the web.

    'qa': 'Q: <prompt>' / 'A: <answer>'; 'equation': '<expression> = <value>'; 'tagged': a tutoring chat
    log, 'User: <prompt>. Assistant: <worked solution in think/answer tags>' (`shown_steps`, one bool
    per problem, says which solutions show their steps; default all). None of them holds the R1-Zero
    template's instructions: a model pre-trained on worksheets has seen the tasks and the tags, never
    that prompt.
    """
    shown_steps = [True] * len(problems) if shown_steps is None else shown_steps
    lines = []
    for p, show in zip(problems, shown_steps, strict=True):
        if style == 'qa':
            lines.append(f'Q: {p.prompt}\nA: {p.answer}')
        elif style == 'equation':
            lines.append(f'{p.answer} = {p.target}' if p.task == 'countdown' else f'{p.steps[0]} = {p.answer}')
        elif style == 'tagged':
            lines.append(f'User: {p.prompt}. Assistant: {worked_solution(p, show)}')
        else:
            raise ValueError(f'worksheet style {style!r} is invalid: must be one of {WORKSHEET_STYLES}')
    return '\n\n'.join(([header] if header else []) + lines)


def parse_answer(text: str) -> str | None:
    """The stripped content of the last <answer>...</answer> in `text`, or None: the last match of the
    lazy `<answer>(.*?)</answer>` scanned left to right, found from the right with five `str.find`s.

    The regex scan itself is quadratic on a flood of unclosed tags (36 s for 20,000 <answer>). Here: E is
    the last </answer> and A the last <answer> before it. The last match ends at the first </answer>
    after A; it opens at the first <answer> after the last </answer> before A (B), because a match never
    holds a </answer>, so after B the scan is looking for an opening."""
    close = text.rfind('</answer>')
    last_open = text.rfind('<answer>', 0, close) if close >= 0 else -1
    if last_open < 0:
        return None
    before = text.rfind('</answer>', 0, last_open)
    start = text.find('<answer>', before + len('</answer>') if before >= 0 else 0)
    end = text.find('</answer>', last_open + len('<answer>'))
    return text[start + len('<answer>'):end].strip()


def format_ok(text: str) -> bool:
    """True iff `text` is exactly `<think> ... </think> <answer> ... </answer>` (whitespace around
    allowed), with no stray or nested think/answer tags. Linear time: each tag counted once, then the
    one arrangement checked."""
    body = text.strip()
    if any(body.count(tag) != 1 for tag in _TAGS) or not (body.startswith('<think>') and body.endswith('</answer>')):
        return False
    think_end, answer_start = body.index('</think>'), body.index('<answer>')
    return think_end < answer_start and not body[think_end + len('</think>'):answer_start].strip()


def grade(problem: Problem, completion_text: str) -> bool:
    """Exact check of the completion's answer: equal to the truth (arithmetic), or an expression over
    the given numbers, each at most once, whose exact value is the target (countdown)."""
    answer = parse_answer(completion_text)
    if answer is None:
        return False
    if problem.task != 'countdown':
        return answer == problem.answer
    used, value = evaluate_expression(answer)
    if value is None:
        return False
    available = list(problem.numbers)
    for x in used:
        if x not in available:
            return False
        available.remove(x)
    return value == problem.target


def grade_first_answer(problem: Problem, completion_text: str) -> bool:
    """`grade` of the text up to its first </answer>: the credit a completion that goes on past its
    answer (into another answer) would get for that answer. An answer never closed earns none."""
    head, closing, _ = completion_text.partition('</answer>')
    return grade(problem, head + closing)


def evaluate_expression(text: str) -> tuple[list[int], fractions.Fraction | None]:
    """(integer literals used, exact value) of an expression of + - * / and parentheses over integer
    literals; ([], None) for anything else (names, calls, powers, unary minus, division by zero).

    The text is parsed, never executed: only the checked nodes of its syntax tree are walked.
    """
    if len(text) > MAX_EXPRESSION_CHARS or not _EXPRESSION_CHARS.fullmatch(text):
        return [], None
    try:
        tree = ast.parse(text.strip(), mode='eval')
    except SyntaxError:
        return [], None
    used = []

    def walk(node):
        if isinstance(node, ast.Constant) and type(node.value) is int:
            used.append(node.value)
            return fractions.Fraction(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in (ast.Add, ast.Sub, ast.Mult, ast.Div):
            left, right = walk(node.left), walk(node.right)
            if left is None or right is None:
                return None
            if isinstance(node.op, ast.Add):
                return left + right
            if isinstance(node.op, ast.Sub):
                return left - right
            if isinstance(node.op, ast.Mult):
                return left * right
            return None if right == 0 else left / right
        return None

    value = walk(tree.body)
    return (used, value) if value is not None else ([], None)
