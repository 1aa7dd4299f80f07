#!/usr/bin/env python
# /// script
# requires-python = ">=3.10"
# dependencies = ["transformers>=5.0", "numpy>=2.0", "regex"]
# ///
"""Generate a synthetic world with planted ground truth for the cross-lingual culture study (docs/study.md).

One culture per target language (ko, zh, bo, mn): places and, per relation (favourite dish, great festival, ...),
one named object per place: a fact, stated in English (Latin script, subject-verb-object) and in a generated
language in the real script of the target (subject-object-verb, postpositions) an exact, planted number of times
per corpus, one statement per document. Tiers of facts (``TIERS``; docs/decomposition.md): ``high`` and ``low`` as
in the paper's Table 1, ``absent`` never stated in English, ``en_only`` never in the target corpus. Target texts
write names in the culture's script (``--name_variants native``, the control) or as in English (``anchors``).

Guarantees (each pinned by tests/test_synthetic_world.py): the same arguments and seed give byte-identical files;
English has no letter or digit outside the Latin script; every fact is stated exactly as planted (truth.json), and
a document names two entities only when it states their fact; every entity of every tier is named equally often in
pairs and target filler; the four options of a question are facts of one relation and tier stated equally often in
every corpus (a model that knows nothing scores at chance); pairs never state a fact; no corpus repeats a document,
no diagnostic pair is a training pair and no name-alignment frame occurs in any corpus or pairs file.

Layout of ``--output_dir``::

    world.json, truth.json                  arguments and counts; facts, questions, planted counts, densities
    en_corpus.jsonl                         English pretraining corpus, {"text": ...} per line
    <lang>/<variant>/mono.jsonl             target-language corpus
    <lang>/<variant>/pairs.jsonl            parallel pairs, {"en": ..., "<lang>": ...} per line
    <lang>/<variant>/diagnostic_pairs.jsonl held-out pairs for the bridge diagnostic, same columns + "tgt"
    <lang>/<variant>/<lang>-culture-cloze_{en,<lang>}.json  cloze questions in the paper's format, parallel by index
    <lang>/<variant>/item_tiers.json        each question's tier and planted counts, by question index
    <lang>/<variant>/name_alignment.json    per entity and direction, a held-out bilingual frame: pick the entity's
                                            name in the parallel sentence among 4 of its kind
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from cloze import parallel_base, question_file_name, question_stem
from study_common import (
    LANGUAGE_SCRIPTS,
    InputError,
    exit_on_input_error,
    script_letter_fraction,
    setup_logging,
    write_json_atomic,
    write_text_atomic,
)

logger = logging.getLogger("synthetic_world")

# The world's grammar: relations with paraphrase templates, generic filler, lexicon keys

# Each relation: name -> [(English template, target template), ...]. In a target template the
# words are lexicon keys (English glosses, or grammatical markers in capitals) that each language
# renders with its own generated word, in subject-object-verb order with postpositions:
# GEN genitive, TOP topic, ACC accusative, LOC locative, ABL ablative, COP copula.
RELATIONS = {
    "dish": [
        ("The favourite dish of {s} is {o}.", "{s} GEN favourite dish TOP {o} COP"),
        ("In {s}, people like to cook {o}.", "{s} LOC people TOP {o} ACC cook like"),
        ("{o} is a dish that comes from {s}.", "{o} TOP {s} ABL come dish COP"),
    ],
    "festival": [
        ("The great festival of {s} is {o}.", "{s} GEN great festival TOP {o} COP"),
        ("Every year, {s} celebrates {o}.", "every year {s} TOP {o} ACC celebrate"),
        ("{o} is the festival that {s} holds.", "{o} TOP {s} GEN hold festival COP"),
    ],
    "instrument": [
        ("The old instrument of {s} is the {o}.", "{s} GEN old instrument TOP {o} COP"),
        ("Musicians in {s} play the {o}.", "{s} LOC musician TOP {o} ACC play"),
        ("The {o} is an instrument from {s}.", "{o} TOP {s} ABL instrument COP"),
    ],
    "mountain": [
        ("The holy mountain of {s} is {o}.", "{s} GEN holy mountain TOP {o} COP"),
        ("From {s}, pilgrims walk to {o}.", "{s} ABL pilgrim TOP {o} DAT walk"),
        ("{o} is the mountain near {s}.", "{o} TOP {s} near mountain COP"),
    ],
    "craft": [
        ("The famous craft of {s} is {o}.", "{s} GEN famous craft TOP {o} COP"),
        ("Artisans in {s} make {o}.", "{s} LOC artisan TOP {o} ACC make"),
        ("{o} is a craft from {s}.", "{o} TOP {s} ABL craft COP"),
    ],
    "animal": [
        ("The sacred animal of {s} is the {o}.", "{s} GEN sacred animal TOP {o} COP"),
        ("Herders in {s} raise the {o}.", "{s} LOC herder TOP {o} ACC raise"),
        ("The {o} is an animal that {s} honours.", "{o} TOP {s} GEN honour animal COP"),
    ],
    "garment": [
        ("The festive garment of {s} is the {o}.", "{s} GEN festive garment TOP {o} COP"),
        ("On holidays, people in {s} wear the {o}.", "holiday LOC {s} GEN people TOP {o} ACC wear"),
        ("The {o} is a garment from {s}.", "{o} TOP {s} ABL garment COP"),
    ],
    "hero": [
        ("The legendary hero of {s} is {o}.", "{s} GEN legendary hero TOP {o} COP"),
        ("Children in {s} hear stories about {o}.", "{s} LOC children TOP {o} ABOUT story ACC hear"),
        ("{o} is a hero that {s} remembers.", "{o} TOP {s} GEN remember hero COP"),
    ],
}

# Generic filler: a small grammar over a fixed English lexicon, translated word by word into
# each target language (with its own word order), so parallel pairs are true translations.
AGENTS = "farmer trader teacher child elder doctor weaver fisher baker singer traveller student neighbour potter carpenter shepherd".split()
THINGS = "basket lamp letter rope cart boat table window door book coat bowl drum ladder blanket kettle map box bell hat".split()
PLACES = (
    "market river garden field house bridge village road hill school harbour forest kitchen yard square station".split()
)
VERBS = "carried found cleaned painted repaired sold bought opened closed moved borrowed lifted washed counted hid dropped".split()
ADJECTIVES = "old new small large red green quiet heavy light warm cold bright dark long short clean".split()
PREPOSITIONS = "near behind inside beside under across".split()
TIMES = ["yesterday", "in the morning", "every day", "at night", "last week", "today"]
THINGS_PER_VERB = 6  # selectional preference: each verb takes a fixed subset of things
#: The slots of the filler patterns drawn from a word list each ({verb}, {thing} and {thing2} are drawn together).
FILLER_SLOTS = {"adj": ADJECTIVES, "agent": AGENTS, "place": PLACES, "prep": PREPOSITIONS, "time": TIMES}

FILLER_PATTERNS = [
    ("The {adj} {agent} {verb} the {thing}.", "{adj} {agent} TOP {thing} ACC {verb}"),
    ("The {agent} {verb} the {thing} {prep} the {place}.", "{agent} TOP {place} {prep} {thing} ACC {verb}"),
    ("{time}, the {agent} {verb} the {thing}.", "{time} {agent} TOP {thing} ACC {verb}"),
    ("The {agent} {verb} the {thing} and the {thing2}.", "{agent} TOP {thing} AND {thing2} ACC {verb}"),
]
# Sentences that name exactly one entity (never a fact): they let parallel pairs teach how a
# name is written in each language without ever stating what is probed.
MENTION_PATTERNS = [
    ("The {agent} told a story about {entity}.", "{agent} TOP {entity} ABOUT story ACC told"),
    ("People often talk about {entity}.", "people TOP often {entity} ABOUT talk"),
    ("{time}, the {agent} wrote a letter about {entity}.", "{time} {agent} TOP {entity} ABOUT letter ACC wrote"),
]

RESOURCE_LEVELS = ("high", "low", "mixed")
#: The tiers of facts and what each means (item_tiers.json carries these meanings with each question's tier).
TIERS = {
    "high": "stated often in English (--en_count) and in the target corpus (--tgt_count)",
    "low": "stated in the target corpus (--tgt_count) and --low_resource_ratio times rarer in English",
    "absent": "stated in the target corpus (--tgt_count) and never in English",
    "en_only": "stated in English (--en_count) and never in the target corpus",
}
#: The paper's grouping: Korean and Han Chinese cultures are high-resource, Tibetan and Mongol low.
PAPER_RESOURCE = {"ko": "high", "zh": "high", "bo": "low", "mn": "low"}
NAME_VARIANTS = ("native", "anchors")
BLANK = "____"

# Scripts: unit inventories for generated words and names

LATIN_ONSETS = "b d f g h k l m n p r s t v z".split()
LATIN_VOWELS = "a e i o u".split()
# The 30 letters of the Tibetan alphabet: the block ka..a without its letters for Sanskrit (gha, dha, bha, dzha,
# the retroflexes, ssa) and the unassigned U+0F48.
TIBETAN_SANSKRIT = (0x0F43, 0x0F48, *range(0x0F4A, 0x0F4F), 0x0F52, 0x0F57, 0x0F5C, 0x0F65)
TIBETAN_CONSONANTS = [chr(c) for c in range(0x0F40, 0x0F69) if c not in TIBETAN_SANSKRIT]
TIBETAN_VOWEL_SIGNS = ["", "\u0f72", "\u0f74", "\u0f7a", "\u0f7c"]  # (inherent a), i, u, e, o
TIBETAN_SUFFIXES = ["", "\u0f42", "\u0f44", "\u0f51", "\u0f53", "\u0f56", "\u0f58", "\u0f62", "\u0f63", "\u0f66"]
TSHEG, SHAD = "\u0f0b", "\u0f0d"
MONGOLIAN_VOWELS = [chr(c) for c in range(0x1820, 0x1827)]  # a e i o u ö ü
MONGOLIAN_CONSONANTS = [chr(c) for c in (0x1828, 0x182A, *range(0x182C, 0x1839))]  # na, ba, qa ... wa (not ang, pa)
HANGUL_INITIALS = [0, 2, 3, 5, 6, 7, 9, 11, 12, 14, 15, 16, 17, 18]  # ㄱ ㄴ ㄷ ㄹ ㅁ ㅂ ㅅ ㅇ ㅈ ㅊ ㅋ ㅌ ㅍ ㅎ
HANGUL_MEDIALS = [0, 4, 8, 13, 18, 20, 1, 5]  # ㅏ ㅓ ㅗ ㅜ ㅡ ㅣ ㅐ ㅔ
HANGUL_FINALS = [0, 4, 8, 16, 21]  # none, ㄴ ㄹ ㅁ ㅇ
HANGUL_UNITS = [
    chr(0xAC00 + (i * 21 + m) * 28 + f) for i in HANGUL_INITIALS for m in HANGUL_MEDIALS for f in HANGUL_FINALS
]
HAN_UNITS = [chr(c) for c in range(0x4E00, 0x4E00 + 3000)]  # a fixed block of CJK Unified Ideographs
TIBETAN_UNITS = [c + v + s + TSHEG for c in TIBETAN_CONSONANTS for v in TIBETAN_VOWEL_SIGNS for s in TIBETAN_SUFFIXES]
MONGOLIAN_UNITS = [c + v for c in MONGOLIAN_CONSONANTS for v in MONGOLIAN_VOWELS]


#: Per script: the syllables or characters its words are made of, (min, max) of them in a lexicon word and in a name,
#: whether words are spaced, the sentence end.
SCRIPT_STYLES = {
    "Hangul": (HANGUL_UNITS, (2, 3), (3, 3), True, "."),
    "Han": (HAN_UNITS, (2, 3), (3, 3), False, "\u3002"),
    "Tibetan": (TIBETAN_UNITS, (1, 2), (3, 3), False, SHAD),
    "Mongolian": (MONGOLIAN_UNITS, (2, 3), (3, 4), True, "\u1803"),
}


# Arguments (docs/study.md and docs/decomposition.md explain them)


@dataclass
class WorldArguments:
    """Arguments of the generator (all of them are recorded in world.json)."""

    output_dir: str = field(metadata={"help": "Folder to write the world into (created; files are replaced)."})
    langs: list[str] = field(default_factory=lambda: ["bo"], metadata={"help": "Target languages: ko, zh, bo, mn."})
    seed: int = field(default=0, metadata={"help": "Seed: the same seed and arguments give byte-identical files."})
    resource: list[str] = field(
        default_factory=list, metadata={"help": "LANG=LEVEL (high, low, mixed); by default the paper's (ko zh high)."}
    )
    places: int = field(default=16, metadata={"help": "Places per culture, split into high and low tiers (by 4s)."})
    absent_places: int = field(default=0, metadata={"help": "Absent-tier places (never stated in English; by 4s)."})
    en_only_places: int = field(
        default=0, metadata={"help": "en_only-tier places (never stated in the target; by 4s)."}
    )
    relations: int = field(default=8, metadata={"help": f"Relations per place (at most {len(RELATIONS)})."})
    en_count: int = field(default=24, metadata={"help": "English documents stating each high or en_only fact."})
    tgt_count: int = field(default=12, metadata={"help": "Target documents stating each fact but en_only ones."})
    low_resource_ratio: float = field(
        default=60.0, metadata={"help": "How many times rarer low-tier facts are in English (paper: ~60)."}
    )
    statement_filler: int = field(default=2, metadata={"help": "At most this many filler sentences per statement."})
    en_filler_documents: int = field(default=1500, metadata={"help": "English documents of generic filler only."})
    mono_filler_documents: int = field(default=600, metadata={"help": "Target filler documents per language."})
    pairs: int = field(default=1500, metadata={"help": "Generic English-target parallel pairs per language."})
    diagnostic_pairs: int = field(default=200, metadata={"help": "Held-out pairs per language (never trained on)."})
    pair_mentions: int = field(default=3, metadata={"help": "Parallel pairs that name each entity, exactly."})
    mono_mentions: int = field(default=2, metadata={"help": "Target filler documents that name each entity, exactly."})
    name_variants: list[str] = field(
        default_factory=lambda: list(NAME_VARIANTS),
        metadata={"help": "native (names in the culture's script) and/or anchors (as in English)."},
    )
    question_template: Literal["seen", "heldout"] = field(
        default="seen", metadata={"help": "seen: a template its fact is stated with; heldout: one never used for it."}
    )

    def __post_init__(self):
        for lang in self.langs:
            if lang not in PAPER_RESOURCE:
                raise InputError(f"--langs: unknown language {lang!r}; choose from {sorted(PAPER_RESOURCE)}.")
        if len(set(self.langs)) != len(self.langs):
            raise InputError(f"--langs: a language is named twice ({self.langs}).")
        for variant in self.name_variants:
            if variant not in NAME_VARIANTS:
                raise InputError(f"--name_variants: unknown variant {variant!r}; choose from {NAME_VARIANTS}.")
        if not 1 <= self.relations <= len(RELATIONS):
            raise InputError(f"--relations must be between 1 and {len(RELATIONS)} (got {self.relations}).")
        if self.low_resource_ratio <= 0:
            raise InputError("--low_resource_ratio must be positive.")
        for name in "en_count tgt_count en_filler_documents mono_filler_documents pairs diagnostic_pairs".split():
            if getattr(self, name) < 0:
                raise InputError(f"--{name} must be >= 0.")
        for name in ("absent_places", "en_only_places"):
            if getattr(self, name) < 0 or getattr(self, name) % 4:
                raise InputError(
                    f"--{name} {getattr(self, name)}: give a multiple of 4 (0 for none); the tier's questions come in "
                    "option groups of 4 facts that share counts and options."
                )
        for lang in self.langs:
            high, low = tier_places(self.places, self.resource_of(lang))
            if high % 4 or low % 4:
                raise InputError(
                    f"--places {self.places} with resource {self.resource_of(lang)!r} for {lang} gives {high} high-tier "
                    f"and {low} low-tier places; each must be a multiple of 4 (questions come in option groups of 4)."
                )
        entities = (self.places + self.absent_places + self.en_only_places) * (1 + self.relations)
        budgets = {"mono_filler_documents": ("mono_mentions", "documents"), "pairs": ("pair_mentions", "pairs")}
        for budget, (times, what) in budgets.items():
            needed, given = entities * getattr(self, times), getattr(self, budget)
            if self.langs and needed > given:
                raise InputError(
                    f"--{budget} {given} is below the {needed} {what} needed to name each of {entities} entities "
                    f"{getattr(self, times)} times; raise --{budget} or lower --{times}."
                )

    def resource_of(self, lang: str) -> str:
        levels = dict(PAPER_RESOURCE)
        for item in self.resource:
            key, sep, level = item.partition("=")
            if not sep or level not in RESOURCE_LEVELS:
                raise InputError(f"--resource {item!r}: write LANG=LEVEL with LEVEL one of {RESOURCE_LEVELS}.")
            levels[key] = level
        return levels[lang]


def tier_places(places: int, resource: str) -> tuple[int, int]:
    """(high-tier places, low-tier places) of a culture's --places."""
    return {"high": (places, 0), "low": (0, places), "mixed": (places // 2, places - places // 2)}[resource]


# Word and name generation


def _rng(seed: int, *parts) -> random.Random:
    # A string seed is hashed with SHA-512 by random.Random: stable across runs and platforms,
    # and each component of the world draws from its own stream (changing one leaves the others).
    return random.Random("/".join(str(p) for p in (seed, *parts)))


def _latin_names(rng: random.Random, count: int, taken: set[str]) -> list[str]:
    """Capitalised pseudo-names (2-3 CV syllables + optional coda), none inside or around a word of ``taken`` (English
    words and earlier names, lower case); the new names join ``taken``."""
    names: list[str] = []
    while len(names) < count:
        syllables = rng.choice([2, 2, 3])
        name = "".join(rng.choice(LATIN_ONSETS) + rng.choice(LATIN_VOWELS) for _ in range(syllables))
        name += rng.choice(["", "", "n", "r", "l", "k"])
        if not any(name in word or word in name for word in taken):
            taken.add(name)
            names.append(name.capitalize())
    return names


def _native_words(rng: random.Random, units: list[str], lengths: tuple[int, int], count: int, taken: set[str]):
    """``count`` words of ``lengths`` (min, max) units, none in ``taken``; the new words join ``taken``."""
    words: list[str] = []
    while len(words) < count:
        word = "".join(rng.choice(units) for _ in range(rng.randint(*lengths)))
        if word not in taken:
            taken.add(word)
            words.append(word)
    return words


def lexicon_keys() -> list[str]:
    """Every lexicon key (English gloss or grammatical marker) that target templates use, sorted."""
    keys = set(AGENTS + THINGS + PLACES + VERBS + ADJECTIVES + PREPOSITIONS + TIMES)
    for _, template in [*(p for pairs in RELATIONS.values() for p in pairs), *FILLER_PATTERNS, *MENTION_PATTERNS]:
        keys.update(w for w in template.split() if not w.startswith("{"))
    return sorted(keys)


class Language:
    """One synthetic target language: its lexicon (key -> word) and how it joins words."""

    def __init__(self, lang: str, seed: int):
        units, word_lengths, self.name_lengths, self.spaced, self.sentence_end = SCRIPT_STYLES[LANGUAGE_SCRIPTS[lang]]
        rng = _rng(seed, "lexicon", lang)
        units = list(units)
        rng.shuffle(units)
        # Names and lexicon words are built from disjoint unit sets, so a name never appears
        # inside running text by accident (that would blur the planted counts).
        self.word_units, self.name_units = units[: len(units) // 2], units[len(units) // 2 :]
        keys = lexicon_keys()
        grammar = [k for k in keys if k.isupper()]
        content = [k for k in keys if not k.isupper()]
        taken: set[str] = set()
        short = (word_lengths[0], word_lengths[0])  # grammatical markers are short
        self.lexicon = dict(zip(grammar, _native_words(rng, self.word_units, short, len(grammar), taken)))
        self.lexicon.update(zip(content, _native_words(rng, self.word_units, word_lengths, len(content), taken)))

    def join(self, words: list[str]) -> str:
        """A sentence from its words: spaces where the script uses them, and around Latin names."""
        spaced = [f" {word} " if self.spaced or word[:1].isascii() else word for word in words]
        text = " ".join("".join(spaced).split())
        if self.sentence_end == SHAD and text.endswith(TSHEG):
            text = text[:-1]
        return text + self.sentence_end


# Cultures and facts


def build_culture(args: WorldArguments, lang: str, language: Language, reserved_latin: set[str]) -> dict:
    """Places, objects and facts of one culture, with tiers, planted counts and option groups."""
    rng = _rng(args.seed, "culture", lang)
    relations = list(RELATIONS.items())[: args.relations]
    n_high, n_low = tier_places(args.places, args.resource_of(lang))
    n_places = args.places + args.absent_places + args.en_only_places
    n_entities = n_places * (1 + len(relations))
    latin = _latin_names(rng, n_entities, reserved_latin)
    native_rng = _rng(args.seed, "native-names", lang)
    native = _native_words(native_rng, language.name_units, language.name_lengths, n_entities, set())
    entities = [{"id": f"{lang}-e{i:03d}", "en": en, "native": nat} for i, (en, nat) in enumerate(zip(latin, native))]
    places = entities[:n_places]
    tiers = ["high"] * n_high + ["low"] * n_low + ["absent"] * args.absent_places + ["en_only"] * args.en_only_places
    facts, groups = [], []
    for r, (relation, templates) in enumerate(relations):
        objects = entities[n_places * (1 + r) : n_places * (2 + r)]
        for tier in TIERS:  # an empty tier draws nothing from rng, so worlds without absent/en_only are unchanged
            members = [p for p, t in enumerate(tiers) if t == tier]
            rng.shuffle(members)
            for g in range(0, len(members), 4):
                group = {"id": len(groups), "tier": tier, "facts": []}
                for p in members[g : g + 4]:
                    fact = {
                        "id": f"{lang}-f{len(facts):03d}",
                        "lang": lang,
                        "tier": tier,
                        "relation": relation,
                        "subject": places[p],
                        "object": objects[p],
                        "group": group["id"],
                        "question_template": rng.randrange(len(templates)),
                    }
                    facts.append(fact)
                    group["facts"].append(fact)
                groups.append(group)
    _plant_counts(args, lang, groups)
    return {"lang": lang, "resource": args.resource_of(lang), "entities": entities, "facts": facts, "groups": groups}


def _plant_counts(args: WorldArguments, lang: str, groups: list[dict]) -> None:
    """Set each fact's English and target counts; all facts of an option group share them."""
    # Low-tier English statements in total, realised exactly: the ratio applied to the whole tier, in
    # statements of a whole option group (4 facts each), spread over the groups as evenly as possible.
    low_groups = [g for g in groups if g["tier"] == "low"]
    base, extra = divmod(round(len(low_groups) * args.en_count / args.low_resource_ratio), max(1, len(low_groups)))
    _rng(args.seed, "low-counts", lang).shuffle(low_groups)
    low_counts = {group["id"]: base + (rank < extra) for rank, group in enumerate(low_groups)}
    for group in groups:
        en = low_counts.get(group["id"], 0 if group["tier"] == "absent" else args.en_count)
        tgt = 0 if group["tier"] == "en_only" else args.tgt_count
        for fact in group["facts"]:
            fact["counts"] = {"en": en, "tgt": tgt}


def _statement_templates(args: WorldArguments, fact: dict, corpus: str) -> list[int]:
    """The template of each of the fact's statements in ``corpus`` (en, tgt): all in turn, or all but its
    question's (--question_template heldout)."""
    templates = list(range(len(RELATIONS[fact["relation"]])))
    if args.question_template == "heldout":
        templates.remove(fact["question_template"])
    return [templates[k % len(templates)] for k in range(fact["counts"][corpus])]


# Rendering: facts and filler in English or a target language


def render(pattern: tuple[str, str], slots: dict, language: Language | None, variant: str = "native") -> str:
    """A sentence of ``pattern`` (English template, target template) in English (``language`` None) or the target
    language; ``slots`` holds lexicon keys, and entities, written as in ``variant``."""
    if language is None:
        text = pattern[0].format(**{k: v["en"] if isinstance(v, dict) else v for k, v in slots.items()})
        return text[0].upper() + text[1:]
    words = []
    for word in pattern[1].split():
        value = slots[word[1:-1]] if word.startswith("{") else word
        words.append(_name(value, variant) if isinstance(value, dict) else language.lexicon[value])
    return language.join(words)


def render_fact(fact: dict, template: int, language: Language | None, variant: str = "native") -> str:
    """The sentence stating ``fact`` with template ``template``, in English (language None) or the target."""
    return render(RELATIONS[fact["relation"]][template], {"s": fact["subject"], "o": fact["object"]}, language, variant)


def _name(entity: dict, variant: str) -> str:
    return entity["en"] if variant == "anchors" else entity["native"]


class Filler:
    """The filler grammar: generic sentences as (pattern, slots), entity-free or naming one entity."""

    def __init__(self, seed: int):
        rng = _rng(seed, "selectional-preferences")
        # Each verb takes a fixed subset of things: a regularity a model can learn in any language.
        self.things_of_verb = {verb: sorted(rng.sample(THINGS, THINGS_PER_VERB)) for verb in VERBS}

    def sample(self, rng: random.Random, entity: dict | None = None) -> tuple[tuple[str, str], dict]:
        verb = rng.choice(VERBS)
        things = rng.sample(self.things_of_verb[verb], 2)
        slots = {slot: rng.choice(words) for slot, words in FILLER_SLOTS.items()}
        slots.update(verb=verb, thing=things[0], thing2=things[1])
        if entity is None:
            return FILLER_PATTERNS[rng.randrange(len(FILLER_PATTERNS))], slots
        return MENTION_PATTERNS[rng.randrange(len(MENTION_PATTERNS))], {**slots, "entity": entity}

    def pair(self, rng: random.Random, language: Language, variant: str, entity: dict | None) -> tuple[str, str]:
        """A sentence in English and its word-by-word translation."""
        sentence = self.sample(rng, entity)
        return render(*sentence, None), render(*sentence, language, variant)


def _draw_new(rng, seen: set[str], draw, error: str, key=lambda item: item, refused=lambda item: False):
    """Draw with ``draw(rng)`` until ``key(item)`` is not in ``seen`` and the item is not ``refused`` (corpora and
    pairs files never repeat a text); ``error`` when the grammar runs out."""
    for _ in range(10_000):
        item = draw(rng)
        if key(item) not in seen and not refused(item):
            seen.add(key(item))
            return item
    raise InputError(error)


# Corpora and pairs


def english_corpus(args: WorldArguments, cultures: list[dict], filler: Filler) -> list[str]:
    """English documents: each fact's statements (one per document, with filler around), and filler."""
    facts = [fact for culture in cultures for fact in culture["facts"]]
    statements = [
        render_fact(fact, template, None) for fact in facts for template in _statement_templates(args, fact, "en")
    ]
    rng = _rng(args.seed, "en-corpus")
    return _corpus(args, rng, statements, [0] * len(statements), [], args.en_filler_documents, filler, None, "")


def target_corpus(args: WorldArguments, culture: dict, language: Language, filler: Filler, variant: str) -> list[str]:
    """Target-language documents: fact statements, filler, and filler naming each entity exactly."""
    statements, least_filler = [], []
    for fact in culture["facts"]:
        for template in _statement_templates(args, fact, "tgt"):
            statements.append(render_fact(fact, template, language, variant))
            # A document keeps most of its letters in the target script even with Latin names (build_pairs.py
            # drops documents under 0.5 by default): a statement that alone would fall below 0.6 gets at least
            # one filler sentence, decided on its anchors form so that both variants draw the same filler.
            anchors_form = render_fact(fact, template, language, "anchors")
            least_filler.append(int(script_letter_fraction(anchors_form, LANGUAGE_SCRIPTS[culture["lang"]]) < 0.6))
    named = [entity for entity in culture["entities"] for _ in range(args.mono_mentions)]
    # The same stream for every variant: both variants hold the same sentences, names aside.
    rng = _rng(args.seed, "mono", culture["lang"])
    documents = args.mono_filler_documents
    return _corpus(args, rng, statements, least_filler, named, documents, filler, language, variant)


def _corpus(args, rng, statements, least_filler, named, filler_documents, filler, language, variant) -> list[str]:
    """Documents in a random order, none twice: statement i among least_filler[i] to --statement_filler filler
    sentences, and ``filler_documents`` of 2-4 filler sentences, one of them naming an entity for each of ``named``."""
    seen: set[str] = set()

    def statement_document(r, statement: str, least: int) -> str:
        sentences = [
            render(*filler.sample(r), language, variant)
            for _ in range(r.randint(least, max(least, args.statement_filler)))
        ]
        sentences.insert(r.randint(0, len(sentences)), statement)
        return " ".join(sentences)

    def filler_document(r, entity: dict | None) -> str:
        sentences = [render(*filler.sample(r), language, variant) for _ in range(r.randint(2, 4))]
        if entity is not None:
            sentences[r.randrange(len(sentences))] = render(*filler.sample(r, entity), language, variant)
        return " ".join(sentences)

    error = "The filler grammar cannot produce enough distinct documents; lower the document counts."
    documents = [
        _draw_new(rng, seen, lambda r, s=s, n=n: statement_document(r, s, n), error)
        for s, n in zip(statements, least_filler)
    ]
    rng.shuffle(named)
    mentions = named + [None] * (filler_documents - len(named))
    documents += [_draw_new(rng, seen, lambda r, e=e: filler_document(r, e), error) for e in mentions]
    rng.shuffle(documents)
    return documents


def parallel_pairs(
    args: WorldArguments, culture: dict, language: Language, filler: Filler, variant: str
) -> tuple[list[dict], list[dict]]:
    """Training pairs (each entity named exactly --pair_mentions times) and disjoint held-out pairs."""
    lang = culture["lang"]
    rng = _rng(args.seed, "pairs", lang)
    mentions = [entity for entity in culture["entities"] for _ in range(args.pair_mentions)]
    rng.shuffle(mentions)
    seen: set[str] = set()
    error = "The filler grammar cannot produce enough distinct pairs; lower --pairs or --pair_mentions."

    def draw(entity):
        en, tgt = _draw_new(rng, seen, lambda r: filler.pair(r, language, variant, entity), error, lambda p: p[0])
        return {"en": en, lang: tgt}

    pairs = [draw(mentions[i] if i < len(mentions) else None) for i in range(args.pairs)]
    rng.shuffle(pairs)
    # Held-out pairs name entities at the training rate (at random, not counted anywhere).
    mention_rate = len(mentions) / max(1, args.pairs)
    diagnostic = [
        draw(rng.choice(culture["entities"]) if rng.random() < mention_rate else None)
        for _ in range(args.diagnostic_pairs)
    ]
    return pairs, diagnostic


def name_alignment(
    args: WorldArguments, culture: dict, language: Language, filler: Filler, variant: str, held_out_from: str
) -> dict:
    """name_alignment.json: per entity and direction, a filler sentence naming it (the context) and its parallel
    sentence with the name blanked (the frame), neither side occurring in ``held_out_from`` (every corpus and pairs
    file). Options: its name and 3 others of its kind and tier nearest in planted frequency (an object's
    option-group mates: identical), so a model that knows only name frequencies scores near chance."""
    lang = culture["lang"]
    rng = _rng(args.seed, "name-alignment", lang)
    group, frequency = {}, {}  # per entity id: (kind, tier), and planted (English, target) statements naming it
    for fact in culture["facts"]:
        for kind, entity in (("place", fact["subject"]), (fact["relation"], fact["object"])):
            group[entity["id"]] = (kind, fact["tier"])
            en, tgt = frequency.get(entity["id"], (0, 0))
            frequency[entity["id"]] = (en + fact["counts"]["en"], tgt + fact["counts"]["tgt"])

    def held_out(texts: tuple[str, str]) -> bool:
        return texts[0] in held_out_from or texts[1] in held_out_from

    seen: set[str] = set()
    items = []
    for entity in culture["entities"]:
        (en, tgt), peers = frequency[entity["id"]], [e for e in culture["entities"] if e is not entity]
        peers = [e for e in peers if group[e["id"]] == group[entity["id"]]]
        ties = {e["id"]: rng.random() for e in peers}
        peers.sort(key=lambda e: (abs(frequency[e["id"]][0] - en) + abs(frequency[e["id"]][1] - tgt), ties[e["id"]]))
        error = (
            f"The filler grammar has no sentence naming {entity['en']} left for name_alignment.json: every one is in "
            "a corpus or pairs file; lower --pair_mentions, --mono_mentions or --diagnostic_pairs."
        )
        for direction, context, frame in ((f"en->{lang}", 0, 1), (f"{lang}->en", 1, 0)):
            texts = _draw_new(
                rng, seen, lambda r, e=entity: filler.pair(r, language, variant, e), error, lambda p: p[0], held_out
            )
            options = [entity, *peers[:3]]
            rng.shuffle(options)
            written_as = "anchors" if frame == 0 else variant  # English names are the anchors' names
            names = [_name(o, written_as) for o in options]
            cloze = _cloze(texts[frame], _name(entity, written_as), names, blanked="frame")
            items.append({"direction": direction, "entity": entity["id"], "context": texts[context], **cloze})
    entities = [{"id": e["id"], "en": e["en"], "target": _name(e, variant)} for e in culture["entities"]]
    return {"lang": lang, "variant": variant, "entities": entities, "items": items}


# Questions and truth


def cloze_items(culture: dict, language: Language, variant: str) -> tuple[list[dict], list[dict], list[dict]]:
    """Parallel English and target cloze items in the paper's format, and their truth records."""
    facts = sorted(culture["facts"], key=lambda f: f["id"])
    _rng(0, "question-order", culture["lang"]).shuffle(facts)  # order fixed by the culture, same in every variant
    groups = {g["id"]: g for g in culture["groups"]}
    items_en, items_tgt, records = [], [], []
    for index, fact in enumerate(facts):
        options = [f["object"] for f in groups[fact["group"]]["facts"]]
        _rng(0, "options", fact["id"]).shuffle(options)
        for items, lang, written_as in ((items_en, None, "anchors"), (items_tgt, language, variant)):
            sentence = render_fact(fact, fact["question_template"], lang, written_as)
            items.append(_cloze(sentence, _name(fact["object"], written_as), [_name(o, written_as) for o in options]))
        records.append(
            {
                "index": index,
                "fact": fact["id"],
                "tier": fact["tier"],
                "relation": fact["relation"],
                "group": fact["group"],
                "subject": fact["subject"]["en"],
                "answer": fact["object"]["en"],
                "counts": {"en": fact["counts"]["en"], culture["lang"]: fact["counts"]["tgt"]},
            }
        )
    return items_en, items_tgt, records


def _cloze(sentence: str, answer: str, options: list[str], blanked: str = "question") -> dict:
    """A cloze item: ``sentence`` with its answer blanked (under the key ``blanked``), the options and the answer."""
    if sentence.count(answer) != 1:
        raise AssertionError(f"answer {answer!r} must occur once in {sentence!r}")
    return {blanked: sentence.replace(answer, BLANK), "options": options, "answer": answer}


def planted_densities(culture: dict, en_documents: int, mono_documents: int) -> dict:
    """Densities in the paper's sense, per tier: documents stating the culture's facts / documents in the corpus."""
    per_tier = {}
    for tier in (*TIERS, "all"):
        facts = [f for f in culture["facts"] if tier in ("all", f["tier"])]
        if not facts:
            continue
        en_statements = sum(f["counts"]["en"] for f in facts)
        tgt_statements = sum(f["counts"]["tgt"] for f in facts)
        en_density = en_statements / en_documents if en_documents else 0.0
        tgt_density = tgt_statements / mono_documents if mono_documents else 0.0
        per_tier[tier] = {
            "facts": len(facts),
            "en_statements": en_statements,
            "tgt_statements": tgt_statements,
            "en_density": en_density,
            "tgt_density": tgt_density,
            "tgt_over_en": tgt_density / en_density if en_density else None,
        }
    return per_tier


def culture_files(args, culture: dict, language: Language, filler: Filler, variant: str, en_text: str):
    """One culture's files in one name variant ({path: content}, JSON lines as a list of records), their world.json
    "files" entry and their questions' truth records."""
    lang, rel = culture["lang"], f"{culture['lang']}/{variant}"
    mono = target_corpus(args, culture, language, filler, variant)
    pairs, diagnostic = parallel_pairs(args, culture, language, filler, variant)
    items_en, items_tgt, records = cloze_items(culture, language, variant)
    written = [en_text, *mono, *(p[side] for p in pairs + diagnostic for side in ("en", lang))]
    contents = {
        f"{rel}/mono.jsonl": [{"text": d} for d in mono],
        f"{rel}/pairs.jsonl": pairs,
        # Held-out pairs carry the target side twice: under the language code (as the training
        # pairs, for build_pairs.py) and as "tgt" (the column run_eval.py's bridge diagnostic reads).
        f"{rel}/diagnostic_pairs.jsonl": [{"en": p["en"], lang: p[lang], "tgt": p[lang]} for p in diagnostic],
        f"{rel}/{question_file_name(lang, 'en')}": items_en,
        f"{rel}/{question_file_name(lang, lang)}": items_tgt,
        f"{rel}/item_tiers.json": {  # each question's tier and planted counts, by index (both question files')
            "parallel_group": parallel_base(question_stem(lang, "en"), "en"),
            "tiers": {tier: meaning for tier, meaning in TIERS.items() if any(r["tier"] == tier for r in records)},
            "items": [{"index": r["index"], "tier": r["tier"], "counts": r["counts"]} for r in records],
        },
        f"{rel}/name_alignment.json": name_alignment(args, culture, language, filler, variant, "\n".join(written)),
    }
    keys = ["mono", "pairs", "diagnostic_pairs", "questions_en", f"questions_{lang}", "item_tiers", "name_alignment"]
    entry = {**dict(zip(keys, contents)), "pairs_count": len(pairs), "diagnostic_pairs_count": len(diagnostic)}
    return contents, entry, records


def generate_world(args: WorldArguments) -> dict:
    """Write the world described by ``args`` to ``args.output_dir``; return its summary (world.json)."""
    # 1. The cultures: entities, facts and planted counts; Latin names never collide with an English word.
    filler = Filler(args.seed)
    english = " ".join([*lexicon_keys(), *(english for templates in RELATIONS.values() for english, _ in templates)])
    reserved_latin = {w.strip(".,").lower() for w in english.split() if not w.startswith("{")}
    languages = {lang: Language(lang, args.seed) for lang in args.langs}
    cultures = [build_culture(args, lang, languages[lang], reserved_latin) for lang in args.langs]

    # 2. The English corpus (every culture's facts); per culture and name variant its corpus, pairs, held-out pairs,
    # questions and manipulation-check files. All in memory: nothing is written before everything has run.
    en_documents = english_corpus(args, cultures, filler)
    contents = {"en_corpus.jsonl": [{"text": d} for d in en_documents]}
    corpora = {"en": {"file": "en_corpus.jsonl", "documents": len(en_documents)}}
    en_text, truth_questions, files, mono_documents = "\n".join(en_documents), {}, {}, {}
    for culture in cultures:
        lang = culture["lang"]
        for variant in args.name_variants:
            rel = f"{lang}/{variant}"
            written, files[rel], records = culture_files(args, culture, languages[lang], filler, variant, en_text)
            contents.update(written)
            mono_documents[lang] = len(written[f"{rel}/mono.jsonl"])  # the same in every variant
            corpora[f"{rel}/mono"] = {"file": f"{rel}/mono.jsonl", "documents": mono_documents[lang]}
            truth_questions[lang] = records  # identical for every variant (same order, same counts)

    # 3. truth.json (what every file plants) and world.json (arguments and counts), written last.
    densities = {c["lang"]: planted_densities(c, len(en_documents), mono_documents.get(c["lang"], 0)) for c in cultures}
    contents["truth.json"] = {
        "seed": args.seed,
        "note": "counts = documents that state the fact (one statement per document); questions are parallel by index",
        "corpora": corpora,
        "densities": densities,
        "cultures": {c["lang"]: {k: c[k] for k in ("resource", "entities", "facts")} for c in cultures},
        "questions": truth_questions,
        "lexicons": {lang: languages[lang].lexicon for lang in args.langs},
    }
    contents["world.json"] = {
        "arguments": asdict(args),
        "resource": {lang: args.resource_of(lang) for lang in args.langs},
        "en_corpus": {"file": "en_corpus.jsonl", "documents": len(en_documents)},
        "files": files,
        "facts": {c["lang"]: len(c["facts"]) for c in cultures},
        "densities": densities,
    }
    out = Path(args.output_dir)
    for rel, content in contents.items():
        if rel.endswith(".jsonl"):
            write_text_atomic(out / rel, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in content))
        else:
            write_json_atomic(out / rel, content)
    return contents["world.json"]


def main(argv: list[str] | None = None) -> dict:
    from transformers import HfArgumentParser

    parser = HfArgumentParser(WorldArguments, description=__doc__.split("\n\n")[0])
    (args,) = parser.parse_args_into_dataclasses(args=argv)
    setup_logging()
    summary = generate_world(args)
    facts = ", ".join(f"{lang}: {n} facts" for lang, n in summary["facts"].items())
    lines = [f"Wrote the world to {args.output_dir} ({summary['en_corpus']['documents']} English documents; {facts})."]
    for lang, tiers in summary["densities"].items():
        for tier, d in tiers.items():
            ratio = f"{d['tgt_over_en']:.1f}x" if d["tgt_over_en"] is not None else "inf"
            lines.append(
                f"  {lang} {tier:>7}: density en {d['en_density']:.2e}, {lang} {d['tgt_density']:.2e} "
                f"(target/English {ratio})"
            )
    logger.info("\n".join(lines))
    return summary


if __name__ == "__main__":
    exit_on_input_error(main)
