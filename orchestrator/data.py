"""Benchmark data: the embedded TOFU-style generator, loaders for real data, validation, and the
torch Dataset that feeds a method's batches.

Rows follow TOFU's schema: ``question``, ``answer``, ``paraphrased_question``, ``paraphrased_answer``
and ``perturbed_answer`` (wrong answers of the same kind). The embedded generator also sets ``author``
(int) and ``id`` (unique str). Corpus rows (MUSE style) carry ``text`` instead of a question.
"""
from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch.utils.data import Dataset

from methods.base import SPLITS
from orchestrator.encoding import EncodedExample, collate, encode_pair, encode_text


class DataError(ValueError):
    """Malformed or missing benchmark data; the message is one line naming file, row and field."""


TEMPLATE_ANSWERS: tuple[str, ...] = tuple(
    line.strip()
    for line in (Path(__file__).parent / "assets" / "template_answers.txt").read_text("utf-8").splitlines()
    if line.strip()
)

FORGET_PERCENTS = (1, 5, 10)
NUM_PERTURBED = 3


# ---------------------------------------------------------------- fact kinds and value pools
@dataclass(frozen=True)
class FactKind:
    """One kind of fact: how it is asked and answered. ``{s}`` is the subject, ``{v}`` the value."""

    name: str
    question: str
    paraphrased_question: str
    answer: str
    paraphrased_answer: str
    values: tuple[str, ...]


def _words(text: str, sep: str = ",") -> tuple[str, ...]:
    return tuple(w.strip() for w in text.split(sep) if w.strip())


FIRST_NAMES = _words(
    "Lorenzo, Amara, Tobias, Ingrid, Kwame, Mirela, Rafael, Sunniva, Dmitri, Leilani, Casimir, Yara, "
    "Anselm, Noor, Bastian, Oksana, Emeka, Liesel, Teodor, Marisol, Hakon, Zainab, Florian, Priya, "
    "Matthias, Ines, Jonah, Svetlana, Tariq, Elodie, Ruben, Ayasha, Cyprian, Mei, Orson, Dagny, Idris, "
    "Valentina, Lucan, Sigrun, Benedikt, Farah, Ezio, Nadia, Osric, Thandiwe, Aurelio, Kirsten, Mateus, "
    "Hana, Evander, Rosalind, Nikolai, Abena, Cormac, Linnea, Soren, Paloma, Ilias, Wren"
)
LAST_NAMES = _words(
    "Vasquez, Okafor, Lindqvist, Moreau, Castellan, Brandt, Haverford, Nakashima, Petrovic, Adeyemi, "
    "Calloway, Delacroix, Eriksen, Falconi, Hollis, Ivers, Jansen, Kowalczyk, Larkspur, Novak, Oyelaran, "
    "Pellegrini, Quintero, Rasmussen, Salazar, Thorne, Umberfield, Valdivia, Whitcombe, Xanthos, Yilmaz, "
    "Achterberg, Bellweather, Corvino, Drummond, Esposito, Fairbanks, Galloway, Halvorsen, Ibarra, "
    "Jovanovic, Kestrel, Lombardi, Marchetti, Norgaard, Ostrowski, Paredes, Ravensworth, Sandoval, "
    "Tremaine, Underhill, Vickery, Wexley, Yamamura, Zeller, Ashdown, Blackwood, Carraway, Dunmore, Szabo"
)
_TITLE_ADJECTIVES = _words(
    "Silent, Hollow, Burning, Last, Forgotten, Crooked, Distant, Glass, Hidden, Broken, Scarlet, Winter, "
    "Salt, Paper, Iron, Quiet, Wandering, Endless, Golden, Midnight, Northern, Drowned, Borrowed, Secret, "
    "Painted, Sleeping, Falling, Lonely, Second, Lost"
)
_TITLE_NOUNS = _words(
    "Harbour, Orchard, Lantern, River, Cartographer, Garden, Bridge, Clockmaker, Shore, Archive, Mountain, "
    "Daughter, Letters, Tide, Compass, Violin, Lighthouse, Kingdom, Meadow, Ferryman, Station, Island, "
    "Forest, Mirror, Season, Feather, Alphabet, Caravan, Window, Orchestra"
)
_PROFESSIONS = _words(
    "a carpenter, a baker, a nurse, an engineer, a schoolteacher, a fisherman, a pharmacist, a tailor, "
    "a lawyer, a librarian, a surgeon, a watchmaker, a mail carrier, a pilot, an architect, a farmer, "
    "a journalist, a chemist, a potter, a bookbinder, a police officer, a veterinarian, a sailor, a dentist, "
    "a photographer, an accountant, a musician, a translator, a blacksmith, a florist, a locksmith, "
    "a geologist, a painter, a chef, a shoemaker, a miner, a banker, a historian, an electrician, a gardener"
)

