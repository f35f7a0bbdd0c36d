"""Write the bundled held-out eval sets, in the paper's MC/TF format, from the same
`periodictable` facts as data/make_materials.py, plus an offline general-knowledge set.

    python -m data.make_eval_sets            # rewrites data/eval_sets/*.jsonl
    python -m data.make_eval_sets --out DIR  # somewhere else

Deterministic. Every question is worded in a way no training file uses (tests/test_eval_sets.py
checks it), and every fact is split by where the training data states it:

  materials_sft_{mc,tf}.jsonl  facts the SFT chats and preference pairs state (and the CPT prose):
                               atomic number, symbol, mass, density, structure, covalent radius,
                               K-alpha line, neutron absorption, major isotope, compound molar mass
  materials_cpt_{mc,tf}.jsonl  facts only the CPT prose states: lattice parameter, coherent
                               neutron scattering length, major-isotope abundance, compound mass
                               fractions
  general_mc.jsonl             general knowledge (data/general_facts.py), to measure forgetting
  knowledge_cpt_mc.jsonl       every CPT-only fact asked twice, by two independent wordings, its wrong
                               options the same relation's values for other subjects the renderings
                               state (no option is an unfamiliar string); `fact_id` clusters the two
  knowledge_control_mc.jsonl   the same relations asked about fictional subjects no file mentions,
                               options from the same value pools: accuracy must stay at chance

MC rows: {"question", "options": [4 strings], "answer": "A".."D", "fact", "subject"}.
TF rows: {"statement", "answer": "True"|"False", "fact", "subject"}.
Wrong options are the values of neighbouring elements (or other isotopes of the same element,
or perturbed percentages), so they are plausible. Answer letters and True/False are balanced.
Each check that a fact really is stated where its split says happens here, before writing.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import periodictable as pt

from data.general_facts import AUTHORS, COUNTRIES, CURRENCIES, MISC
from data.make_materials import COMPOUNDS, QUESTIONS, STRUCTURE_NAMES, element_facts, write_outputs
from data.make_materials import OUT_DIR as MATERIALS_DIR, main as materials_cli

HERE = Path(__file__).resolve().parent

OUT_DIR = HERE / "eval_sets"
SEED = 903444
SFT_SET_SIZE = 400  # of ~800 candidate facts; see docs/eval.md for the interval arithmetic
LETTERS = "ABCD"


def cap(text: str) -> str:
    return text[:1].upper() + text[1:]


# -------------------------------------------------------------------------------------------
# facts: (fact kind, subject, right value, [wrong values], MC question, TF template with {value})
# -------------------------------------------------------------------------------------------
# Question wordings for the held-out sets. Units follow the training text's value strings.
ELEMENT_WORDING = {
    # kind: (MC question, TF statement, unit)
    "number": ("How many protons are in the nucleus of a {name} atom?",
               "A {name} atom carries {value} protons in its nucleus.", ""),
    "symbol": ("Which symbol denotes {name} in chemical formulas?",
               "In chemical formulas, {name} is denoted {value}.", ""),
    "mass": ("Which value matches the mean mass of a {name} atom in atomic mass units?",
             "The mean mass of a {name} atom is {value} atomic mass units.", " u"),
    "density": ("Which figure gives the mass of one cubic centimetre of {name}?",
                "One cubic centimetre of {name} has a mass of {value} grams.", " g/cm3"),
    "structure": ("Which lattice type does crystalline {name} take?",
                  "Crystalline {name} takes a {value} lattice.", ""),
    "radius": ("Which value matches the radius of a {name} atom in a covalent bond?",
               "Bonded covalently, a {name} atom has a radius of {value} angstrom.", " angstrom"),
    "k_alpha": ("Which wavelength identifies {name} by its K-alpha emission in X-ray spectra?",
                "{Name} emits K-alpha X-rays with a wavelength of {value} angstrom.", " angstrom"),
    "absorption": ("How large a cross section does {name} present to thermal neutrons it absorbs?",
                   "For capturing thermal neutrons, {name} has a cross section of about {value} barn.", " barn"),
    "major_isotope": ("Which isotope makes up most of naturally occurring {name}?",
                      "Most naturally occurring {name} is the isotope {value}.", ""),
    # only in the CPT prose
    "lattice_a": ("What is the edge length of the unit cell of solid {name}?",
                  "The unit cell of solid {name} has an edge of {value} angstrom.", " angstrom"),
    "b_c": ("Which value is the bound coherent neutron scattering length of {name}?",
            "Neutrons scatter coherently from {name} with a scattering length of {value} fm.", " fm"),
    "major_abundance": ("What share of natural {name} is the isotope {isotope}?",
                        "The isotope {isotope} makes up {value} percent of natural {name}.", " percent"),
}
SFT_KINDS = ("number", "symbol", "mass", "density", "structure", "radius", "k_alpha", "absorption", "major_isotope")
CPT_KINDS = ("lattice_a", "b_c", "major_abundance")
# A training sentence that states each fact: the eval set only keeps facts whose sentence is
# found in the split's files (SFT answers from make_materials.QUESTIONS; CPT fragments below).
CPT_EVIDENCE = {
    "lattice_a": "lattice parameter of {value} angstrom",
    "b_c": "coherent scattering length of {value} fm",
    "major_abundance": "{isotope} ({value} percent)",
}


def neighbour_values(facts: list, i: int, key: str, count: int = 3) -> list:
    """Distinct values of `key` from the nearest elements, nearest first."""
    found = []
    for step in range(1, len(facts)):
        for j in (i + step, i - step):
            if 0 <= j < len(facts) and facts[j][key] and facts[j][key] != facts[i][key] and facts[j][key] not in found:
                found.append(facts[j][key])
                if len(found) == count:
                    return found
    return found


def other_isotopes(f: dict) -> list:
    """Three other isotopes of the same element, nearest in mass number: plausible distractors."""
    major = int(f["major_isotope"].split("-")[1])
    others = sorted((iso for iso in pt.elements[f["number"]].isotopes if iso != major), key=lambda a: (abs(a - major), a))
    return [f"{f['symbol']}-{a}" for a in others[:3]]


def element_facts_for(kinds: tuple) -> list:
    elements = [el for el in pt.elements if 0 < el.number <= 96]
    facts = [element_facts(el) for el in elements]
    structures = sorted(set(STRUCTURE_NAMES.values()) - {"cubic", "monatomic", "diatomic molecular"})
    out = []
    for i, f in enumerate(facts):
        for kind in kinds:
            if not f[kind]:
                continue
            if kind == "major_isotope":
                wrong = other_isotopes(f)
            elif kind == "structure":
                wrong = neighbour_values(facts, i, kind)
                wrong += [s for s in structures if s != f[kind] and s not in wrong][: 3 - len(wrong)]
            else:
                wrong = neighbour_values(facts, i, kind)
            if len(wrong) < 3:
                continue
            out.append({"kind": kind, "subject": f["name"], "value": str(f[kind]), "wrong": [str(w) for w in wrong],
                        "fields": {"name": f["name"], "Name": cap(f["name"]), "isotope": f["major_isotope"]}})
    return out


def compound_facts(kind: str, rng: random.Random) -> list:
    """Molar masses (SFT) or mass fractions (CPT only) of the bundled compounds."""
    out = []
    for formula, common in COMPOUNDS:
        comp = pt.formula(formula)
        if kind == "molar_mass":
            value = f"{comp.mass:.3f}"
            wrong = [f"{comp.mass * k:.3f}" for k in rng.sample([0.8, 0.9, 1.1, 1.25], 3)]
            out.append({"kind": kind, "subject": formula, "value": value, "wrong": wrong,
                        "fields": {"formula": formula, "common": common}})
            continue
        for el, w in comp.mass_fraction.items():
            if len(comp.mass_fraction) < 2:
                continue
            value = f"{100 * w:.2f}"
            wrong = sorted({f"{100 * w * k:.2f}" for k in (0.55, 0.7, 0.85, 1.15, 1.3)} - {value})
            wrong = rng.sample([v for v in wrong if float(v) < 100], 3)
            name = pt.elements.symbol(el.symbol).name
            out.append({"kind": kind, "subject": f"{formula}:{el.symbol}", "value": value, "wrong": wrong,
                        "fields": {"formula": formula, "common": common, "name": name, "Name": cap(name)}})
    return out


COMPOUND_WORDING = {
    "molar_mass": ("What does one mole of {common} ({formula}) weigh?",
                   "A mole of {formula} ({common}) weighs {value} grams.", " g/mol"),
    "mass_fraction": ("What fraction of the mass of {common} ({formula}) is {name}?",
                      "{Name} accounts for {value} percent of the mass of {formula}.", " percent"),
}
WORDING = {**ELEMENT_WORDING, **COMPOUND_WORDING}


# -------------------------------------------------------------------------------------------
# where the training files state each fact
# -------------------------------------------------------------------------------------------
def training_texts(materials: Path) -> dict:
    """Every string the training files contain, by source: cpt (prose) and qa (SFT + preference)."""
    def rows(name):
        return [json.loads(line) for line in (materials / name).read_text().splitlines() if line.strip()]

    qa = [m["content"] for r in rows("sft.jsonl") for m in r["messages"]]
    for r in rows("preference.jsonl"):
        qa += [r["prompt"], r["chosen"], r["rejected"]]
    return {"cpt": [r["text"] for r in rows("cpt.jsonl")], "qa": qa}


def sft_sentence(fact: dict) -> str:
    if fact["kind"] == "molar_mass":
        return f"The molar mass of {fact['fields']['formula']} ({fact['fields']['common']}) is {fact['value']} g/mol."
    answer = next(a for key, _, a in QUESTIONS if key == fact["kind"])
    return answer.format(name=fact["subject"], value=fact["value"])


def cpt_fragment(fact: dict) -> tuple:
    """(fragment, must-also-contain) locating the fact in the CPT prose."""
    if fact["kind"] == "mass_fraction":
        f = fact["fields"]
        return f"{f['name'].lower()} {fact['value']} percent", f["formula"]
    return CPT_EVIDENCE[fact["kind"]].format(value=fact["value"], **fact["fields"]), fact["subject"]


def stated_only_where_expected(facts: list, split: str, texts: dict) -> list:
    """Keep the facts the training files state where `split` says, and nowhere else."""
    qa_blob = "\n".join(texts["qa"])
    kept = []
    for fact in facts:
        if split == "sft":
            if sft_sentence(fact) in qa_blob:
                kept.append(fact)
            continue
        fragment, subject = cpt_fragment(fact)
        in_cpt = any(fragment in doc and subject.lower() in doc.lower() for doc in texts["cpt"])
        if in_cpt and fragment not in qa_blob:
            kept.append(fact)
    return kept


# -------------------------------------------------------------------------------------------
# rows
# -------------------------------------------------------------------------------------------
def mc_rows(facts: list, rng: random.Random, first_slot: int = 0) -> list:
    """4-option rows; the right answer's letter cycles A-D over a shuffled order (balanced)."""
    rows = []
    for k, fact in enumerate(facts):
        question, _, unit = WORDING.get(fact["kind"], ("{question}", "", ""))  # general facts carry their own
        question = fact.get("template", question)  # a second wording (knowledge_rows)
        options = [v + unit for v in fact["wrong"][:3]]
        rng.shuffle(options)
        slot = (k + first_slot) % 4
        options.insert(slot, fact["value"] + unit)
        rows.append({"question": question.format(question=fact.get("question"), **fact["fields"]), "options": options, "answer": LETTERS[slot],
                     "fact": fact["kind"], "subject": fact["subject"]})
    return rows


