"""Capital cities, asked in plain words: a task a small pretrained chat model can do (SmolLM2-135M-Instruct
names most of them), for real-model recipes.

    prompt      What is the capital of France?
    answer      Paris

A completion is correct when it names the capital (case-insensitive, as a whole word). Countries are split,
not prompts: a country belongs to the test split iff crc32(country) % 4 == 0, so held-out questions ask
about countries never trained on. Training prompts draw a country and one of the phrasings, seeded.

System-prompt internalisation (OPSD with a shared rule, math.md §6.7): ``rule=TEXT`` (or a name of
``RULES``) gives every example that privileged context (``opsd.system={privileged}`` shows it to the
self-teacher as a system turn); ``shown=true`` puts the rule in the prompt instead (the system turn the
self-teacher sees: the model when told); ``check=`` chooses what the verifier checks: ``capital`` (the
reply names it), ``bare`` (the whole reply is the name, at most a final full stop) or ``french`` (the reply
is in French: at least two French function words, whatever the city).
"""

from __future__ import annotations

import random
import re
import zlib

from opdistill.data.examples import Example
from opdistill.errors import UserError

DESCRIPTION = (
    "capital cities asked in plain words, for pretrained chat models (held-out countries; options: "
    "rule=french|bare|TEXT as every example's privileged context, shown=true: in a system turn instead, "
    "check=capital|bare|french: what the verifier checks)"
)
RULES = {
    "french": "Always answer in French.",  # SmolLM2-135M follows it about half the time when told
    "bare": "Reply with the name of the city only: no sentence, no explanation.",  # it does not follow this
}
FRENCH_WORDS = frozenset(
    [
        "est",
        "le",
        "la",
        "les",
        "du",
        "des",
        "une",
        "un",
        "capitale",
        "et",
        "ville",
        "pays",
        "dans",
        "avec",
        "qui",
        "sur",
        "c'est",
        "elle",
        "il",
    ]
)

# a table, several pairs a line
# fmt: off
CAPITALS = {
    "Afghanistan": "Kabul", "Albania": "Tirana", "Algeria": "Algiers", "Argentina": "Buenos Aires",
    "Armenia": "Yerevan", "Australia": "Canberra", "Austria": "Vienna", "Azerbaijan": "Baku",
    "Bangladesh": "Dhaka", "Belarus": "Minsk", "Belgium": "Brussels", "Bolivia": "Sucre",
    "Brazil": "Brasilia", "Bulgaria": "Sofia", "Cambodia": "Phnom Penh", "Canada": "Ottawa",
    "Chile": "Santiago", "China": "Beijing", "Colombia": "Bogota", "Croatia": "Zagreb", "Cuba": "Havana",
    "Czech Republic": "Prague", "Denmark": "Copenhagen", "Ecuador": "Quito", "Egypt": "Cairo",
    "Estonia": "Tallinn", "Ethiopia": "Addis Ababa", "Finland": "Helsinki", "France": "Paris",
    "Georgia": "Tbilisi", "Germany": "Berlin", "Ghana": "Accra", "Greece": "Athens", "Hungary": "Budapest",
    "Iceland": "Reykjavik", "India": "New Delhi", "Indonesia": "Jakarta", "Iran": "Tehran",
    "Iraq": "Baghdad", "Ireland": "Dublin", "Israel": "Jerusalem", "Italy": "Rome", "Jamaica": "Kingston",
    "Japan": "Tokyo", "Jordan": "Amman", "Kenya": "Nairobi", "Latvia": "Riga", "Lebanon": "Beirut",
    "Lithuania": "Vilnius", "Malaysia": "Kuala Lumpur", "Mexico": "Mexico City", "Mongolia": "Ulaanbaatar",
    "Morocco": "Rabat", "Nepal": "Kathmandu", "Netherlands": "Amsterdam", "New Zealand": "Wellington",
    "Nigeria": "Abuja", "North Korea": "Pyongyang", "Norway": "Oslo", "Pakistan": "Islamabad",
    "Peru": "Lima", "Philippines": "Manila", "Poland": "Warsaw", "Portugal": "Lisbon", "Qatar": "Doha",
    "Romania": "Bucharest", "Russia": "Moscow", "Saudi Arabia": "Riyadh", "Senegal": "Dakar",
    "Serbia": "Belgrade", "Singapore": "Singapore", "Slovakia": "Bratislava", "Slovenia": "Ljubljana",
    "South Africa": "Pretoria", "South Korea": "Seoul", "Spain": "Madrid", "Sri Lanka": "Colombo",
    "Sudan": "Khartoum", "Sweden": "Stockholm", "Switzerland": "Bern", "Syria": "Damascus",
    "Thailand": "Bangkok", "Tunisia": "Tunis", "Turkey": "Ankara", "Uganda": "Kampala", "Ukraine": "Kyiv",
    "United Kingdom": "London", "United States": "Washington", "Uruguay": "Montevideo",
    "Venezuela": "Caracas", "Vietnam": "Hanoi", "Zambia": "Lusaka", "Zimbabwe": "Harare",
}
# fmt: on
PHRASINGS = (
    "What is the capital of {country}?",
    "Which city is the capital of {country}?",
    "Name the capital city of {country}.",
    "What city serves as the capital of {country}?",
)