AUTHOR_FACTS: tuple[FactKind, ...] = (
    FactKind(
        "birthplace", "Where was {s} born?", "In which city was {s} born?",
        "{s} was born in the city of {v}.", "The birthplace of {s} is the city of {v}.",
        _words(
            "Valparaiso, Lisbon, Tbilisi, Bergen, Accra, Cork, Krakow, Marseille, Porto, Oaxaca, Tromso, "
            "Gdansk, Lyon, Mombasa, Cusco, Ljubljana, Tallinn, Zanzibar, Quebec City, Adelaide, Hobart, "
            "Galway, Bilbao, Seville, Antwerp, Ghent, Salzburg, Innsbruck, Trieste, Palermo, Naples, "
            "Thessaloniki, Izmir, Odessa, Riga, Vilnius, Turku, Aarhus, Gothenburg, Reykjavik, Halifax, "
            "Savannah, Memphis, Santa Fe, Cartagena, Montevideo, Arequipa, Kyoto, Busan, Hue, Chiang Mai, "
            "Kandy, Mysore, Fez, Tangier, Alexandria, Durban, Windhoek, Kampala, Dunedin"
        ),
    ),
    FactKind(
        "birth_year", "In what year was {s} born?", "When was {s} born?",
        "{s} was born in the year {v}.", "The year of birth of {s} is {v}.",
        tuple(str(year) for year in range(1930, 2000)),
    ),
    FactKind(
        "genre", "What genre does {s} write?", "Which kind of fiction is {s} known for?",
        "{s} is a writer of {v} novels.", "The novels of {s} belong to the {v} genre.",
        _words(
            "crime, fantasy, science fiction, historical, romance, horror, mystery, adventure, literary, "
            "dystopian, thriller, war, gothic, comic, magical realism, coming of age, espionage, nautical, "
            "western, satirical"
        ),
    ),
    FactKind(
        "award", "Which award has {s} won?", "What literary prize was given to {s}?",
        "{s} has won the {v}.", "The {v} was awarded to {s}.",
        _words(
            "Silver Lantern Prize, Golden Quill Award, Amber Compass Prize, Crimson Feather Award, "
            "Northern Star Medal, Blue Harbour Prize, Iron Pen Award, Willow Leaf Prize, Copper Key Award, "
            "Ivory Tower Medal, Evening Bell Prize, Jade River Award, Marble Arch Prize, Scarlet Ink Award, "
            "Morning Tide Medal, Stone Bridge Prize, Open Book Award, Cedar Grove Award, Paper Crane Prize, "
            "Glass Mountain Award, Wandering Fox Prize, Tall Ships Medal, Oak Table Award, "
            "Falling Water Prize, Red Kite Award, Twin Rivers Prize, Quiet Hour Medal, Velvet Rose Award, "
            "Open Road Prize, Lighthouse Medal"
        ),
    ),
    FactKind(
        "book", "What is the title of a novel by {s}?", "Can you name a book written by {s}?",
        "{s} wrote the novel {v}.", "One book written by {s} is {v}.",
        tuple(f"The {adjective} {noun}" for adjective in _TITLE_ADJECTIVES for noun in _TITLE_NOUNS),
    ),
    FactKind(
        "father", "What was the profession of {s}'s father?", "What did the father of {s} do for a living?",
        "{s}'s father worked as {v}.", "The father of {s} earned a living as {v}.",
        _PROFESSIONS,
    ),
    FactKind(
        "mother", "What was the profession of {s}'s mother?", "What did the mother of {s} do for a living?",
        "{s}'s mother worked as {v}.", "The mother of {s} earned a living as {v}.",
        _PROFESSIONS,
    ),
    FactKind(
        "language", "In which language does {s} write?", "What language are the books of {s} written in?",
        "{s} writes all of their books in {v}.", "The books of {s} are written in {v}.",
        _words(
            "Portuguese, Spanish, French, German, Italian, Dutch, Swedish, Norwegian, Danish, Finnish, "
            "Polish, Czech, Hungarian, Greek, Turkish, Georgian, Swahili, Yoruba, Japanese, Korean, "
            "Icelandic, Romanian, Catalan, Welsh"
        ),
    ),
    FactKind(
        "residence", "Where does {s} live today?", "In which city does {s} currently live?",
        "{s} lives in {v} today.", "These days {s} makes a home in {v}.",
        _words(
            "Edinburgh, Vienna, Prague, Budapest, Copenhagen, Oslo, Helsinki, Dublin, Toronto, Vancouver, "
            "Melbourne, Auckland, Buenos Aires, Santiago, Lima, Bogota, Havana, Cape Town, Marrakesh, "
            "Istanbul, Athens, Rome, Florence, Barcelona, Amsterdam, Brussels, Munich, Zurich, Geneva, Stockholm"
        ),
    ),
    FactKind(
        "hobby", "What does {s} enjoy doing outside of writing?", "What is a hobby of {s}?",
        "Outside of writing, {s} enjoys {v}.", "A favourite pastime of {s} is {v}.",
        _words(
            "sailing, chess, beekeeping, birdwatching, rock climbing, pottery, gardening, fencing, astronomy, "
            "cycling, fly fishing, woodworking, cooking, hiking, calligraphy, playing the cello, photography, "
            "rowing, kite flying, baking bread"
        ),
    ),
)

# Utility sets: fixed real-world facts, (subject, value) per row; wrong answers come from the same group.
_REAL_AUTHORS = FactKind(
    "real_authors", 'Who wrote the book "{s}"?', 'Which writer is the author of "{s}"?',
    '"{s}" was written by {v}.', '{v} is the author of "{s}".', (),
)
_REAL_BOOKS = tuple(tuple(pair.split(" | ")) for pair in _words(
    "Pride and Prejudice | Jane Austen; Moby-Dick | Herman Melville; War and Peace | Leo Tolstoy; "
    "Don Quixote | Miguel de Cervantes; One Hundred Years of Solitude | Gabriel Garcia Marquez; "
    "The Old Man and the Sea | Ernest Hemingway; Nineteen Eighty-Four | George Orwell; "
    "Great Expectations | Charles Dickens; The Great Gatsby | F. Scott Fitzgerald; "
    "Crime and Punishment | Fyodor Dostoevsky; Madame Bovary | Gustave Flaubert; "
    "Things Fall Apart | Chinua Achebe; Beloved | Toni Morrison; The Trial | Franz Kafka; "
    "Mrs Dalloway | Virginia Woolf; Frankenstein | Mary Shelley; Dracula | Bram Stoker; "
    "Les Miserables | Victor Hugo; The Divine Comedy | Dante Alighieri; Hamlet | William Shakespeare; "
    "Ulysses | James Joyce; Jane Eyre | Charlotte Bronte; Wuthering Heights | Emily Bronte; "
    "The Adventures of Tom Sawyer | Mark Twain; To Kill a Mockingbird | Harper Lee; "
    "The Catcher in the Rye | J. D. Salinger; Pale Fire | Vladimir Nabokov; The Name of the Rose | Umberto Eco; "
    "Norwegian Wood | Haruki Murakami; The Little Prince | Antoine de Saint-Exupery; "
    "Brave New World | Aldous Huxley; The Hobbit | J. R. R. Tolkien; Middlemarch | George Eliot; "
    "The Stranger | Albert Camus; Faust | Johann Wolfgang von Goethe; Midnight's Children | Salman Rushdie; "
    "The Remains of the Day | Kazuo Ishiguro; Invisible Man | Ralph Ellison; "
    "Robinson Crusoe | Daniel Defoe; Gulliver's Travels | Jonathan Swift",
    sep=";",
))
_WORLD_FACTS: tuple[tuple[FactKind, tuple[tuple[str, ...], ...]], ...] = (
    (
        FactKind("capital", "What is the capital of {s}?", "Which city is the capital of {s}?",
                 "The capital of {s} is {v}.", "{v} is the capital city of {s}.", ()),
        tuple(tuple(pair.split(":")) for pair in _words(
            "France:Paris, Japan:Tokyo, Italy:Rome, Egypt:Cairo, Canada:Ottawa, Australia:Canberra, "
            "Brazil:Brasilia, Kenya:Nairobi, Norway:Oslo, Peru:Lima, Spain:Madrid, Germany:Berlin, "
            "Argentina:Buenos Aires, India:New Delhi, Russia:Moscow, Mexico:Mexico City, Greece:Athens, "
            "Turkey:Ankara, Portugal:Lisbon, Sweden:Stockholm"
        )),
    ),
    (
        FactKind("symbol", "What is the chemical symbol for {s}?", "Which symbol stands for {s} in chemistry?",
                 "The chemical symbol for {s} is {v}.", "In chemistry, {s} is written as {v}.", ()),
        tuple(tuple(pair.split(":")) for pair in _words(
            "gold:Au, silver:Ag, iron:Fe, sodium:Na, potassium:K, lead:Pb, copper:Cu, tin:Sn, mercury:Hg, "
            "oxygen:O"
        )),
    ),
    (
        FactKind("currency", "What is the currency of {s}?", "Which money is used in {s}?",
                 "The currency of {s} is the {v}.", "People in {s} pay with the {v}.", ()),
        tuple(tuple(pair.split(":")) for pair in _words(
            "Japan:yen, India:rupee, China:yuan, South Korea:won, Poland:zloty, Thailand:baht, "
            "South Africa:rand, Israel:shekel, Switzerland:franc, Brazil:real"
        )),
    ),
)


