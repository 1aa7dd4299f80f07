"""The synthetic world's guarantees, checked on the files it writes (not on its internals)."""

import json
from collections import Counter
from pathlib import Path

import pytest

from study_common import LANGUAGE_SCRIPTS, InputError, has_non_latin_letter, read_documents, script_letter_fraction
from synthetic_world import RELATIONS, Language, WorldArguments, generate_world, main, render_fact

LANGS = ["bo", "ko", "zh", "mn"]


def small_world_args(output_dir, seed=0, **overrides):
    values = dict(
        output_dir=str(output_dir),
        langs=LANGS,
        seed=seed,
        resource=["bo=mixed", "ko=mixed"],  # zh stays high, mn stays low (the paper's levels)
        places=8,
        relations=4,
        en_count=6,
        tgt_count=4,
        low_resource_ratio=4.0,
        en_filler_documents=120,
        mono_filler_documents=120,
        pairs=200,
        diagnostic_pairs=30,
        pair_mentions=2,
        mono_mentions=1,
    )
    values.update(overrides)
    return WorldArguments(**values)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    args = small_world_args(out)
    summary = generate_world(args)
    truth = json.loads((out / "truth.json").read_text(encoding="utf-8"))
    return {"dir": out, "args": args, "summary": summary, "truth": truth}


def _jsonl(path):
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


def _facts(world, lang):
    return world["truth"]["cultures"][lang]["facts"]


def _name(entity, variant):
    return entity["en"] if variant == "anchors" else entity["native"]


def test_same_seed_gives_byte_identical_files_and_another_seed_differs(tmp_path, world):
    generate_world(small_world_args(tmp_path / "again"))
    first = sorted(p.relative_to(world["dir"]) for p in world["dir"].rglob("*") if p.is_file())
    second = sorted(p.relative_to(tmp_path / "again") for p in (tmp_path / "again").rglob("*") if p.is_file())
    assert first == second and len(first) > 20
    for rel in first:
        if rel.name == "world.json":  # records output_dir, which differs
            continue
        assert (world["dir"] / rel).read_bytes() == (tmp_path / "again" / rel).read_bytes(), rel
    generate_world(small_world_args(tmp_path / "other", seed=1))
    assert (tmp_path / "other" / "en_corpus.jsonl").read_bytes() != (world["dir"] / "en_corpus.jsonl").read_bytes()


def test_english_corpus_is_latin_only_and_target_corpora_are_in_their_script(world):
    english = list(read_documents(world["dir"] / "en_corpus.jsonl"))
    assert len(english) == world["truth"]["corpora"]["en"]["documents"]
    assert not [d for d in english if has_non_latin_letter(d)]
    for lang in LANGS:
        script = LANGUAGE_SCRIPTS[lang]
        native = list(read_documents(world["dir"] / lang / "native" / "mono.jsonl"))
        assert all(script_letter_fraction(d, script) == 1.0 for d in native), lang
        anchors = list(read_documents(world["dir"] / lang / "anchors" / "mono.jsonl"))
        assert any(script_letter_fraction(d, script) < 1.0 for d in anchors), f"{lang}: anchors hold Latin names"
        # build_pairs.py drops target texts under 0.5 of their script by default: none may be that low
        anchor_pairs = _jsonl(world["dir"] / lang / "anchors" / "pairs.jsonl")
        assert min(script_letter_fraction(t, script) for t in anchors + [p[lang] for p in anchor_pairs]) >= 0.5
        for pair in _jsonl(world["dir"] / lang / "native" / "pairs.jsonl"):
            assert not has_non_latin_letter(pair["en"])
            assert script_letter_fraction(pair[lang], script) == 1.0


def _count_documents(documents, needles):
    return sum(1 for d in documents if any(n in d for n in needles))