def tf_rows(facts: list, rng: random.Random) -> list:
    """Half true (the right value), half false (a neighbour's value), alternating."""
    rows = []
    for k, fact in enumerate(facts):
        _, statement, _ = WORDING[fact["kind"]]
        true = k % 2 == 0
        value = fact["value"] if true else rng.choice(fact["wrong"])
        rows.append({"statement": statement.format(value=value, **fact["fields"]),
                     "answer": "True" if true else "False", "fact": fact["kind"], "subject": fact["subject"]})
    return rows


def general_rows(rng: random.Random) -> list:
    items = []  # (fact kind, subject, question, right, wrong pool)
    capitals_by_continent = {}
    for country, capital, continent in COUNTRIES:
        capitals_by_continent.setdefault(continent, []).append(capital)
    continents = sorted(capitals_by_continent)
    for country, capital, continent in COUNTRIES:
        same = [c for c in capitals_by_continent[continent] if c != capital]
        items.append(("capital", country, f"Which city is the capital of {country}?", capital, same))
        items.append(("continent", country, f"On which continent does {country} lie?", continent,
                      [c for c in continents if c != continent]))
    currencies = [c for _, c in CURRENCIES]
    for country, currency in CURRENCIES:
        items.append(("currency", country, f"Which currency is used in {country}?", currency,
                      [c for c in currencies if c != currency]))
    authors = sorted({a for _, a in AUTHORS})
    for work, author in AUTHORS:
        items.append(("author", work, f"Who wrote {work}?", author, [a for a in authors if a != author]))
    for question, right, wrong in MISC:
        items.append(("misc", question, question, right, wrong))
    rng.shuffle(items)
    facts = [{"kind": kind, "subject": subject, "value": right, "wrong": rng.sample(pool, 3), "question": q}
             for kind, subject, q, right, pool in items]
    return mc_rows([{**f, "fields": {}} for f in facts], rng)