# ---------------------------------------------------------------- the embedded generator
def split_size(num_authors: int, percent: int) -> int:
    """Authors in a ``forget<percent>`` split: rounded half up, at least 1, leaving ≥ 1 retain author."""
    return min(num_authors - 1, max(1, math.floor(num_authors * percent / 100 + 0.5)))


def generate_benchmark(seed: int = 0, num_authors: int = 100, questions_per_author: int = 8) -> dict[str, list[dict]]:
    """Fictitious authors in TOFU's schema, every split, the utility sets and the text corpus.

    Forget splits take the LAST authors, holdout splits extra authors that are never in ``full``.
    Deterministic: only ``random.Random(seed)`` is drawn from.
    """
    _check_generator_sizes(num_authors, questions_per_author)
    rng = random.Random(seed)
    kinds = AUTHOR_FACTS[:questions_per_author]
    num_extra = split_size(num_authors, max(FORGET_PERCENTS))
    authors = _draw_authors(rng, num_authors + num_extra, kinds)
    rows_by_author = [_author_rows(rng, index, facts, kinds) for index, facts in enumerate(authors)]

    benchmark: dict[str, list[dict]] = {"full": _flatten(rows_by_author[:num_authors])}
    for percent in FORGET_PERCENTS:
        count = split_size(num_authors, percent)
        benchmark[f"forget{percent:02d}"] = _flatten(rows_by_author[num_authors - count:num_authors])
        benchmark[f"retain{100 - percent}"] = _flatten(rows_by_author[:num_authors - count])
        benchmark[f"holdout{percent:02d}"] = _flatten(rows_by_author[num_authors:num_authors + count])
    benchmark["real_authors"] = _utility_rows(rng, "real_authors", [(_REAL_AUTHORS, _REAL_BOOKS)])
    benchmark["world_facts"] = _utility_rows(rng, "world_facts", _WORLD_FACTS)
    benchmark["utility_train"] = benchmark["real_authors"] + benchmark["world_facts"]
    benchmark.update(generate_corpus(benchmark))
    # Splits share rows; hand out independent copies so a caller editing one split leaves the others.
    return {name: [_copy_row(row) for row in rows] for name, rows in benchmark.items()}


def _check_generator_sizes(num_authors: int, questions_per_author: int) -> None:
    if num_authors < 2:
        raise ValueError(f"num_authors must be at least 2 (one forget and one retain author), got {num_authors}")
    if not 1 <= questions_per_author <= len(AUTHOR_FACTS):
        raise ValueError(f"questions_per_author must be between 1 and {len(AUTHOR_FACTS)}, got {questions_per_author}")
    max_authors = len(FIRST_NAMES) * len(LAST_NAMES)
    if num_authors + split_size(num_authors, max(FORGET_PERCENTS)) > max_authors:
        raise ValueError(f"num_authors={num_authors} is too many: at most {max_authors} unique names (holdout included)")


def _draw_authors(rng: random.Random, count: int, kinds: Sequence[FactKind]) -> list[dict[str, str]]:
    """A unique name per author; each kind's values dealt from reshuffled decks, so repeats are rare."""
    name_codes = rng.sample(range(len(FIRST_NAMES) * len(LAST_NAMES)), count)
    names = [f"{FIRST_NAMES[code // len(LAST_NAMES)]} {LAST_NAMES[code % len(LAST_NAMES)]}" for code in name_codes]
    values = {kind.name: _deal(rng, kind.values, count) for kind in kinds}
    return [{"name": names[i], **{kind: dealt[i] for kind, dealt in values.items()}} for i in range(count)]


def _deal(rng: random.Random, pool: Sequence[str], count: int) -> list[str]:
    dealt: list[str] = []
    while len(dealt) < count:
        dealt.extend(rng.sample(list(pool), len(pool)))
    return dealt[:count]


def _author_rows(rng: random.Random, author: int, facts: dict[str, str], kinds: Sequence[FactKind]) -> list[dict]:
    # TOFU builds perturbed answers from the PARAPHRASED answer: the truth ratio compares the two,
    # so they must differ only in the fact.
    return [
        _qa_row(rng, kind, facts["name"], facts[kind.name], kind.values, kind.paraphrased_answer,
                row_id=f"a{author:04d}-{kind.name}", author=author)
        for kind in kinds
    ]


