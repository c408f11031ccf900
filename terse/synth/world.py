"""The synthetic world: people, companies, cities and products tied by relations, built from a seed.

Every relation is functional where a question asks for one value (a person works for exactly one
company, a company is based in exactly one city, has one CEO, one founding year), so each question
has exactly one gold answer. Lists (the products a company makes) are ordered by launch year.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from terse.errors import ConfigError
from terse.synth.names import PRODUCT_KINDS, SPLITS, NamePool, Split

ROLES = ["engineer", "designer", "analyst", "chemist", "accountant", "researcher", "manager", "architect", "pilot", "writer"]
INDUSTRIES = ["robotics", "food", "logistics", "energy", "software", "textiles", "shipping", "medicine", "audio", "furniture"]
HOBBIES = ["chess", "sailing", "pottery", "climbing", "gardening", "painting", "cycling", "baking", "fishing", "astronomy"]


@dataclass(frozen=True)
class WorldConfig:
    """Size of one generated world. Defaults give documents of ~100-250 tokens and a few dozen entities."""

    num_cities: int = 8
    """Cities; companies are based in them and people live in them."""
    num_companies: int = 10
    """Companies; each has one CEO, one city, one founding year and `products_per_company` products."""
    num_people: int = 30
    """People; each works for one company (CEOs included) and lives in one city."""
    products_per_company: tuple[int, int] = (2, 5)
    """Inclusive range of how many products each company makes (list questions need >= 2)."""

    def __post_init__(self) -> None:
        if self.num_cities < 2:
            raise ConfigError(f"num_cities={self.num_cities} must be >= 2 so distractor cities exist")
        if self.num_companies < 2:
            raise ConfigError(f"num_companies={self.num_companies} must be >= 2 so distractors exist")
        if self.num_people < self.num_companies:
            raise ConfigError(
                f"num_people={self.num_people} must be >= num_companies={self.num_companies}: "
                f"every company needs a CEO"
            )
        low, high = self.products_per_company
        if not 2 <= low <= high <= 8:
            raise ConfigError(
                f"products_per_company={self.products_per_company} must satisfy 2 <= low <= high <= 8"
            )


@dataclass(frozen=True)
class City:
    name: str
    population_k: int
    """Population in thousands."""
    river: str


@dataclass(frozen=True)
class Product:
    name: str
    kind: str
    maker: str
    launch_year: int
    price: int


@dataclass(frozen=True)
class Company:
    name: str
    city: str
    founded_year: int
    industry: str
    ceo: str
    products: tuple[str, ...]
    num_employees: int


@dataclass(frozen=True)
class Person:
    name: str
    employer: str
    role: str
    city: str
    birth_year: int
    hobby: str


@dataclass(frozen=True)
class World:
    """One generated world; lookups are by entity name."""

    seed: int
    split: Split
    cities: dict[str, City] = field(default_factory=dict)
    companies: dict[str, Company] = field(default_factory=dict)
    people: dict[str, Person] = field(default_factory=dict)
    products: dict[str, Product] = field(default_factory=dict)

    def entity_names(self) -> set[str]:
        return set(self.cities) | set(self.companies) | set(self.people) | set(self.products)


def build_world(seed: int, split: Split, config: WorldConfig | None = None) -> World:
    """Build the world for `(seed, split)`: the same arguments always give the same world."""
    if split not in SPLITS:
        raise ConfigError(f"split={split!r} is not one of {SPLITS}")
    config = config or WorldConfig()
    rng = random.Random(f"world:{split}:{seed}")
    pool = NamePool(rng, split)
    world = World(seed=seed, split=split)
    rivers = [pool.archive() for _ in range(config.num_cities)]
    for i in range(config.num_cities):
        name = pool.city()
        world.cities[name] = City(name, rng.randint(20, 2000), rivers[i])
    city_names = list(world.cities)
    person_names = [pool.person() for _ in range(config.num_people)]
    company_names = [pool.company() for _ in range(config.num_companies)]
    employers = company_names + [rng.choice(company_names) for _ in range(config.num_people - len(company_names))]
    rng.shuffle(employers)
    ceo_of: dict[str, str] = {}
    for person, company in zip(person_names, employers):
        ceo_of.setdefault(company, person)
    for person, company in zip(person_names, employers):
        role = "chief executive" if ceo_of[company] == person else rng.choice(ROLES)
        world.people[person] = Person(
            person, company, role, rng.choice(city_names), rng.randint(1950, 2002), rng.choice(HOBBIES)
        )
    for company in company_names:
        founded = rng.randint(1890, 2015)
        num_products = rng.randint(*config.products_per_company)
        made: list[Product] = []
        for _ in range(num_products):
            name = pool.product()
            made.append(Product(name, rng.choice(PRODUCT_KINDS), company, rng.randint(max(founded, 1990), 2025), rng.randint(9, 990)))
        made.sort(key=lambda p: (p.launch_year, p.name))
        for product in made:
            world.products[product.name] = product
        world.companies[company] = Company(
            company,
            rng.choice(city_names),
            founded,
            rng.choice(INDUSTRIES),
            ceo_of[company],
            tuple(p.name for p in made),
            rng.randint(12, 90000),
        )
    return world
