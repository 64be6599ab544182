"""A small generated instruction-tuning dataset for four company departments.

Offline and CPU-friendly: no files, no network, no tokenizer, just short ASCII strings that a tiny
byte-level language model can learn. Each department has its own facts (service ports, budgets,
leave days, support procedures) and its own phrasing, so federated clients that each hold one
department see genuinely different data (a natural non-IID split by ``category``).

The facts are constants: a given question always gets the same answer, whatever the seed, so the
question -> answer mapping is learnable and a held-out set generated with another seed asks about
the same facts. The seed only decides which questions are asked, how they are phrased and the
filler values inside some contexts (order numbers, amounts). Rows come in department order: all
``engineering`` rows, then ``finance``, ``hr`` and ``customer_support``.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence

import numpy as np

from src.errors import ConfigError

DEPARTMENTS: tuple[str, ...] = ("engineering", "finance", "hr", "customer_support")

Row = tuple[str, str, str]  # (instruction, context, response)


def _pick(rng: np.random.Generator, items: Sequence):
    return items[int(rng.integers(len(items)))]


# --------------------------------------------------------------------------- engineering

# service -> (port, owner team, weekday the on-call rotation hands over)
_SERVICES: dict[str, tuple[int, str, str]] = {
    "search": (8443, "platform", "Monday"),
    "billing": (9100, "payments", "Tuesday"),
    "auth": (7000, "identity", "Wednesday"),
    "inventory": (8081, "supply", "Thursday"),
    "notifications": (5672, "messaging", "Friday"),
    "reports": (9200, "data", "Monday"),
    "gateway": (8000, "edge", "Tuesday"),
    "scheduler": (6060, "infra", "Wednesday"),
    "analytics": (8888, "data", "Thursday"),
    "checkout": (8090, "payments", "Friday"),
}
_PORT_QUESTIONS = (
    "Which port does the {s} service listen on?",
    "What port is the {s} service on?",
    "On which port can I reach the {s} service?",
)
_OWNER_QUESTIONS = (
    "Who owns the {s} service?",
    "Which team maintains the {s} service?",
    "Who is responsible for the {s} service code?",
)
_ONCALL_QUESTIONS = (
    "When does the {s} on-call rotation hand over?",
    "On which day does on-call for the {s} service change?",
    "Who covers on-call for the {s} service?",
)
_ALERT_CONTEXTS = (
    "Alert: {s} service error rate at {n}%.",
    "Alert: {s} service p99 latency is {n}00 ms.",
    "Pager: {s} service health check failed {n} times.",
)
_ALERT_QUESTIONS = (
    "Which team should be paged for this alert?",
    "Who do I page about this?",
)


def _engineering(rng: np.random.Generator) -> Row:
    service = _pick(rng, list(_SERVICES))
    port, team, day = _SERVICES[service]
    kind = rng.integers(4)  # port, owner, on-call, or an alert (context) to route
    context = ""
    if kind == 0:
        instruction = _pick(rng, _PORT_QUESTIONS).format(s=service)
        response = f"The {service} service listens on port {port}."
    elif kind == 1:
        instruction = _pick(rng, _OWNER_QUESTIONS).format(s=service)
        response = f"The {service} service is owned by the {team} team."
    elif kind == 2:
        instruction = _pick(rng, _ONCALL_QUESTIONS).format(s=service)
        response = f"The {team} team covers {service}; on-call hands over every {day}."
    else:
        context = _pick(rng, _ALERT_CONTEXTS).format(s=service, n=rng.integers(2, 10))
        instruction = _pick(rng, _ALERT_QUESTIONS)
        response = f"Page the {team} on-call; {service} runs on port {port}."
    return instruction, context, response


# --------------------------------------------------------------------------- finance

# team -> (budget in $k for Q1..Q4, manager approval limit in $, cost center)
_TEAMS: dict[str, tuple[tuple[int, int, int, int], int, str]] = {
    "marketing": ((120, 135, 110, 150), 5000, "MKT-210"),
    "sales": ((90, 95, 100, 140), 3000, "SLS-120"),
    "research": ((200, 180, 220, 210), 10000, "RES-104"),
    "legal": ((60, 60, 75, 70), 2500, "LGL-330"),
    "operations": ((150, 160, 155, 170), 7500, "OPS-415"),
    "design": ((45, 50, 55, 65), 2000, "DSG-518"),
}
_QUARTERS = ("Q1", "Q2", "Q3", "Q4")
# expense type -> reimbursement rule
_EXPENSE_RULES: dict[str, str] = {
    "meals": "Meals are reimbursed up to $40 per day with a receipt.",
    "hotels": "Hotels are reimbursed up to $180 per night.",
    "flights": "Flights are reimbursed at economy fare if booked 14 days ahead.",
    "taxis": "Taxis are reimbursed in full for work trips with a receipt.",
    "software": "Software is reimbursed only with prior IT approval.",
    "training": "Training is reimbursed up to $1,500 per employee per year.",
}
_BUDGET_QUESTIONS = (
    "What is the {t} budget for {q}?",
    "How much can the {t} team spend in {q}?",
    "{q} budget of the {t} team?",
)
_APPROVAL_QUESTIONS = (
    "What is the approval limit for a {t} manager?",
    "How much can a {t} manager approve alone?",
    "Up to what amount can {t} managers sign off spend?",
)
_EXPENSE_QUESTIONS = (
    "What is the reimbursement rule for {e}?",
    "Can I expense {e}?",
    "How are {e} costs reimbursed?",
)
_RECEIPT_ITEMS = ("taxi", "lunch", "hotel", "train ticket", "conference pass")
_RECEIPT_QUESTIONS = (
    "Which cost center should this be filed under?",
    "Where do I book this expense?",
)


def _finance(rng: np.random.Generator) -> Row:
    team = _pick(rng, list(_TEAMS))
    budgets, limit, cost_center = _TEAMS[team]
    kind = rng.integers(4)  # budget, approval limit, expense rule, or a receipt (context) to file
    context = ""
    if kind == 0:
        q = int(rng.integers(4))
        instruction = _pick(rng, _BUDGET_QUESTIONS).format(t=team, q=_QUARTERS[q])
        response = f"The {team} budget for {_QUARTERS[q]} is ${budgets[q]}k."
    elif kind == 1:
        instruction = _pick(rng, _APPROVAL_QUESTIONS).format(t=team)
        response = f"{team.capitalize()} managers can approve up to ${limit:,}."
    elif kind == 2:
        expense = _pick(rng, list(_EXPENSE_RULES))
        instruction = _pick(rng, _EXPENSE_QUESTIONS).format(e=expense)
        response = _EXPENSE_RULES[expense]
    else:
        context = f"Receipt: {_pick(rng, _RECEIPT_ITEMS)}, ${rng.integers(12, 400)}, {team} team."
        instruction = _pick(rng, _RECEIPT_QUESTIONS)
        response = f"File it under cost center {cost_center} ({team})."
    return instruction, context, response


# --------------------------------------------------------------------------- hr

# level -> (vacation days, yearly learning budget in $, notice period, remote days per week)
_LEVELS: dict[str, tuple[int, int, str, int]] = {
    "L1": (20, 500, "2 weeks", 2),
    "L2": (22, 1000, "1 month", 2),
    "L3": (25, 1500, "1 month", 3),
    "L4": (27, 2000, "2 months", 3),
    "L5": (30, 3000, "3 months", 4),
}
_LEVEL_QUESTIONS: tuple[tuple[tuple[str, ...], str], ...] = (
    # (phrasings, answer); the answer's fields come from _LEVELS
    (
        (
            "How many vacation days does an {level} employee get?",
            "Vacation allowance at level {level}?",
            "I am {level}. How much paid leave do I have?",
        ),
        "{level} employees get {vacation} vacation days per year.",
    ),
    (
        (
            "What is the learning budget for {level}?",
            "How much training money does an {level} employee get?",
            "Learning allowance for level {level}?",
        ),
        "{level} employees have a ${learning:,} yearly learning budget.",
    ),
    (
        (
            "What is the notice period for {level}?",
            "How much notice must an {level} employee give?",
            "I am {level} and want to resign. What notice applies?",
        ),
        "The notice period at level {level} is {notice}.",
    ),
    (
        (
            "How many remote days does {level} get?",
            "Can an {level} employee work from home?",
            "Remote work allowance for level {level}?",
        ),
        "{level} employees may work remotely {remote} days a week.",
    ),
)
# (policy id, policy excerpt, question, answer): the excerpt is the row's context
_POLICIES: tuple[tuple[str, str, str, str], ...] = (
    (
        "HR-3",
        "Sick leave over 3 days needs a doctor's note.",
        "When is a doctor's note needed?",
        "A doctor's note is needed after 3 days of sick leave.",
    ),
    (
        "HR-5",
        "Parental leave is 16 weeks at full pay for every level.",
        "How long is parental leave?",
        "Parental leave is 16 weeks at full pay.",
    ),
    (
        "HR-7",
        "New hires have a 6 month probation period.",
        "How long does probation last?",
        "Probation lasts 6 months for new hires.",
    ),
    (
        "HR-9",
        "Up to 5 unused vacation days carry over to next year.",
        "Can unused vacation carry over?",
        "Yes, up to 5 unused vacation days carry over.",
    ),
    (
        "HR-11",
        "Overtime is paid at 1.5x, for L1 and L2 only.",
        "Who gets paid overtime?",
        "Only L1 and L2 employees get overtime, at 1.5x.",
    ),
)


def _hr(rng: np.random.Generator) -> Row:
    kind = rng.integers(5)  # one of the four _LEVEL_QUESTIONS, or a policy excerpt (context)
    if kind == len(_LEVEL_QUESTIONS):
        policy_id, excerpt, question, answer = _pick(rng, _POLICIES)
        return f"Answer from the policy: {question}", f"Policy {policy_id}: {excerpt}", answer
    level = _pick(rng, list(_LEVELS))
    vacation, learning, notice, remote = _LEVELS[level]
    phrasings, answer = _LEVEL_QUESTIONS[kind]
    fields = dict(level=level, vacation=vacation, learning=learning, notice=notice, remote=remote)
    return _pick(rng, phrasings).format(level=level), "", answer.format(**fields)


# --------------------------------------------------------------------------- customer support

# issue -> (customer messages, ticket category, reply procedure); {n} is an order number
_ISSUES: dict[str, tuple[tuple[str, ...], str, str]] = {
    "a double charge": (
        ("I was charged twice for order {n}.", "My card shows two payments for order {n}."),
        "BILLING",
        "apologize, confirm the duplicate and refund it within 5 days.",
    ),
    "a late delivery": (
        ("Order {n} has not arrived yet.", "Where is my package? Order {n} is late."),
        "SHIPPING",
        "send the tracking link; offer $10 credit if 7+ days late.",
    ),
    "a damaged item": (
        ("Order {n} arrived broken.", "The item in order {n} is damaged."),
        "RETURNS",
        "ask for a photo, then ship a free replacement.",
    ),
    "a forgotten password": (
        ("I forgot my password and cannot log in.", "The password reset email never came."),
        "ACCOUNT",
        "resend the reset link and ask them to check spam.",
    ),
    "a refund request": (
        ("I want my money back for order {n}.", "Please refund order {n}, I changed my mind."),
        "RETURNS",
        "check it is within 30 days, then issue the refund.",
    ),
    "an app crash": (
        ("The app crashes when I open my cart.", "Your app closes every time I pay."),
        "TECHNICAL",
        "ask for the app version and escalate to tier 2.",
    ),
    "an address change": (
        ("I need a new address on order {n}.", "Can you ship order {n} to my new address?"),
        "SHIPPING",
        "update the address if the order has not shipped yet.",
    ),
}
_PROCEDURE_QUESTIONS = (
    "How do we handle {i}?",
    "What is the support procedure for {i}?",
    "A customer reports {i}. What do we do?",
)
_CATEGORY_QUESTIONS = (
    "Which ticket category is {i}?",
    "How should a ticket about {i} be tagged?",
    "Ticket category for {i}?",
)
_MESSAGE_QUESTIONS = (
    "How should support handle this message?",
    "Triage this customer message.",
    "What is the reply procedure here?",
)


def _customer_support(rng: np.random.Generator) -> Row:
    issue = _pick(rng, list(_ISSUES))
    messages, category, procedure = _ISSUES[issue]
    kind = rng.integers(3)  # procedure, ticket category, or a customer message (context) to triage
    context = ""
    response = f"Ticket {category}: {procedure}"
    if kind == 0:
        instruction = _pick(rng, _PROCEDURE_QUESTIONS).format(i=issue)
    elif kind == 1:
        instruction = _pick(rng, _CATEGORY_QUESTIONS).format(i=issue)
        response = f"Use ticket category {category}."
    else:
        context = "Customer: " + _pick(rng, messages).format(n=rng.integers(1000, 10000))
        instruction = _pick(rng, _MESSAGE_QUESTIONS)
    return instruction, context, response


# --------------------------------------------------------------------------- public API

_GENERATORS: dict[str, Callable[[np.random.Generator], Row]] = {
    "engineering": _engineering,
    "finance": _finance,
    "hr": _hr,
    "customer_support": _customer_support,
}


def generate_departments(samples_per_department: int = 300, seed: int = 0) -> list[dict[str, str]]:
    """Rows {"instruction", "context", "response", "category"}, all str, in department order.

    ``samples_per_department`` rows per name in :data:`DEPARTMENTS` (``category`` is the name):
    first all engineering rows, then finance, hr and customer_support. ``context`` is "" for most
    rows and a short alert, receipt, policy excerpt or customer message for the others. The same
    arguments give the same list; the facts behind the answers do not depend on ``seed``.
    """
    n = samples_per_department
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise ConfigError(f"data.loader.samples_per_department must be an integer >= 1, got {n!r}")
    rng = np.random.default_rng(seed)
    rows = []
    for department in DEPARTMENTS:
        make_row = _GENERATORS[department]
        for _ in range(int(n)):
            instruction, context, response = make_row(rng)
            rows.append(
                {
                    "instruction": instruction,
                    "context": context,
                    "response": response,
                    "category": department,
                }
            )
    return rows