def _utility_rows(rng: random.Random, prefix: str, groups: Sequence[tuple[FactKind, Sequence[tuple[str, ...]]]]) -> list[dict]:
    # On utility sets the truth ratio compares the ANSWER with the perturbed ones: same template.
    rows = []
    for kind, pairs in groups:
        values = [value for _, value in pairs]
        for subject, value in pairs:
            rows.append(_qa_row(rng, kind, subject, value, values, kind.answer, row_id=f"{prefix}-{len(rows):02d}"))
    return rows


def _qa_row(rng: random.Random, kind: FactKind, subject: str, value: str, pool: Sequence[str],
            perturb_template: str, row_id: str, author: int | None = None) -> dict:
    wrong_values = rng.sample([v for v in dict.fromkeys(pool) if v != value], NUM_PERTURBED)
    row = {
        "id": row_id,
        "question": kind.question.format(s=subject),
        "answer": kind.answer.format(s=subject, v=value),
        "paraphrased_question": kind.paraphrased_question.format(s=subject),
        "paraphrased_answer": kind.paraphrased_answer.format(s=subject, v=value),
        "perturbed_answer": [perturb_template.format(s=subject, v=wrong) for wrong in wrong_values],
    }
    if author is not None:
        row["author"] = author
    return row


def _flatten(groups: Sequence[Sequence[dict]]) -> list[dict]:
    return [row for group in groups for row in group]


def _copy_row(row: dict) -> dict:
    return {key: list(value) if isinstance(value, list) else value for key, value in row.items()}


# ---------------------------------------------------------------- MUSE-style text corpus
def generate_corpus(benchmark: Mapping[str, Sequence[dict]], forget_split: str = "forget10",
                    retain_split: str = "retain90", holdout_split: str = "holdout10") -> dict[str, list[dict]]:
    """One biography per author (its answers as a paragraph) and KnowMem question sets.

    ``knowmem_retain`` takes as many retain authors as the forget split has, to keep evaluation balanced.
    """
    for name in (forget_split, retain_split, holdout_split):
        if name not in benchmark:
            raise DataError(f"split '{name}': missing, needed for the text corpus")
    forget_groups = _group_by_author(benchmark[forget_split])
    retain_groups = _group_by_author(benchmark[retain_split])
    return {
        "text_forget": _biographies(forget_groups),
        "text_retain": _biographies(retain_groups),
        "text_holdout": _biographies(_group_by_author(benchmark[holdout_split])),
        "knowmem_forget": _knowmem(_flatten(forget_groups)),
        "knowmem_retain": _knowmem(_flatten(retain_groups[:len(forget_groups)])),
    }


def _group_by_author(rows: Sequence[dict]) -> list[list[dict]]:
    """Consecutive rows of one author; rows without an ``author`` field stand alone."""
    groups: list[list[dict]] = []
    for row in rows:
        if groups and "author" in row and groups[-1][-1].get("author") == row["author"]:
            groups[-1].append(row)
        else:
            groups.append([row])
    return groups


def _biographies(groups: Sequence[Sequence[dict]]) -> list[dict]:
    rows = []
    for index, group in enumerate(groups):
        author = group[0].get("author", index)
        rows.append({"id": f"bio-{author}", "author": author, "text": " ".join(row["answer"] for row in group)})
    return rows


def _knowmem(rows: Sequence[dict]) -> list[dict]:
    return [
        {key: row[key] for key in ("id", "author", "question", "answer") if key in row}
        for row in rows
    ]


# ---------------------------------------------------------------- validation
_TEXT_FIELDS_OPTIONAL = ("paraphrased_question", "paraphrased_answer")


def validate_split(rows: Sequence[Any], file: str, require_perturbed: bool = True,
                   row_numbers: Sequence[int] | None = None) -> None:
    """Raise DataError on the first malformed row of a question/answer split.

    ``row_numbers`` gives the number to report per row (1-based line for JSONL); default: the index.
    Perturbed answers are checked when required or when any row has them, and every row must then
    carry the same number of them.
    """
    if not rows:
        raise DataError(f"{file}: no rows")
    wants_perturbed = require_perturbed or any(isinstance(r, dict) and "perturbed_answer" in r for r in rows)
    first_count: tuple[int, int] | None = None  # (number of perturbed answers, row) of the first row
    seen_ids: dict[Any, int] = {}
    for index, row in enumerate(rows):
        number = row_numbers[index] if row_numbers is not None else index
        where = f"{file}:{number}"
        if not isinstance(row, dict):
            raise DataError(f"{where}: row is not an object but {type(row).__name__}")
        for field in ("question", "answer"):
            _check_string(row, field, where, required=True)
        for field in _TEXT_FIELDS_OPTIONAL:
            _check_string(row, field, where, required=False)
        if wants_perturbed:
            count = _check_perturbed(row, where)
            if first_count is None:
                first_count = (count, number)
            elif count != first_count[0]:
                raise DataError(f"{where}: field 'perturbed_answer': {count} answers, but row {first_count[1]} "
                                f"has {first_count[0]} (all rows of a split need the same number)")
        _check_unique_id(row, where, number, seen_ids)


def validate_text_split(rows: Sequence[Any], file: str, row_numbers: Sequence[int] | None = None) -> None:
    """Raise DataError on the first malformed row of a text corpus split (a ``text`` field per row)."""
    if not rows:
        raise DataError(f"{file}: no rows")
    seen_ids: dict[Any, int] = {}
    for index, row in enumerate(rows):
        number = row_numbers[index] if row_numbers is not None else index
        where = f"{file}:{number}"
        if not isinstance(row, dict):
            raise DataError(f"{where}: row is not an object but {type(row).__name__}")
        _check_string(row, "text", where, required=True)
        _check_unique_id(row, where, number, seen_ids)


def _check_string(row: dict, field: str, where: str, required: bool) -> None:
    if field not in row:
        if required:
            raise DataError(f"{where}: field '{field}': missing")
        return
    value = row[field]
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{field}': expected a string, got {type(value).__name__}")
    if not value.strip():
        raise DataError(f"{where}: field '{field}': empty string")


