"""A generated multi-document question set: one gold document answers, the others are distractors."""

from __future__ import annotations

import random
from dataclasses import dataclass

NAMES = ["Alice", "Boris", "Chen", "Dana", "Emil", "Fatima", "Goran", "Hana", "Ivan", "Junko", "Kofi",
         "Lena", "Mateo", "Nora", "Omar", "Priya", "Quinn", "Rosa", "Sven", "Tariq"]
CITIES = ["Paris", "Lagos", "Osaka", "Lima", "Oslo", "Quito", "Perth", "Porto", "Dakar", "Hanoi"]
COMPANIES = ["Acme Corp", "Globex", "Initech", "Umbrella", "Hooli", "Vandelay", "Wonka", "Cyberdyne"]
HOBBIES = ["chess", "sailing", "pottery", "climbing", "baking", "cycling", "painting", "fishing"]
FILLER = [
    "The weather that year was mild and the harvest was good.",
    "Local newspapers wrote about the new bridge over the river.",
    "Many visitors came for the summer festival in the old town.",
    "The museum opened a new wing dedicated to modern sculpture.",
    "Trains between the two largest cities now run every hour.",
    "A long report on public libraries was published in the spring.",
]


@dataclass(frozen=True)
class DocSet:
    docs: list[str]
    question: str
    gold: int
    answer: str


def make_docset(seed: int, num_docs: int = 10, num_filler: int = 3) -> DocSet:
    """`num_docs` person profiles with filler; the question asks where the gold person works."""
    rng = random.Random(seed)
    people = rng.sample(NAMES, num_docs)
    docs = []
    companies = []
    for name in people:
        company = rng.choice(COMPANIES)
        companies.append(company)
        facts = [
            f"{name} lives in {rng.choice(CITIES)} and works at {company} as an engineer since {rng.randint(1990, 2024)}.",
            f"On weekends {name} enjoys {rng.choice(HOBBIES)} with friends.",
        ]
        sentences = facts + rng.sample(FILLER, num_filler)
        rng.shuffle(sentences)
        docs.append(" ".join(sentences))
    gold = rng.randrange(num_docs)
    return DocSet(docs, f"Where does {people[gold]} work?", gold, companies[gold])
