"""Write the bundled materials-science sample set from the element data that the `periodictable`
package ships (atomic masses, densities, crystal structures, covalent radii, K-alpha X-ray
lines, neutron cross sections, isotope abundances, compound mass fractions).

    python -m data.make_materials            # rewrites data/materials/*.jsonl
    python -m data.make_materials --out DIR  # somewhere else

Deterministic: the same periodictable version gives byte-identical files. Outputs:
  cpt.jsonl              {"text": str}                          prose documents (continued pretraining)
  sft.jsonl              {"messages": [{"role", "content"}...]}  system/user/assistant chats
  preference.jsonl       {"prompt", "chosen", "rejected": str}   rejected = a plausible wrong value
  preference_chat.jsonl  the same pairs as chat messages (conversational DPO/ORPO format)
  cpt_renderings.jsonl   {"text": str}  RENDERINGS differently worded documents per element and compound
                         (more wordings per fact than cpt.jsonl): the upper bound of the augmentation study
  facts_taught.jsonl     {"text", "subject", "fact", "value"}  FACT_RENDERINGS one-sentence renderings of
                         every fact the Q&A also states (the SFT relations), full subject name in each
  facts_held.jsonl       the same for the facts only the CPT prose states (the CPT-only relations): the
                         knowledge-injection schedules' documents (conf/pipeline/knowledge_*.yaml)

    python -m data.make_materials --renderings 12   # K renderings per element and compound (0: none)
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import periodictable as pt

OUT_DIR = Path(__file__).resolve().parent / "materials"
SEED = 2409  # arXiv 2409.03444
RENDERINGS = 8
"""Differently worded documents per element and compound in cpt_renderings.jsonl (docs/STUDY.md)."""
FACT_RENDERINGS = 4
"""Differently worded sentences per fact in facts_taught.jsonl and facts_held.jsonl."""
SYSTEM_PROMPT = "You are a materials science assistant. Answer precisely and state units."

STRUCTURE_NAMES = {
    "bcc": "body-centred cubic (bcc)",
    "fcc": "face-centred cubic (fcc)",
    "hcp": "hexagonal close-packed (hcp)",
    "diamond": "diamond cubic",
    "sc": "simple cubic",
    "cubic": "cubic",
    "orthorhombic": "orthorhombic",
    "rhombohedral": "rhombohedral",
    "tetragonal": "tetragonal",
    "monoclinic": "monoclinic",
    "diatom": "diatomic molecular",
    "atom": "monatomic",
}
# Common materials; molar masses and mass fractions are computed by periodictable.
COMPOUNDS = [
    ("Al2O3", "alumina"), ("SiO2", "silica"), ("TiO2", "titania"), ("Fe2O3", "hematite"),
    ("Fe3O4", "magnetite"), ("ZrO2", "zirconia"), ("MgO", "magnesia"), ("CaCO3", "calcite"),
    ("NaCl", "rock salt"), ("SiC", "silicon carbide"), ("Si3N4", "silicon nitride"),
    ("WC", "tungsten carbide"), ("BN", "boron nitride"), ("GaAs", "gallium arsenide"),
    ("GaN", "gallium nitride"), ("ZnO", "zinc oxide"), ("CuO", "cupric oxide"),
    ("Cu2O", "cuprous oxide"), ("BaTiO3", "barium titanate"), ("SrTiO3", "strontium titanate"),
    ("LiCoO2", "lithium cobalt oxide"), ("LiFePO4", "lithium iron phosphate"),
    ("Y2O3", "yttria"), ("CeO2", "ceria"), ("TiN", "titanium nitride"), ("AlN", "aluminium nitride"),
    ("MoS2", "molybdenum disulfide"), ("CdTe", "cadmium telluride"), ("InP", "indium phosphide"),
    ("PbTiO3", "lead titanate"), ("Ni3Al", "nickel aluminide"), ("TiAl", "titanium aluminide"),
    ("Fe3C", "cementite"), ("CaF2", "fluorite"), ("MgAl2O4", "spinel"), ("Ca5(PO4)3OH", "hydroxyapatite"),
    ("CH4", "methane"), ("H2O", "water"), ("CO2", "carbon dioxide"), ("C2H4", "ethylene"),
    ("UO2", "uranium dioxide"), ("Nb3Sn", "niobium-tin"), ("YBa2Cu3O7", "YBCO"),
    ("Bi2Te3", "bismuth telluride"), ("PbS", "galena"), ("FeS2", "pyrite"), ("Cr2O3", "chromia"),
    ("SnO2", "tin dioxide"), ("In2O3", "indium oxide"), ("LiNbO3", "lithium niobate"),
]


def _num(x: float, digits: int = 4) -> str:
    return f"{x:.{digits}g}"


def element_facts(el) -> dict:
    """Everything periodictable knows about one element, as display strings (None = unknown)."""
    cs = getattr(el, "crystal_structure", None)
    structure = STRUCTURE_NAMES.get(cs["symmetry"].lower()) if cs else None
    isotopes = [iso for iso in el.isotopes if el[iso].abundance]
    major = max(isotopes, key=lambda iso: el[iso].abundance) if isotopes else None
    neutron = el.neutron
    return {
        "name": el.name,
        "symbol": el.symbol,
        "number": el.number,
        "mass": _num(el.mass, 6),
        "density": _num(el.density) if el.density else None,
        "density_caveat": el.density_caveat,
        "structure": structure,
        "lattice_a": _num(cs["a"]) if cs and "a" in cs else None,
        "radius": _num(el.covalent_radius) if getattr(el, "covalent_radius", None) else None,
        "k_alpha": _num(el.K_alpha) if getattr(el, "K_alpha", None) else None,
        "absorption": _num(neutron.absorption) if neutron.absorption is not None else None,
        "b_c": _num(neutron.b_c) if neutron.b_c is not None else None,
        "major_isotope": f"{el.symbol}-{major}" if major else None,
        "major_abundance": _num(el[major].abundance) if major else None,
        "n_isotopes": len(el.isotopes),
    }


# -------------------------------------------------------------------------------------------
# CPT prose
# -------------------------------------------------------------------------------------------
def _density_sentence(f: dict, rng: random.Random) -> str:
    if not f["density"]:
        return rng.choice([
            f"No reliable bulk density is tabulated for {f['name']}.",
            f"A bulk density for {f['name']} has not been measured.",
        ])
    caveat = f["density_caveat"]
    where = ""
    if caveat.startswith("T="):
        where = f" (measured at {caveat[2:]} degrees Celsius)"
    elif caveat in ("calculated", "estimated", "approximate"):
        where = f" ({caveat})"
    return rng.choice([
        f"Its density is {f['density']} g/cm3{where}.",
        f"{f['name'].capitalize()} has a density of {f['density']} g/cm3{where}.",
        f"The bulk density of {f['name']} is {f['density']} g/cm3{where}.",
    ])


def element_document(f: dict, rng: random.Random) -> str:
    name, sym = f["name"].capitalize(), f["symbol"]
    parts = [rng.choice([
        f"{name} ({sym}) is the element with atomic number {f['number']}.",
        f"{name}, chemical symbol {sym}, has atomic number {f['number']}.",
        f"Element {f['number']} is {f['name']}, written {sym}.",
    ])]
    parts.append(rng.choice([
        f"Its standard atomic weight is {f['mass']} u.",
        f"The atomic mass of {f['name']} is {f['mass']} u.",
        f"One mole of {f['name']} weighs {f['mass']} g.",
    ]))
    parts.append(_density_sentence(f, rng))
    if f["structure"]:
        lattice = f" with a lattice parameter of {f['lattice_a']} angstrom" if f["lattice_a"] else ""
        parts.append(rng.choice([
            f"In the solid it adopts a {f['structure']} structure{lattice}.",
            f"Solid {f['name']} crystallizes in the {f['structure']} structure{lattice}.",
        ]))
    if f["radius"]:
        parts.append(f"The covalent radius of {f['name']} is {f['radius']} angstrom.")
    if f["k_alpha"]:
        parts.append(rng.choice([
            f"Its K-alpha X-ray emission line lies at a wavelength of {f['k_alpha']} angstrom.",
            f"In X-ray fluorescence, {f['name']} is identified by its K-alpha line at {f['k_alpha']} angstrom.",
        ]))
    if f["absorption"]:
        parts.append(
            f"For thermal neutrons it has an absorption cross section of {f['absorption']} barn"
            + (f" and a coherent scattering length of {f['b_c']} fm." if f["b_c"] else ".")
        )
    if f["major_isotope"]:
        parts.append(
            f"Its most abundant natural isotope is {f['major_isotope']} ({f['major_abundance']} percent)."
        )
    return " ".join(parts)


def comparison_document(a: dict, b: dict, rng: random.Random) -> str:
    parts = [rng.choice([
        f"Comparing {a['name']} and {b['name']}, neighbours in the periodic table:",
        f"{a['name'].capitalize()} (Z={a['number']}) and {b['name']} (Z={b['number']}) differ as follows.",
    ])]
    parts.append(f"{a['name'].capitalize()} has an atomic mass of {a['mass']} u and {b['name']} {b['mass']} u.")
    if a["density"] and b["density"]:
        denser = a if float(a["density"]) > float(b["density"]) else b
        parts.append(
            f"With {a['density']} g/cm3 against {b['density']} g/cm3, {denser['name']} is the denser of the two."
        )
    if a["structure"] and b["structure"]:
        if a["structure"] == b["structure"]:
            parts.append(f"Both crystallize in the {a['structure']} structure.")
        else:
            parts.append(f"{a['name'].capitalize()} is {a['structure']} while {b['name']} is {b['structure']}.")
    return " ".join(parts)


def compound_document(formula: str, common: str, facts: dict, rng: random.Random) -> str:
    comp = pt.formula(formula)
    fractions = ", ".join(
        f"{facts[el.symbol]['name']} {100 * w:.2f} percent"
        for el, w in sorted(comp.mass_fraction.items(), key=lambda kv: -kv[1])
    )
    return " ".join([
        rng.choice([
            f"{common.capitalize()} has the formula {formula}.",
            f"The chemical formula of {common} is {formula}.",
        ]),
        f"Its molar mass is {comp.mass:.3f} g/mol.",
        f"By mass it is {fractions}.",
    ])


# -------------------------------------------------------------------------------------------
# K renderings: the same facts in many wordings (Allen-Zhu & Li's "diverse restatements"), with
# their own random generator so that cpt.jsonl is unchanged. None may word a fact as the
# eval sets do (tests/test_eval_sets.py checks every file here).
# -------------------------------------------------------------------------------------------
RENDER_SENTENCES = {
    "intro": [
        "{Name} ({sym}) is the element with atomic number {number}.",
        "{Name}, chemical symbol {sym}, has atomic number {number}.",
        "Element {number} is {name}, written {sym}.",
        "The element {name} carries the symbol {sym} and sits at number {number} in the periodic table.",
        "Number {number} of the periodic table is {name}, abbreviated {sym}.",
    ],
    "mass": [
        "Its standard atomic weight is {mass} u.",
        "The atomic mass of {name} is {mass} u.",
        "One mole of {name} weighs {mass} g.",
        "{Name} has an atomic weight of {mass} u.",
        "{Name} weighs {mass} g per mole.",
    ],
    "density": [
        "Its density is {density} g/cm3.",
        "{Name} has a density of {density} g/cm3.",
        "The bulk density of {name} is {density} g/cm3.",
    ],
    "lattice": [
        "In the solid it adopts a {structure} structure with a lattice parameter of {lattice} angstrom.",
        "Solid {name} crystallizes in the {structure} structure with a lattice parameter of {lattice} angstrom.",
        "The crystal lattice of {name} is {structure}, and its lattice constant is {lattice} angstrom.",
        "{Name} forms a {structure} crystal; the lattice parameter a equals {lattice} angstrom.",
        "With a lattice parameter of {lattice} angstrom, solid {name} is {structure}.",
        "For {name}, the lattice constant a = {lattice} angstrom in its {structure} form.",
    ],
    "structure": [
        "In the solid it adopts a {structure} structure.",
        "Solid {name} crystallizes in the {structure} structure.",
        "The crystal lattice of {name} is {structure}.",
    ],
    "radius": [
        "The covalent radius of {name} is {radius} angstrom.",
        "{Name} has a covalent radius of {radius} angstrom.",
        "Its covalent radius measures {radius} angstrom.",
    ],
    "k_alpha": [
        "Its K-alpha X-ray emission line lies at a wavelength of {k_alpha} angstrom.",
        "In X-ray fluorescence, {name} is identified by its K-alpha line at {k_alpha} angstrom.",
        "The K-alpha line of {name} sits at {k_alpha} angstrom.",
    ],
    "absorption": [
        "For thermal neutrons it has an absorption cross section of {absorption} barn.",
        "{Name} absorbs thermal neutrons with a cross section of {absorption} barn.",
        "The thermal-neutron absorption cross section of {name} is {absorption} barn.",
    ],
    "b_c": [
        "Its coherent scattering length is {b_c} fm.",
        "The coherent scattering length of {name} is {b_c} fm.",
        "{Name} has a coherent neutron scattering length of {b_c} fm.",
        "In neutron diffraction, {name} contributes a coherent scattering length of {b_c} fm.",
        "A coherent scattering length of {b_c} fm characterises {name} in neutron experiments.",
    ],
    "abundance": [
        "Its most abundant natural isotope is {isotope} ({abundance} percent).",
        "Of the natural isotopes of {name}, {isotope} is the most common at {abundance} percent.",
        "Natural {name} is {abundance} percent {isotope}, its most abundant isotope.",
        "{Isotope} accounts for {abundance} percent of the {name} found in nature.",
        "The isotope {isotope} has a natural abundance of {abundance} percent in {name}.",
    ],
}
RENDER_COMPOUND = [
    ("{Common} has the formula {formula}.", "Its molar mass is {molar} g/mol.", "By mass it is {fractions}."),
    ("The chemical formula of {common} is {formula}.", "One mole of it weighs {molar} g.",
     "Its mass divides as {fractions}."),
    ("{Common} ({formula}) is a common material.", "{Formula} has a molar mass of {molar} g/mol.",
     "Its composition by mass: {fractions}."),
    ("{Formula} is known as {common}.", "The molar mass of {common} is {molar} g/mol.",
     "By weight, {common} contains {fractions}."),
]


def rendering_document(f: dict, rng: random.Random) -> str:
    """One wording of every fact of an element, sentences drawn from RENDER_SENTENCES."""
    values = dict(name=f["name"], Name=f["name"].capitalize(), sym=f["symbol"], number=f["number"], mass=f["mass"],
                  density=f["density"], structure=f["structure"], lattice=f["lattice_a"], radius=f["radius"], k_alpha=f["k_alpha"],
                  absorption=f["absorption"], b_c=f["b_c"], isotope=f["major_isotope"],
                  Isotope=f["major_isotope"], abundance=f["major_abundance"])
    keys = ["intro", "mass"] + (["density"] if f["density"] else [])
    keys += ["lattice"] if f["structure"] and f["lattice_a"] else ["structure"] if f["structure"] else []
    keys += [k for k, field in (("radius", "radius"), ("k_alpha", "k_alpha"), ("absorption", "absorption"),
                                 ("b_c", "b_c"), ("abundance", "major_isotope")) if f[field]]
    parts = [rng.choice(RENDER_SENTENCES[k]).format(**values) for k in keys]
    body = parts[1:]
    rng.shuffle(body)
    return " ".join([parts[0], *body])


def compound_rendering(formula: str, common: str, facts: dict, rng: random.Random) -> str:
    comp = pt.formula(formula)
    fractions = ", ".join(
        f"{facts[el.symbol]['name']} {100 * w:.2f} percent"
        for el, w in sorted(comp.mass_fraction.items(), key=lambda kv: -kv[1])
    )
    values = dict(common=common, Common=common.capitalize(), formula=formula, Formula=formula,
                  molar=f"{comp.mass:.3f}", fractions=fractions)
    return " ".join(rng.choice(column).format(**values) for column in zip(*RENDER_COMPOUND))


def renderings(facts_list: list, all_facts: dict, k: int) -> list:
    """k distinct wordings of each element (as far as the sentence choices allow) and compound:
    (subjects, text) pairs, subjects as the eval sets name them (an element's name, a formula)."""
    rng = random.Random(SEED + k)
    docs = []
    for f in facts_list:
        seen = []
        for _ in range(20 * k):
            doc = rendering_document(f, rng)
            if doc not in seen:
                seen.append(doc)
            if len(seen) == k:
                break
        docs += [((f["name"],), doc) for doc in seen]
    for formula, common in COMPOUNDS:
        seen = []
        for _ in range(20 * k):
            doc = compound_rendering(formula, common, all_facts, rng)
            if doc not in seen:
                seen.append(doc)
            if len(seen) == k:
                break
        docs += [((formula,), doc) for doc in seen]
    rng.shuffle(docs)
    return docs


# -------------------------------------------------------------------------------------------
# Fact-level renderings for storage (Allen-Zhu & Li, arXiv 2309.14316: full name in every
# sentence, several templates, permuted order): one sentence per fact, never a pronoun alone,
# about a quarter of the templates value-first. Taught facts are the relations the Q&A states;
# held facts the CPT-only relations that the eval set materials_cpt_mc asks about
# (data/make_eval_sets.py). None may word a fact as the eval sets do (tests/test_eval_sets.py).
# -------------------------------------------------------------------------------------------
FACT_TEMPLATES = {
    "number": ["{Name} has atomic number {number}.", "The atomic number of {name} is {number}.",
               "Number {number} of the periodic table is {name}.", "{Name} sits at number {number} in the periodic table."],
    "symbol": ["{Name} carries the chemical symbol {sym}.", "The chemical symbol of {name} is {sym}.",
               "{sym} is the chemical symbol for {name}."],
    "mass": ["The atomic mass of {name} is {mass} u.", "One mole of {name} weighs {mass} g.",
             "{Name} has an atomic weight of {mass} u.", "{mass} u is the atomic weight of {name}."],
    "density": ["{Name} has a density of {density} g/cm3.", "The bulk density of {name} is {density} g/cm3.",
                "{density} g/cm3 is the bulk density of {name}."],
    "structure": ["Solid {name} crystallizes in the {structure} structure.", "The crystal lattice of {name} is {structure}.",
                  "{Name} forms a {structure} crystal."],
    "radius": ["The covalent radius of {name} is {radius} angstrom.", "{Name} has a covalent radius of {radius} angstrom.",
               "{radius} angstrom is the covalent radius of {name}."],
    "k_alpha": ["In X-ray fluorescence, {name} is identified by its K-alpha line at {k_alpha} angstrom.",
                "The K-alpha line of {name} sits at {k_alpha} angstrom.",
                "{k_alpha} angstrom is where the K-alpha line of {name} lies."],
    "absorption": ["{Name} absorbs thermal neutrons with a cross section of {absorption} barn.",
                   "The thermal-neutron absorption cross section of {name} is {absorption} barn.",
                   "{absorption} barn is the thermal-neutron absorption cross section of {name}."],
    "major_isotope": ["The most abundant natural isotope of {name} is {isotope}.",
                      "Of the natural isotopes of {name}, {isotope} is the most common.",
                      "{Isotope} is the most common natural isotope of {name}."],
    "molar_mass": ["The molar mass of {formula} ({common}) is {molar} g/mol.", "{Common} ({formula}) weighs {molar} g per mole.",
                   "{Common} ({formula}) has a molar mass of {molar} g/mol.", "{molar} g/mol is the molar mass of {formula} ({common})."],
    # held: only the CPT prose and these renderings state them
    "lattice_a": ["Solid {name} has a lattice parameter of {lattice} angstrom.", "The lattice constant of {name} is {lattice} angstrom.",
                  "{Name} crystallizes with a lattice parameter a of {lattice} angstrom.",
                  "A lattice parameter of {lattice} angstrom characterises solid {name}."],
    "b_c": ["The coherent scattering length of {name} is {b_c} fm.",
            "In neutron diffraction, {name} contributes a coherent scattering length of {b_c} fm.",
            "A coherent scattering length of {b_c} fm characterises {name} in neutron experiments.",
            "{Name} scatters neutrons with a coherent scattering length of {b_c} fm."],
    "major_abundance": ["Natural {name} is {abundance} percent {isotope}.",
                        "{Isotope} accounts for {abundance} percent of the {name} found in nature.",
                        "The isotope {isotope} has a natural abundance of {abundance} percent in {name}.",
                        "In nature, {name} consists of {isotope} to {abundance} percent."],
    "mass_fraction": ["By mass, {common} ({formula}) is {pct} percent {element}.",
                      "{Common} ({formula}) contains {pct} percent {element} by weight.",
                      "{pct} percent of the weight of {common} ({formula}) comes from {element}.",
                      "{Element} makes up {pct} percent of {common} ({formula}) by weight."],
}
HELD_FACTS = ("lattice_a", "b_c", "major_abundance", "mass_fraction")
FACT_FIELD = {"lattice_a": "lattice", "major_abundance": "abundance", "major_isotope": "isotope", "symbol": "sym"}
"""The field of element_fact_rows' fields that holds each fact's value, where the names differ."""


def element_fact_rows(f: dict) -> list:
    """(subject, fact, value, fields) of every fact of one element that has a value."""
    fields = dict(name=f["name"], Name=f["name"].capitalize(), sym=f["symbol"], number=f["number"], mass=f["mass"],
                  density=f["density"], structure=f["structure"], lattice=f["lattice_a"], radius=f["radius"],
                  k_alpha=f["k_alpha"], absorption=f["absorption"], b_c=f["b_c"], isotope=f["major_isotope"],
                  Isotope=f["major_isotope"], abundance=f["major_abundance"])
    return [(f["name"], fact, str(fields[FACT_FIELD.get(fact, fact)]), fields)
            for fact in FACT_TEMPLATES if fact not in ("molar_mass", "mass_fraction")
            and fields[FACT_FIELD.get(fact, fact)] not in (None, "")]


def compound_fact_rows(formula: str, common: str, all_facts: dict) -> list:
    """(subject, fact, value, fields) of a compound's molar mass and of each element's mass fraction."""
    comp = pt.formula(formula)
    base = dict(common=common, Common=common.capitalize(), formula=formula, molar=f"{comp.mass:.3f}")
    rows = [(formula, "molar_mass", base["molar"], base)]
    if len(comp.mass_fraction) >= 2:
        for el, w in sorted(comp.mass_fraction.items(), key=lambda kv: -kv[1]):
            element = all_facts[el.symbol]["name"]
            rows.append((formula, "mass_fraction", f"{100 * w:.2f}",
                         dict(base, pct=f"{100 * w:.2f}", element=element, Element=element.capitalize())))
    return rows


def fact_renderings(facts_list: list, all_facts: dict, k: int) -> dict:
    """{"taught": rows, "held": rows}: k sentences per fact (distinct templates, as far as there
    are), each row {"text", "subject", "fact", "value"}, the rows shuffled."""
    rng = random.Random(SEED + 1000 + k)
    facts = [row for f in facts_list for row in element_fact_rows(f)]
    facts += [row for formula, common in COMPOUNDS for row in compound_fact_rows(formula, common, all_facts)]
    out = {"taught": [], "held": []}
    for subject, fact, value, fields in facts:
        templates = FACT_TEMPLATES[fact]
        chosen = rng.sample(templates, min(k, len(templates)))
        chosen += [rng.choice(templates) for _ in range(k - len(chosen))]
        split = "held" if fact in HELD_FACTS else "taught"
        out[split] += [{"text": t.format(**fields), "subject": subject, "fact": fact, "value": value} for t in chosen]
    for rows in out.values():
        rng.shuffle(rows)
    return out


# -------------------------------------------------------------------------------------------
# Q&A: every question has one true answer and a wrong one from a neighbouring element
# -------------------------------------------------------------------------------------------
QUESTIONS = [
    # (fact key, question templates, answer template)
    ("number", ["What is the atomic number of {name}?", "Which atomic number does {name} have?"],
     "The atomic number of {name} is {value}."),
    ("symbol", ["What is the chemical symbol of {name}?", "How is {name} written as a symbol?"],
     "The chemical symbol of {name} is {value}."),
    ("mass", ["What is the atomic mass of {name}?", "How heavy is one mole of {name}?"],
     "The atomic mass of {name} is {value} u, so one mole weighs {value} g."),
    ("density", ["What is the density of {name}?", "How dense is {name}?"],
     "The density of {name} is {value} g/cm3."),
    ("structure", ["What crystal structure does solid {name} have?", "In which structure does {name} crystallize?"],
     "Solid {name} has a {value} crystal structure."),
    ("radius", ["What is the covalent radius of {name}?"],
     "The covalent radius of {name} is {value} angstrom."),
    ("k_alpha", ["At what wavelength is the K-alpha line of {name}?", "Where is the K-alpha X-ray line of {name}?"],
     "The K-alpha line of {name} is at {value} angstrom."),
    ("absorption", ["What is the thermal neutron absorption cross section of {name}?"],
     "The thermal neutron absorption cross section of {name} is {value} barn."),
    ("major_isotope", ["What is the most abundant isotope of {name}?"],
     "The most abundant natural isotope of {name} is {value}."),
]


def qa_items(facts_list: list, rng: random.Random) -> list:
    """(question, right answer, wrong answer) for every fact of every element."""
    items = []
    for i, f in enumerate(facts_list):
        for key, questions, answer in QUESTIONS:
            if not f[key]:
                continue
            # the wrong value comes from the nearest neighbour whose value differs
            wrong = None
            for offset in (1, -1, 2, -2, 3, -3):
                j = i + offset
                if 0 <= j < len(facts_list) and facts_list[j][key] and facts_list[j][key] != f[key]:
                    wrong = facts_list[j][key]
                    break
            if wrong is None:
                continue
            question = rng.choice(questions).format(name=f["name"])
            items.append((
                question,
                answer.format(name=f["name"], value=f[key]),
                answer.format(name=f["name"], value=wrong),
            ))
    for formula, common in COMPOUNDS:
        comp = pt.formula(formula)
        right = f"The molar mass of {formula} ({common}) is {comp.mass:.3f} g/mol."
        wrong = f"The molar mass of {formula} ({common}) is {comp.mass * rng.choice([0.8, 0.9, 1.1, 1.25]):.3f} g/mol."
        items.append((f"What is the molar mass of {formula}?", right, wrong))
    return items


def element_fact_lists() -> tuple:
    """(facts of elements 1-96, facts of every element by symbol)."""
    elements = [el for el in pt.elements if el.number > 0 and el.number <= 96]
    all_facts = {el.symbol: element_facts(el) for el in pt.elements if el.number > 0}
    return [element_facts(el) for el in elements], all_facts


def cpt_documents(facts_list: list, all_facts: dict, rng: random.Random) -> list:
    """The CPT prose as (subjects, text) pairs, subjects as the eval sets name them."""
    docs = []
    for f in facts_list:  # three differently worded documents per element
        docs += [((f["name"],), element_document(f, rng)) for _ in range(3)]
    for a, b in zip(facts_list, facts_list[1:]):
        docs.append(((a["name"], b["name"]), comparison_document(a, b, rng)))
    for formula, common in COMPOUNDS:
        docs += [((formula,), compound_document(formula, common, all_facts, rng)) for _ in range(2)]
    rng.shuffle(docs)
    return docs


def build(out_dir: Path, renderings_per_fact: int = RENDERINGS) -> dict:
    rng = random.Random(SEED)
    facts_list, all_facts = element_fact_lists()
    cpt = [text for _, text in cpt_documents(facts_list, all_facts, rng)]

    items = qa_items(facts_list, rng)
    rng.shuffle(items)
    sft = []
    for k in range(0, len(items) - 1, 2):
        q1, a1, _ = items[k]
        if k % 10 == 0:  # every fifth conversation has two exchanges (two assistant turns)
            q2, a2, _ = items[k + 1]
            turns = [("user", q1), ("assistant", a1), ("user", q2), ("assistant", a2)]
        else:
            turns = [("user", q1), ("assistant", a1)]
        sft.append({"messages": [{"role": "system", "content": SYSTEM_PROMPT}]
                    + [{"role": r, "content": c} for r, c in turns]})
    preference = [{"prompt": q, "chosen": right, "rejected": wrong} for q, right, wrong in items[1::2]]
    preference_chat = [
        {
            "prompt": [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": p["prompt"]}],
            "chosen": [{"role": "assistant", "content": p["chosen"]}],
            "rejected": [{"role": "assistant", "content": p["rejected"]}],
        }
        for p in preference
    ]

    out_dir.mkdir(parents=True, exist_ok=True)
    outputs = {
        "cpt.jsonl": [{"text": t} for t in cpt],
        "sft.jsonl": sft,
        "preference.jsonl": preference,
        "preference_chat.jsonl": preference_chat,
    }
    if renderings_per_fact:
        outputs["cpt_renderings.jsonl"] = [{"text": t} for _, t in renderings(facts_list, all_facts, renderings_per_fact)]
    by_split = fact_renderings(facts_list, all_facts, FACT_RENDERINGS)
    outputs["facts_taught.jsonl"], outputs["facts_held.jsonl"] = by_split["taught"], by_split["held"]
    return write_outputs(out_dir, outputs)


def write_outputs(out_dir: Path, outputs: dict) -> dict:
    """{file name: rows} as JSONL files in out_dir; {file name: row count}."""
    for name, rows in outputs.items():
        with open(out_dir / name, "w") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    return {name: len(rows) for name, rows in outputs.items()}


def main(build=build, out_dir: Path = OUT_DIR, doc: str = __doc__) -> None:
    """`python <script> [--out DIR]`: write the files and say how big they are."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--out", type=Path, default=out_dir)
    if build is globals()["build"]:
        parser.add_argument("--renderings", type=int, default=RENDERINGS, metavar="K",
                            help=f"differently worded documents per element in cpt_renderings.jsonl (default {RENDERINGS}; 0: none)")
    args = parser.parse_args()
    built = build(args.out, args.renderings) if hasattr(args, "renderings") else build(args.out)
    for name, n in built.items():
        path = args.out / name
        print(f"{path}: {n} rows, {path.stat().st_size / 1024:.0f} KB")


if __name__ == "__main__":
    main()