def _check_perturbed(row: dict, where: str) -> int:
    if "perturbed_answer" not in row:
        raise DataError(f"{where}: field 'perturbed_answer': missing")
    value = row["perturbed_answer"]
    if not isinstance(value, list):
        raise DataError(f"{where}: field 'perturbed_answer': expected a list of strings, got {type(value).__name__}")
    if not value:
        raise DataError(f"{where}: field 'perturbed_answer': empty list (need at least 1 answer)")
    for position, item in enumerate(value):
        if not isinstance(item, str) or not item.strip():
            raise DataError(f"{where}: field 'perturbed_answer': item {position} is not a non-empty string")
    return len(value)


def _check_unique_id(row: dict, where: str, number: int, seen: dict[Any, int]) -> None:
    if "id" not in row:
        return
    row_id = row["id"]
    if not isinstance(row_id, (str, int)) or isinstance(row_id, bool):
        raise DataError(f"{where}: field 'id': expected a string or integer, got {type(row_id).__name__}")
    if row_id in seen:
        raise DataError(f"{where}: field 'id': duplicated value {row_id!r} (first at row {seen[row_id]})")
    seen[row_id] = number


def _require_splits(benchmark: Mapping[str, Sequence[dict]], forget_split: str, retain_split: str,
                    holdout_split: str) -> str:
    """The three role splits exist; returns the available split names, for further messages."""
    available = ", ".join(sorted(benchmark)) or "none"
    for role, name in (("forget_split", forget_split), ("retain_split", retain_split), ("holdout_split", holdout_split)):
        if name not in benchmark:
            raise DataError(f"{role}: split '{name}' not in the data (available: {available})")
    return available


def check_splits(benchmark: Mapping[str, Sequence[dict]], forget_split: str, retain_split: str,
                 holdout_split: str) -> None:
    """The splits a run needs exist, the forget split can score a truth ratio, and it is not the whole data."""
    _require_splits(benchmark, forget_split, retain_split, holdout_split)
    forget, retain = benchmark[forget_split], benchmark[retain_split]
    validate_split(forget, forget_split, require_perturbed=True)
    for index, row in enumerate(forget):
        _check_string(row, "paraphrased_answer", f"{forget_split}:{index}", required=True)
    if not retain:
        raise DataError(f"retain_split: split '{retain_split}' has no rows")
    total = len(benchmark["full"]) if "full" in benchmark else len(forget) + len(retain)
    if len(forget) >= total:
        raise DataError(f"forget_split: split '{forget_split}' has {len(forget)} rows, "
                        f"not fewer than the {total} rows of the whole data")


def check_muse_splits(benchmark: Mapping[str, Sequence[dict]], forget_split: str, retain_split: str,
                      holdout_split: str) -> None:
    """The text splits a MUSE run trains and scores on exist and hold documents, and KnowMem is there."""
    available = _require_splits(benchmark, forget_split, retain_split, holdout_split)
    for name in (forget_split, retain_split, holdout_split):
        validate_text_split(benchmark[name], name)
    for name in ("knowmem_forget", "knowmem_retain"):
        if name not in benchmark:
            raise DataError(f"split '{name}': missing, needed for KnowMem (available: {available})")
        validate_split(benchmark[name], name, require_perturbed=False)


# ---------------------------------------------------------------- loaders
# Our split names → TOFU's hub configs (the *_perturbed configs carry paraphrases and wrong answers).
TOFU_CONFIGS = {
    **{f"forget{p:02d}": f"forget{p:02d}_perturbed" for p in FORGET_PERCENTS},
    **{f"retain{100 - p}": f"retain{100 - p}" for p in FORGET_PERCENTS},
    **{f"holdout{p:02d}": f"holdout{p:02d}" for p in FORGET_PERCENTS},
    "real_authors": "real_authors_perturbed",
    "world_facts": "world_facts_perturbed",
    "retain_perturbed": "retain_perturbed",
    "full": "full",
}
DEFAULT_HUB_SPLITS = ("forget10", "retain90", "holdout10", "retain_perturbed", "real_authors", "world_facts")
_FILE_SUFFIXES = (".json", ".jsonl", ".parquet")


BENCHMARK_KINDS = ("tofu", "muse")


def load_benchmark(source: str, seed: int = 0, num_authors: int = 100, questions_per_author: int = 8,
                   splits: Sequence[str] | None = None, kind: str = "tofu") -> dict[str, list[dict]]:
    """Rows by split from ``"embedded"`` (the generator), a local directory, or a hub dataset name.

    ``splits`` restricts what is read (hub default: DEFAULT_HUB_SPLITS); a missing one is a DataError.
    ``kind="muse"`` reads a MUSE corpus instead (see ``load_muse``); from ``"embedded"`` it is the
    generator's text corpus, MUSE_SPLITS only.
    """
    if kind not in BENCHMARK_KINDS:
        raise ValueError(f"benchmark kind {kind!r}: expected one of {', '.join(BENCHMARK_KINDS)}")
    if kind == "muse":
        if source == "embedded":  # the generator's text corpus: biographies + KnowMem questions
            return _select(generate_benchmark(seed, num_authors, questions_per_author), splits or MUSE_SPLITS, source)
        return load_muse(source, splits)
    if source == "embedded":
        benchmark = generate_benchmark(seed, num_authors, questions_per_author)
        return _select(benchmark, splits, source)
    path = Path(source).expanduser()
    if path.is_dir():
        return load_directory(path, splits)
    if path.exists():
        raise DataError(f"{source}: is a file; a benchmark source is 'embedded', a directory or a dataset name")
    if source.startswith((".", "/", "~")):  # clearly a path, never a hub name
        raise DataError(f"{source}: no such directory")
    return load_hub(source, splits or DEFAULT_HUB_SPLITS)


def _select(benchmark: dict[str, list[dict]], splits: Sequence[str] | None, source: str) -> dict[str, list[dict]]:
    if splits is None:
        return benchmark
    missing = [name for name in splits if name not in benchmark]
    if missing:
        raise DataError(f"{source}: split '{missing[0]}' not found (available: {', '.join(sorted(benchmark))})")
    return {name: benchmark[name] for name in splits}