def test_every_fact_is_stated_exactly_as_planted_in_every_corpus(world):
    args = world["args"]
    english = list(read_documents(world["dir"] / "en_corpus.jsonl"))
    for lang in LANGS:
        language = Language(lang, args.seed)
        facts = _facts(world, lang)
        for variant in ("native", "anchors"):
            mono = list(read_documents(world["dir"] / lang / variant / "mono.jsonl"))
            for fact in facts:
                n_templates = len(RELATIONS[fact["relation"]])
                en_statements = [render_fact(fact, t, None) for t in range(n_templates)]
                tgt_statements = [render_fact(fact, t, language, variant) for t in range(n_templates)]
                # counted twice: documents holding a statement, and documents naming subject and object
                assert _count_documents(english, en_statements) == fact["counts"]["en"], fact["id"]
                both_en = sum(1 for d in english if fact["subject"]["en"] in d and fact["object"]["en"] in d)
                assert both_en == fact["counts"]["en"], fact["id"]
                assert _count_documents(mono, tgt_statements) == fact["counts"]["tgt"], (variant, fact["id"])
                s, o = _name(fact["subject"], variant), _name(fact["object"], variant)
                assert sum(1 for d in mono if s in d and o in d) == fact["counts"]["tgt"], (variant, fact["id"])


@pytest.fixture(scope="module")
def counted(world):
    """Per fact, the documents of each written corpus that name both its subject and its object.

    Counted on the files alone (a document names two entities only when it states their fact),
    independently of the counts truth.json records: {fact id: {"en": n, "native": n, "anchors": n}}.
    """
    english = list(read_documents(world["dir"] / "en_corpus.jsonl"))
    counts = {}
    for lang in LANGS:
        monos = {v: list(read_documents(world["dir"] / lang / v / "mono.jsonl")) for v in ("native", "anchors")}
        for fact in _facts(world, lang):
            subject, obj = fact["subject"], fact["object"]
            entry = {"en": sum(1 for d in english if subject["en"] in d and obj["en"] in d)}
            for variant, mono in monos.items():
                s, o = _name(subject, variant), _name(obj, variant)
                entry[variant] = sum(1 for d in mono if s in d and o in d)
            counts[fact["id"]] = entry
    return counts


def test_planted_counts_follow_the_arguments_per_tier(world, counted):
    args = world["args"]
    en_documents = sum(1 for _ in read_documents(world["dir"] / "en_corpus.jsonl"))
    for lang in LANGS:
        facts = _facts(world, lang)
        tiers = Counter(f["tier"] for f in facts)
        level = args.resource_of(lang)
        expected = {"high": {"high": 32}, "low": {"low": 32}, "mixed": {"high": 16, "low": 16}}[level]
        assert dict(tiers) == expected, lang
        # the corpora as written, against the arguments
        assert all(counted[f["id"]]["native"] == counted[f["id"]]["anchors"] == args.tgt_count for f in facts)
        assert all(counted[f["id"]]["en"] == args.en_count for f in facts if f["tier"] == "high")
        low = [f for f in facts if f["tier"] == "low"]
        if low:  # the ratio holds in aggregate, rounded to whole option groups of 4
            expected_low = round(len(low) / 4 * args.en_count / args.low_resource_ratio) * 4
            assert sum(counted[f["id"]]["en"] for f in low) == expected_low
            assert {counted[f["id"]]["en"] for f in low} <= {1, 2}  # 6 / 4 = 1.5 per fact, spread over groups
        # truth.json records what the files hold
        assert all(f["counts"] == {"en": counted[f["id"]]["en"], "tgt": counted[f["id"]]["native"]} for f in facts)
        mono_documents = sum(1 for _ in read_documents(world["dir"] / lang / "native" / "mono.jsonl"))
        for tier, density in world["truth"]["densities"][lang].items():
            in_tier = [f for f in facts if tier in ("all", f["tier"])]
            en_statements = sum(counted[f["id"]]["en"] for f in in_tier)
            tgt_statements = sum(counted[f["id"]]["native"] for f in in_tier)
            assert (density["facts"], density["en_statements"], density["tgt_statements"]) == (
                len(in_tier),
                en_statements,
                tgt_statements,
            ), (lang, tier)
            assert density["en_density"] == pytest.approx(en_statements / en_documents)
            assert density["tgt_density"] == pytest.approx(tgt_statements / mono_documents)