# -------------------------------------------------------------------------------------------
# the knowledge-injection measurement (docs/STUDY.md, "Knowledge injection")
# -------------------------------------------------------------------------------------------
SECOND_WORDING = {
    "lattice_a": "How long is the side a of the crystal cell of {name}, in angstrom?",
    "b_c": "How strongly does a {name} nucleus scatter neutrons coherently, given as a length?",
    "major_abundance": "How much of the {name} on Earth is {isotope}, as a share?",
    "mass_fraction": "By how many percent of its weight is {common} ({formula}) made of {name}?",
}
FICTIONAL_STEMS = ["vel", "orsan", "quel", "tarv", "mirel", "zorb", "drav", "pell", "skar", "hest",
                   "brol", "fenn", "yarr", "glim", "throv", "caspr", "nolv", "wend", "ixar", "pluv"]
FICTIONAL_COMPOUNDS = [("Vx2O3", "velorite"), ("QlN", "quellide"), ("TrC2", "tarvine"), ("ZbS", "zorbane"),
                       ("DvO2", "dravite"), ("PlF3", "pellane"), ("SkTe", "skarnite"), ("HsP", "hestide")]


def relation_pools(facts: list) -> dict:
    """{relation: sorted distinct values} over the facts: the answers a trained model has seen."""
    pools = {}
    for fact in facts:
        pools.setdefault(fact["kind"], set()).add(fact["value"])
    return {kind: sorted(values, key=float) for kind, values in pools.items()}