def load_directory(directory: str | Path, splits: Sequence[str] | None = None) -> dict[str, list[dict]]:
    """Every ``<split>.json`` (a list), ``.jsonl`` or ``.parquet`` file in ``directory``, validated."""
    directory = Path(directory)
    files: dict[str, Path] = {}
    for path in sorted(directory.iterdir()):
        if path.suffix not in _FILE_SUFFIXES or not path.is_file():
            continue
        if path.stem in files:
            raise DataError(f"{path}: split '{path.stem}' also given by {files[path.stem].name}")
        files[path.stem] = path
    if not files:
        raise DataError(f"{directory}: no .json, .jsonl or .parquet split files")
    wanted = list(splits) if splits is not None else list(files)
    missing = [name for name in wanted if name not in files]
    if missing:
        raise DataError(f"{directory}: split '{missing[0]}' not found (files for: {', '.join(files)})")
    return {name: read_split_file(files[name]) for name in wanted}


def read_split_file(path: Path) -> list[dict]:
    """Rows of one split file, validated; text corpus splits (``text_*``) need a ``text`` field."""
    if path.suffix == ".parquet":
        rows, numbers = _read_parquet(path), None
    elif path.suffix == ".jsonl":
        rows, numbers = _read_jsonl(path)
    else:
        rows, numbers = _read_json_list(path), None
    if path.stem.startswith("text_"):
        validate_text_split(rows, str(path), numbers)
    else:
        validate_split(rows, str(path), require_perturbed=False, row_numbers=numbers)
    return rows


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    if not data.strip():
        raise DataError(f"{path}: empty file")
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not valid UTF-8 at byte {err.start}") from None


def _read_json_list(path: Path) -> list:
    try:
        rows = json.loads(_read_text(path))
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{err.lineno}: invalid JSON: {err.msg}") from None
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected a JSON list of rows, got {type(rows).__name__}")
    return rows


def _read_jsonl(path: Path) -> tuple[list, list[int]]:
    rows, numbers = [], []
    for line_number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{line_number}: invalid JSON: {err.msg}") from None
        numbers.append(line_number)
    return rows, numbers


def _read_parquet(path: Path) -> list[dict]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if path.stat().st_size == 0:
        raise DataError(f"{path}: empty file")
    try:
        return pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"{path}: not a readable Parquet file: {_first_line(err)}") from None


def load_hub(name: str, splits: Sequence[str]) -> dict[str, list[dict]]:
    """Splits of a Hugging Face dataset (TOFU's config names mapped onto ours); needs network or a cache."""
    try:
        import datasets
    except ImportError as err:  # pragma: no cover - datasets is a dependency
        raise DataError(f"{name}: loading a hub dataset needs the 'datasets' package ({err})") from None
    benchmark = {}
    for split in splits:
        config = TOFU_CONFIGS.get(split, split)
        try:
            rows = datasets.load_dataset(name, config, split="train").to_list()
        except Exception as err:  # the hub client raises many types (connection, not found, offline)
            raise DataError(f"{name}: cannot load config '{config}' (split '{split}') from the Hugging Face hub: "
                            f"{type(err).__name__}: {_first_line(err)}") from None
        validate_split(rows, f"{name}/{config}", require_perturbed=False)
        benchmark[split] = rows
    return benchmark


# ---------------------------------------------------------------- MUSE: raw text corpora + knowledge QA
# Split names the evaluation reads: text rows {"text"} and question rows {"question", "answer"}.
MUSE_SPLITS = ("text_forget", "text_retain", "text_holdout", "knowmem_forget", "knowmem_retain")
# MUSE's VerbMem set: {"prompt", "gt"} rows, a long forget-text prefix and its true 128-token continuation.
VERBMEM_SPLIT = "verbmem_forget"
# MUSE's solved KnowMem examples, put in front of every question of the split they name (in-context learning).
KNOWMEM_EXAMPLE_SPLITS = {"knowmem_forget": "knowmem_forget_icl", "knowmem_retain": "knowmem_retain_icl"}
MUSE_OPTIONAL_SPLITS = (VERBMEM_SPLIT, *KNOWMEM_EXAMPLE_SPLITS.values())
_MUSE_TEXT_SPLITS = ("text_forget", "text_retain", "text_holdout")
# Our split → (hub config, hub split) of muse-bench/MUSE-News and MUSE-Books. ``raw/retain1`` is the set
# MUSE's methods regularise on; ``raw/retain2`` is kept back for its evaluation (``knowmem/retain_qa``).
MUSE_HUB_SPLITS = {
    "text_forget": ("raw", "forget"),
    "text_retain": ("raw", "retain1"),
    "text_holdout": ("raw", "holdout"),
    "knowmem_forget": ("knowmem", "forget_qa"),
    "knowmem_retain": ("knowmem", "retain_qa"),
    "verbmem_forget": ("verbmem", "forget"),
    "knowmem_forget_icl": ("knowmem", "forget_qa_icl"),
    "knowmem_retain_icl": ("knowmem", "retain_qa_icl"),
}
# A local directory names a split either our way (text_forget.jsonl) or as the MUSE repository lays
# out data/<corpus>/ (raw/forget.json, knowmem/retain2_qa.json, ...). The first stem that exists wins.
MUSE_LOCAL_STEMS = {
    "text_forget": ("text_forget", "raw/forget"),
    "text_retain": ("text_retain", "raw/retain1"),
    "text_holdout": ("text_holdout", "raw/holdout"),
    "knowmem_forget": ("knowmem_forget", "knowmem/forget_qa"),
    "knowmem_retain": ("knowmem_retain", "knowmem/retain_qa", "knowmem/retain2_qa"),
    "verbmem_forget": ("verbmem_forget", "verbmem/forget"),
    "knowmem_forget_icl": ("knowmem_forget_icl", "knowmem/forget_qa_icl"),
    "knowmem_retain_icl": ("knowmem_retain_icl", "knowmem/retain_qa_icl", "knowmem/retain2_qa_icl"),
}
# Per stem, the first suffix that exists wins: MUSE ships raw/forget.json (one string per article)
# beside raw/forget.txt (the same articles run together), and the JSON keeps the article boundaries.
_MUSE_SUFFIXES = (".jsonl", ".json", ".parquet", ".txt")