def test_cloze_files_are_valid_parallel_and_frequency_matched(world, counted):
    for lang in LANGS:
        facts = {f["id"]: f for f in _facts(world, lang)}
        records = world["truth"]["questions"][lang]
        for variant in ("native", "anchors"):
            folder = world["dir"] / lang / variant
            en = json.loads((folder / f"{lang}-culture-cloze_en.json").read_text(encoding="utf-8"))
            tgt = json.loads((folder / f"{lang}-culture-cloze_{lang}.json").read_text(encoding="utf-8"))
            assert len(en) == len(tgt) == len(records) == len(facts)
            by_english = {e["en"]: e for f in facts.values() for e in (f["subject"], f["object"])}
            for i, (q_en, q_tgt, record) in enumerate(zip(en, tgt, records)):
                for item in (q_en, q_tgt):
                    assert item["question"].count("____") == 1 and "_____" not in item["question"]
                    assert len(item["options"]) == 4 and len(set(item["options"])) == 4
                    assert item["answer"] in item["options"]
                fact = facts[record["fact"]]
                assert record["index"] == i and q_en["answer"] == fact["object"]["en"] == record["answer"]
                # parallel: option k of the target file is option k of the English file, in its own script
                assert q_tgt["options"] == [_name(by_english[o], variant) for o in q_en["options"]]
                assert q_tgt["answer"] == _name(fact["object"], variant)
                # frequency-matched: every option is the answer of a fact stated as often in every written corpus
                option_facts = [f for f in facts.values() if f["object"]["en"] in q_en["options"]]
                assert len(option_facts) == 4
                assert {json.dumps(counted[f["id"]], sort_keys=True) for f in option_facts} == {
                    json.dumps(counted[fact["id"]], sort_keys=True)
                }
                # and the question file's record says the same
                assert record["counts"] == {"en": counted[fact["id"]]["en"], lang: counted[fact["id"]][variant]}


def test_parallel_pairs_never_state_a_fact_and_name_each_entity_exactly(world):
    args = world["args"]
    for lang in LANGS:
        facts = _facts(world, lang)
        entities = world["truth"]["cultures"][lang]["entities"]
        for variant in ("native", "anchors"):
            folder = world["dir"] / lang / variant
            pairs = _jsonl(folder / "pairs.jsonl")
            diagnostic = _jsonl(folder / "diagnostic_pairs.jsonl")
            assert len(pairs) == args.pairs and len(diagnostic) == args.diagnostic_pairs
            assert all(set(p) == {"en", lang} for p in pairs)
            assert all(set(p) == {"en", lang, "tgt"} and p["tgt"] == p[lang] for p in diagnostic)
            for pair in pairs + diagnostic:
                for fact in facts:
                    for side, key in (("en", "en"), (lang, "en" if variant == "anchors" else "native")):
                        assert not (fact["subject"][key] in pair[side] and fact["object"][key] in pair[side]), (
                            fact["id"],
                            pair,
                        )
            mentions = Counter(e["id"] for p in pairs for e in entities if e["en"] in p["en"])
            assert set(mentions.values()) == {args.pair_mentions} and len(mentions) == len(entities)
            assert all(_name(e, variant) in p[lang] for p in pairs for e in entities if e["en"] in p["en"])
            # held out: no diagnostic pair is a training pair, and no corpus repeats a document
            assert not {p["en"] for p in diagnostic} & {p["en"] for p in pairs}
            assert len({p["en"] for p in pairs}) == len(pairs)
            mono = list(read_documents(folder / "mono.jsonl"))
            assert len(set(mono)) == len(mono)
    english = list(read_documents(world["dir"] / "en_corpus.jsonl"))
    assert len(set(english)) == len(english)