def nearest_others(value: str, pool: list, count: int = 3) -> list:
    """The `count` values of the pool nearest to `value` (other subjects' values of one relation)
    that differ from it by 5% or more, so that a model recalling the value roughly can tell them
    apart; the nearest ones where too few do."""
    x = float(value)
    others = sorted((v for v in pool if v != value), key=lambda v: (abs(float(v) - x), v))
    apart = [v for v in others if abs(float(v) - x) >= 0.05 * abs(x)]
    return (apart + [v for v in others if v not in apart])[:count]


def knowledge_facts(cpt_facts: list) -> list:
    """The CPT-only facts with wrong options from the same relation's values of other subjects."""
    pools = relation_pools(cpt_facts)
    return [dict(f, wrong=nearest_others(f["value"], pools[f["kind"]])) for f in cpt_facts]


def knowledge_rows(facts: list, rng: random.Random) -> list:
    """Each fact by both wordings; `fact_id` names the fact, `wording` 1 or 2."""
    rows = []
    for wording, questions in ((1, {k: WORDING[k][0] for k in SECOND_WORDING}), (2, SECOND_WORDING)):
        asked = [dict(f, template=questions[f["kind"]]) for f in facts]
        # the second wording's letters continue where the first's stop: balanced over both
        for row, fact in zip(mc_rows(asked, rng, first_slot=(wording - 1) * len(facts)), asked):
            row.update(fact=fact["kind"], subject=fact["subject"], fact_id=f"{fact['subject']}|{fact['kind']}",
                       wording=wording)
            rows.append(row)
    rng.shuffle(rows)
    return rows