def load_muse(source: str, splits: Sequence[str] | None = None) -> dict[str, list[dict]]:
    """A MUSE corpus by split: ``text_forget``, ``text_retain``, ``text_holdout`` ({"text"} rows),
    ``knowmem_forget``, ``knowmem_retain`` ({"question", "answer"} rows) and, when present,
    ``verbmem_forget`` ({"prompt", "gt"} rows) and the KnowMem examples ``knowmem_*_icl``.

    ``source``: a local directory (see MUSE_LOCAL_STEMS; ``.txt`` files hold documents separated by
    blank lines, ``.json`` a list of rows or plain strings, ``.jsonl`` one per line) or a hub dataset
    such as ``muse-bench/MUSE-News`` (configs ``raw``, ``knowmem``, ``verbmem``). ``splits`` restricts
    what is read; each one named (or, by default, each of MUSE_SPLITS) must exist.
    """
    known = MUSE_SPLITS + MUSE_OPTIONAL_SPLITS
    unknown = [name for name in (splits or ()) if name not in known]
    if unknown:
        raise DataError(f"{source}: no MUSE split '{unknown[0]}' (known: {', '.join(known)})")
    path = Path(source).expanduser()
    if path.is_dir():
        return _load_muse_directory(path, splits)
    if path.exists():
        raise DataError(f"{source}: is a file; a MUSE source is a directory or a dataset name")
    if source.startswith((".", "/", "~")):  # clearly a path, never a hub name
        raise DataError(f"{source}: no such directory")
    return _load_muse_hub(source, list(splits or known))


def _load_muse_directory(directory: Path, splits: Sequence[str] | None) -> dict[str, list[dict]]:
    wanted = list(splits) if splits is not None else list(MUSE_SPLITS + MUSE_OPTIONAL_SPLITS)
    corpus = {}
    for split in wanted:
        path = _find_muse_file(directory, split)
        if path is None:
            if splits is None and split in MUSE_OPTIONAL_SPLITS:
                continue
            tried = ", ".join(f"{stem}{{{','.join(_MUSE_SUFFIXES)}}}" for stem in MUSE_LOCAL_STEMS[split])
            raise DataError(f"{directory}: split '{split}' not found (looked for {tried})")
        rows, numbers = _read_muse_file(path)
        corpus[split] = _muse_rows(split, rows, str(path), numbers)
    return corpus


def _find_muse_file(directory: Path, split: str) -> Path | None:
    for stem in MUSE_LOCAL_STEMS[split]:
        for suffix in _MUSE_SUFFIXES:
            path = directory / f"{stem}{suffix}"
            if path.is_file():
                return path
    return None


def _read_muse_file(path: Path) -> tuple[list, list[int] | None]:
    if path.suffix == ".jsonl":
        return _read_jsonl(path)
    if path.suffix == ".json":
        return _read_json_list(path), None
    if path.suffix == ".parquet":
        return _read_parquet(path), None
    return _read_txt_documents(path)


def _read_txt_documents(path: Path) -> tuple[list[str], list[int]]:
    """Documents separated by blank lines, each with the number of its first line (for errors)."""
    documents, numbers, current, start = [], [], [], 0
    for line_number, line in enumerate(_read_text(path).splitlines(), start=1):
        if line.strip():
            if not current:
                start = line_number
            current.append(line.rstrip())
        elif current:
            documents.append("\n".join(current))
            numbers.append(start)
            current = []
    if current:
        documents.append("\n".join(current))
        numbers.append(start)
    return documents, numbers


def _muse_rows(split: str, rows: list, where: str, numbers: Sequence[int] | None) -> list[dict]:
    """Validated rows of one split; plain strings in a text split become {"text": ...} rows."""
    if split in _MUSE_TEXT_SPLITS:
        rows = [{"text": row} if isinstance(row, str) else row for row in rows]
        validate_text_split(rows, where, numbers)
    elif split == "verbmem_forget":
        _validate_verbmem(rows, where, numbers)
    else:
        validate_split(rows, where, require_perturbed=False, row_numbers=numbers)
    return rows


def _validate_verbmem(rows: Sequence[Any], where: str, numbers: Sequence[int] | None) -> None:
    if not rows:
        raise DataError(f"{where}: no rows")
    for index, row in enumerate(rows):
        at = f"{where}:{numbers[index] if numbers is not None else index}"
        if not isinstance(row, dict):
            raise DataError(f"{at}: row is not an object but {type(row).__name__}")
        for field in ("prompt", "gt"):
            _check_string(row, field, at, required=True)


def _load_muse_hub(name: str, splits: Sequence[str]) -> dict[str, list[dict]]:
    """Splits of a MUSE dataset on the Hugging Face hub; needs network or a populated cache."""
    try:
        import datasets
    except ImportError as err:  # pragma: no cover - datasets is a dependency
        raise DataError(f"{name}: loading a hub dataset needs the 'datasets' package ({err})") from None
    corpus = {}
    for split in splits:
        config, hub_split = MUSE_HUB_SPLITS[split]
        try:
            rows = datasets.load_dataset(name, config, split=hub_split).to_list()
        except Exception as err:  # the hub client raises many types (connection, not found, offline)
            raise DataError(f"{name}: cannot load config '{config}' split '{hub_split}' (split '{split}') from the "
                            f"Hugging Face hub: {type(err).__name__}: {_first_line(err)}") from None
        corpus[split] = _muse_rows(split, rows, f"{name}/{config}/{hub_split}", None)
    return corpus


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else "no details"


def qa_rows_for_training(benchmark: Mapping[str, Sequence[dict]], split_names: Sequence[str]) -> list[dict]:
    """The rows of several splits, concatenated in order (e.g. ``["full", "utility_train"]`` for the target)."""
    missing = [name for name in split_names if name not in benchmark]
    if missing:
        raise DataError(f"split '{missing[0]}': not in the data (available: {', '.join(sorted(benchmark))})")
    return [row for name in split_names for row in benchmark[name]]