def test_variants_differ_only_in_how_names_are_written(world):
    for lang in LANGS:
        entities = world["truth"]["cultures"][lang]["entities"]
        native = list(read_documents(world["dir"] / lang / "native" / "mono.jsonl"))
        anchors = list(read_documents(world["dir"] / lang / "anchors" / "mono.jsonl"))
        assert len(native) == len(anchors)
        for doc_native, doc_anchors in zip(native, anchors):
            for entity in entities:
                doc_native = doc_native.replace(entity["native"], "<E>")
                doc_anchors = doc_anchors.replace(f" {entity['en']} ", "<E>").replace(f"{entity['en']} ", "<E>")
                doc_anchors = doc_anchors.replace(entity["en"], "<E>")
            assert doc_native.replace(" ", "") == doc_anchors.replace(" ", "")


def test_cli_writes_the_world_and_bad_arguments_get_clear_errors(tmp_path, capsys):
    main(["--output_dir", str(tmp_path / "w"), "--langs", "ko", "--places", "4", "--relations", "2"])
    assert "ko" in capsys.readouterr().out
    assert (tmp_path / "w" / "ko" / "native" / "ko-culture-cloze_ko.json").is_file()
    with pytest.raises(InputError, match="multiple of 4"):
        small_world_args(tmp_path / "x", places=6)
    with pytest.raises(InputError, match="unknown language"):
        small_world_args(tmp_path / "x", langs=["fr"])
    with pytest.raises(InputError, match="LANG=LEVEL"):
        small_world_args(tmp_path / "x", resource=["bo=medium"])


def test_too_small_a_budget_for_the_mentions_is_refused_with_the_arguments(tmp_path):
    # per culture 8 places x (1 + 4 relations) = 40 entities, named --pair_mentions 2 and --mono_mentions 1 times
    with pytest.raises(InputError, match="--pairs 79 is below the 80 pairs needed to name each of 40 entities 2"):
        small_world_args(tmp_path / "x", pairs=79)
    with pytest.raises(InputError, match="--mono_filler_documents 39 is below the 40 documents needed"):
        small_world_args(tmp_path / "x", mono_filler_documents=39)


def test_a_grammar_that_runs_out_of_sentences_is_refused_before_any_file_is_written(tmp_path):
    # an entity can be named in 113 distinct English filler sentences: 120 distinct pairs naming it cannot exist
    argv = ["--output_dir", str(tmp_path / "w"), "--langs", "ko", "--places", "4", "--relations", "1"]
    argv += ["--pair_mentions", "120", "--pairs", "1000", "--mono_mentions", "1", "--mono_filler_documents", "8"]
    with pytest.raises(InputError, match="cannot produce enough distinct pairs"):
        main(argv)
    assert not (tmp_path / "w").exists()


def test_heldout_questions_use_a_template_never_used_for_their_fact(tmp_path):
    args = small_world_args(tmp_path / "h", langs=["ko"], question_template="heldout", name_variants=["native"])
    generate_world(args)
    truth = json.loads((tmp_path / "h" / "truth.json").read_text(encoding="utf-8"))
    english = (tmp_path / "h" / "en_corpus.jsonl").read_text(encoding="utf-8")
    for fact in truth["cultures"]["ko"]["facts"]:
        assert render_fact(fact, fact["question_template"], None) not in english


# --------------------------------------------------------------------------------------
# Tiers absent and en_only, item_tiers.json, name_alignment.json
# --------------------------------------------------------------------------------------

TIERED_LANGS = ["ko", "bo"]  # a spaced script and an unspaced one

#: Digest of every file of small_world_args' world that existed before the absent and en_only tiers (all
#: but world.json, which records output_dir and the arguments, item_tiers.json and name_alignment.json).
#: Worlds without --absent_places/--en_only_places must stay byte for byte what they were: a change here
#: changes every study's data. Update it only for a change to the world that is meant.
SMALL_WORLD_DIGEST = "512b21df0b493e35763b60788500a7e604a6ab710c4c87c41c0428ce1b57f9fa"