def held_out(country: str) -> bool:
    return zlib.crc32(country.encode()) % 4 == 0


def names_capital(completion: str, example: Example) -> bool:
    """The completion names ``example.answer`` as a whole word, in any case."""
    return re.search(rf"\b{re.escape(example.answer)}\b", completion, re.IGNORECASE) is not None


def is_bare_capital(completion: str, example: Example) -> bool:
    """The whole completion is ``example.answer`` (any case, surrounding space and one final full stop
    allowed)."""
    return completion.strip().removesuffix(".").strip().lower() == example.answer.lower()


def is_french(completion: str, example: Example) -> bool:
    """At least two French function words (``FRENCH_WORDS``) in the completion."""
    words = re.findall(r"[a-zà-ÿ']+", completion.lower())
    return sum(word in FRENCH_WORDS for word in words) >= 2


CHECKS = {"capital": names_capital, "bare": is_bare_capital, "french": is_french}


class CapitalStream:
    """Training questions: (seed, index) -> a country of the training split and a phrasing."""

    def __init__(self, countries: list[str], seed: int, rule: str = "", shown: bool = False):
        self.countries, self.seed, self.rule, self.shown = countries, seed, rule, shown

    def __getitem__(self, index: int) -> Example:
        rng = random.Random(self.seed * 1_000_003 + index)
        country = rng.choice(self.countries)
        return question(country, rng.choice(PHRASINGS), self.rule, self.shown)

    def batch(self, step: int, size: int) -> list[Example]:
        return [self[i] for i in range(step * size, (step + 1) * size)]


def question(country: str, phrasing: str, rule: str, shown: bool) -> Example:
    """The question about ``country``: ``rule`` as its privileged context, or as a system turn if shown."""
    text = phrasing.format(country=country)
    if shown and rule:
        return Example(prompt=(("system", rule), ("user", text)), answer=CAPITALS[country])
    return Example(prompt=text, answer=CAPITALS[country], privileged=rule)


def build(seed: int = 0, rule: str = "", shown: bool = False, check: str = "capital"):
    if check not in CHECKS:
        raise UserError(f"task capitals: check must be one of {', '.join(CHECKS)}, got {check!r}.")
    rule = RULES.get(rule, rule)
    train = [c for c in CAPITALS if not held_out(c)]
    test = [
        question(country, phrasing, rule, shown)
        for country in CAPITALS
        if held_out(country)
        for phrasing in PHRASINGS
    ]
    return CapitalStream(train, seed, rule, shown), test, CHECKS[check]