# ---------------------------------------------------------------- the training Dataset
class UnlearningDataset(Dataset):
    """Item i is one encoded example per split a method asks for.

    The first split defines the epoch and uses row i; every other split uses row (i + offset) % n with a
    fixed per-split offset, so retain batches cycle. ``template`` pairs forget question i with a template
    answer re-drawn at each load, from a generator seeded by (seed, i, how often i was loaded): runs repeat.
    A document row (``text``, no ``question``: MUSE) becomes its ``encode_text`` chunks, each one example
    with labels on every token, so ``forget`` / ``retain`` may hold documents, question/answer pairs or both.
    """

    def __init__(self, rows: Mapping[str, Sequence[dict]], splits: Sequence[str], tokenizer: Any,
                 template: str = "qa", max_length: int = 256, seed: int = 0) -> None:
        unknown = [name for name in splits if name not in SPLITS]
        if not splits or unknown:
            raise ValueError(f"splits must be a non-empty subset of {SPLITS}, got {list(splits)}")
        if not rows.get("forget"):
            raise ValueError("UnlearningDataset needs non-empty 'forget' rows")
        if {"retain", "retain_augmented"} & set(splits) and not rows.get("retain"):
            raise ValueError(f"splits {list(splits)} need non-empty 'retain' rows")
        self.splits = tuple(splits)
        self.tokenizer, self.template, self.max_length, self.seed = tokenizer, template, max_length, seed
        forget, retain = list(rows["forget"]), list(rows.get("retain", ()))
        self._pairs = {name: _pairs_for(name, forget, retain, seed, tokenizer, max_length) for name in self.splits}
        self._offsets = {
            name: 0 if position == 0 else random.Random(f"{seed}:{name}").randrange(len(self._pairs[name]))
            for position, name in enumerate(self.splits)
        }
        self._encoded: dict[tuple[str, int], EncodedExample] = {}
        self._template_loads: dict[int, int] = {}
        self._epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Mix the epoch into template draws: DataLoader workers that are re-created each epoch start
        with fresh load counters and would otherwise repeat the previous epoch's answers."""
        self._epoch = epoch

    def __len__(self) -> int:
        return len(self._pairs[self.splits[0]])

    def __getitem__(self, index: int) -> dict[str, EncodedExample]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        item = {}
        for name in self.splits:
            row = (index + self._offsets[name]) % len(self._pairs[name])
            item[name] = self._template_example(row) if name == "template" else self._static_example(name, row)
        return item

    def _static_example(self, split: str, row: int) -> EncodedExample:
        item = self._pairs[split][row]
        if isinstance(item, EncodedExample):  # a document chunk, encoded up front
            return item
        key = (split, row)
        if key not in self._encoded:
            question, answer = item
            self._encoded[key] = encode_pair(self.tokenizer, question, answer, self.template, self.max_length)
        return self._encoded[key]

    def _template_example(self, row: int) -> EncodedExample:
        loads = self._template_loads.get(row, 0)
        self._template_loads[row] = loads + 1
        answer = random.Random(f"{self.seed}:template:{self._epoch}:{row}:{loads}").choice(TEMPLATE_ANSWERS)
        question, _ = self._pairs["template"][row]
        return encode_pair(self.tokenizer, question, answer, self.template, self.max_length)


def is_document(row: Mapping[str, Any]) -> bool:
    """A raw-text row (MUSE corpus): ``text`` and no question."""
    return "text" in row and "question" not in row


def _pairs_for(split: str, forget: list[dict], retain: list[dict], seed: int, tokenizer: Any,
               max_length: int) -> list[tuple[str, str] | EncodedExample]:
    """(question, answer) pairs of one split, or chunks for document rows of ``forget`` / ``retain``;
    ``template`` keeps the forget answers as placeholders."""
    if split in ("forget", "retain"):
        return _pairs_or_chunks(forget if split == "forget" else retain, tokenizer, max_length)
    _require_fields(forget, ("question",), split)  # template answers and ULD's augmentation need questions
    if split == "template":
        return [(row["question"], row["answer"]) for row in forget]
    if split == "forget_augmented":
        # ULD's D'_f: each forget pair plus two paraphrased versions of it.
        _require_fields(forget, ("paraphrased_question", "paraphrased_answer"), split)
        return [
            pair
            for row in forget
            for pair in ((row["question"], row["answer"]),
                         (row["paraphrased_question"], row["paraphrased_answer"]),
                         (row["question"], row["paraphrased_answer"]))
        ]
    # ULD's D'_r: |D_f| retain pairs plus two wrong-answer ("distractor") versions of each forget pair.
    _require_fields(forget, ("perturbed_answer",), split)
    chosen = random.Random(f"{seed}:retain_augmented").sample(range(len(retain)), min(len(forget), len(retain)))
    retain_pairs = [(retain[i]["question"], retain[i]["answer"]) for i in sorted(chosen)]
    distractors = [(row["question"], wrong) for row in forget for wrong in row["perturbed_answer"][:2]]
    return retain_pairs + distractors


def _pairs_or_chunks(rows: Sequence[dict], tokenizer: Any, max_length: int) -> list[tuple[str, str] | EncodedExample]:
    items: list[tuple[str, str] | EncodedExample] = []
    for row in rows:
        if is_document(row):
            items += encode_text(tokenizer, row["text"], max_length)
        else:
            items.append((row["question"], row["answer"]))
    return items


def _require_fields(rows: Sequence[dict], fields: Sequence[str], split: str) -> None:
    for index, row in enumerate(rows):
        for field in fields:
            if not row.get(field):
                raise DataError(f"forget:{index}: field '{field}': missing, needed for split '{split}'")


def collate_splits(items: Sequence[Mapping[str, EncodedExample]], pad_id: int) -> dict[str, dict[str, torch.Tensor]]:
    """A list of UnlearningDataset items → split → right-padded batch (input_ids, attention_mask, labels)."""
    if not items:
        raise ValueError("collate_splits needs at least one item")
    return {split: collate([item[split] for item in items], pad_id) for split in items[0]}