@pytest.fixture(scope="module")
def tiered_world(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiered")
    args = small_world_args(
        out, langs=TIERED_LANGS, resource=["ko=mixed", "bo=mixed"], relations=3, absent_places=4, en_only_places=4
    )
    generate_world(args)
    truth = json.loads((out / "truth.json").read_text(encoding="utf-8"))
    return {"dir": out, "args": args, "truth": truth, "langs": TIERED_LANGS}


def _digest(folder, skip=("world.json", "item_tiers.json", "name_alignment.json")):
    import hashlib

    digest = hashlib.sha256()
    for path in sorted(Path(folder).rglob("*")):
        if path.is_file() and path.name not in skip:
            digest.update(str(path.relative_to(folder)).encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def _entity_kinds(facts):
    """{entity id: (kind, tier)}: places are of kind "place", objects of their relation's name."""
    kinds = {}
    for fact in facts:
        kinds[fact["subject"]["id"]] = ("place", fact["tier"])
        kinds[fact["object"]["id"]] = (fact["relation"], fact["tier"])
    return kinds


def test_worlds_without_absent_or_en_only_places_are_byte_identical_to_before(world):
    assert world["args"].absent_places == world["args"].en_only_places == 0
    assert _digest(world["dir"]) == SMALL_WORLD_DIGEST
    assert {f["tier"] for lang in LANGS for f in _facts(world, lang)} == {"high", "low"}


def test_absent_facts_are_never_in_english_and_en_only_facts_never_in_the_target_corpus(tiered_world):
    args, out = tiered_world["args"], tiered_world["dir"]
    english = list(read_documents(out / "en_corpus.jsonl"))
    assert not [d for d in english if has_non_latin_letter(d)]
    planted = {"high": (args.en_count, args.tgt_count), "absent": (0, args.tgt_count), "en_only": (args.en_count, 0)}
    for lang in TIERED_LANGS:
        language = Language(lang, args.seed)
        facts = _facts(tiered_world, lang)
        assert Counter(f["tier"] for f in facts) == {"high": 12, "low": 12, "absent": 12, "en_only": 12}
        for variant in ("native", "anchors"):
            mono = list(read_documents(out / lang / variant / "mono.jsonl"))
            for fact in facts:
                s, o = fact["subject"], fact["object"]
                en = sum(1 for d in english if s["en"] in d and o["en"] in d)
                tgt = sum(1 for d in mono if _name(s, variant) in d and _name(o, variant) in d)
                assert fact["counts"] == {"en": en, "tgt": tgt}, (lang, variant, fact["id"])
                # and the documents that name both are exactly those that state the fact
                templates = range(len(RELATIONS[fact["relation"]]))
                assert _count_documents(english, [render_fact(fact, t, None) for t in templates]) == en
                assert _count_documents(mono, [render_fact(fact, t, language, variant) for t in templates]) == tgt
                if fact["tier"] in planted:
                    assert (en, tgt) == planted[fact["tier"]], (lang, variant, fact["id"])
                if fact["tier"] == "absent":  # English never names them at all: no statement, no filler
                    assert not [d for d in english if s["en"] in d or o["en"] in d], fact["id"]
        densities = tiered_world["truth"]["densities"][lang]
        assert (densities["absent"]["en_statements"], densities["absent"]["tgt_statements"]) == (0, 12 * args.tgt_count)
        assert (densities["en_only"]["en_statements"], densities["en_only"]["tgt_statements"]) == (
            12 * args.en_count,
            0,
        )
        assert densities["en_only"]["tgt_over_en"] == 0.0 and densities["absent"]["tgt_over_en"] is None


def test_every_entity_of_every_tier_is_named_equally_often_in_pairs_and_target_filler(tiered_world):
    args, out = tiered_world["args"], tiered_world["dir"]
    for lang in TIERED_LANGS:
        facts = _facts(tiered_world, lang)
        entities = tiered_world["truth"]["cultures"][lang]["entities"]
        kinds = _entity_kinds(facts)
        assert {tier for _, tier in kinds.values()} == {"high", "low", "absent", "en_only"}
        for variant in ("native", "anchors"):
            pairs = _jsonl(out / lang / variant / "pairs.jsonl")
            mono = list(read_documents(out / lang / variant / "mono.jsonl"))
            assert all(sum(e["en"] in p["en"] for e in entities) <= 1 for p in pairs)  # no pair states a fact
            for entity in entities:
                in_pairs = sum(1 for p in pairs if entity["en"] in p["en"])
                assert in_pairs == args.pair_mentions, (variant, entity["id"], kinds[entity["id"]])
                stating = sum(
                    f["counts"]["tgt"] for f in facts if entity["id"] in (f["subject"]["id"], f["object"]["id"])
                )
                naming = sum(1 for d in mono if _name(entity, variant) in d)
                assert naming - stating == args.mono_mentions, (variant, entity["id"], kinds[entity["id"]])


def test_item_tiers_agree_with_truth_and_the_question_files(tiered_world, world):
    for w in (tiered_world, world):
        for lang in w.get("langs", LANGS):
            facts = {f["id"]: f for f in _facts(w, lang)}
            by_object = {f["object"]["en"]: f for f in facts.values()}
            records = w["truth"]["questions"][lang]
            for variant in ("native", "anchors"):
                folder = w["dir"] / lang / variant
                tiers = json.loads((folder / "item_tiers.json").read_text(encoding="utf-8"))
                en = json.loads((folder / f"{lang}-culture-cloze_en.json").read_text(encoding="utf-8"))
                tgt = json.loads((folder / f"{lang}-culture-cloze_{lang}.json").read_text(encoding="utf-8"))
                assert tiers["parallel_group"] == f"{lang}-culture-cloze"
                assert set(tiers["tiers"]) == {f["tier"] for f in facts.values()}
                assert all(isinstance(meaning, str) and meaning for meaning in tiers["tiers"].values())
                assert [item["index"] for item in tiers["items"]] == list(range(len(en))) == list(range(len(tgt)))
                for item, record, q_en in zip(tiers["items"], records, en):
                    fact = by_object[q_en["answer"]]
                    assert fact["id"] == record["fact"]
                    assert item["tier"] == fact["tier"] == record["tier"]
                    assert item["counts"] == {"en": fact["counts"]["en"], lang: fact["counts"]["tgt"]}
                    # the options are answers of facts of the same tier with the same counts
                    assert {(by_object[o]["tier"], json.dumps(by_object[o]["counts"])) for o in q_en["options"]} == {
                        (fact["tier"], json.dumps(fact["counts"]))
                    }


def _all_written_text(out):
    """Every sentence-bearing text of a world: corpora, pairs and diagnostic pairs of every language and variant."""
    texts = list(read_documents(out / "en_corpus.jsonl"))
    for path in sorted(out.rglob("*.jsonl")):
        for record in _jsonl(path):
            texts += [v for v in record.values() if isinstance(v, str)]
    return "\n".join(texts)


def _filled(frame, answer):
    assert frame.count("____") == 1 and "_____" not in frame, frame
    return frame.replace("____", answer)


def _alignments(*worlds):
    """(world, lang, variant, name_alignment.json) for every language and variant of ``worlds``."""
    for w in worlds:
        for lang in w.get("langs", LANGS):
            for variant in ("native", "anchors"):
                path = w["dir"] / lang / variant / "name_alignment.json"
                yield w, lang, variant, json.loads(path.read_text(encoding="utf-8"))


def _planted_frequency(facts):
    """{entity id: (English, target) planted statements naming it}."""
    frequency = {}
    for fact in facts:
        for e in (fact["subject"]["id"], fact["object"]["id"]):
            en, tgt = frequency.get(e, (0, 0))
            frequency[e] = (en + fact["counts"]["en"], tgt + fact["counts"]["tgt"])
    return frequency


def _name_in(entity, language, variant):
    return entity["en"] if language == "en" else _name(entity, variant)


def test_name_alignment_frames_never_occur_in_any_corpus_or_pairs_file(tiered_world, world):
    written = {id(w): _all_written_text(w["dir"]) for w in (tiered_world, world)}
    for w, _, _, alignment in _alignments(tiered_world, world):
        for item in alignment["items"]:
            assert item["context"] not in written[id(w)], item
            assert _filled(item["frame"], item["answer"]) not in written[id(w)], item


def test_name_alignment_has_one_item_per_entity_and_direction_with_options_of_its_kind(tiered_world, world):
    for w, lang, variant, alignment in _alignments(tiered_world, world):
        facts = _facts(w, lang)
        entities = {e["id"]: e for e in w["truth"]["cultures"][lang]["entities"]}
        kinds, frequency = _entity_kinds(facts), _planted_frequency(facts)
        assert (alignment["lang"], alignment["variant"]) == (lang, variant)
        assert alignment["entities"] == [
            {"id": e["id"], "en": e["en"], "target": _name(e, variant)} for e in entities.values()
        ]
        assert Counter((i["entity"], i["direction"]) for i in alignment["items"]) == {
            (e, d): 1 for e in entities for d in (f"en->{lang}", f"{lang}->en")
        }
        for item in alignment["items"]:
            entity = entities[item["entity"]]
            frame_lang = "en" if item["direction"] == f"{lang}->en" else lang
            context_lang = lang if frame_lang == "en" else "en"
            assert item["context"].count(_name_in(entity, context_lang, variant)) == 1 and "____" not in item["context"]
            assert item["answer"] == _name_in(entity, frame_lang, variant)
            assert _filled(item["frame"], item["answer"]).count(item["answer"]) == 1
            assert len(set(item["options"])) == 4 and item["answer"] in item["options"]
            by_name = {_name_in(e, frame_lang, variant): e["id"] for e in entities.values()}
            options = [by_name[o] for o in item["options"]]  # KeyError: an option that is no entity's name
            assert {kinds[o] for o in options} == {kinds[entity["id"]]}, item  # same kind and tier
            if kinds[entity["id"]][1] != "low":  # low-tier English counts vary between option groups
                assert {frequency[o] for o in options} == {frequency[entity["id"]]}, item
            # distractors are the peers nearest in planted frequency
            target = frequency[entity["id"]]
            distance = {e: abs(frequency[e][0] - target[0]) + abs(frequency[e][1] - target[1]) for e in entities}
            peers = [e for e in entities if kinds[e] == kinds[entity["id"]] and e not in options]
            assert max(distance[o] for o in options) <= min((distance[e] for e in peers), default=999), item
            # the context names its entity only, and the frame no entity but by its blank
            others = [e for e in entities.values() if e is not entity]
            assert not [e for e in others if _name_in(e, context_lang, variant) in item["context"]], item
            assert not [e for e in others if _name_in(e, frame_lang, variant) in item["frame"]], item


def test_absent_or_en_only_place_counts_that_are_not_multiples_of_4_are_refused_naming_the_flag(tmp_path):
    with pytest.raises(InputError, match="--absent_places 6: give a multiple of 4"):
        small_world_args(tmp_path / "x", absent_places=6)
    with pytest.raises(InputError, match="--en_only_places -4: give a multiple of 4"):
        small_world_args(tmp_path / "x", en_only_places=-4)
    with pytest.raises(InputError, match="--en_only_places 2"):
        main(["--output_dir", str(tmp_path / "w"), "--langs", "ko", "--places", "4", "--en_only_places", "2"])
    assert not (tmp_path / "w").exists()
