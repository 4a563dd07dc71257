"""The embedded benchmark: fictitious authors in TOFU's schema, generated offline from a seed.

N authors × M question/answer pairs (``question``, ``answer``, ``paraphrased_question``, ``paraphrased_answer``,
``perturbed_answer``; plus ``author`` and a unique ``id``), forget01/05/10 splits with matching retain and
holdout splits, "real authors" and "world facts" utility sets, and a MUSE-style text corpus (one biography
per author, KnowMem question sets). Deterministic: only ``random.Random(seed)`` is drawn from.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Mapping, Sequence

from orchestrator.errors import DataError

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