def control_rows(cpt_facts: list, rng: random.Random) -> list:
    """Fictional subjects asked what the real ones are asked, four values of the relation's pool
    as options; the "right" one is drawn at random, so only a shortcut can beat chance."""
    pools = relation_pools(cpt_facts)
    facts = []
    for stem in FICTIONAL_STEMS:
        name = f"{stem}ium"
        fields = {"name": name, "Name": cap(name), "isotope": f"{cap(stem[:2])}-{rng.randint(40, 200)}"}
        for kind in ("lattice_a", "b_c", "major_abundance"):
            options = rng.sample(pools[kind], 4)
            facts.append({"kind": kind, "subject": name, "value": options[0], "wrong": options[1:], "fields": fields})
    for formula, common in FICTIONAL_COMPOUNDS:
        for element in rng.sample(["oxygen", "nitrogen", "carbon", "sulfur"], 2):
            options = rng.sample(pools["mass_fraction"], 4)
            facts.append({"kind": "mass_fraction", "subject": f"{formula}:{element}", "value": options[0],
                          "wrong": options[1:], "fields": {"formula": formula, "common": common, "name": element,
                                                           "Name": cap(element)}})
    rows = mc_rows(facts, rng)
    for row, fact in zip(rows, facts):
        row["fact_id"] = f"{fact['subject']}|{fact['kind']}"
    return rows


def build(out_dir: Path, materials: Path = MATERIALS_DIR) -> dict:
    rng = random.Random(SEED)
    texts = training_texts(materials)
    sft = element_facts_for(SFT_KINDS) + compound_facts("molar_mass", rng)
    cpt = element_facts_for(CPT_KINDS) + compound_facts("mass_fraction", rng)
    sft = stated_only_where_expected(sft, "sft", texts)
    cpt = stated_only_where_expected(cpt, "cpt", texts)
    rng.shuffle(sft)
    rng.shuffle(cpt)
    sft = sorted(sft[:SFT_SET_SIZE], key=lambda f: (f["kind"], f["subject"]))
    cpt = sorted(cpt, key=lambda f: (f["kind"], f["subject"]))
    rng.shuffle(sft)
    rng.shuffle(cpt)
    outputs = {
        "materials_sft_mc.jsonl": mc_rows(sft, rng),
        "materials_sft_tf.jsonl": tf_rows(sft, rng),
        "materials_cpt_mc.jsonl": mc_rows(cpt, rng),
        "materials_cpt_tf.jsonl": tf_rows(cpt, rng),
        "general_mc.jsonl": general_rows(rng),
    }
    knowledge_rng = random.Random(SEED + 1)  # its own generator: the files above stay as they were
    outputs["knowledge_cpt_mc.jsonl"] = knowledge_rows(knowledge_facts(cpt), knowledge_rng)
    outputs["knowledge_control_mc.jsonl"] = control_rows(cpt, knowledge_rng)
    out_dir.mkdir(parents=True, exist_ok=True)
    return write_outputs(out_dir, outputs)


if __name__ == "__main__":
    materials_cli(build, OUT_DIR, __doc__)
