"""Combinatorial name pools, partitioned so that train / validation / test never share a name.

Every name is built from syllable or word lists; a stable hash (CRC32, not Python's salted `hash`) of
the name's distinguishing part assigns it to exactly one split, so the splits' names are disjoint by
construction and the assignment is the same in every process and on every machine.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Callable
from typing import Literal

Split = Literal["train", "validation", "test"]
SPLITS: tuple[Split, ...] = ("train", "validation", "test")

FIRST_NAMES = ["Alice", "Bruno", "Clara", "Dario", "Elena", "Felix", "Greta", "Hugo", "Irene", "Jonas", "Karin", "Luca", "Maya", "Nils", "Olga", "Pavel", "Quinn", "Rosa", "Simon", "Tara", "Ugo", "Vera", "Walter", "Xenia", "Yusuf", "Zora", "Amir", "Bianca", "Cyril", "Dalia", "Emil", "Fiona", "Gideon", "Hana", "Ivan", "Julia", "Kofi", "Lena", "Marco", "Nadia", "Oscar", "Petra", "Rafael", "Sofia", "Tomas", "Una", "Viktor", "Wanda", "Yara", "Zeno", "Anton", "Beatrix", "Caspar", "Delia", "Edgar", "Flora", "Gustav", "Helga", "Ingrid", "Jasper", "Kira", "Lorenz", "Mira", "Noah", "Ottilie", "Priya", "Ruben", "Selma", "Theo", "Ilse"]

_LAST_ONSETS = ["b", "br", "c", "d", "dr", "f", "g", "gr", "h", "k", "kl", "l", "m", "n", "p", "pr", "r", "s", "st", "t", "tr", "v", "w", "z"]
_LAST_VOWELS = ["a", "e", "i", "o", "u", "ai", "ei", "ou"]
_LAST_CODAS = ["n", "r", "l", "s", "nd", "rt", "lm", "x"]
_LAST_ENDINGS = ["ero", "ani", "ova", "ski", "berg", "mann", "son", "eau", "elli", "ard", "ez", "ino"]

_CORE_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "qu", "x"]
_CORE_VOWELS = ["a", "e", "i", "o", "u", "y"]
_CORE_MIDDLES = ["l", "n", "r", "s", "t", "v", "x", "z", "nd", "nt", "rk"]
_CORE_ENDINGS = ["ex", "on", "ia", "ix", "ora", "uma", "ent", "is", "ax", "io", "elt"]

COMPANY_SUFFIXES = ["Labs", "Systems", "Industries", "Works", "Group", "Dynamics", "Holdings", "Foods", "Motors", "Networks"]
CITY_SUFFIXES = ["ton", "ville", "burg", "haven", "ford", "port", "dale", "mouth", "field", "stad"]
PRODUCT_KINDS = ["phone", "tablet", "drone", "scooter", "router", "camera", "printer", "headset", "speaker", "watch", "kettle", "bicycle", "lamp", "sensor", "keyboard", "thermostat", "projector", "blender"]


def split_of(key: str) -> Split:
    """The split a name belongs to, from a stable hash of its distinguishing part `key`."""
    return SPLITS[zlib.crc32(key.lower().encode()) % len(SPLITS)]


def _syllable_word(rng: random.Random, onsets: list[str], vowels: list[str], middles: list[str], endings: list[str]) -> str:
    parts = [rng.choice(onsets), rng.choice(vowels)]
    if rng.random() < 0.6:
        parts += [rng.choice(middles), rng.choice(vowels)]
    parts.append(rng.choice(endings))
    return "".join(parts).capitalize()


class NamePool:
    """Draws unique names of each kind for one split; never returns a name twice or from another split.

    Rejection sampling over combinatorial spaces of many thousands of names per kind, so a world of a
    few hundred entities draws quickly and a split never runs dry.
    """

    def __init__(self, rng: random.Random, split: Split) -> None:
        self._rng = rng
        self._split = split
        self._used: set[str] = set()

    def _draw(self, make: Callable[[], str], key_of: Callable[[str], str]) -> str:
        for _ in range(100_000):
            name = make()
            if name not in self._used and split_of(key_of(name)) == self._split:
                self._used.add(name)
                return name
        raise RuntimeError(f"name space exhausted for split {self._split!r}")  # pragma: no cover

    def last_name(self) -> str:
        rng = self._rng
        return _syllable_word(rng, _LAST_ONSETS, _LAST_VOWELS, _LAST_CODAS, _LAST_ENDINGS)

    def person(self) -> str:
        # The last name alone decides the split, so two splits never share even a surname.
        return self._draw(lambda: f"{self._rng.choice(FIRST_NAMES)} {self.last_name()}", lambda n: n.split()[-1])

    def _core(self) -> str:
        return _syllable_word(self._rng, _CORE_ONSETS, _CORE_VOWELS, _CORE_MIDDLES, _CORE_ENDINGS)

    def company(self) -> str:
        return self._draw(lambda: f"{self._core()} {self._rng.choice(COMPANY_SUFFIXES)}", lambda n: n.split()[0])

    def city(self) -> str:
        def make() -> str:
            stem = self._core()[:-2].rstrip("aeiouy") or self._core()
            return f"{stem}{self._rng.choice(CITY_SUFFIXES)}".capitalize()

        return self._draw(make, lambda n: n)

    def product(self) -> str:
        # "Zorvex 7" style model names; the core word decides the split.
        return self._draw(lambda: f"{self._core()} {self._rng.randint(2, 99)}", lambda n: n.split()[0])

    def archive(self) -> str:
        return self._draw(lambda: self._core(), lambda n: n)
