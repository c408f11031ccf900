"""Render a `World` into natural-looking documents: several templates per fact, filler prose, and
distractor articles that mention the same entities without stating the facts questions ask about.

A document states each of its facts exactly once, in the exact surface form of the answer (names and
years verbatim), so a gold answer always appears in its gold document.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from terse.synth.world import City, Company, Person, Product, World


@dataclass(frozen=True)
class Document:
    """One document of the corpus; `doc_id` is unique across every world of a split."""

    doc_id: str
    title: str
    text: str
    kind: str
    """"company", "person", "product", "city", "news" or "haystack"."""


FILLER = [
    "The morning light fell across the old stone square while the market stalls opened one by one.",
    "Local historians still argue about how the first bridge over the river was paid for.",
    "Visitors often remark on the quiet streets and the smell of fresh bread in the early hours.",
    "A small museum near the station keeps maps, letters and photographs from the last century.",
    "In winter the harbour freezes at the edges, and children skate where boats usually moor.",
    "The regional newspaper prints a weekly column about gardens, recipes and neighbourhood events.",
    "Several cafés stay open late, and musicians play on the corner when the weather allows it.",
    "Trains to the coast leave every hour, although the timetable changes during the holidays.",
    "Most buildings in the centre were renovated after a long debate in the town council.",
    "Farmers from the surrounding valleys bring cheese, apples and honey to the Saturday fair.",
    "Cycling paths run along the canal, shaded by rows of tall poplars planted long ago.",
    "The annual lantern festival draws crowds who walk slowly through the lit-up alleys.",
    "A new library opened last year with reading rooms, a workshop and a rooftop terrace.",
    "Rain is common in autumn, so most people carry an umbrella from September onwards.",
    "Schools in the area organise science fairs where pupils show their own experiments.",
    "The hills to the north are popular with walkers, painters and bird watchers alike.",
    "Delivery vans crowd the narrow lanes before noon, then the streets become calm again.",
    "An old lighthouse, no longer in use, has been turned into a small guest house.",
    "Committees meet on Thursdays to discuss budgets, roads and the care of public parks.",
    "Economists describe the region as steady, with modest growth and few surprises.",
]


def filler_sentences(rng: random.Random, num_sentences: int) -> list[str]:
    """`num_sentences` filler sentences drawn with replacement (no facts about entities)."""
    return [rng.choice(FILLER) for _ in range(num_sentences)]


def _company_text(c: Company, world: World, rng: random.Random) -> str:
    facts = [
        rng.choice([
            f"{c.name} is based in {c.city}.",
            f"The headquarters of {c.name} are in {c.city}.",
            f"{c.name} has its head office in {c.city}.",
        ]),
        rng.choice([
            f"{c.name} was founded in {c.founded_year}.",
            f"The company was founded in {c.founded_year}.",
            f"It was established in {c.founded_year} as a small {c.industry} business.",
        ]),
        rng.choice([
            f"The CEO of {c.name} is {c.ceo}.",
            f"{c.ceo} leads the company as its CEO.",
            f"Its chief executive officer (CEO) is {c.ceo}.",
        ]),
        rng.choice([
            f"{c.name} makes the following products: {_join(c.products)}.",
            f"Its product line consists of {_join(c.products)}.",
            f"The products made by {c.name} are {_join(c.products)}.",
        ]),
        rng.choice([
            f"The company works in {c.industry} and employs about {c.num_employees} people.",
            f"About {c.num_employees} people work in its {c.industry} divisions.",
        ]),
    ]
    return _lead_then_shuffled(facts, rng)


def _person_text(p: Person, world: World, rng: random.Random) -> str:
    facts = [
        rng.choice([
            f"{p.name} works for {p.employer} as a {p.role}.",
            f"{p.name} is a {p.role} at {p.employer}.",
            f"{p.name} is employed by {p.employer}, where the job title is {p.role}.",
        ]),
        rng.choice([
            f"{p.name} lives in {p.city}.",
            f"Home for {p.name} is the city of {p.city}.",
            f"These days {p.name} lives in {p.city}.",
        ]),
        rng.choice([
            f"{p.name} was born in {p.birth_year}.",
            f"Born in {p.birth_year}, {p.name} grew up far from the coast.",
        ]),
        rng.choice([
            f"In spare time {p.name} enjoys {p.hobby}.",
            f"A favourite pastime of {p.name} is {p.hobby}.",
        ]),
    ]
    return _lead_then_shuffled(facts, rng)


def _product_text(p: Product, world: World, rng: random.Random) -> str:
    facts = [
        rng.choice([
            f"The {p.name} is a {p.kind} made by {p.maker}.",
            f"{p.maker} makes the {p.name}, a {p.kind}.",
            f"The {p.name} {p.kind} is made by {p.maker}.",
        ]),
        rng.choice([
            f"The {p.name} was launched in {p.launch_year}.",
            f"It was launched in {p.launch_year}.",
            f"Sales of the {p.name} began in {p.launch_year}, the year it was launched.",
        ]),
        rng.choice([f"It costs {p.price} dollars.", f"The {p.name} sells for {p.price} dollars."]),
    ]
    return _with_filler(facts, rng)


def _city_text(c: City, world: World, rng: random.Random) -> str:
    based = sorted(name for name, co in world.companies.items() if co.city == c.name)
    facts = [
        rng.choice([
            f"{c.name} is a city of about {c.population_k} thousand people on the {c.river} river.",
            f"About {c.population_k} thousand people live in {c.name}, a city on the {c.river} river.",
        ])
    ]
    if based:
        facts.append(f"Companies based in {c.name} include {_join(based)}.")
    return _with_filler(facts, rng)


def _news_text(world: World, rng: random.Random) -> tuple[str, str]:
    """A distractor article naming several entities while stating none of the facts questions ask."""
    people = rng.sample(sorted(world.people), 2)
    company = rng.choice(sorted(world.companies))
    product = rng.choice(sorted(world.products))
    city = rng.choice(sorted(world.cities))
    sentences = [
        f"{people[0]} and {people[1]} spoke on a panel about the future of {world.companies[company].industry}.",
        rng.choice([
            f"Analysts compared {company} with its rivals and expect a busy year.",
            f"Reporters asked {company} about rumours of a merger; the company declined to comment.",
        ]),
        rng.choice([
            f"Reviewers tested the {product} and praised its battery life.",
            f"A blog post compared the {product} with older models.",
        ]),
        f"The weather in {city} was unusually warm for the season.",
    ]
    rng.shuffle(sentences)
    title = rng.choice(["Industry roundup", "Weekly business notes", "Around the region", "Trade fair diary"])
    return title, _with_filler(sentences, rng)


def _lead_then_shuffled(facts: list[str], rng: random.Random) -> str:
    """The first fact opens the text (it names the subject); the others follow in random order."""
    first, rest = facts[0], facts[1:]
    rng.shuffle(rest)
    return _with_filler([first, *rest], rng)


def _with_filler(facts: list[str], rng: random.Random) -> str:
    """Interleave fact sentences with 0-2 filler sentences each, in paragraphs."""
    sentences: list[str] = []
    for fact in facts:
        sentences.append(fact)
        sentences += filler_sentences(rng, rng.randint(0, 2))
    paragraphs, i = [], 0
    while i < len(sentences):
        n = rng.randint(2, 4)
        paragraphs.append(" ".join(sentences[i : i + n]))
        i += n
    return "\n".join(paragraphs)


def _join(items: tuple[str, ...] | list[str]) -> str:
    return ", ".join(items)


def render_documents(world: World, *, num_news: int = 8) -> list[Document]:
    """Every entity's document plus `num_news` distractor articles; deterministic per world."""
    rng = random.Random(f"docs:{world.split}:{world.seed}")
    docs: list[Document] = []

    def add(title: str, text: str, kind: str) -> None:
        # The title opens the text: prompts show "[doc_id] text", so the text must name its subject.
        docs.append(Document(f"{world.split[:2]}{world.seed}-{len(docs)}", title, f"{title}\n{text}", kind))

    for c in world.companies.values():
        add(c.name, _company_text(c, world, rng), "company")
    for p in world.people.values():
        add(p.name, _person_text(p, world, rng), "person")
    for pr in world.products.values():
        add(f"The {pr.name}", _product_text(pr, world, rng), "product")
    for city in world.cities.values():
        add(city.name, _city_text(city, world, rng), "city")
    for _ in range(num_news):
        title, text = _news_text(world, rng)
        add(title, text, "news")
    return docs
